"""The extraction stage: texts -> our forward pass -> an attention file.

Texts are tokenized once, sorted by length into batches under a token budget (so little
padding is computed), run through the family's forward pass under torch.inference_mode, cropped
to each text's real tokens on the torch side and written in the user's order. Each layer is
handed over as soon as it is computed (`on_layer`), converted to the storage dtype, and queued
to one writer thread that compresses and writes it while the next layer and batch run; so a
long text never holds all layers' attention at once, and storage costs little wall time. With
`metrics_only`, the per-head metrics are computed per layer instead (attnpipe.analyze.fast_metrics) and
stored in place of the matrices. With `verify`, every batch also runs through transformers'
eager attention and the largest difference is recorded in the file (and fails the run above the
tolerance); verify keeps a batch's layers in memory to compare them.
"""

from __future__ import annotations

import contextlib
import platform
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from attnpipe import __version__, store
from attnpipe.extract import guards
from attnpipe.extract.background import BackgroundWriter
from attnpipe.extract.corpus import Text
from attnpipe.errors import AttnpipeError
from attnpipe.extract.loading import LoadedModel, checkpoint_dtype, default_model_dir, load_model, resolve_device

# Probabilities are float32 sums of n terms: 1e-5 bounds the float32 rounding we have measured
# against transformers' eager attention (~1e-7 on MiniLM), with room for long inputs.
DEFAULT_VERIFY_TOL = 1e-5
# Padded tokens (texts x longest length) per forward pass. bench/bench_extract.py measured
# batches of 2k-8k tokens equally fast on MiniLM on 2 CPU cores; 4096 keeps a batch's
# attention for one layer of a 12-head model at <= 4096 x 12 x T x 4 bytes.
DEFAULT_MAX_TOKENS_PER_BATCH = 4096
# One layer's float32 attention for a batch (texts x heads x T x T x 4 bytes) stays under this many
# MiB; a text over it goes alone (and is streamed layer by layer). Attention grows with the square
# of the length: under the token budget alone, one layer of a 12-head batch is 4096 x 12 x T x 4
# bytes (25 MB at T=128, 100 MB at T=512), and a run's peak memory then depended on how many full
# batches of its longest texts the corpus had. 16 MiB is 21 MiniLM texts of 128 tokens; bench:
# no slower than the token budget alone on the demo corpus.
DEFAULT_BATCH_ATTENTION_MB = 16.0
# Pending arrays the writer thread may fall behind by before the forward pass waits for it: a
# few batches' worth. More buys no speed (a writer slower than the model sets the pace anyway)
# and is memory that a long run fills (bench: 256 MiB made RSS at 5,000 texts 1.8x that at 500).
DEFAULT_WRITER_QUEUE_BYTES = 32 << 20
# Families whose queries see only earlier keys (for --metrics-only; the same answer that
# attnpipe.analyze.metrics.infer_causal gives on their attention).
from attnpipe.models import CAUSAL_MODEL_TYPES  # noqa: E402  (derived from the families' CAUSAL)


@dataclass(frozen=True)
class ExtractConfig:
    texts: tuple[Text, ...]
    output: Path
    model_dir: Path | None = None  # None: the packaged all-MiniLM-L6-v2
    layers: tuple[str, ...] = ("all",)
    heads: tuple[str, ...] = ("all",)
    device: str = "cpu"
    batch_size: int = 32
    max_length: int | None = None  # None: what the model can take
    dtype: store.StorageDtype = "float32"
    verify: bool = False
    verify_tol: float = DEFAULT_VERIFY_TOL
    trust_remote_code: bool = False
    progress: bool | None = None  # None: a bar only on a terminal
    pairs: tuple = ()  # extract_seq2seq.Pair: source/target pairs for encoder-decoder models
    method: str = "manual"  # "manual": our forward pass; "hf": transformers' eager output (extract_hf)
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


def _max_length(model: LoadedModel, requested: int | None) -> int:
    config = model.hf_model.config
    limit = getattr(config, "max_position_embeddings", None) or 1 << 30  # --method hf: e.g. ALiBi models have none
    position_pad_id = getattr(model.weights, "position_pad_id", None)
    if position_pad_id is not None:  # RoBERTa's positions start after pad_id
        limit -= position_pad_id + 1
    if requested is None:
        tokenizer_limit = getattr(model.tokenizer, "model_max_length", limit) or limit
        return int(min(limit, tokenizer_limit))
    if requested < 2:
        raise AttnpipeError(f"--max-length {requested} is too small: it must leave room for special tokens")
    if requested > limit:
        raise AttnpipeError(f"--max-length {requested} is more than the model's {limit} positions")
    return requested


@dataclass(frozen=True)
class _Encoded:
    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    special_tokens_mask: list[list[int]]
    offsets: list[np.ndarray]
    word_ids: list[np.ndarray]
    untruncated_lengths: list[int]


def _encode(tokenizer, texts: list[str], max_length: int) -> _Encoded:
    """Tokenize once (truncated); only texts that reach max_length are counted again untruncated."""
    fast = getattr(tokenizer, "is_fast", False)
    enc = tokenizer(
        texts,
        truncation=True,
        max_length=max_length,
        return_special_tokens_mask=True,
        return_offsets_mapping=fast,
    )
    n_texts = len(texts)
    untruncated = [len(ids) for ids in enc["input_ids"]]
    # A text shorter than the limit was not cut; only those at the limit may have been.
    at_limit = [i for i, n in enumerate(untruncated) if n >= max_length]
    if at_limit:
        full = tokenizer([texts[i] for i in at_limit], truncation=False)["input_ids"]
        for i, ids in zip(at_limit, full, strict=True):
            untruncated[i] = len(ids)
    offsets, word_ids = [], []
    for i in range(n_texts):
        n = len(enc["input_ids"][i])
        if fast:
            offsets.append(np.asarray(enc["offset_mapping"][i], dtype=np.int64).reshape(n, 2))
            word_ids.append(np.array([-1 if w is None else w for w in enc.word_ids(i)], dtype=np.int64))
        else:  # slow tokenizers know no character spans: documented as -1
            offsets.append(np.full((n, 2), -1, dtype=np.int64))
            word_ids.append(np.full(n, -1, dtype=np.int64))
    return _Encoded(
        input_ids=enc["input_ids"],
        token_type_ids=enc.get("token_type_ids"),
        special_tokens_mask=enc["special_tokens_mask"],
        offsets=offsets,
        word_ids=word_ids,
        untruncated_lengths=untruncated,
    )


# Texts tokenized at once when only their lengths are wanted (token_lengths): bounds the memory
# the tokenizer's encodings take, whatever the corpus size.
LENGTH_WINDOW = 1024


def token_lengths(tokenizer, texts: list[str], max_length: int) -> list[int]:
    """Each text's token count after truncation to max_length, LENGTH_WINDOW texts at a time."""
    lengths: list[int] = []
    for start in range(0, len(texts), LENGTH_WINDOW):
        window = tokenizer(texts[start:start + LENGTH_WINDOW], truncation=True, max_length=max_length)
        lengths.extend(len(ids) for ids in window["input_ids"])
    return lengths


def text_item(text: Text, encoded: _Encoded, i: int, tokenizer, **fields) -> store.TextAttention:
    """Text `i` of an encoded batch as a TextAttention; `fields` gives its attention (and extras)."""
    n = len(encoded.input_ids[i])
    return store.TextAttention(
        id=text.id,
        text=text.text,
        tokens=tuple(tokenizer.convert_ids_to_tokens(encoded.input_ids[i])),
        token_ids=np.asarray(encoded.input_ids[i], dtype=np.int64),
        special_tokens_mask=np.asarray(encoded.special_tokens_mask[i], dtype=bool),
        offsets=encoded.offsets[i],
        word_ids=encoded.word_ids[i],
        truncated=encoded.untruncated_lengths[i] > n,
        num_tokens_untruncated=encoded.untruncated_lengths[i],
        **fields,
    )


def length_sorted_batches(lengths: list[int], batch_size: int) -> Iterator[list[int]]:
    """Indices grouped into batches of similar length (longest first), to compute little padding."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def token_budget_batches(lengths: list[int], max_tokens: int, max_texts: int,
                         max_cells: int | None = None) -> Iterator[list[int]]:
    """Indices in batches of similar length (longest first) whose padded size, texts x longest
    length, stays within `max_tokens`, and whose attention cells per head, texts x longest
    length squared, within `max_cells` (a text over either goes alone); at most `max_texts` texts each."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batch: list[int] = []
    for i in order:
        width = max(lengths[batch[0]] if batch else lengths[i], 1)  # the first is the longest
        texts = len(batch) + 1
        if batch and (texts * width > max_tokens or len(batch) >= max_texts
                      or (max_cells is not None and texts * width * width > max_cells)):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def batches(lengths: list[int], config: ExtractConfig, num_heads: int) -> Iterator[list[int]]:
    """The run's batches: `token_budget_batches` under the config's token, text and attention budgets."""
    max_cells = int(config.batch_attention_mb * 2**20 / (4 * max(num_heads, 1)))
    return token_budget_batches(lengths, config.max_tokens_per_batch, config.batch_size, max_cells)


def _pad(rows: list[list[int]], value: int, device: torch.device) -> torch.Tensor:
    width = max(len(row) for row in rows)
    return torch.tensor([row + [value] * (width - len(row)) for row in rows], device=device)


def library_versions() -> dict[str, str]:
    import h5py
    import transformers

    return {
        "attnpipe": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "h5py": h5py.__version__,
    }


def run_provenance(*, dtype: str, verify: bool = False, parity: float = 0.0, hidden_parity: float = 0.0,
                   method: str = "manual", **fields) -> store.Provenance:
    """The provenance every extraction path writes: `fields` name the model and what was stored;
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


@dataclass(frozen=True)
class _Parity:
    attention: float  # largest |ours - transformers eager| over real positions
    hidden: float  # the same for the last hidden state
    where: tuple[int, int, int]  # (batch row, layer, head) of the largest attention difference


def _reference_diffs(model, batch, lengths, probs_by_layer, hidden) -> _Parity:
    """Compare our pass with transformers' eager attention on the same batch, real tokens only."""
    reference = model.hf_model(**batch, output_attentions=True)
    if not reference.attentions:
        raise AttnpipeError("transformers returned no attentions: the model is not on eager attention")
    attn_diff, hidden_diff, where = 0.0, 0.0, (0, 0, 0)
    for row, n in enumerate(lengths):
        for layer, probs in probs_by_layer.items():
            per_head = (reference.attentions[layer][row, :, :n, :n] - probs[row, :, :n, :n]).abs()
            per_head = per_head.amax(dim=(1, 2))  # (H,)
            head = int(per_head.argmax())
            if per_head[head].item() > attn_diff:
                attn_diff, where = per_head[head].item(), (row, layer, head)
        ref_hidden = reference.last_hidden_state[row, :n]
        hidden_diff = max(hidden_diff, (ref_hidden - hidden[row, :n]).abs().max().item())
    return _Parity(attn_diff, hidden_diff, where)


def extract(config: ExtractConfig) -> ExtractResult:
    """Run the whole extraction stage and write `config.output`; return what was done."""
    if config.pairs:  # encoder-decoder models: attnpipe/extract/pairs.py
        from attnpipe.extract.pairs import extract_pairs

        return extract_pairs(config)
    storage = _check_config(config)
    device = resolve_device(config.device)
    model_dir = config.model_dir if config.model_dir is not None else default_model_dir()
    with _torch_threads(config.threads):
        if config.method == "hf":
            from attnpipe.extract.hf import load_hf_model

            model = load_hf_model(model_dir, device, config.trust_remote_code)
        else:
            model = load_model(model_dir, device, config.trust_remote_code)
        if model.family.INPUT_KIND == "pairs":
            raise AttnpipeError(
                f"{model_dir} is an encoder-decoder ({model.model_type}) model: give --source and --target "
                "(or a .jsonl file with source and target fields) instead of texts"
            )
        return _extract_loaded(config, storage, model, model_dir, device)


def _check_config(config: ExtractConfig) -> store.Storage:
    store.check_output_path(config.output)
    if not config.texts:
        raise AttnpipeError("no texts given: use --text or --texts-file")
    if config.output.suffix == ".json":
        if len(config.texts) > 1:
            raise AttnpipeError(
                f"a .json output holds one text, got {len(config.texts)}: write .h5 for several texts"
            )
        for flag, bad in (("--dtype uint8", config.dtype == "uint8"), ("--rows", config.rows != "all"),
                          ("--metrics-only", config.metrics_only)):
            if bad:
                raise AttnpipeError(f"{flag} is for .h5 output; a .json file holds whole float matrices")
    if config.batch_size < 1:
        raise AttnpipeError(f"--batch-size must be at least 1, got {config.batch_size}")
    if config.method == "hf" and config.verify:
        raise AttnpipeError("--verify compares our forward pass with transformers; with --method hf "
                            "the attention already comes from transformers")
    if config.max_tokens_per_batch < 1:
        raise AttnpipeError(f"--max-tokens-per-batch must be at least 1, got {config.max_tokens_per_batch}")
    if not config.batch_attention_mb > 0:  # also refuses NaN
        raise AttnpipeError(f"--batch-attention-mb must be above 0, got {config.batch_attention_mb}")
    if config.threads is not None and config.threads < 1:
        raise AttnpipeError(f"--threads must be at least 1, got {config.threads}")
    if config.metrics is not None:
        from attnpipe.analyze.metrics import check_metric_names

        check_metric_names(config.metrics)
    return store.Storage(dtype=config.dtype, compression=config.compression,
                         compression_level=config.compression_level, rows=config.rows,
                         metrics_only=config.metrics_only)


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _LayerSink:
    """Crops each text of a batch's layer on the torch side and sends it on, chunk by chunk.

    To HDF5: converted to the storage dtype, split into the file's chunks and queued for the
    writer thread. To JSON (one text): kept as float32. With metrics_only: per-head metrics.
    """

    def __init__(self, storage: store.Storage, layer_pos: dict[int, int], heads: tuple[int, ...],
                 num_heads: int, writer: BackgroundWriter | None, json_attention: list | None):
        self.storage = storage
        self.layer_pos = layer_pos
        self.head_index = None if len(heads) == num_heads else torch.tensor(heads)
        self.writer = writer
        self.json_attention = json_attention
        self.itemsize = np.dtype(storage.dtype).itemsize
        self.num_layers = len(layer_pos)

    def batch(self, indices: list[int], lengths: list[int], metrics=None, metric_values=None) -> None:
        self.indices, self.lengths = indices, lengths
        self.metrics, self.metric_values = metrics, metric_values
        self.pending: dict[int, list[np.ndarray]] = {}  # text -> converted layers of an unfinished chunk

    def _convert(self, crop: torch.Tensor) -> np.ndarray:
        if self.storage.dtype == "uint8":  # the same float32 arithmetic as store.to_storage
            return (crop * float(store.UINT8_SCALE)).round_().to(torch.uint8).cpu().numpy()
        out = torch.empty(crop.shape, dtype=getattr(torch, self.storage.dtype))
        return out.copy_(crop).numpy()  # one pass: crop, convert and make contiguous

    def __call__(self, layer: int, probs: torch.Tensor) -> None:  # probs (B, H, T, T)
        pos = self.layer_pos[layer]
        if self.head_index is not None:
            probs = probs.index_select(1, self.head_index.to(probs.device))  # (B, H', T, T)
        if self.metrics is not None:  # computed in the writer thread, on the other core, while the pass runs on
            self.writer.submit(_store_metrics, self.metrics, probs, self.metric_values, self.indices, pos,
                               nbytes=probs.nbytes)
            return
        heads = probs.shape[1]
        for row, (i, n) in enumerate(zip(self.indices, self.lengths, strict=True)):
            if self.json_attention is not None:
                self.json_attention[pos] = probs[row, :, :n, :n].float().cpu().numpy()
                continue
            if n == 0:
                continue
            rows = store.query_positions(self.storage.rows, n)
            layers_per_chunk, step, _, _ = store.chunk_shape(self.num_layers, heads, len(rows), n, self.itemsize)
            for head in range(0, heads, step):
                crop = probs[row, head:head + step, :n, :n]  # (h, n, n) view, real tokens only
                if self.storage.rows != "all":
                    crop = crop[:, int(rows[0]):int(rows[0]) + 1]  # (h, 1, n)
                converted = self._convert(crop)
                if layers_per_chunk == 1:
                    self.writer.submit("write_chunk", i, pos, head, converted[None], nbytes=converted.nbytes)
                    continue
                # Short texts: several whole layers per chunk (better compression), sent when complete.
                layers = self.pending.setdefault(i, [])
                layers.append(converted)
                if len(layers) == layers_per_chunk:
                    chunk = np.stack(self.pending.pop(i))  # (l, H, r, n)
                    self.writer.submit("write_chunk", i, pos - layers_per_chunk + 1, 0, chunk, nbytes=chunk.nbytes)



def _store_metrics(metrics, probs: torch.Tensor, values: np.ndarray, indices: list[int], pos: int) -> None:
    """One batch's layer of per-head metrics into values[texts, layer position] (writer thread)."""
    with torch.inference_mode():
        values[indices, pos] = metrics.layer(probs)  # (B, H', M)


def _extract_loaded(config: ExtractConfig, storage: store.Storage, model: LoadedModel,
                    model_dir: Path, device: torch.device) -> ExtractResult:
    layers = parse_indices(config.layers, model.num_layers, "--layer", "layers")
    heads = parse_indices(config.heads, model.num_heads, "--heads", "heads")
    max_length = _max_length(model, config.max_length)

    texts = list(config.texts)
    lengths = token_lengths(model.tokenizer, [t.text for t in texts], max_length)  # for the batching
    truncated_flags = np.zeros(len(texts), dtype=bool)
    pad_id = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    keep = frozenset(layers)
    layer_pos = {layer: pos for pos, layer in enumerate(layers)}
    causal = guards.is_causal(model.model_type)
    parity = hidden_parity = 0.0
    metric_names: tuple[str, ...] = ()
    metric_values = causal_flags = None
    if config.metrics_only:
        from attnpipe.analyze.fast_metrics import BatchMetrics
        from attnpipe.analyze.metrics import METRICS

        metric_names = tuple(METRICS) if config.metrics is None else tuple(config.metrics)
        metric_values = np.full((len(texts), len(layers), len(heads), len(metric_names)), np.nan)
        causal_flags = np.full(len(texts), model.model_type in CAUSAL_MODEL_TYPES)

    is_json = config.output.suffix == ".json"
    json_attention: list | None = [None] * len(layers) if is_json else None
    json_item: store.TextAttention | None = None
    with contextlib.ExitStack() as stack:
        h5 = writer = None
        if not is_json:
            h5 = stack.enter_context(store.H5Writer(config.output, len(texts), config.dtype, storage))
            writer = BackgroundWriter(h5, config.writer_queue_bytes)
            stack.callback(writer.abort)  # on an error: stop the thread before the file is dropped
        sink = _LayerSink(storage, layer_pos, heads, model.num_heads, writer, json_attention)
        bar = stack.enter_context(
            tqdm(total=len(texts), unit="text", file=sys.stderr,
                 disable=None if config.progress is None else not config.progress)  # None: tty only
        )
        for batch_indices in batches(lengths, config, model.num_heads):
            batch_lengths = [lengths[i] for i in batch_indices]
            # Each batch is tokenized in full on its own: a corpus's encodings are never all held at once.
            encoded = _encode(model.tokenizer, [texts[i].text for i in batch_indices], max_length)
            if [len(ids) for ids in encoded.input_ids] != batch_lengths:
                raise AttnpipeError(f"the tokenizer gave texts {[texts[i].id for i in batch_indices][:5]} "
                                    "different lengths on a second call; it must be deterministic")
            items = []
            for row, i in enumerate(batch_indices):
                n = lengths[i]
                item = text_item(
                    texts[i], encoded, row, model.tokenizer,
                    attention=None,  # streamed to the writer layer by layer
                    query_positions=None if storage.rows == "all" else store.query_positions(storage.rows, n),
                )
                truncated_flags[i] = item.truncated
                items.append(item)
                if writer is not None:
                    writer.submit("begin", i, item, len(layers), len(heads))
            batch = {
                "input_ids": _pad(encoded.input_ids, pad_id, device),
                "attention_mask": _pad([[1] * n for n in batch_lengths], 0, device),
            }
            if encoded.token_type_ids is not None and model.weights.token_type is not None:
                batch["token_type_ids"] = _pad(encoded.token_type_ids, 0, device)
            metrics = None
            if config.metrics_only:
                metrics = BatchMetrics(metric_names, batch_lengths, [item.tokens for item in items],
                                       [item.special_tokens_mask for item in items],
                                       causal=bool(causal_flags[batch_indices[0]]), device=device)
            sink.batch(batch_indices, batch_lengths, metrics, metric_values)
            stream = config.stream_layers and not config.verify  # verify compares whole batches
            batch_ids = [texts[i].id for i in batch_indices]

            seen: set[int] = set()

            def checked(kind: str, layer: int, probs: torch.Tensor) -> None:  # stops a broken pass, then stores
                guards.check_attention({layer: probs}, batch_lengths, batch_ids, causal=causal)
                seen.add(layer)
                sink(layer, probs)

            with torch.inference_mode():
                out = model.family.forward(
                    model.weights, batch, keep_layers={"self": keep}, on_layer=checked if stream else None,
                )
                missing = [layer for layer in layers if layer not in seen and layer not in out.attentions.get("self", {})]
                if missing:  # a pass that skipped layers must not be compared or stored as if complete
                    raise AttnpipeError(f"the forward pass returned no attention for texts {batch_ids[:5]} "
                                        f"(layers {missing})")
                if config.verify:
                    check = _reference_diffs(model, batch, batch_lengths, out.attentions["self"], out.hidden)
                    parity, hidden_parity = max(parity, check.attention), max(hidden_parity, check.hidden)
                    if check.attention > config.verify_tol:
                        row, layer, head = check.where
                        raise AttnpipeError(
                            f"--verify failed: text {texts[batch_indices[row]].id!r} layer {layer} "
                            f"head {head} differs from transformers eager by {check.attention:.3g} "
                            f"(tolerance {config.verify_tol:g})"
                        )
                for layer in layers:  # the in-memory path (or a family that ignores on_layer)
                    if layer not in seen:
                        checked("self", layer, out.attentions["self"][layer])
                del out
            for row, i in enumerate(batch_indices):
                if writer is not None:
                    writer.submit("end", i)
                else:
                    json_item = store.TextAttention(**{
                        **items[row].__dict__, "attention": np.stack(json_attention)})
            bar.update(len(batch_indices))
        provenance = run_provenance(
            dtype=config.dtype, verify=config.verify, parity=parity, hidden_parity=hidden_parity,
            method=config.method,
            model=str(model_dir),
            model_type=model.model_type,
            weights_sha256=model.weights_sha256,
            weight_files=model.weight_files,
            num_layers=model.num_layers,
            num_heads=model.num_heads,
            layers=layers,
            heads=heads,
            max_length=max_length,
            trust_remote_code=config.trust_remote_code,
            checkpoint_dtype=checkpoint_dtype(model_dir),
        )
        if writer is not None:
            writer.close()  # every queued chunk is written; from here this thread owns the file
            if config.metrics_only:
                h5.write_metrics(metric_values, metric_names, causal_flags)
            h5.finish(provenance)
        else:
            store.write_json(config.output, json_item, provenance)
    truncated = tuple(t.id for t, cut in zip(texts, truncated_flags, strict=True) if cut)
    return ExtractResult(
        output=config.output,
        num_texts=len(texts),
        num_tokens=sum(lengths),
        layers=layers,
        heads=heads,
        truncated_ids=truncated,
        max_length=max_length,
        parity_max_abs_diff=parity if config.verify else None,
        parity_hidden_max_abs_diff=hidden_parity if config.verify else None,
    )
