"""The one implementation of the per-head metrics, in torch, on padded batches: used during
extraction (`--metrics-only`) and, through attnpipe.analyze.metrics, by every subcommand.

Computing metrics one text at a time in numpy would cost more than the forward pass, so this
module computes the definitions of attnpipe.analyze.metric_reference (its `row_metrics`, then the
mean over the rows where a metric is defined; that module is the test oracle) for a whole
length-sorted batch and one layer at a time. Per-row values are computed
in float32 (the probabilities' own precision; float64 costs 4x here) and averaged over rows in
float64, so results agree with the numpy float64 version to ~1e-6 relative. Padded query rows
are never counted and padded keys carry weight exactly 0 (they are masked before softmax).
tests/test_perf.py and tests/test_metrics.py check agreement with attnpipe.analyze.metric_reference.

    bm = BatchMetrics(names, lengths, tokens, special_masks, causal=False)
    values = bm.layer(probs)        # probs (B, H, T, T) -> (B, H, M) float64 numpy

`corpus_metrics` is the same for files on disk (attnpipe.analyze.metrics.corpus_metrics, so every
subcommand): the long table, in worker processes that each read and compute a contiguous share of
the texts. A share is read in windows of texts (AttentionFile.metric_windows: a version-3 file
reads a window in one read per field); a window's texts of one length and causality are one
(k, L·H, n, n) tensor, each text's layers and heads as BatchMetrics' head axis, so a batch of
thousands of short texts is one set of torch operations. Sums over keys are BLAS products
(tests/test_metric_windows.py holds this path to the per-text one). `text_values` is one text's
array in memory (attnpipe.analyze.metrics.head_metrics).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from attnpipe.analyze import metric_reference as M  # the names, thresholds and key rules
from attnpipe import store
from attnpipe.errors import AttnpipeError
from attnpipe.store.validate import check_same_version

# Texts per worker below which forking costs more than it saves.
MIN_TEXTS_PER_WORKER = 16
# Shares of the texts per worker process (balance: texts differ in length).
SHARES_PER_WORKER = 4
# Attention values corpus_metrics reads before computing their metrics (16 MiB as float32). A
# window's arrays stay under glibc's largest mmap threshold (32 MiB), so their memory is reused
# from window to window instead of mapped afresh: 64 MiB windows faulted in ~6 GB of new pages
# over a 10^6-text file (1.6 M faults against 0.2 M; 42 -> 35 s for the values alone).
WINDOW_VALUES = 4 << 20
# One metrics batch: at most this many padded values, and no text shorter than this share of the
# batch's longest (padding is computed too).
BATCH_VALUES = 1 << 20  # 4 MiB as float32: ~10% faster than 16 MiB (cache), measured on 14-token texts
MIN_LENGTH_SHARE = 0.8


class BatchMetrics:
    """Masks of one batch (lengths, tokens, causality), reused for every layer."""

    def __init__(
        self,
        names: Sequence[str],
        lengths: Sequence[int],
        tokens: Sequence[Sequence[str]],
        special_masks: Sequence[np.ndarray],
        *,
        causal: bool,
        device: torch.device | str = "cpu",
    ):
        t = max(lengths) if lengths else 0
        sep = torch.zeros(len(lengths), t, dtype=torch.float32, device=device)
        punct = torch.zeros(len(lengths), t, dtype=torch.float32, device=device)
        done: dict[tuple[int, int], int] = {}  # the same token list again (one text's layers): copy its row
        for row, (toks, special) in enumerate(zip(tokens, special_masks, strict=True)):
            key = (id(toks), id(special))
            if key in done:
                sep[row], punct[row] = sep[done[key]], punct[done[key]]
            elif len(toks):
                sep[row, : len(toks)] = torch.from_numpy(M.sep_eos_keys(toks, special).astype(np.float32))
                punct[row, : len(toks)] = torch.from_numpy(M.punctuation_keys(toks, special).astype(np.float32))
            done.setdefault(key, row)
        self._masks(names, lengths, torch.stack((sep, punct), dim=-1), causal=causal, device=device)

    @classmethod
    def from_key_weights(cls, names: Sequence[str], lengths: Sequence[int], key_weights: torch.Tensor, *,
                         causal: bool, device: torch.device | str = "cpu") -> BatchMetrics:
        """As the constructor, with each row's key weights given instead of its tokens:
        key_weights (B, T, 2) float32, [SEP]/EOS keys then punctuation keys (metric_reference's
        sep_eos_keys and punctuation_keys as 0/1), 0 beyond each row's length."""
        metrics = cls.__new__(cls)
        metrics._masks(names, lengths, key_weights.to(device), causal=causal, device=device)
        return metrics

    def _masks(self, names, lengths, key_weights: torch.Tensor, *, causal: bool, device) -> None:
        self.names = M.check_metric_names(names)
        self.causal = causal
        t = max(lengths) if lengths else 0
        # Texts of one length share their masks: computed once, broadcast over the batch (B' = 1).
        lengths = list(lengths) if len(set(lengths)) > 1 else list(lengths[:1])
        b = len(lengths)  # B' (B or 1) below
        n = torch.tensor(lengths, device=device)  # (B',)
        pos = torch.arange(t, device=device)
        self.key_real = pos[None, :] < n[:, None]  # (B', K)
        visible = self.key_real[:, None, :] & self.key_real[:, :, None]  # (B', Q, K): real queries and keys
        if causal:
            visible = visible & torch.ones(t, t, dtype=torch.bool, device=device).tril()
        self.visible = visible[:, None]  # (B', 1, Q, K)
        self.all_visible = bool(visible.all())  # equal lengths, bidirectional: nothing to mask
        self.num_visible = visible.sum(-1).to(torch.float32)[:, None]  # (B', 1, Q)
        distance = (pos[:, None] - pos[None, :]).abs()  # (Q, K)
        # Weights of (query, key) summed over keys in one einsum: distance, local keys.
        self.query_key_sums = torch.stack((distance, distance <= M.LOCAL_WINDOW), dim=-1).to(torch.float32)  # (Q, K, 2)
        # Weights of keys summed in one batched matmul: [SEP]/EOS keys, punctuation keys.
        self.key_sums = key_weights  # (B, K, 2)
        # Sums over keys as a matrix-vector product: a reduction over a short last axis (tens of
        # keys) is several times slower in torch than BLAS's dot products.
        self.ones = torch.ones(t, dtype=torch.float32, device=device)  # (K,)
        # Rows where the neighbour metrics are defined (numpy's `neighbour`: key i + offset visible).
        prev = torch.zeros(b, t, dtype=torch.bool, device=device)
        nxt = torch.zeros(b, t, dtype=torch.bool, device=device)
        if t > 1:
            prev[:, 1:] = self.visible[:, 0].diagonal(offset=-1, dim1=-2, dim2=-1)
            nxt[:, :-1] = self.visible[:, 0].diagonal(offset=1, dim1=-2, dim2=-1)
        self.prev_rows, self.next_rows = prev[:, None], nxt[:, None]  # (B', 1, Q)
        self.row_real = self.key_real[:, None]  # (B', 1, Q): the same positions as queries
        self.norm_rows = (self.num_visible > 1) & self.row_real  # (B', 1, Q)
        # Each metric's rows where it is defined, and whether that is every row (equal lengths: no
        # mask to apply), known once per batch.
        self.defined = {key: (mask, bool(mask.all())) for key, mask in (
            ("rows", self.row_real), ("norm", self.norm_rows), ("previous", self.prev_rows), ("next", self.next_rows))}

    def layer(self, probs: torch.Tensor) -> np.ndarray:
        """probs (B, H, T, T) of one layer -> (B, H, M) float64: each metric's mean over rows."""
        a = probs.float()  # (B, H, Q, K); read only below
        if not self.all_visible:
            a = torch.where(self.visible, a, 0.0)
        b, t = a.shape[0], a.shape[-1]
        cache: dict[str, torch.Tensor] = {}

        def over_keys(x: torch.Tensor) -> torch.Tensor:  # (B, H, Q, K) -> (B, H, Q): sum_j x_ij
            return torch.matmul(x, self.ones)

        def key_sum(column: int) -> torch.Tensor:  # sum_j a_ij w_j for the two key weightings
            if "keys" not in cache:
                cache["keys"] = torch.bmm(a.reshape(b, -1, t), self.key_sums).view(*a.shape[:-1], 2)  # (B, H, Q, 2)
            return cache["keys"][..., column]

        def query_key_sum(column: int) -> torch.Tensor:  # sum_j a_ij w_ij: distance, local keys
            if "query_keys" not in cache:
                cache["query_keys"] = torch.einsum("bhqk,qkm->bhqm", a, self.query_key_sums)  # (B, H, Q, 2)
            return cache["query_keys"][..., column]

        def entropy() -> torch.Tensor:
            if "entropy" not in cache:
                # -sum a ln a, with 0 ln 0 = 0 (0 times a finite log); 1.4x torch.special.entr here
                cache["entropy"] = -over_keys(a.clamp_min(torch.finfo(a.dtype).tiny).log_().mul_(a))
            return cache["entropy"]

        def shifted(offset: int) -> torch.Tensor:  # a[i, i + offset] placed at row i
            out = torch.zeros(a.shape[:-1], dtype=a.dtype, device=a.device)
            diag = a.diagonal(offset=offset, dim1=-2, dim2=-1)
            if offset < 0:
                out[..., -offset:] = diag
            elif offset > 0:
                out[..., : t - offset] = diag
            else:
                out = diag
            return out

        def small_weights() -> torch.Tensor:  # visible keys below the sparsity threshold, as 1.0
            small = torch.lt(a, M.SPARSITY_THRESHOLD, out=torch.empty_like(a))  # 3x (a < x).float()
            return over_keys(small if self.all_visible else small.mul_(self.visible))

        def normalized() -> torch.Tensor:
            return entropy() / torch.where(self.norm_rows, self.num_visible, 2.0).log()

        compute = {  # name -> (per-row values, rows where defined: a key of self.defined)
            "entropy": lambda: (entropy(), "rows"),
            "normalized_entropy": lambda: (normalized(), "norm"),
            "max_attention": lambda: (a.amax(-1), "rows"),
            "self": lambda: (shifted(0), "rows"),
            "previous_token": lambda: (shifted(-1), "previous"),
            "next_token": lambda: (shifted(1), "next"),
            "first_token": lambda: (a[..., 0], "rows"),
            "sep_eos": lambda: (key_sum(0), "rows"),
            "punctuation": lambda: (key_sum(1), "rows"),
            "mean_distance": lambda: (query_key_sum(0), "rows"),
            "sparsity": lambda: (small_weights() / self.num_visible.clamp(min=1), "rows"),
            "local_share": lambda: (query_key_sum(1), "rows"),
        }
        out = []
        for name in self.names:
            values, key = compute[name]()  # (B, H, Q)
            defined, every_row = self.defined[key]  # (B', 1, Q)
            if every_row:
                out.append(values.sum(-1, dtype=torch.float64) / defined.shape[-1])
            else:
                count = defined.sum(-1).to(torch.float64)  # (B', 1); 0 -> NaN, as numpy's nanmean
                out.append(torch.where(defined, values, 0.0).sum(-1, dtype=torch.float64) / count)
        return torch.stack(out, dim=-1).cpu().numpy()  # (B, H, M)


def text_values(
    attention: np.ndarray,
    tokens: Sequence[str],
    special_tokens_mask: np.ndarray | None,
    *,
    causal: bool | None,
    names: Sequence[str],
) -> np.ndarray:
    """One text's (L, H, n, n) probabilities -> (L, H, M) float64 metric values (its layers as the batch).

    causal None: inferred from the data (metric_reference.infer_causal). No tokens: NaN, as the
    reference's mean over no rows."""
    a = np.asarray(attention)
    n = a.shape[-1] if a.ndim else 0
    if a.ndim != 4 or a.shape[-2] != n:
        raise AttnpipeError(f"attention has shape {a.shape}; expected (layer, head, n, n)")
    if len(tokens) != n:
        raise AttnpipeError(f"{len(tokens)} tokens but attention is {n} x {n}")
    num_layers = a.shape[0]
    if n == 0 or num_layers == 0:
        return np.full((*a.shape[:2], len(names)), np.nan)
    causal = M.infer_causal(a) if causal is None else causal
    tokens = tuple(tokens)
    probs = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # (L, H, n, n)
    metrics = BatchMetrics(names, [n] * num_layers, [tokens] * num_layers, [special_tokens_mask] * num_layers,
                           causal=causal)
    with torch.inference_mode():
        return metrics.layer(probs)  # (L, H, M)


def _to_float32(stored: np.ndarray) -> np.ndarray:
    """store.decode, with float16 converted by torch (vectorised; numpy's float16 cast is not)."""
    if stored.dtype == np.float16:
        return torch.from_numpy(stored).float().numpy()
    return store.decode(stored)


class _Float32Values:
    """_to_float32 for metric_windows. A version-3 file's window arrives as one flat array,
    converted into one float32 buffer reused from call to call: fresh memory cost 4-11 ms per
    4 M values against 0.9 ms into memory already mapped (float16). Such an array is valid until
    the next call: texts_values consumes each window before metric_windows converts the next.
    Other files are converted text by text, (L, H, n, n) arrays gathered into a window: those
    get their own memory."""

    def __init__(self) -> None:
        self._buffer = torch.empty(0, dtype=torch.float32)

    def __call__(self, stored: np.ndarray) -> np.ndarray:
        if stored.ndim != 1 or stored.dtype not in (np.float16, np.uint8):
            return _to_float32(stored)
        if self._buffer.numel() < stored.size:
            self._buffer = torch.empty(stored.size, dtype=torch.float32)
        out = self._buffer[: stored.size]
        out.copy_(torch.from_numpy(stored))  # exact for both dtypes
        if stored.dtype == np.uint8:
            out.div_(store.UINT8_SCALE)  # one IEEE division per value: store.decode's numbers
        return out.numpy()


@dataclass(frozen=True)
class _Group:
    """A window's texts of one length and causality, as one tensor."""

    n: int
    causal: bool
    positions: np.ndarray  # (k,) each text's position in the caller's indices
    probs: torch.Tensor  # (k, L·H, n, n) float32: each text's layers and heads as one axis
    key_weights: torch.Tensor  # (k, n, 2) float32: [SEP]/EOS and punctuation keys

    def __len__(self) -> int:
        return len(self.positions)


@dataclass(frozen=True)
class _BatchText:
    position: int
    n: int


@dataclass(frozen=True)
class _Batch:
    """One metrics batch: texts start..stop of each of some groups (the longest first)."""

    parts: tuple[tuple[_Group, int, int], ...]

    def __len__(self) -> int:
        return sum(stop - start for _, start, stop in self.parts)

    def __iter__(self):  # its texts
        for group, start, stop in self.parts:
            for position in group.positions[start:stop].tolist():
                yield _BatchText(position, group.n)


def texts_values(attention_file, indices: Sequence[int], names: Sequence[str], causal: bool | None) -> np.ndarray:
    """(len(indices), L, H, M) metric values of the given texts.

    Texts are read in windows of about WINDOW_VALUES attention values (memory stays bounded; a
    version-3 file reads a window's texts in one read per field); each window's texts are grouped
    by length and causality into (k, L·H, n, n) tensors and computed in batches of similar length,
    padded to the longest: a batch's metrics are a hundred small torch operations, so a batch of
    many short texts costs little more than one.
    """
    meta = attention_file.meta
    out = np.full((len(indices), len(meta.layers), len(meta.heads), len(names)), np.nan)
    for window in attention_file.metric_windows(indices, _Float32Values(), WINDOW_VALUES):
        _window_values(window, names, causal, out)
    return out


def _window_values(window, names: Sequence[str], causal: bool | None, out: np.ndarray) -> None:
    """Fill out[position] for a window's texts: groups sorted by causality and length (longest
    first) cut into batches of at most BATCH_VALUES padded values whose shortest text has
    MIN_LENGTH_SHARE of the longest."""
    num_layers, num_heads = out.shape[1:3]
    parts: list[tuple[_Group, int, int]] = []
    width = room = 0
    for group in _groups(window, num_layers * num_heads, causal):
        start = 0
        while start < len(group):
            if parts and (group.causal != parts[0][0].causal or group.n < MIN_LENGTH_SHARE * width or room == 0):
                _batch_values(_Batch(tuple(parts)), names, out)
                parts = []
            if not parts:  # a new batch: as many texts as fit at its width (L·H·n² each, padded)
                width = group.n
                room = max(1, BATCH_VALUES // (num_layers * num_heads * width * width))
            take = min(room, len(group) - start)
            parts.append((group, start, start + take))
            room -= take
            start += take
    if parts:
        _batch_values(_Batch(tuple(parts)), names, out)


def _groups(window, num_matrices: int, causal: bool | None) -> list[_Group]:
    """A window's texts with tokens as groups of one length and causality (causality inferred
    per text when None), bidirectional first, longest first. Texts of one length that lie next to
    each other (a version-3 file holds length-sorted batches) are one view of the window's values."""
    lengths = window.lengths
    values = torch.from_numpy(window.values)  # (V,)
    keys = _key_weights(window)  # (T, 2)
    value_offsets = window.value_offsets.tolist()
    token_offsets = np.concatenate(([0], np.cumsum(lengths))).tolist()
    edges = np.concatenate(([0], np.flatnonzero(np.diff(lengths)) + 1, [len(lengths)])).tolist()
    runs: dict[int, list[tuple[int, int]]] = {}  # n -> runs of texts a..b-1 of n tokens
    for a, b in zip(edges[:-1], edges[1:]):
        if lengths[a]:  # no tokens: NaN everywhere (already in `out`)
            runs.setdefault(int(lengths[a]), []).append((a, b))
    groups = []
    for n, spans in runs.items():
        probs = _cat([values[value_offsets[a]:value_offsets[b]].view(b - a, num_matrices, n, n) for a, b in spans])
        weights = _cat([keys[token_offsets[a]:token_offsets[b]].view(b - a, n, 2) for a, b in spans])
        positions = np.concatenate([window.positions[a:b] for a, b in spans])
        is_causal = _infer_causal(probs) if causal is None else np.full(len(positions), causal)
        for kind in (False, True):
            chosen = is_causal == kind
            if chosen.all():
                groups.append(_Group(n, kind, positions, probs, weights))
            elif chosen.any():
                rows = torch.from_numpy(np.flatnonzero(chosen))
                groups.append(_Group(n, kind, positions[chosen], probs[rows], weights[rows]))
    return sorted(groups, key=lambda g: (g.causal, -g.n))


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def _infer_causal(probs: torch.Tensor) -> np.ndarray:
    """metric_reference.infer_causal of each text of (k, L·H, n, n): (k,) bool."""
    k, n = probs.shape[0], probs.shape[-1]
    if n < 2:  # one token: bidirectional by convention
        return np.zeros(k, bool)
    # The first query's later keys settle most bidirectional texts at once.
    causal = ~probs[:, :, 0, 1:].ne(0).flatten(1).any(1)  # (k,)
    rows = causal.nonzero()[:, 0]
    if len(rows):
        upper = torch.ones(n, n, dtype=torch.bool).triu(1)
        causal[rows] = ~probs[rows][..., upper].ne(0).flatten(1).any(1)
    return causal.numpy()


def _key_weights(window) -> torch.Tensor:
    """metric_reference.sep_eos_keys and punctuation_keys of every token of a window: (T, 2)
    float32, each distinct token string tested once."""
    by_name = np.array([token in M.SEP_EOS_TOKENS for token in window.tokens], bool)
    punctuation = np.array([M.is_punctuation(token) for token in window.tokens], bool)
    codes, special = window.token_codes, window.special
    first = np.zeros(len(codes), bool)  # each text's position 0: first_token's, never a [SEP]/EOS key
    starts = np.concatenate(([0], np.cumsum(window.lengths)[:-1]))
    first[starts[window.lengths > 0]] = True
    sep_eos = (by_name[codes] | special) & ~first
    punct = punctuation[codes] & ~special
    return torch.from_numpy(np.stack((sep_eos, punct), axis=-1).astype(np.float32))


def _batch_values(batch: _Batch, names: Sequence[str], out: np.ndarray) -> None:
    """out[position] of a batch's texts: one BatchMetrics over them, the heads of all layers as
    its head axis."""
    first, start, stop = batch.parts[0]
    width, count = first.n, len(batch)
    if len(batch.parts) == 1:  # one length: a slice of its group, no copy
        probs, weights, lengths = first.probs[start:stop], first.key_weights[start:stop], [width] * count
    else:  # padded: BatchMetrics masks what lies outside each text, so it need not be zeroed
        probs = torch.empty(count, first.probs.shape[1], width, width)
        weights = torch.zeros(count, width, 2)  # but key weights are summed: 0 beyond each text
        lengths, row = [], 0
        for group, a, b in batch.parts:
            probs[row:row + b - a, :, :group.n, :group.n] = group.probs[a:b]
            weights[row:row + b - a, :group.n] = group.key_weights[a:b]
            lengths += [group.n] * (b - a)
            row += b - a
    metrics = BatchMetrics.from_key_weights(names, lengths, weights, causal=first.causal)
    values = metrics.layer(probs)  # (k, L·H, M)
    positions = np.concatenate([group.positions[a:b] for group, a, b in batch.parts])
    out[positions] = values.reshape(count, *out.shape[1:])


def _share(path: Path, indices: Sequence[int], names: tuple[str, ...], causal: bool | None,
           identity: tuple | None = None) -> np.ndarray:
    """The given texts of the file: (k, L, H, M). Runs in a worker process, on one torch thread.

    `identity`: the parent's AttentionFile.identity; the file this worker opens must be that one
    version (one snapshot per run: a file replaced meanwhile is refused, never mixed in)."""
    torch.set_num_threads(1)
    with torch.inference_mode(), store.open_attention(path) as f:
        if identity is not None:
            check_same_version(path, f.identity, identity)
        return texts_values(f, indices, names, causal)


@contextlib.contextmanager
def _one_torch_thread():
    """torch on one thread meanwhile, as in the worker processes: `workers` is the parallelism.

    A batch is ~40 operations on a few MiB; splitting each over torch's threads gains little and,
    when other work holds a core, every operation waits for a thread that is not running (on a
    2-core machine with one core busy: 22 s instead of 1.9 s for 50,000 fourteen-token texts)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def corpus_metrics(attention_file, *, causal: bool | None = None, metrics: Sequence[str] | None = None,
                   workers: int | None = None):
    """The long table of attnpipe.analyze.metrics.corpus_metrics, `workers` processes at once.

    Values agree with the numpy float64 definition to ~1e-6 relative (per-row float32, see the
    module docstring); tests/test_perf.py checks it. workers None: one per available core, fewer
    for a small corpus. A JSON file is computed in-process.
    """
    names = M.check_metric_names(M.METRICS if metrics is None else metrics)
    count = len(attention_file)
    if count == 0:
        raise AttnpipeError(f"{attention_file.path} holds no texts")
    meta = attention_file.meta
    ids = tuple(attention_file.ids)
    # The table's other columns do not depend on the values: they are built in a thread meanwhile,
    # on another core (at 10^6 texts, gigabytes of fresh memory: ~10 s on their own; the copies
    # let go of the GIL). The thread starts once no worker is forked any more.
    with ThreadPoolExecutor(1, thread_name_prefix="attnpipe-labels") as thread:
        labels = []

        def build_labels() -> None:
            labels.append(thread.submit(store.metrics_labels, ids, meta.layers, meta.heads, names))

        values = _corpus_values(attention_file, names, causal, workers, build_labels)
        return store.metrics_table(ids, meta.layers, meta.heads, names, values, labels=labels[0].result())


def _corpus_values(attention_file, names: tuple[str, ...], causal: bool | None, workers: int | None,
                   meanwhile: Callable[[], None]) -> np.ndarray:
    """corpus_metrics' values, (texts, L, H, M), in `workers` processes; `meanwhile` is called
    once the work is under way and every worker process is forked (never fork with a thread running)."""
    count, meta = len(attention_file), attention_file.meta
    workers = default_workers() if workers is None else workers
    workers = max(1, min(workers, count // MIN_TEXTS_PER_WORKER))
    if workers == 1 or attention_file.path.suffix == ".json" or attention_file.in_memory:
        meanwhile()
        with torch.inference_mode(), _one_torch_thread():
            return texts_values(attention_file, range(count), names, causal)
    # SHARES_PER_WORKER contiguous shares per worker, handed out as workers finish: texts
    # differ in length (cost ~ n²), so equal counts would leave one worker waiting for another.
    shares = min(count, workers * SHARES_PER_WORKER)
    bounds = np.linspace(0, count, shares + 1).astype(int)
    # Shares of the texts as the file holds them (version 3: in written order), so each worker
    # reads runs of neighbouring texts; values go back to the user's order below.
    order = attention_file.storage_order()
    # fork: the children start at once, without importing torch again (spawn costs seconds);
    # each opens the file itself and runs torch on one thread. A fork-context pool forks all
    # its workers at the first submission (map submits every share at once).
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        parts = pool.map(_share, [attention_file.path] * shares,
                         [order[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)],
                         [names] * shares, [causal] * shares, [attention_file.identity] * shares)
        meanwhile()
        values = np.empty((count, len(meta.layers), len(meta.heads), len(names)))
        values[order] = np.concatenate(list(parts))
    return values
