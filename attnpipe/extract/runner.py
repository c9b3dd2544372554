"""The extraction stage: one loop for every input kind -> an attention file.

An input adapter (texts: inputs.py, source/target pairs: pairs.py, images: images.py,
embeddings: embeddings.py) turns the inputs into items with padded widths; the loop sorts them
by width into batches under a token and an attention budget (so little padding is computed),
runs the family forward (attnpipe.models; `--method hf` is one more family) under
torch.inference_mode, and hands each kept layer of each kind (self, decoder, cross), as soon as
it is computed (`on_layer`), to the guards and then the sink (sinks.py): streamed to one writer
thread that compresses and writes it while the next layer and batch run, or per-head metrics
(--metrics-only), or kept for the batch (JSON, pairs, --explain). With `verify`, every batch
also runs through transformers' eager attention (verify.py) and the largest difference is
recorded in the file (and fails the run above the tolerance); verify keeps a batch's layers in
memory to compare them. With `explain`, texts run one at a time with gradients
(attnpipe.extract.gradients) through the same guards, sink and writer. With `generation`, the
model first writes the text (generate.py: a causal LM's continuation, an encoder-decoder's
target) and the loop then runs on the generated tokens like on any others. Every path records
one provenance (`run_provenance`).
"""

from __future__ import annotations

import contextlib
import functools
import platform
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from attnpipe import store
from attnpipe.errors import AttnpipeError
from attnpipe.extract import guards
from attnpipe.extract.attribution import DEFAULT_IG_METHOD, DEFAULT_IG_STEPS
from attnpipe.extract.background import BackgroundWriter, is_heavy, usable_cpus, writer_plan
from attnpipe.extract.batching import (DEFAULT_BATCH_ATTENTION_MB, DEFAULT_BATCH_SIZE, DEFAULT_MAX_TOKENS_PER_BATCH,
                                       batches)
from attnpipe.extract.corpus import Text
from attnpipe.extract.generate import GenerationSettings
from attnpipe.extract.inputs import Batch, TextInputs
from attnpipe.extract.loading import default_model_dir, load_model, resolve_device
from attnpipe.extract.sinks import Selection, Sink
from attnpipe.extract.verify import reference_diffs
from attnpipe.models import FAMILIES
from attnpipe.models.parts import layer_matrix_values
from attnpipe.version import __version__

# Probabilities are float32 sums of n terms: 1e-5 bounds the float32 rounding we have measured
# against transformers' eager attention (~1e-7 on MiniLM), with room for long inputs.
DEFAULT_VERIFY_TOL = 1e-5
# Pending arrays the writer thread may fall behind by before the forward pass waits for it: a
# few batches' worth. More buys no speed (a writer slower than the model sets the pace anyway)
# and is memory that a long run fills (bench: 256 MiB made RSS at 5,000 texts 1.8x that at 500).
DEFAULT_WRITER_QUEUE_BYTES = 32 << 20
# How messages and the pairs' --verify name each kind of an encoder-decoder.
PAIR_KIND_NAMES = {"self": "encoder", "decoder": "decoder", "cross": "cross"}


@dataclass(frozen=True)
class ExtractConfig:
    texts: tuple[Text, ...] = ()
    output: Path | None = Path("attention_data.json")  # None: kept in memory (attnpipe.extract)
    model_dir: Path | None = None  # None: the packaged all-MiniLM-L6-v2
    layers: tuple[str, ...] = ("all",)
    heads: tuple[str, ...] = ("all",)
    device: str = "cpu"
    batch_size: int = DEFAULT_BATCH_SIZE
    max_length: int | None = None  # None: what the model can take
    dtype: store.StorageDtype = "float32"
    verify: bool = False
    verify_tol: float = DEFAULT_VERIFY_TOL
    trust_remote_code: bool = False
    progress: bool | None = None  # None: a bar only on a terminal
    pairs: tuple = ()  # corpus Pair: source/target pairs for encoder-decoder models
    method: str = "manual"  # "manual": our forward pass; "hf": transformers' eager output (models/hf.py)
    max_tokens_per_batch: int = DEFAULT_MAX_TOKENS_PER_BATCH  # padded tokens per batch; batch_size caps texts
    batch_attention_mb: float = DEFAULT_BATCH_ATTENTION_MB  # one layer's float32 attention per batch, MiB
    threads: int | None = None  # torch intra-op threads; None: torch's default (all cores)
    compression: store.Compression = "gzip"
    compression_level: int | None = None  # gzip 0-12; None: store.DEFAULT_GZIP_LEVELS[dtype]
    rows: store.RowSelection = "all"  # query rows stored: all, cls (position 0) or last
    metrics_only: bool = False  # store attnpipe.analyze.metrics per head instead of the matrices
    metrics: tuple[str, ...] | None = None  # with metrics_only: names; None = all of metrics.METRICS
    stream_layers: bool = True  # hand each layer to the writer as it is computed (False: per batch)
    writer_queue_bytes: int = DEFAULT_WRITER_QUEUE_BYTES
    images: tuple[Path, ...] = ()  # image files for a ViT --model_dir
    torch_model: str | None = None  # "package.module:build" or "file.py:build" (runs the user's code)
    weights: Path | None = None  # state dict for torch_model
    data: Path | None = None  # (batch, seq, dim) embeddings .npy for torch_model
    mask_zero_rows: bool = False  # torch_model: trailing all-zero rows of data are padding
    causal: bool = False  # torch_model: a causal mask in its encoder
    explain: str | None = None  # --explain target: gradients stored beside the attention
    ablate: bool = False  # with explain: head ablations too
    # Generation first (attnpipe/extract/generate.py): causal LMs continue each text (settings kind
    # "continuation", --generate N); encoder-decoders write the target of pairs given without one.
    generation: GenerationSettings | None = None
    schema_version: int = store.H5_SCHEMA_VERSION  # HDF5 layout: 3 (packed, the default) or 2 (a group per text)
    attribution: str | None = None  # with explain: "ig", attention attribution (extract/attribution.py)
    ig_steps: int = DEFAULT_IG_STEPS  # with attribution: quadrature steps M
    ig_method: str = DEFAULT_IG_METHOD  # with attribution: gausslegendre | riemann_right | riemann_middle
    skipped_empty: tuple[int, ...] = ()  # lines of the texts file's empty texts skipped (--skip-empty)

    @property
    def input_kind(self) -> str:
        """texts | pairs | images | embeddings, from what the config holds."""
        given = [kind for kind, on in (("texts", self.texts), ("pairs", self.pairs), ("images", self.images),
                                       ("embeddings", self.torch_model is not None)) if on]
        if len(given) > 1:
            raise AttnpipeError(f"give one kind of input, got {' and '.join(given)}")
        return given[0] if given else "texts"


@dataclass(frozen=True)
class ExtractResult:
    output: Path
    num_texts: int
    num_tokens: int
    layers: tuple[int, ...]
    heads: tuple[int, ...]
    truncated_ids: tuple[str, ...]
    max_length: int
    parity_max_abs_diff: float | None
    parity_hidden_max_abs_diff: float | None
    decoder_layers: tuple[int, ...] | None = None  # encoder-decoder models: stored decoder layers
    decoder_heads: tuple[int, ...] | None = None
    input_kind: str = "texts"
    generation: dict | None = None  # generated text: the settings (store.Provenance.generation)
    generated_tokens: int = 0  # tokens the model generated, over all inputs
    memory: store.MemoryStore | None = None  # output None: the texts, read like an open file


def parse_indices(values: tuple[str, ...], count: int, flag: str, noun: str) -> tuple[int, ...]:
    """`all`, or indices (comma-separated or repeated; negative counts from the end) -> sorted."""
    items = [part.strip() for value in values for part in str(value).split(",") if part.strip()]
    if not items or items == ["all"]:
        return tuple(range(count))
    chosen = set()
    for item in items:
        try:
            index = int(item)
        except ValueError as err:
            raise AttnpipeError(f"{flag} takes 'all' or integers, got {item!r}") from err
        if not -count <= index < count:
            raise AttnpipeError(
                f"{flag} {index} is out of range: model has {count} {noun} "
                f"(0 to {count - 1}, or -{count} to -1 from the end)"
            )
        chosen.add(index % count)
    return tuple(sorted(chosen))


def library_versions() -> dict[str, str]:
    import importlib.metadata

    import h5py

    # A run through the direct loader never imports transformers (~2 s): its installed version
    # is the package's metadata, which is what transformers.__version__ says.
    loaded = sys.modules.get("transformers")
    transformers_version = loaded.__version__ if loaded is not None else importlib.metadata.version("transformers")
    return {
        "attnpipe": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers_version,
        "numpy": np.__version__,
        "h5py": h5py.__version__,
    }


def run_provenance(*, dtype: str, verify: bool = False, parity: float = 0.0, hidden_parity: float = 0.0,
                   method: str = "manual", **fields) -> store.Provenance:
    """The provenance every extraction writes: `fields` name the model and what was stored;
    the rest is the run's (storage dtype, float32 computation, library versions, and the largest
    --verify differences, recorded only when --verify ran)."""
    return store.Provenance(
        dtype=dtype,
        compute_dtype="float32",
        method=method,
        library_versions=library_versions(),
        parity_max_abs_diff=parity if verify else None,
        parity_hidden_max_abs_diff=hidden_parity if verify else None,
        **fields,
    )


def check_config(config: ExtractConfig) -> store.Storage:
    """Everything that can be refused before a model is loaded; the run's storage options."""
    if config.output is not None:
        store.check_output_path(config.output)
    kind = config.input_kind
    noun = {"texts": "text", "pairs": "pair", "images": "image", "embeddings": "sample"}[kind]
    if kind == "texts" and not config.texts:
        raise AttnpipeError("no texts given: use --text or --texts-file")
    if config.output is None:  # in memory: the float32 matrices of every row, as a .json file holds them
        for what, bad in (("dtype", config.dtype != "float32"), ("rows", config.rows != "all"),
                          ("metrics_only", config.metrics_only)):
            if bad:
                raise AttnpipeError(f"{what} is a storage option of .h5 files; in memory the attention "
                                    "is float32, every row: give an output file for it")
    elif config.output.suffix == ".json":
        count = {"texts": len(config.texts), "pairs": len(config.pairs), "images": len(config.images)}.get(kind, 1)
        if count > 1:
            raise AttnpipeError(f"a .json output holds one {noun}, got {count}: write .h5 for several {noun}s")
        for flag, bad in (("--dtype uint8", config.dtype == "uint8"), ("--rows", config.rows != "all"),
                          ("--metrics-only", config.metrics_only)):
            if bad:
                raise AttnpipeError(f"{flag} is for .h5 output; a .json file holds whole float matrices")
    if config.batch_size < 1:
        raise AttnpipeError(f"--batch-size must be at least 1, got {config.batch_size}")
    if config.method not in ("manual", "hf"):
        raise AttnpipeError(f"--method must be manual or hf, got {config.method!r}")
    if config.method == "hf" and config.verify:
        raise AttnpipeError("--verify compares our forward pass with transformers; with --method hf "
                            "the attention already comes from transformers")
    if config.method == "hf" and kind != "texts":
        raise AttnpipeError(f"--method hf takes texts; {kind} run through attnpipe's own pass")
    if kind == "embeddings":
        if config.model_dir is not None:
            raise AttnpipeError("--torch-model replaces --model_dir and --method")
        if config.data is None:
            raise AttnpipeError("--torch-model needs --data embeddings.npy of shape (batch, seq, dim)")
        if config.verify:
            raise AttnpipeError("--verify compares with transformers; a --torch-model has no transformers "
                                "reference (tests/test_parity_vit_torch.py checks the torch pass)")
    elif config.weights is not None or config.data is not None or config.mask_zero_rows or config.causal:
        raise AttnpipeError("--weights, --data, --mask-zero-rows and --causal go with --torch-model")
    if kind == "images" and config.model_dir is None:
        raise AttnpipeError("--image needs --model_dir: a ViT folder (config.json, weights, preprocessor_config.json)")
    if kind == "pairs":
        if config.rows != "all":
            raise AttnpipeError(f"--rows {config.rows} keeps one query row of each matrix; encoder-decoder pairs "
                                "also store decoder and cross-attention, whose rows are target tokens with no "
                                "[CLS] or last row of the source to keep: use --rows all for pairs")
        if config.metrics_only:
            raise AttnpipeError("--metrics-only stores one (text, layer, head) metrics table; encoder-decoder "
                                "pairs have three attentions (encoder, decoder, cross) per text: store the "
                                "matrices and run analyze_attention.py metrics on them")
    check_generation(config, kind)
    if config.ablate and config.explain is None:
        raise AttnpipeError("--ablate needs --explain")
    if config.attribution is not None:
        from attnpipe.extract.attribution import check_request

        check_request(config.explain, config.attribution, config.ig_steps, config.ig_method)
    if config.explain is not None:
        if config.method != "manual":
            raise AttnpipeError("--explain differentiates attnpipe's own pass; --method hf reads "
                                "transformers' attention, which has no head gates")
        for flag, bad in (("--rows", config.rows != "all"), ("--metrics-only", config.metrics_only)):
            if bad:
                raise AttnpipeError(f"{flag} with --explain: the gradients (attention_grad, layer x head x "
                                    "query x key) are stored beside whole attention matrices")
    if config.max_tokens_per_batch < 1:
        raise AttnpipeError(f"--max-tokens-per-batch must be at least 1, got {config.max_tokens_per_batch}")
    if not config.batch_attention_mb > 0:  # also refuses NaN
        raise AttnpipeError(f"--batch-attention-mb must be above 0, got {config.batch_attention_mb}")
    if config.batch_attention_mb == float("inf"):  # int() of it raised OverflowError
        raise AttnpipeError("--batch-attention-mb must be a finite number, got inf")
    if not config.verify_tol < float("inf"):  # NaN or inf would let every --verify difference pass
        raise AttnpipeError(f"--verify-tol must be a finite number, got {config.verify_tol}")
    if config.threads is not None and config.threads < 1:
        raise AttnpipeError(f"--threads must be at least 1, got {config.threads}")
    if config.metrics is not None:
        from attnpipe.analyze.metrics import check_metric_names

        check_metric_names(config.metrics)
    return store.Storage(dtype=config.dtype, compression=config.compression,
                         compression_level=config.compression_level, rows=config.rows,
                         metrics_only=config.metrics_only, schema_version=config.schema_version)


def check_generation(config: ExtractConfig, kind: str) -> None:
    """Generation fits the inputs: --generate N continues texts, pairs without targets get them
    generated, and a pair with a target is never generated over."""
    settings = config.generation
    untargeted = [p.id for p in config.pairs if p.target is None]
    if kind == "pairs":
        if untargeted and len(untargeted) < len(config.pairs):
            raise AttnpipeError(f"pairs {untargeted[:5]} have no target while others have one: give every "
                                "pair a target, or none (the model then generates them)")
        if untargeted and (settings is None or settings.kind != "target"):
            raise AttnpipeError("pairs without a target need generation settings (kind 'target')")
        if not untargeted and settings is not None:
            raise AttnpipeError("the pairs have targets: generation writes a target only for a source given "
                                "without one")
    elif settings is not None and (kind != "texts" or settings.kind != "continuation"):
        raise AttnpipeError(f"--generate continues texts with a causal language model; {kind} are not generated")
    if settings is None:
        return
    if config.method != "manual":
        raise AttnpipeError("--generate and generated targets run attnpipe's own pass; --method hf does not generate")


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def open_run(config: ExtractConfig, device: torch.device):
    """Load the model for the config's input kind and its input adapter: (model, inputs)."""
    kind = config.input_kind
    if kind == "embeddings":
        from attnpipe.extract.embeddings import EmbeddingInputs, load_torch_model

        model = load_torch_model(config.torch_model, config.weights, device, config.causal)
        inputs = EmbeddingInputs(config.data, model, config.mask_zero_rows)
        if config.output is not None and config.output.suffix == ".json" and len(inputs.ids) > 1:
            raise AttnpipeError(f"a .json output holds one sample, {config.data} has {len(inputs.ids)}: write .h5")
        return model, inputs
    if kind == "images":
        from attnpipe.extract.images import ImageInputs, image_ids

        image_ids(list(config.images))  # a repeated image fails before the model loads
        model = load_model(config.model_dir, device, config.trust_remote_code, input_kind="image")
        return model, ImageInputs(list(config.images), model)
    model_dir = config.model_dir if config.model_dir is not None else default_model_dir()
    # Only --verify, --explain (gradients) and pairs / generation use the transformers model itself;
    # any other run may load a clean BERT-like checkpoint without it (loading._load_direct).
    reference = config.verify or config.explain is not None or kind == "pairs" or config.generation is not None
    model = load_model(model_dir, device, config.trust_remote_code, method=config.method, input_kind="text",
                       reference=reference)
    seq2seq = "cross" in model.family.KINDS
    if kind == "pairs":
        from attnpipe.extract.pairs import PairInputs

        if not seq2seq:
            pair_types = sorted(t for t, f in FAMILIES.items() if "cross" in f.KINDS)
            raise AttnpipeError(
                f"{model_dir} is a {model.model_type!r} model, not an encoder-decoder: source/target pairs "
                f"need one of {', '.join(pair_types)}; give --text for this model"
                + (" (with --generate N to continue it)" if model.family.CAUSAL else "")
            )
        labels = generation = None
        if config.generation is not None:  # sources without targets: the model writes them
            from attnpipe.extract.generate import generate_targets
            from attnpipe.extract.pairs import seq2seq_max_length

            labels, generation = generate_targets(model, [p.source for p in config.pairs], config.generation,
                                                  seq2seq_max_length(model, config.max_length))
        return model, PairInputs(list(config.pairs), model, config.max_length, generated_labels=labels,
                                 generation=generation)
    if seq2seq and config.generation is not None:
        raise AttnpipeError(
            f"{model_dir} is an encoder-decoder ({model.model_type}) model: it generates the target of each "
            "--source given without --target (length: --max-new-tokens N); --generate N continues texts "
            "with a causal language model"
        )
    if seq2seq:
        raise AttnpipeError(
            f"{model_dir} is an encoder-decoder ({model.model_type}) model: give --source and --target "
            "(or a .jsonl file with source and target fields) instead of texts"
        )
    if config.generation is not None:
        from attnpipe.extract.generate import ContinuationInputs

        if not model.family.CAUSAL:
            causal_types = sorted(t for t, f in FAMILIES.items() if f.CAUSAL and "cross" not in f.KINDS)
            raise AttnpipeError(
                f"--generate continues texts with a causal language model ({', '.join(causal_types)}); "
                f"{model_dir} is a {model.model_type!r} model, an encoder that does not generate"
            )
        return model, ContinuationInputs(list(config.texts), model, config.max_length, config.generation)
    return model, TextInputs(list(config.texts), model, config.max_length)


def selections(config: ExtractConfig, model) -> dict[str, Selection]:
    """The stored layers and heads of each attention kind the family has."""
    weights = model.weights
    if "cross" not in model.family.KINDS:
        return {"self": Selection(parse_indices(config.layers, weights.num_layers, "--layer", "layers"),
                                  parse_indices(config.heads, weights.num_heads, "--heads", "heads"),
                                  weights.num_heads)}
    encoder = Selection(parse_indices(config.layers, weights.num_layers, "--layer", "encoder layers"),
                        parse_indices(config.heads, weights.num_heads, "--heads", "encoder heads"),
                        weights.num_heads)
    decoder = Selection(parse_indices(config.layers, weights.decoder_num_layers, "--layer", "decoder layers"),
                        parse_indices(config.heads, weights.decoder_num_heads, "--heads", "decoder heads"),
                        weights.decoder_num_heads)
    return {"self": encoder, "decoder": decoder, "cross": decoder}


def is_causal(model) -> bool:
    """Whether the model's (self-)attention is causal: its family's trait, or the run's --causal."""
    return bool(model.family.CAUSAL or getattr(model.weights, "causal", False))


def extract(config: ExtractConfig) -> ExtractResult:
    """Run the whole extraction stage and write `config.output`; return what was done."""
    storage = check_config(config)
    device = resolve_device(config.device)
    with torch_threads(config.threads):
        model, inputs = open_run(config, device)
        return run_model(config, storage, model, inputs, device)


def run_is_heavy(model, inputs) -> bool:
    """background.is_heavy for this model at the run's longest input; heavy when its layers
    cannot be measured (--method hf), which keeps torch's default threads."""
    values = layer_matrix_values(model.weights)
    return values is None or is_heavy(values, getattr(inputs, "max_length", None) or 512)


def run_model(config: ExtractConfig, storage: store.Storage, model, inputs, device: torch.device) -> ExtractResult:
    """`run` under the thread policy: a light model's small products gain nothing from a second
    torch thread, so it runs on one (unless --threads says otherwise) and the other cores go to
    the writer (background.py)."""
    heavy = run_is_heavy(model, inputs)
    light_threads = 1 if config.threads is None and device.type == "cpu" and not heavy else None
    with torch_threads(light_threads):
        return run(config, storage, model, inputs, device, heavy)


def _guarded(kind: str, layer: int, probs: torch.Tensor, batch: Batch, ids: list[str], causal: bool) -> None:
    q_lengths, k_lengths = batch.lengths[kind]
    guards.check_attention({layer: probs}, q_lengths, ids, causal=causal or kind == "decoder",
                           key_lengths=None if kind != "cross" else k_lengths, kind=kind)


def _verify_failure(inputs, batch: Batch, check, multi_kind: bool, tol: float) -> AttnpipeError:
    row, kind, layer, head = check.where
    what = f"{PAIR_KIND_NAMES[kind]} attention " if multi_kind else ""
    return AttnpipeError(
        f"--verify failed: {inputs.label} {inputs.ids[batch.indices[row]]!r} {what}layer {layer} "
        f"head {head} differs from transformers eager by {check.attention:.3g} (tolerance {tol:g})"
    )


def _forward(model, batch: Batch, keep: dict[str, frozenset[int]], on_layer, hidden: bool):
    try:
        return model.family.forward(model.weights, batch.tensors, keep_layers=keep, on_layer=on_layer, hidden=hidden)
    except ValueError as err:  # inputs that do not fit the model (image size, channels, ...)
        name = getattr(model, "factory", None) or getattr(model, "model_dir", "")
        raise AttnpipeError(f"{name}: {err}") from err


def run(config: ExtractConfig, storage: store.Storage, model, inputs, device: torch.device,
        heavy: bool) -> ExtractResult:
    """The one loop: batches -> family forward -> guards -> verify -> sink -> writer -> provenance."""
    chosen = selections(config, model)
    kinds = tuple(chosen)
    keep = {kind: frozenset(sel.layers) for kind, sel in chosen.items()}
    causal = is_causal(model)
    count = len(inputs.ids)
    parity = hidden_parity = 0.0
    explainer = None
    if config.explain is not None:
        from attnpipe.extract.explain import Explainer

        explainer = Explainer(model, config.explain, config.ablate, inputs, chosen,
                              attribution=None if config.attribution is None else (config.ig_steps, config.ig_method))
    metric_names: tuple[str, ...] = ()
    metric_values = None
    if config.metrics_only:
        from attnpipe.analyze.fast_metrics import BatchMetrics
        from attnpipe.analyze.metrics import METRICS

        self_sel = chosen["self"]
        metric_names = tuple(METRICS) if config.metrics is None else tuple(config.metrics)
        metric_values = np.full((count, len(self_sel.layers), len(self_sel.heads), len(metric_names)), np.nan)
    memory = store.MemoryStore(count) if config.output is None else None
    is_json = memory is None and config.output.suffix == ".json"
    # Streaming writes a text's tokens before its layers: one attention kind, no per-item extras.
    stream = not is_json and memory is None and kinds == ("self",) and explainer is None
    truncated: list[str] = []
    plan = writer_plan(device.type == "cpu", torch.get_num_threads(), usable_cpus(), heavy)
    with contextlib.ExitStack() as stack:
        h5 = writer = None
        if memory is not None:  # the same writer thread, handing complete texts to memory
            h5 = memory
            writer = BackgroundWriter(h5, config.writer_queue_bytes, deferred=plan.deferred)
            stack.callback(writer.abort)
        elif not is_json:
            h5 = stack.enter_context(store.h5_writer(config.output, count, config.dtype, storage,
                                                     encode_threads=plan.encode_threads))
            writer = BackgroundWriter(h5, config.writer_queue_bytes, deferred=plan.deferred)
            stack.callback(writer.abort)  # on an error: stop the thread before the file is dropped
        sink = Sink(storage, chosen, writer, stream=stream, metric_values=metric_values)
        bar = stack.enter_context(
            tqdm(total=count, unit=inputs.label, file=sys.stderr,
                 disable=None if config.progress is None else not config.progress)  # None: tty only
        )
        def plan(widths: list[int]):
            return batches(widths, config, chosen["self"].num_heads)

        if explainer is not None:  # one at a time: no padding in a gradient
            order = [[i] for i in range(count)]
        elif hasattr(inputs, "batch_order"):  # texts: tokenized once, window by window
            order = inputs.batch_order(plan)
        else:
            order = plan(inputs.widths)
        for indices in order:
            batch = inputs.prepare(indices, device)
            ids = [inputs.ids[i] for i in indices]
            truncated += [item.id for item in batch.items
                          if item.truncated or (item.target is not None and item.target.truncated)]
            metrics = None
            if config.metrics_only:
                q_lengths = batch.lengths["self"][0]
                metrics = BatchMetrics(metric_names, q_lengths, [item.tokens for item in batch.items],
                                       [item.special_tokens_mask for item in batch.items],
                                       causal=causal, device=device)
            sink.begin(batch, metrics)
            seen: set[tuple[str, int]] = set()

            def checked(kind: str, layer: int, probs: torch.Tensor) -> None:  # stops a broken pass, then stores
                seen.add((kind, layer))
                sink.layer(kind, layer, probs, functools.partial(_guarded, kind, layer, probs, batch, ids, causal))

            extras = None
            if explainer is not None:
                out, extras = explainer(batch)  # gradients with autograd on, every layer kept
            else:
                streaming = config.stream_layers and not config.verify  # verify compares whole batches
                with torch.inference_mode():
                    # Only --verify compares the hidden state: otherwise the pass may stop at the
                    # last stored layer's attention (models/__init__.py: hidden=False).
                    out = _forward(model, batch, keep, checked if streaming else None, hidden=config.verify)
            missing = [(kind, layer) for kind in kinds for layer in chosen[kind].layers
                       if (kind, layer) not in seen and layer not in out.attentions.get(kind, {})]
            if missing:  # a pass that skipped layers must not be compared or stored as if complete
                raise AttnpipeError(f"the forward pass returned no attention for texts {ids[:5]} "
                                    f"(layers {[layer for _, layer in missing]})")
            if config.verify:
                with torch.inference_mode():
                    reference = out if explainer is None else explainer.plain(batch)
                    check = reference_diffs(model.hf_model, batch.tensors, batch.lengths, reference)
                parity, hidden_parity = max(parity, check.attention), max(hidden_parity, check.hidden)
                if check.attention > config.verify_tol:
                    raise _verify_failure(inputs, batch, check, len(kinds) > 1, config.verify_tol)
            with torch.inference_mode():
                for kind in kinds:  # the in-memory path (or a family that ignores on_layer)
                    for layer in chosen[kind].layers:
                        if (kind, layer) not in seen:
                            checked(kind, layer, out.attentions[kind][layer].detach())
            del out
            sink.end(extras)
            if writer is not None and writer.deferred:  # the batch's writing, with the cores to itself
                writer.run_queued()
            bar.update(len(indices))
        self_sel = chosen["self"]
        fields = dict(num_layers=model.num_layers, num_heads=model.num_heads, layers=self_sel.layers,
                      heads=self_sel.heads, max_length=inputs.max_length, **model.provenance_fields())
        if "decoder" in chosen:
            fields.update(decoder_num_layers=model.weights.decoder_num_layers,
                          decoder_num_heads=model.weights.decoder_num_heads,
                          decoder_layers=chosen["decoder"].layers, decoder_heads=chosen["decoder"].heads)
        if explainer is not None:
            fields.update(gradient_target=explainer.target.spec)
            if config.attribution is not None:
                fields.update(attribution=config.attribution, attribution_steps=config.ig_steps,
                              attribution_method=config.ig_method)
        if inputs.generation is not None:
            fields.update(generation=inputs.generation)
        if config.skipped_empty:
            fields.update(skipped_empty=tuple(config.skipped_empty))
        provenance = run_provenance(dtype=config.dtype, verify=config.verify, parity=parity,
                                    hidden_parity=hidden_parity, method=config.method, **fields)
        if writer is not None:
            writer.close()  # every queued chunk is written; from here this thread owns the file
            if config.metrics_only:
                h5.write_metrics(metric_values, metric_names, np.full(count, causal))
            h5.finish(provenance)
        else:
            store.write_json(config.output, sink.json_item, provenance)
    decoder = chosen.get("decoder")
    order_ids = {item_id: pos for pos, item_id in enumerate(inputs.ids)}
    return ExtractResult(
        output=config.output,
        num_texts=count,
        num_tokens=int(sum(inputs.lengths if hasattr(inputs, "lengths") else inputs.widths)),  # embeddings: real rows, not the array's width
        layers=self_sel.layers,
        heads=self_sel.heads,
        truncated_ids=tuple(sorted(truncated, key=order_ids.__getitem__)),
        max_length=inputs.max_length,
        parity_max_abs_diff=parity if config.verify else None,
        parity_hidden_max_abs_diff=hidden_parity if config.verify else None,
        decoder_layers=None if decoder is None else decoder.layers,
        decoder_heads=None if decoder is None else decoder.heads,
        input_kind=config.input_kind,
        generation=inputs.generation,
        generated_tokens=inputs.generated_tokens,
        memory=memory,
    )
