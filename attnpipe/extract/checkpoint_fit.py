"""Does a raw state dict fit a base model? Checked by the workflow before any job starts (a
`state_dict` checkpoint in the config) and by `scripts/make_checkpoint.py state-dict`.

A state dict fits when it has the base's parameter names (up to one common leading prefix such as
``bert.``, and ignoring the ``position_ids`` buffer) with the base's shapes. Shapes of a
``.safetensors`` file are read from its header, without loading any tensor; a ``.pt``/``.pth``/
``.bin`` file is read with the library's one state-dict reader,
`attnpipe.extract.loading.read_state_dict` (``torch.load(weights_only=True, mmap=True)`` only).

    problems = state_dict_problems(Path("run/step_500.safetensors"), default_model_dir())
    # [] when it fits, else one line per problem
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from attnpipe.errors import AttnpipeError
from attnpipe.extract.loading import read_state_dict
from attnpipe.extract.model_files import loadable_problems

IGNORED = ("position_ids",)  # a buffer some checkpoints save and others do not
MAX_HEADER_BYTES = 100_000_000  # a larger safetensors header length means the file is not one

Shapes = dict[str, tuple[int, ...]]


def safetensors_shapes(path: Path) -> Shapes:
    """Parameter name -> shape, from a .safetensors header (8-byte little-endian length + JSON)."""
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) != 8:
            raise AttnpipeError(f"{path} is not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES:
            raise AttnpipeError(f"{path} is not a safetensors file (header length {n})")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise AttnpipeError(f"{path} is not a safetensors file ({exc})") from None
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def file_shapes(path: Path) -> Shapes:
    """Parameter name -> shape of one weight file."""
    if path.suffix == ".safetensors":
        return safetensors_shapes(path)
    if path.suffix in (".pt", ".pth", ".bin"):
        try:
            tensors = read_state_dict(path, "state dict", mmap=True)
        except AttnpipeError as exc:  # refused pickled code, or not a state dict: say which loader
            raise AttnpipeError(f"{path} cannot be loaded with torch.load(weights_only=True): {exc}") from None
        return {k: tuple(v.shape) for k, v in tensors.items()}
    raise AttnpipeError(f"{path}: a state dict must be .safetensors or .pt/.pth/.bin")


def folder_shapes(folder: Path) -> Shapes:
    """Parameter shapes of a transformers model folder's weight files."""
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise AttnpipeError(f"{folder} has no weight files")
    shapes: Shapes = {}
    for f in files:
        shapes.update(file_shapes(f))
    return shapes


def _strip(names, prefix: str) -> dict[str, str]:
    return {n[len(prefix):] if prefix and n.startswith(prefix) else n: n for n in names}


def align(sd: dict, base: dict) -> tuple[dict[str, str], list[str], list[str], str]:
    """Match a state dict's names to a base's, allowing one leading prefix on either side (e.g.
    'bert.'): (base name -> state-dict name, base names missing, state-dict names left over, prefix)."""
    sd_names = {n for n in sd if not n.endswith(IGNORED)}
    base_names = {n for n in base if not n.endswith(IGNORED)}
    candidates = {""} | {n.split(".", 1)[0] + "." for n in sd_names | base_names if "." in n}
    best, best_prefix = None, ""
    for prefix in sorted(candidates):
        for sd_map, base_map in ((_strip(sd_names, prefix), {n: n for n in base_names}),
                                 ({n: n for n in sd_names}, _strip(base_names, prefix))):
            common = set(sd_map) & set(base_map)
            if best is None or len(common) > len(best[0]):
                best, best_prefix = (common, sd_map, base_map), prefix
    common, sd_map, base_map = best
    missing = sorted(base_map[k] for k in set(base_map) - common)
    unexpected = sorted(sd_map[k] for k in set(sd_map) - common)
    return {base_map[k]: sd_map[k] for k in common}, missing, unexpected, best_prefix


def state_dict_problems(state_dict: Path, base: Path) -> list[str]:
    """Why `state_dict` does not fit the model folder `base` (empty list: it fits)."""
    sd = file_shapes(state_dict)
    ref = folder_shapes(base)
    pairs, missing, unexpected, _ = align(sd, ref)
    problems = []
    if missing:
        problems.append(f"{len(missing)} parameter(s) of the base missing, e.g. {missing[:3]}")
    if unexpected:
        problems.append(f"{len(unexpected)} parameter(s) the base does not have, e.g. {unexpected[:3]}")
    bad = [(b, s) for b, s in sorted(pairs.items()) if tuple(ref[b]) != tuple(sd[s])]
    for b, s in bad[:3]:
        problems.append(f"{s} has shape {list(sd[s])}, the base's {b} has {list(ref[b])}")
    if len(bad) > 3:
        problems.append(f"... {len(bad) - 3} more shape mismatches")
    return problems


# Files a transformers tokenizer is read from; a text model's folder needs one of them.
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "tokenizer.model",
                   "sentencepiece.bpe.model", "source.spm")


def folder_problems(folder: Path) -> list[str]:
    """Why a transformers model folder's weights do not fit its own config.json (empty: they fit).

    The workflow's check before any job starts, for `hf` and `run` checkpoints, with the loader's
    rules (attnpipe.extract.loading.weight_fit_problems): every parameter found (the base model's
    prefix such as `bert.` allowed, a pooler or computed parameters excepted), no weights inside
    the architecture's own modules that it does not have, the same shapes; a text model also needs
    a tokenizer file. Fast path: the architecture is built on torch's "meta" device (no memory)
    and compared with the weight files' headers. transformers renames some checkpoints' keys as it
    loads them (ViT's encoder.layer.N -> layers.N), so a folder the headers do not match is then
    loaded for real on the CPU, and transformers' own account of what it found is what counts.
    """
    import torch
    import transformers

    from attnpipe.extract.loading import check_weights_fit, weight_fit_problems

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from attnpipe.extract.loading import read_model_config

    problems = loadable_problems(folder, read_model_config(folder))  # what would be transformers' traceback below
    if problems:
        return problems
    try:
        config = transformers.AutoConfig.from_pretrained(folder)
        with torch.device("meta"):
            model = transformers.AutoModel.from_config(config)
    except (OSError, ValueError, KeyError, TypeError, ImportError) as exc:
        return [f"transformers cannot build the model config.json describes: {_first(exc)}"]
    problems = _header_problems(folder, model, weight_fit_problems)
    if problems:
        try:
            real, info = transformers.AutoModel.from_pretrained(
                folder, output_loading_info=True, ignore_mismatched_sizes=True, dtype=torch.float32)
            check_weights_fit(folder, real, info)
            problems = []
        except AttnpipeError as exc:
            return [str(exc).split(": the weights do not fit config.json: ", 1)[-1]]
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
            return [f"transformers cannot load it: {_first(exc)}"]
    text_model = getattr(config, "model_type", None) not in IMAGE_MODEL_TYPES
    if text_model and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        problems.append(f"no tokenizer file ({', '.join(TOKENIZER_FILES)}): every word would be unknown")
    return problems


IMAGE_MODEL_TYPES = ("vit", "deit", "beit", "dinov2", "swin")  # models that need an image processor, not a tokenizer


def _first(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _header_problems(folder: Path, model, weight_fit_problems) -> list[str]:
    """weight_fit_problems of the weight files' header names and shapes against a meta model."""
    weights = folder_shapes(folder)
    prefix = (getattr(model, "base_model_prefix", "") or "") + "."
    if prefix != "." and any(n.startswith(prefix) for n in weights):  # saved from a task class
        weights = {n[len(prefix):] if n.startswith(prefix) else n: s for n, s in weights.items()}
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    aliases: dict[int, list[str]] = {}  # one entry per parameter, with every name a tie gives it
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
    missing = [names[0] for names in aliases.values() if not any(n in weights for n in names)]
    unexpected = [n for n in weights if n not in shapes and not n.endswith(IGNORED)]
    mismatched = [(n, weights[n], shapes[n]) for n in weights if n in shapes and tuple(weights[n]) != shapes[n]]
    return weight_fit_problems(model, missing, unexpected, mismatched)
