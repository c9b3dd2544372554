"""The extraction stage: texts -> our forward pass -> an attention file.

Texts are tokenized once, sorted by length into batches (so little padding is computed),
run through the family's forward pass, cropped to each text's real tokens and written in the
user's order. With `verify`, every batch also runs through transformers' eager attention and
the largest difference is recorded in the file (and fails the run above the tolerance).
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

from attnpipe import __version__, guards, store
from attnpipe.corpus import Text
from attnpipe.errors import AttnpipeError
from attnpipe.loading import LoadedModel, checkpoint_dtype, default_model_dir, load_model, resolve_device

# Probabilities are float32 sums of n terms: 1e-5 bounds the float32 rounding we have measured
# against transformers' eager attention (~1e-7 on MiniLM), with room for long inputs.
DEFAULT_VERIFY_TOL = 1e-5


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
    fast = getattr(tokenizer, "is_fast", False)
    enc = tokenizer(
        texts,
        truncation=True,
        max_length=max_length,
        return_special_tokens_mask=True,
        return_offsets_mapping=fast,
    )
    full = tokenizer(texts, truncation=False)["input_ids"]
    n_texts = len(texts)
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
        untruncated_lengths=[len(ids) for ids in full],
    )


def length_sorted_batches(lengths: list[int], batch_size: int) -> Iterator[list[int]]:
    """Indices grouped into batches of similar length (longest first), to compute little padding."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


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
    if config.pairs:  # encoder-decoder models: attnpipe/extract_seq2seq.py
        from attnpipe.extract_seq2seq import extract_pairs

        return extract_pairs(config)
    store.check_output_path(config.output)
    if not config.texts:
        raise AttnpipeError("no texts given: use --text or --texts-file")
    if config.output.suffix == ".json" and len(config.texts) > 1:
        raise AttnpipeError(
            f"a .json output holds one text, got {len(config.texts)}: write .h5 for several texts"
        )
    if config.batch_size < 1:
        raise AttnpipeError(f"--batch-size must be at least 1, got {config.batch_size}")
    if config.method == "hf" and config.verify:
        raise AttnpipeError("--verify compares our forward pass with transformers; with --method hf "
                            "the attention already comes from transformers")
    device = resolve_device(config.device)
    model_dir = config.model_dir if config.model_dir is not None else default_model_dir()
    if config.method == "hf":
        from attnpipe.extract_hf import load_hf_model

        model = load_hf_model(model_dir, device, config.trust_remote_code)
    else:
        model = load_model(model_dir, device, config.trust_remote_code)
    if getattr(model.family, "SEQ2SEQ", False):
        raise AttnpipeError(
            f"{model_dir} is an encoder-decoder ({model.model_type}) model: give --source and --target "
            "(or a .jsonl file with source and target fields) instead of texts"
        )
    layers = parse_indices(config.layers, model.num_layers, "--layer", "layers")
    heads = parse_indices(config.heads, model.num_heads, "--heads", "heads")
    max_length = _max_length(model, config.max_length)

    texts = list(config.texts)
    encoded = _encode(model.tokenizer, [t.text for t in texts], max_length)
    lengths = [len(ids) for ids in encoded.input_ids]
    pad_id = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    keep = frozenset(layers)
    head_index = torch.tensor(heads, device=device)
    parity = hidden_parity = 0.0

    json_item: store.TextAttention | None = None
    with contextlib.ExitStack() as stack:
        writer = None
        if config.output.suffix != ".json":
            writer = stack.enter_context(store.H5Writer(config.output, len(texts), config.dtype))
        bar = stack.enter_context(
            tqdm(total=len(texts), unit="text", file=sys.stderr,
                 disable=None if config.progress is None else not config.progress)  # None: tty only
        )
        for batch_indices in length_sorted_batches(lengths, config.batch_size):
            batch = {
                "input_ids": _pad([encoded.input_ids[i] for i in batch_indices], pad_id, device),
                "attention_mask": _pad([[1] * lengths[i] for i in batch_indices], 0, device),
            }
            if encoded.token_type_ids is not None and model.weights.token_type is not None:
                batch["token_type_ids"] = _pad([encoded.token_type_ids[i] for i in batch_indices], 0, device)
            batch_lengths = [lengths[i] for i in batch_indices]
            with torch.inference_mode():
                out = model.family.forward(
                    model.weights, batch["input_ids"], batch["attention_mask"],
                    batch.get("token_type_ids"), keep_layers=keep,
                )
                guards.check_attention(out.attentions, batch_lengths, [texts[i].id for i in batch_indices],
                                       causal=guards.is_causal(model.model_type))  # stops a broken pass
                if config.verify:
                    check = _reference_diffs(model, batch, batch_lengths, out.attentions, out.hidden)
                    parity, hidden_parity = max(parity, check.attention), max(hidden_parity, check.hidden)
                    if check.attention > config.verify_tol:
                        row, layer, head = check.where
                        raise AttnpipeError(
                            f"--verify failed: text {texts[batch_indices[row]].id!r} layer {layer} "
                            f"head {head} differs from transformers eager by {check.attention:.3g} "
                            f"(tolerance {config.verify_tol:g})"
                        )
                stacked = torch.stack([out.attentions[layer] for layer in layers], dim=1)  # (B, L, H, T, T)
                stacked = stacked.index_select(2, head_index).float().cpu().numpy()  # (B, L, H', T, T)
            for row, i in enumerate(batch_indices):
                n = lengths[i]
                item = store.TextAttention(
                    id=texts[i].id,
                    text=texts[i].text,
                    tokens=tuple(model.tokenizer.convert_ids_to_tokens(encoded.input_ids[i])),
                    token_ids=np.asarray(encoded.input_ids[i], dtype=np.int64),
                    special_tokens_mask=np.asarray(encoded.special_tokens_mask[i], dtype=bool),
                    offsets=encoded.offsets[i],
                    word_ids=encoded.word_ids[i],
                    truncated=encoded.untruncated_lengths[i] > n,
                    num_tokens_untruncated=encoded.untruncated_lengths[i],
                    attention=np.ascontiguousarray(stacked[row, :, :, :n, :n]),  # real tokens only
                )
                if writer is not None:
                    writer.write(i, item)
                else:
                    json_item = item
            bar.update(len(batch_indices))
        provenance = store.Provenance(
            model=str(model_dir),
            model_type=model.model_type,
            weights_sha256=model.weights_sha256,
            weight_files=model.weight_files,
            num_layers=model.num_layers,
            num_heads=model.num_heads,
            layers=layers,
            heads=heads,
            dtype=config.dtype,
            compute_dtype="float32",
            method=config.method,
            max_length=max_length,
            trust_remote_code=config.trust_remote_code,
            library_versions=library_versions(),
            parity_max_abs_diff=parity if config.verify else None,
            parity_hidden_max_abs_diff=hidden_parity if config.verify else None,
            checkpoint_dtype=checkpoint_dtype(model_dir),
        )
        if writer is not None:
            writer.finish(provenance)
        else:
            store.write_json(config.output, json_item, provenance)
    truncated = tuple(t.id for t, full, n in zip(texts, encoded.untruncated_lengths, lengths) if full > n)
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
