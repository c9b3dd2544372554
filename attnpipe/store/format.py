"""The attention file formats: their spec, SCHEMA_VERSION, and the records they hold.

Dimension order is always (layer, head, query, key): rows are queries, columns are keys.
Only real tokens are stored: no padding, so a text of n tokens has (L, H, n, n) attention,
where L and H count the *stored* layers and heads (their model indices are in `layers`/`heads`).

HDF5 (`.h5`, many texts): schema version 3 (packed; H5_SCHEMA_VERSION, the default; its spec is
attnpipe.store.packed's docstring) or, with --schema-version 2, schema version 2 (version 1
files, which lack the storage attributes below, read as float32/float16, gzip, all rows)::

    /                      attrs: format = "attnpipe-attention", schema_version = 2,
                                  dims = "layer,head,query,key", and the provenance below
    /ids                   (N,) utf-8 strings: text ids in the user's order
    /texts/<i>             one group per text, i = 0..N-1 zero-padded to 8 digits, user's order
        attrs              id, truncated (bool), num_tokens_untruncated (int)
        text               scalar utf-8 string: the text as given
        attention          (L, H, n, n) float32, float16 or uint8 (see `dtype` below), or
                           (L, H, r, n) when only r query rows are kept (`rows` below);
                           chunks of at most CHUNK_TARGET_BYTES (1 MiB), see `chunk_shape`:
                           (l, H, r, n), l whole layers, when a layer fits, else (1, h, r, n),
                           h of the heads (l, h divide L, H), so one matrix is read without
                           the rest; compression per `compression`
                           (gzip: with shuffle); attribute dims = "layer,head,query,key"
        query_positions    (r,) int64, only when `rows` is not "all": the query position of
                           each stored row (cls: [0]; last: [n - 1])
        token_ids          (n,) int64
        tokens             (n,) utf-8 strings, as the tokenizer spells them ("##ing", "Ġthe")
        special_tokens_mask (n,) bool: [CLS], [SEP], <s>, ... are True
        offsets            (n, 2) int64: character span [start, end) of each token in `text`;
                           (0, 0) for special tokens; all -1 for slow tokenizers, which give none
        word_ids           (n,) int64: index of the word each sub-word belongs to; -1 for special
                           tokens (and everywhere for slow tokenizers)

Encoder-decoder models (t5, bart, marian; new in version 2) run a source and a target text
together. The fields above then describe the *source*: `text` is the source text, `tokens` its
tokens and `attention` the **encoder** self-attention (L, H, s, s), so code written for
encoders keeps working. The decoder side is added, with L', H' counting the stored *decoder*
layers and heads (model indices in `decoder_layers` / `decoder_heads`)::

    /texts/<i>
        decoder_attention  (L', H', t, t) decoder self-attention (causal: future keys exactly 0)
        cross_attention    (L', H', t, s) decoder -> encoder attention: rows = target, columns = source
        target/            group; attrs truncated (bool), num_tokens_untruncated (int)
            text           scalar utf-8 string: the target text as given
            tokens         (t,) utf-8 strings: the decoder *input* tokens, i.e. the rows (queries) of
                           decoder_attention and cross_attention: the model's decoder start token
                           followed by the tokenized target shifted right by one (teacher forcing,
                           as transformers builds decoder_input_ids from labels)
            token_ids      (t,) int64 ids of those tokens
            special_tokens_mask (t,) bool
            labels         (t,) utf-8 strings: the tokenized target (with its special tokens, e.g.
                           a final </s>); row i of the decoder predicts labels[i]
            label_ids      (t,) int64 ids of the labels

Every text group also has, from version 2 (absent from version 1 files, read back as defaults)::

    /texts/<i>
        attrs input_kind   "text" (default), "image" (ViT: tokens "[CLS]", "patch_<row>_<col>") or
                           "embeddings" (a plain torch model fed an array: tokens "0".."n-1")
        attrs image_path, image_size, patch_grid, patch_size   only for input_kind "image":
                           the image file as given, its (width, height) in pixels before the
                           processor resized it, the (rows, cols) of patches and the patch side in
                           model-input pixels. Token 1 + r·cols + c is the patch at row r, column c;
                           the grid covers the whole image as the processor resized it.

Files extracted with --explain (attnpipe/extract/gradients.py; version 2) also have::

    /texts/<i>
        attrs              gradient_target_value (float64: the explained scalar at gates = 1),
                           gradient_target_label (int64: the class index or next-token id explained; -1
                           for a similarity or output-norm target)
        attention_grad     (L, H, n, n) float32: d target / d attention probability, same stored
                           layers and heads as `attention` (always float32: gradients span many
                           orders of magnitude); attribute dims = "layer,head,query,key"
        head_gate_grad     (num_layers, num_heads) float32: d target / d gate of every model head
                           at gates = 1 (Michel et al. 2019); head_importance is its absolute value
        head_importance    (num_layers, num_heads) float32: |head_gate_grad|
        token_grad_input   (n,) float32: gradient x input on the word embeddings, summed over
                           the embedding dimension (signed)
        head_ablation      (num_layers, num_heads) float32, only with --ablate: target with that
                           one head's gate at 0 minus gradient_target_value
    /head_importance_mean  (num_layers, num_heads) float32: mean of head_importance over texts
    /head_ablation_mean    (num_layers, num_heads) float32, only with --ablate

Encoder-decoder files extracted with --explain (version 2): the fields above are the *encoder*'s
(token_grad_input: on the source tokens); the decoder's and the cross-attention's are stored
beside decoder_attention and cross_attention, with <kind> = decoder | cross (the gradients with
respect to the decoder self-attention and the cross-attention heads' gates: two gates per decoder
layer and head)::

    /texts/<i>
        decoder_attention_grad   (L', H', t, t) float32: d target / d decoder_attention, same stored
                                 decoder layers and heads; attribute dims = "layer,head,query,key"
        cross_attention_grad     (L', H', t, s) float32: d target / d cross_attention, likewise
        <kind>_head_gate_grad    (decoder_num_layers, decoder_num_heads) float32: d target / d gate
                                 of every decoder head of that kind at gates = 1
        <kind>_head_importance   (decoder_num_layers, decoder_num_heads) float32: |<kind>_head_gate_grad|
        <kind>_head_ablation     (decoder_num_layers, decoder_num_heads) float32, only with --ablate
    /<kind>_head_importance_mean, /<kind>_head_ablation_mean (the latter with --ablate): their means

Files of generated text (extract_attention.py --generate N on a causal LM, or an encoder-decoder
given --source without --target; version 2, absent otherwise and read back as None)::

    /texts/<i>
        generated          (n,) bool: token i was written by the model (`generate`), not given:
                           causal LMs: False for the prompt, True for its continuation
        generated_text     scalar utf-8 string, causal LMs only: the continuation decoded (special
                           tokens skipped); `text` stays the prompt as given, and the generated
                           tokens have offsets (-1, -1) and word_ids -1 (they are not in `text`)
        target/generated   (t,) bool, encoder-decoders: decoder input token i was generated (all but
                           the start token); `target/text` is then the generated target decoded

Files extracted with --explain T --attribution ig (attnpipe/extract/attribution.py; version 2)
also have, per stored layer l of each kind (Hao et al. 2021; A = the layer's attention, F = T)::

    /texts/<i>
        attention_attribution    (L, H, n, n) float32: A ⊙ ∫₀¹ ∂F(αA)/∂A dα, every head of the layer
                                 scaled by α, the stored heads kept; attribute dims as attention
        attribution_delta        (L,) float32: F(A) − F(0), layer l's attention set to 0
        attribution_gap          (L,) float32: Σ attribution over every head − attribution_delta
        <kind>_attention_attribution, <kind>_attribution_delta, <kind>_attribution_gap
                                 encoder-decoder files: the decoder and cross-attention's, likewise
    / attrs attribution ("ig"), attribution_steps (M), attribution_method (the quadrature);
            absent without --attribution

Provenance attributes (root of the HDF5 file, `metadata` object of the JSON file):
model (folder as given), model_type, weights_sha256 (sha256 over each weight file's name then
bytes, files sorted by name), weight_files (JSON-encoded list in HDF5), num_layers / num_heads (of the model), layers / heads (stored model indices),
dtype (storage dtype), compute_dtype, method ("manual": our forward pass), max_length,
parity_max_abs_diff and parity_hidden_max_abs_diff (largest difference from transformers'
eager attention measured by --verify; NaN in HDF5 / null in JSON when not verified),
trust_remote_code, library_versions (python, torch, transformers, numpy, h5py, attnpipe: a
JSON-encoded string in HDF5, an object in JSON), gradient_target (version 2: the --explain target,
e.g. "predicted", "2", "next-token", "similarity:<text>", "output-norm"; "" in HDF5 / null in JSON without one).
generation (version 2: the settings text was generated with, as an object: kind "continuation" |
"target", strategy "greedy" | "beam" | "sample", max_new_tokens, num_beams, do_sample, seed, and
generation_config, the checkpoint's own generate settings that differ from transformers' defaults;
a JSON-encoded string in HDF5, "" / null without generation).
`layers`/`heads` are sorted, without repeats.
Encoder-decoder files only (version 2): decoder_num_layers / decoder_num_heads (of the model's
decoder) and decoder_layers / decoder_heads (stored decoder indices, for decoder_attention and
cross_attention); for them num_layers/num_heads/layers/heads describe the encoder. Absent
(HDF5) or missing (JSON) in files of encoder-only and decoder-only models.
Version 2 adds: method may also be "hf" (attention read from transformers' eager
`output_attentions`, not our pass); checkpoint_dtype (the dtype the weights were stored in,
e.g. "bfloat16", when known; "" in HDF5 / null in JSON otherwise: computation is float32 anyway).
Optional in any version: skipped_empty (int64 array in HDF5, a list in JSON: the 1-based line
numbers of the texts file's empty texts that --skip-empty left out; absent when none were).

Storage attributes (schema version 2, root of the HDF5 file; read by `AttentionFile.storage`):
compression ("gzip", "lzf" or "none"), compression_level (gzip level 0-12; -1 otherwise),
rows ("all", "cls" or "last": which query rows `attention` holds), metrics_only (bool).
dtype "uint8" stores v = round(p * 255) (UINT8_SCALE): the reader returns p = v / 255 as float32,
at most 0.5/255 ≈ 0.00196 from the computed probability; the attention dataset carries the
attribute scale = 1/255 for plain-h5py readers.

Metrics only (`metrics_only` true, written by `extract_attention.py --metrics-only`): the texts
keep every dataset except `attention`, and the per-head metrics of attnpipe.analyze.metrics are stored
instead, as one array that the reader turns into the long table of `corpus_metrics`::

    /metrics/values        (N, L, H, M) float64: text (user's order) x stored layer x stored
                           head x metric; attribute dims = "text,layer,head,metric"
    /metrics/names         (M,) utf-8 strings: the metric names, in order
    /metrics/causal        (N,) bool: whether each text's queries saw only earlier keys

JSON (`.json`, one text), seed 001's format with extra keys::

    {"tokens": [...], "text": "...", "attention_matrices": [layer][head][query][key],
     "id": "...", "token_ids": [...], "special_tokens_mask": [...], "offsets": [[s, e], ...],
     "word_ids": [...], "truncated": false, "num_tokens_untruncated": n,
     "layers": [...], "heads": [...], "metadata": {"format": ..., "schema_version": 2, ...},
     "input_kind": "text", "image": null | {"path": ..., "size": [w, h], "patch_grid": [rows, cols],
     "patch_size": p}}

Encoder-decoder files add (version 2) "decoder_attention_matrices" [layer][head][target][target],
"cross_attention_matrices" [layer][head][target][source], "decoder_layers", "decoder_heads" and
"target": {"text", "tokens", "token_ids", "special_tokens_mask", "labels", "label_ids",
"truncated", "num_tokens_untruncated"}, with the same meanings as in HDF5.

With --explain (version 2) the JSON also has `attention_grad` [layer][head][query][key],
`head_gate_grad`, `head_importance` (and `head_ablation` with --ablate) as [layer][head],
`token_grad_input` [token], `gradient_target_value` and `gradient_target_label`, as in HDF5;
encoder-decoder files add `decoder_attention_grad` [layer][head][target][target],
`cross_attention_grad` [layer][head][target][source] and, as [layer][head],
`decoder_head_gate_grad`, `decoder_head_importance`, `cross_head_gate_grad`,
`cross_head_importance` (and `decoder_head_ablation`, `cross_head_ablation` with --ablate).

`tokens` and `attention_matrices` hold real tokens only (seed 001 kept [PAD] entries in
`tokens`; a single text needs no padding, so there is none to flag).

JSON holds float32 or float16 values of all rows; uint8, row subsets and metrics-only are
HDF5-only.

Writes are atomic: a temporary file in the output folder, renamed over the target when complete.
The HDF5 writer refuses NUL (U+0000) in ids, texts and tokens (HDF5 strings cannot hold it; JSON
can) and checks the disk / file-size limit has room before each text. The reader validates every
text it returns (`check_text`): structure, shapes, finite non-negative values, and rows summing to
1 within ROW_SUM_TOL[dtype]; anything else is one AttnpipeError naming file, text, layer and head.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np

from attnpipe.errors import AttnpipeError

SCHEMA_VERSION = 2  # 2: encoder-decoder, image, embedding and gradient fields; storage options
READABLE_VERSIONS = (1, 2, 3)  # version 1 lacks only the fields added in 2; 3: packed (store/packed.py)
WRITABLE_VERSIONS = (2, 3)  # HDF5 layouts a writer can make: 2 one group per text, 3 packed
H5_SCHEMA_VERSION = 3  # the HDF5 layout written unless asked otherwise (--schema-version 2: a group per text)
FORMAT_NAME = "attnpipe-attention"
DIMS = ("layer", "head", "query", "key")
OUTPUT_SUFFIXES = (".json", ".h5", ".hdf5")
StorageDtype = Literal["float32", "float16", "uint8"]
Compression = Literal["gzip", "lzf", "none"]
RowSelection = Literal["all", "cls", "last"]
STORAGE_DTYPES = ("float32", "float16", "uint8")
COMPRESSIONS = ("gzip", "lzf", "none")
ROW_SELECTIONS = ("all", "cls", "last")
UINT8_SCALE = 255  # uint8 storage: v = round(p * 255), read back as p = v / 255
DEFAULT_GZIP_LEVEL = 4  # h5py's own default (and what schema version 1 files were written with)
# gzip chunks are standard zlib streams, which every HDF5 reads with its deflate filter; we make
# them with faster coders than zlib (encode_chunk): levels 0-3 with ISA-L (python-isal), 4-12 with
# libdeflate (package `deflate`). On the 256 demo texts of MiniLM (bench/bench_extract.py, one core):
#   float16 (shuffled)   zlib 1: 0.76 s, 1.666 B/value   ISA-L 1: 0.08 s, 1.688   libdeflate 6: 0.47 s, 1.626
#   uint8                zlib 4: 0.41 s, 0.409           ISA-L 1: 0.06 s, 0.410   libdeflate 6: 0.35 s, 0.389
#                        zlib 9: 7.4 s, 0.385            libdeflate 12: 6.2 s, 0.349
# A float's low mantissa byte is incompressible noise, so floats take the fast level 1; 8-bit
# values, chosen to save disk, take level 6.
MAX_GZIP_LEVEL = 12
DEFAULT_GZIP_LEVELS = {"float32": 1, "float16": 1, "uint8": 6}
CHUNK_TARGET_BYTES = 1 << 20  # chunks of at most ~1 MiB: one matrix read costs one small chunk
# Reading checks that every stored row sums to 1 within this tolerance, by storage dtype.
# float32: float32 softmax rounding (~1e-7 measured) with room for long rows. float16: each value
# is rounded to 11 significant bits (relative error <= 2**-11 ~ 4.9e-4, summed over a row of
# weights adding to 1) and values under 6e-8 flush to 0 (<= n·6e-8): 2e-3 covers rows of 10k keys.
ROW_SUM_TOL = {"float32": 1e-4, "float16": 2e-3, "uint8": 1e-4}
# uint8 rounds each value by at most 0.5/255, so a row of n keys may sum to 1 ± n·0.5/255:
# check_rows adds that bound for uint8 files (it is exact, not a loosened guess).
UINT8_ROW_SLACK = 0.5 / 255


@dataclass(frozen=True)
class Provenance:
    model: str
    model_type: str
    weights_sha256: str
    weight_files: tuple[str, ...]
    num_layers: int
    num_heads: int
    layers: tuple[int, ...]
    heads: tuple[int, ...]
    dtype: StorageDtype
    compute_dtype: str
    method: str
    max_length: int
    trust_remote_code: bool
    library_versions: dict[str, str] = field(default_factory=dict)
    parity_max_abs_diff: float | None = None
    parity_hidden_max_abs_diff: float | None = None
    schema_version: int = SCHEMA_VERSION
    # Encoder-decoder models only (None otherwise); the fields above then describe the encoder.
    decoder_num_layers: int | None = None
    decoder_num_heads: int | None = None
    decoder_layers: tuple[int, ...] | None = None
    decoder_heads: tuple[int, ...] | None = None
    checkpoint_dtype: str | None = None  # version 2: the weights' stored dtype, when known
    gradient_target: str | None = None  # version 2: what gradients explain (--explain), None without
    generation: dict | None = None  # version 2: generation settings (--generate, pairs without target)
    # --attribution ig (attnpipe/extract/attribution.py), None without: "ig", its steps and quadrature
    attribution: str | None = None
    attribution_steps: int | None = None
    attribution_method: str | None = None
    skipped_empty: tuple[int, ...] = ()  # lines of the texts file's empty texts skipped (--skip-empty); optional

    @property
    def is_seq2seq(self) -> bool:
        return self.decoder_layers is not None


DECODER_FIELDS = ("decoder_num_layers", "decoder_num_heads", "decoder_layers", "decoder_heads")
ATTRIBUTION_FIELDS = ("attribution", "attribution_steps", "attribution_method")  # written only with --attribution


@dataclass(frozen=True)
class TargetAttention:
    """The decoder side of one source/target pair of an encoder-decoder model."""

    text: str
    tokens: tuple[str, ...]  # decoder input tokens: start token + target shifted right = the rows
    token_ids: np.ndarray  # (t,) int64
    special_tokens_mask: np.ndarray  # (t,) bool
    labels: tuple[str, ...]  # the tokenized target: row i predicts labels[i]
    label_ids: np.ndarray  # (t,) int64
    truncated: bool
    num_tokens_untruncated: int
    decoder_attention: np.ndarray  # (L', H', t, t) float32, causal
    cross_attention: np.ndarray  # (L', H', t, s) float32: rows = target, columns = source
    # Version 2, only with --explain (attnpipe/extract/gradients.py); None otherwise. The attention
    # gradients have decoder_attention's / cross_attention's stored layers and heads; the gate
    # gradients and ablations cover every decoder head, (decoder_num_layers, decoder_num_heads).
    decoder_attention_grad: np.ndarray | None = None  # (L', H', t, t) d target / d decoder attention
    cross_attention_grad: np.ndarray | None = None  # (L', H', t, s) d target / d cross-attention
    decoder_head_gate_grad: np.ndarray | None = None  # d target / d gate of each decoder self-attention head
    cross_head_gate_grad: np.ndarray | None = None  # d target / d gate of each cross-attention head
    decoder_head_ablation: np.ndarray | None = None  # target change with that head's gate at 0 (--ablate)
    cross_head_ablation: np.ndarray | None = None
    generated: np.ndarray | None = None  # (t,) bool: decoder input token written by `generate` (version 2)
    # Only with --attribution ig: as the text's attention_attribution / attribution_gap / _delta
    decoder_attention_attribution: np.ndarray | None = None  # (L', H', t, t)
    cross_attention_attribution: np.ndarray | None = None  # (L', H', t, s)
    decoder_attribution_gap: np.ndarray | None = None  # (L',)
    cross_attribution_gap: np.ndarray | None = None
    decoder_attribution_delta: np.ndarray | None = None  # (L',)
    cross_attribution_delta: np.ndarray | None = None

    @property
    def decoder_head_importance(self) -> np.ndarray | None:
        return None if self.decoder_head_gate_grad is None else np.abs(self.decoder_head_gate_grad)

    @property
    def cross_head_importance(self) -> np.ndarray | None:
        return None if self.cross_head_gate_grad is None else np.abs(self.cross_head_gate_grad)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)


# TargetAttention's gradient fields: stored under these names beside `decoder_attention` (HDF5:
# datasets of the text group; JSON: top-level keys), with `<kind>_head_importance` = |gate grad|.
TARGET_ATTRIBUTIONS = ("decoder_attention_attribution", "cross_attention_attribution", "decoder_attribution_gap",
                       "cross_attribution_gap", "decoder_attribution_delta", "cross_attribution_delta")
TARGET_GRADIENTS = ("decoder_attention_grad", "cross_attention_grad", "decoder_head_gate_grad",
                    "cross_head_gate_grad", "decoder_head_ablation", "cross_head_ablation") + TARGET_ATTRIBUTIONS
# A text's --attribution ig fields (float32 datasets beside attention_grad; JSON: top-level keys)
TEXT_ATTRIBUTIONS = ("attention_attribution", "attribution_gap", "attribution_delta")


InputKind = Literal["text", "image", "embeddings"]


@dataclass(frozen=True)
class ImageInfo:
    """Where an image's patch tokens lie (version 2). Token 1 + r·cols + c is patch (r, c)."""

    path: str  # the image file as given
    size: tuple[int, int]  # (width, height) in pixels, before the processor resized it
    patch_grid: tuple[int, int]  # (rows, cols) of patches
    patch_size: int  # patch side in model-input pixels


@dataclass(frozen=True)
class TextAttention:
    id: str
    text: str
    tokens: tuple[str, ...]
    token_ids: np.ndarray  # (n,) int64
    special_tokens_mask: np.ndarray  # (n,) bool
    offsets: np.ndarray  # (n, 2) int64
    word_ids: np.ndarray  # (n,) int64, -1 = not part of a word
    truncated: bool
    num_tokens_untruncated: int
    attention: np.ndarray  # (L, H, n, n) float32: stored layers x stored heads x query x key
    target: TargetAttention | None = None  # encoder-decoder models: then `attention` is the encoder's
    input_kind: InputKind = "text"  # version 2
    image: ImageInfo | None = None  # version 2, input_kind "image" only
    # Version 2, only with --explain (attnpipe/extract/gradients.py); None otherwise.
    attention_grad: np.ndarray | None = None  # (L, H, n, n) d target / d attention
    head_gate_grad: np.ndarray | None = None  # (num_layers, num_heads) d target / d head gate
    token_grad_input: np.ndarray | None = None  # (n,) gradient x input on word embeddings
    head_ablation: np.ndarray | None = None  # (num_layers, num_heads) target change, head zeroed
    gradient_target_value: float | None = None
    gradient_target_label: int | None = None
    # Version 2, only for generated text (attnpipe/extract/generate.py); None otherwise.
    generated: np.ndarray | None = None  # (n,) bool: token written by the model's `generate`
    generated_text: str | None = None  # causal LMs: the continuation, decoded

    @property
    def head_importance(self) -> np.ndarray | None:
        """|d target / d gate| per (model layer, model head) (Michel et al. 2019)."""
        return None if self.head_gate_grad is None else np.abs(self.head_gate_grad)
    # The query position of each stored row when only some rows are kept (--rows cls|last),
    # attention is then (L, H, r, n); None means every row, in order.
    query_positions: np.ndarray | None = None
    # Only with --attribution ig (attnpipe/extract/attribution.py); None otherwise.
    attention_attribution: np.ndarray | None = None  # (L, H, n, n) A ⊙ ∫ ∂target/∂(αA) dα
    attribution_gap: np.ndarray | None = None  # (L,) Σ attribution − (target(A) − target(0)) per stored layer
    attribution_delta: np.ndarray | None = None  # (L,) target(A) − target(0): the layer's attention zeroed

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)


@dataclass(frozen=True)
class Storage:
    """How attention is stored in an HDF5 file (root attributes of schema version 2)."""

    dtype: StorageDtype = "float32"
    compression: Compression = "gzip"
    compression_level: int | None = None  # gzip only: 0-12, None = DEFAULT_GZIP_LEVELS[dtype]
    rows: RowSelection = "all"
    metrics_only: bool = False
    schema_version: int = H5_SCHEMA_VERSION  # HDF5 layout: 3 (packed, store/packed.py) or 2 (a group per text)

    def __post_init__(self) -> None:
        if self.schema_version not in WRITABLE_VERSIONS:
            raise AttnpipeError(f"--schema-version {self.schema_version} is not one of "
                                f"{', '.join(map(str, WRITABLE_VERSIONS))}")
        if self.dtype not in STORAGE_DTYPES:
            raise AttnpipeError(f"--dtype {self.dtype!r} is not one of {', '.join(STORAGE_DTYPES)}")
        if self.compression not in COMPRESSIONS:
            raise AttnpipeError(f"--compression {self.compression!r} is not one of {', '.join(COMPRESSIONS)}")
        if self.rows not in ROW_SELECTIONS:
            raise AttnpipeError(f"--rows {self.rows!r} is not one of {', '.join(ROW_SELECTIONS)}")
        if self.compression_level is not None:
            if self.compression != "gzip":
                raise AttnpipeError(f"--compression-level applies to gzip only, not {self.compression}")
            if not 0 <= self.compression_level <= MAX_GZIP_LEVEL:
                raise AttnpipeError(f"--compression-level {self.compression_level} is out of range: "
                                    f"use 0-{MAX_GZIP_LEVEL}")

    @property
    def level(self) -> int:
        return DEFAULT_GZIP_LEVELS[self.dtype] if self.compression_level is None else self.compression_level

    def h5_filters(self, itemsize: int) -> dict:
        """h5py create_dataset options for this compression (shuffle helps multi-byte values only).

        Every chunk also carries HDF5's fletcher32 checksum (attnpipe.store.checksum; files
        written before it have none and read as before).
        """
        if self.compression == "gzip":
            # HDF5 records a zlib level of at most 9; the chunks themselves come from encode_chunk.
            return dict(compression="gzip", compression_opts=min(self.level, 9), shuffle=itemsize > 1,
                        fletcher32=True)
        if self.compression == "lzf":
            return dict(compression="lzf", shuffle=itemsize > 1, fletcher32=True)
        return dict(fletcher32=True)


def query_positions(rows: RowSelection, n: int) -> np.ndarray:
    """The query positions kept for a text of n tokens: all, [0] (cls) or [n - 1] (last)."""
    if rows == "all" or n == 0:
        return np.arange(n, dtype=np.int64)
    return np.array([0 if rows == "cls" else n - 1], dtype=np.int64)


# ----------------------------------------------------------------------------- HDF5 root attributes


def provenance_attrs(prov: Provenance) -> dict:
    attrs = asdict(prov)
    attrs["library_versions"] = json.dumps(prov.library_versions, sort_keys=True)
    attrs["weight_files"] = json.dumps(list(prov.weight_files))
    for key in ("parity_max_abs_diff", "parity_hidden_max_abs_diff"):
        attrs[key] = math.nan if attrs[key] is None else float(attrs[key])
    attrs["gradient_target"] = "" if prov.gradient_target is None else prov.gradient_target
    attrs["generation"] = "" if prov.generation is None else json.dumps(prov.generation, sort_keys=True)
    attrs["layers"] = np.asarray(prov.layers, dtype=np.int64)
    attrs["heads"] = np.asarray(prov.heads, dtype=np.int64)
    for key in DECODER_FIELDS:  # written only for encoder-decoder models
        if attrs[key] is None:
            del attrs[key]
        elif key in ("decoder_layers", "decoder_heads"):
            attrs[key] = np.asarray(attrs[key], dtype=np.int64)
    attrs["checkpoint_dtype"] = prov.checkpoint_dtype or ""  # attributes cannot hold None
    for key in ATTRIBUTION_FIELDS:  # written only with --attribution
        if attrs[key] is None:
            del attrs[key]
    if prov.skipped_empty:  # written only when --skip-empty skipped texts
        attrs["skipped_empty"] = np.asarray(prov.skipped_empty, dtype=np.int64)
    else:
        del attrs["skipped_empty"]
    return attrs


def attr_int(value, name: str = "an integer attribute") -> int:
    """An integer attribute as stored: an integer, or a float holding a whole finite number (int()
    of infinity raises OverflowError, of NaN ValueError; both are damage, said as ValueError)."""
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if isinstance(value, (float, np.floating)) and not (math.isfinite(value) and float(value).is_integer()):
        raise ValueError(f"{name} must be an integer, got {float(value)!r}")
    return int(value)


class MissingAttribute(KeyError):
    """A provenance attribute the file should have and does not (its name is the argument)."""


def provenance_from_attrs(attrs) -> Provenance:
    def get(key):
        if key not in attrs:
            raise MissingAttribute(key)
        value = attrs[key]
        return value.decode() if isinstance(value, bytes) else value

    def maybe(value) -> float | None:
        return None if math.isnan(value) else float(value)

    return Provenance(
        model=get("model"),
        model_type=get("model_type"),
        weights_sha256=get("weights_sha256"),
        weight_files=tuple(json.loads(get("weight_files"))),
        num_layers=attr_int(get("num_layers"), "num_layers"),
        num_heads=attr_int(get("num_heads"), "num_heads"),
        layers=tuple(attr_int(x, "layers") for x in get("layers")),
        heads=tuple(attr_int(x, "heads") for x in get("heads")),
        dtype=get("dtype"),
        compute_dtype=get("compute_dtype"),
        method=get("method"),
        max_length=attr_int(get("max_length"), "max_length"),
        trust_remote_code=bool(get("trust_remote_code")),
        library_versions=json.loads(get("library_versions")),
        parity_max_abs_diff=maybe(get("parity_max_abs_diff")),
        parity_hidden_max_abs_diff=maybe(get("parity_hidden_max_abs_diff")),
        schema_version=attr_int(get("schema_version"), "schema_version"),
        decoder_num_layers=attr_int(get("decoder_num_layers"), "decoder_num_layers") if "decoder_num_layers" in attrs else None,
        decoder_num_heads=attr_int(get("decoder_num_heads"), "decoder_num_heads") if "decoder_num_heads" in attrs else None,
        decoder_layers=tuple(attr_int(x, "decoder_layers") for x in get("decoder_layers")) if "decoder_layers" in attrs else None,
        decoder_heads=tuple(attr_int(x, "decoder_heads") for x in get("decoder_heads")) if "decoder_heads" in attrs else None,
        checkpoint_dtype=(get("checkpoint_dtype") or None) if "checkpoint_dtype" in attrs else None,
        gradient_target=(get("gradient_target") or None) if "gradient_target" in attrs else None,
        generation=json.loads(get("generation")) if attrs.get("generation") else None,
        attribution=str(get("attribution")) if "attribution" in attrs else None,
        attribution_steps=attr_int(get("attribution_steps"), "attribution_steps") if "attribution_steps" in attrs else None,
        attribution_method=str(get("attribution_method")) if "attribution_method" in attrs else None,
        skipped_empty=tuple(attr_int(x, "skipped_empty") for x in get("skipped_empty")) if "skipped_empty" in attrs else (),
    )


def storage_from_attrs(attrs) -> Storage:
    def get(key, default):
        value = attrs.get(key, default)
        return value.decode() if isinstance(value, bytes) else value

    compression = str(get("compression", "gzip"))
    level = attr_int(get("compression_level", DEFAULT_GZIP_LEVEL), "compression_level")
    return Storage(
        dtype=str(get("dtype", "float32")),
        compression=compression,
        compression_level=level if compression == "gzip" else None,
        rows=str(get("rows", "all")),
        metrics_only=bool(get("metrics_only", False)),
        schema_version=3 if attr_int(get("schema_version", SCHEMA_VERSION), "schema_version") == 3 else SCHEMA_VERSION,
    )


def or_none(convert, value):
    """convert(value), or None for an absent (version 1 / no --target) value."""
    return None if value is None else convert(value)


def text_bytes_bound(item: TextAttention, num_layers: int, num_heads: int, itemsize: int, rows: str) -> int:
    """An upper bound on the uncompressed bytes a writer stores for `item`: its attention (stored
    `rows`), token arrays, strings and the arrays it carries besides (decoder side, gradients)."""
    strings = len(item.text.encode()) + sum(len(t.encode()) for t in item.tokens)
    extra = [a for a in (item.attention_grad, item.head_gate_grad, item.token_grad_input, item.head_ablation,
                         *(getattr(item, name) for name in TEXT_ATTRIBUTIONS)) if a is not None]
    if item.target is not None:
        extra += [item.target.decoder_attention, item.target.cross_attention]
        extra += [a for a in (getattr(item.target, name) for name in TARGET_GRADIENTS) if a is not None]
    return plain_texts_bytes_bound(np.array([item.num_tokens]), strings, num_layers, num_heads, itemsize,
                                   rows) + sum(a.nbytes for a in extra)


def plain_texts_bytes_bound(num_tokens: np.ndarray, string_bytes: int, num_layers: int, num_heads: int,
                            itemsize: int, rows: str) -> int:
    """text_bytes_bound of texts that carry only tokens, summed: their token counts and the UTF-8
    bytes of their texts and tokens together."""
    n = np.asarray(num_tokens, np.int64)
    attention = num_layers * num_heads * (n if rows == "all" else np.minimum(n, 1)) * n * itemsize
    return int(attention.sum() + 56 * n.sum()) + string_bytes  # 40 B of token arrays + 16 per token string
