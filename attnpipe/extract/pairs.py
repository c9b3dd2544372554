"""The extraction stage for encoder-decoder models (T5, BART, Marian): source/target pairs.

Each pair is run with teacher forcing. The source is tokenized as the model's input; the target
is tokenized as its labels (`text_target`, so a Marian model uses its target vocabulary), and the
decoder's input is the model's decoder start token followed by the labels shifted right by one,
exactly as transformers builds `decoder_input_ids` from `labels`. Row i of the decoder and
cross-attention is therefore decoder input token i, the position that predicts label i.

Stored per pair (attnpipe.store, schema version 2): the encoder self-attention as `attention`
(source x source), and in `target` the decoder's causal self-attention (target x target), the
decoder -> encoder cross-attention (target x source) and both token lists.
"""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from attnpipe import store
from attnpipe.extract.corpus import decoded_lines, check_unique_ids, jsonl_rows
from attnpipe.errors import AttnpipeError
from attnpipe.extract.runner import (
    ExtractConfig,
    ExtractResult,
    _encode,
    _max_length,
    _pad,
    length_sorted_batches,
    parse_indices,
    run_provenance,
)
from attnpipe.extract.loading import LoadedModel, default_model_dir, load_model, resolve_device
from attnpipe.models import is_seq2seq, supported_model_types

# T5 has relative positions and so no position table to bound the length: its pre-training length.
T5_DEFAULT_MAX_LENGTH = 512


@dataclass(frozen=True)
class Pair:
    id: str
    source: str
    target: str


def pairs_from_strings(sources: list[str], targets: list[str]) -> list[Pair]:
    """--source / --target given on the command line, paired in order: ids pair-0, pair-1, ..."""
    if len(sources) != len(targets):
        raise AttnpipeError(
            f"--source was given {len(sources)} time(s) and --target {len(targets)} time(s): "
            "give one --target for each --source, in the same order"
        )
    pairs = []
    for index, (source, target) in enumerate(zip(sources, targets)):
        for flag, text in (("--source", source), ("--target", target)):
            if not text.strip():
                raise AttnpipeError(f"{flag} number {index + 1} is empty")
        pairs.append(Pair(f"pair-{index}", source, target))
    return pairs


def _first_row(path: Path) -> object:
    for line in decoded_lines(path):
        if line.strip():
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def is_pairs_file(path: Path) -> bool:
    """A .jsonl file whose first row has a "source" field: a file of source/target pairs."""
    if path.suffix != ".jsonl" or not path.is_file():
        return False
    row = _first_row(path)
    return isinstance(row, dict) and "source" in row


def read_pairs_file(path: Path) -> list[Pair]:
    """A .jsonl file of {"source": ..., "target": ..., "id": optional}; ids default to line-N."""
    pairs = []
    for number, row in jsonl_rows(path):
        if not isinstance(row, dict):
            raise AttnpipeError(f"{path} line {number} is not a JSON object")
        for field in ("source", "target"):
            if not isinstance(row.get(field), str):
                raise AttnpipeError(f'{path} line {number} has no string "{field}" field')
            if not row[field].strip():
                raise AttnpipeError(f'{path} line {number} has an empty "{field}"')
        pairs.append(Pair(str(row.get("id", f"line-{number}")), row["source"], row["target"]))
    if not pairs:
        raise AttnpipeError(f"texts file {path} has no pairs")
    check_unique_ids(pairs)
    return pairs


class _TargetSide:
    """The tokenizer, called on targets the way transformers tokenizes labels (`text_target`)."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.is_fast = getattr(tokenizer, "is_fast", False)

    def __call__(self, texts, **kwargs):
        return self._tokenizer(text_target=texts, **kwargs)


def decoder_start_token_id(model: LoadedModel) -> int:
    """The model's decoder start token (T5, Marian: pad; BART: </s>), from its config."""
    config = model.hf_model.config
    start = getattr(config, "decoder_start_token_id", None)
    if start is None:  # some checkpoints keep it only in generation_config.json
        start = getattr(getattr(model.hf_model, "generation_config", None), "decoder_start_token_id", None)
    if start is None:
        raise AttnpipeError(
            f"{model.model_dir}/config.json has no decoder_start_token_id: the decoder input cannot be "
            "built from the target (set it in config.json; T5 and Marian use the pad token id)"
        )
    return int(start)


def _seq2seq_max_length(model: LoadedModel, requested: int | None) -> int:
    if hasattr(model.hf_model.config, "max_position_embeddings"):  # BART, Marian: the position table
        return _max_length(model, requested)
    # T5: relative positions, no table; the tokenizer's limit, else T5's pre-training length.
    limit = getattr(model.tokenizer, "model_max_length", None)
    limit = T5_DEFAULT_MAX_LENGTH if not limit or limit > 10**6 else int(limit)
    if requested is None:
        return limit
    if requested < 2:
        raise AttnpipeError(f"--max-length {requested} is too small: it must leave room for special tokens")
    return requested


@dataclass(frozen=True)
class _Parity:
    attention: float  # largest |ours - eager| over encoder, decoder and cross-attention
    hidden: float  # the same for the encoder's and the decoder's last hidden states
    where: tuple[int, str, int, int]  # (batch row, kind, layer, head) of the largest attention difference


def _reference_diffs(model, batch, src_lengths, tgt_lengths, out) -> _Parity:
    """Our pass against transformers' eager attention on the same batch, real positions only."""
    # use_cache=False: a cache copies the decoder keys, which changes the matmul's rounding (not the math).
    ref = model.hf_model(**batch, output_attentions=True, use_cache=False)
    if not (ref.encoder_attentions and ref.decoder_attentions and ref.cross_attentions):
        raise AttnpipeError("transformers returned no attentions: the model is not on eager attention")
    attn, hidden, where = 0.0, 0.0, (0, "encoder", 0, 0)
    for row, (s, t) in enumerate(zip(src_lengths, tgt_lengths)):
        kinds = (
            ("encoder", out.encoder_attentions, ref.encoder_attentions, s, s),
            ("decoder", out.decoder_attentions, ref.decoder_attentions, t, t),
            ("cross", out.cross_attentions, ref.cross_attentions, t, s),
        )
        for kind, ours, theirs, q, k in kinds:
            for layer, probs in ours.items():
                per_head = (theirs[layer][row, :, :q, :k] - probs[row, :, :q, :k]).abs().amax(dim=(1, 2))
                head = int(per_head.argmax())
                if per_head[head].item() > attn:
                    attn, where = per_head[head].item(), (row, kind, layer, head)
        hidden = max(
            hidden,
            (ref.encoder_last_hidden_state[row, :s] - out.encoder_hidden[row, :s]).abs().max().item(),
            (ref.last_hidden_state[row, :t] - out.decoder_hidden[row, :t]).abs().max().item(),
        )
    return _Parity(attn, hidden, where)


def _stack(attentions: dict[int, torch.Tensor], layers, head_index) -> np.ndarray:
    stacked = torch.stack([attentions[layer] for layer in layers], dim=1)  # (B, L, H, Q, K)
    return stacked.index_select(2, head_index).float().cpu().numpy()  # (B, L, H', Q, K)


def extract_pairs(config: ExtractConfig) -> ExtractResult:
    """Run the extraction stage on `config.pairs` and write `config.output`; return what was done."""
    store.check_output_path(config.output)
    pairs = list(config.pairs)
    if config.texts:
        raise AttnpipeError("give source/target pairs or texts, not both")
    if config.output.suffix == ".json" and len(pairs) > 1:
        raise AttnpipeError(
            f"a .json output holds one pair, got {len(pairs)}: write .h5 for several pairs"
        )
    if config.batch_size < 1:
        raise AttnpipeError(f"--batch-size must be at least 1, got {config.batch_size}")
    device = resolve_device(config.device)
    model_dir = config.model_dir if config.model_dir is not None else default_model_dir()
    model = load_model(model_dir, device, config.trust_remote_code)
    if not is_seq2seq(model.model_type):
        seq2seq = [t for t in supported_model_types() if is_seq2seq(t)]
        raise AttnpipeError(
            f"{model_dir} is a {model.model_type!r} model, not an encoder-decoder: source/target pairs "
            f"need one of {', '.join(seq2seq)}; give --text for this model"
        )
    weights = model.weights
    layers = parse_indices(config.layers, weights.num_layers, "--layer", "encoder layers")
    heads = parse_indices(config.heads, weights.num_heads, "--heads", "encoder heads")
    dec_layers = parse_indices(config.layers, weights.decoder_num_layers, "--layer", "decoder layers")
    dec_heads = parse_indices(config.heads, weights.decoder_num_heads, "--heads", "decoder heads")
    max_length = _seq2seq_max_length(model, config.max_length)
    start = decoder_start_token_id(model)
    special_ids = set(model.tokenizer.all_special_ids)

    src = _encode(model.tokenizer, [p.source for p in pairs], max_length)
    tgt = _encode(_TargetSide(model.tokenizer), [p.target for p in pairs], max_length)
    labels = tgt.input_ids
    # Teacher forcing: decoder input = start token + labels shifted right (transformers' shift_tokens_right).
    dec_ids = [[start] + row[:-1] for row in labels]
    dec_special = [[start in special_ids] + [bool(x) for x in row[:-1]] for row in tgt.special_tokens_mask]
    src_lengths = [len(ids) for ids in src.input_ids]
    tgt_lengths = [len(ids) for ids in dec_ids]
    pad_id = model.hf_model.config.pad_token_id
    pad_id = pad_id if pad_id is not None else 0
    keep, keep_dec = frozenset(layers), frozenset(dec_layers)
    head_index = torch.tensor(heads, device=device)
    dec_head_index = torch.tensor(dec_heads, device=device)
    parity = hidden_parity = 0.0

    with contextlib.ExitStack() as stack:
        writer = stack.enter_context(store.open_writer(config.output, len(pairs), config.dtype))
        bar = stack.enter_context(
            tqdm(total=len(pairs), unit="pair", file=sys.stderr,
                 disable=None if config.progress is None else not config.progress)  # None: tty only
        )
        total = [s + t for s, t in zip(src_lengths, tgt_lengths)]
        for batch_indices in length_sorted_batches(total, config.batch_size):
            batch = {
                "input_ids": _pad([src.input_ids[i] for i in batch_indices], pad_id, device),
                "attention_mask": _pad([[1] * src_lengths[i] for i in batch_indices], 0, device),
                "decoder_input_ids": _pad([dec_ids[i] for i in batch_indices], pad_id, device),
                "decoder_attention_mask": _pad([[1] * tgt_lengths[i] for i in batch_indices], 0, device),
            }
            b_src = [src_lengths[i] for i in batch_indices]
            b_tgt = [tgt_lengths[i] for i in batch_indices]
            with torch.inference_mode():
                out = model.family.forward_seq2seq(
                    weights, batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"],
                    batch["decoder_attention_mask"], keep_layers=keep, keep_decoder_layers=keep_dec,
                )
                if config.verify:
                    check = _reference_diffs(model, batch, b_src, b_tgt, out)
                    parity, hidden_parity = max(parity, check.attention), max(hidden_parity, check.hidden)
                    if check.attention > config.verify_tol:
                        row, kind, layer, head = check.where
                        raise AttnpipeError(
                            f"--verify failed: pair {pairs[batch_indices[row]].id!r} {kind} attention "
                            f"layer {layer} head {head} differs from transformers eager by "
                            f"{check.attention:.3g} (tolerance {config.verify_tol:g})"
                        )
                enc = _stack(out.encoder_attentions, layers, head_index)  # (B, L, H, S, S)
                dec = _stack(out.decoder_attentions, dec_layers, dec_head_index)  # (B, L', H', T, T)
                cross = _stack(out.cross_attentions, dec_layers, dec_head_index)  # (B, L', H', T, S)
            for row, i in enumerate(batch_indices):
                s, t = src_lengths[i], tgt_lengths[i]
                target = store.TargetAttention(
                    text=pairs[i].target,
                    tokens=tuple(model.tokenizer.convert_ids_to_tokens(dec_ids[i])),
                    token_ids=np.asarray(dec_ids[i], dtype=np.int64),
                    special_tokens_mask=np.asarray(dec_special[i], dtype=bool),
                    labels=tuple(model.tokenizer.convert_ids_to_tokens(labels[i])),
                    label_ids=np.asarray(labels[i], dtype=np.int64),
                    truncated=tgt.untruncated_lengths[i] > t,
                    num_tokens_untruncated=tgt.untruncated_lengths[i],
                    decoder_attention=np.ascontiguousarray(dec[row, :, :, :t, :t]),  # real tokens only
                    cross_attention=np.ascontiguousarray(cross[row, :, :, :t, :s]),
                )
                item = store.TextAttention(
                    id=pairs[i].id,
                    text=pairs[i].source,
                    tokens=tuple(model.tokenizer.convert_ids_to_tokens(src.input_ids[i])),
                    token_ids=np.asarray(src.input_ids[i], dtype=np.int64),
                    special_tokens_mask=np.asarray(src.special_tokens_mask[i], dtype=bool),
                    offsets=src.offsets[i],
                    word_ids=src.word_ids[i],
                    truncated=src.untruncated_lengths[i] > s,
                    num_tokens_untruncated=src.untruncated_lengths[i],
                    attention=np.ascontiguousarray(enc[row, :, :, :s, :s]),
                    target=target,
                )
                writer.write(i, item)
            bar.update(len(batch_indices))
        provenance = run_provenance(
            dtype=config.dtype, verify=config.verify, parity=parity, hidden_parity=hidden_parity,
            model=str(model_dir),
            model_type=model.model_type,
            weights_sha256=model.weights_sha256,
            weight_files=model.weight_files,
            num_layers=weights.num_layers,
            num_heads=weights.num_heads,
            layers=layers,
            heads=heads,
            max_length=max_length,
            trust_remote_code=config.trust_remote_code,
            decoder_num_layers=weights.decoder_num_layers,
            decoder_num_heads=weights.decoder_num_heads,
            decoder_layers=dec_layers,
            decoder_heads=dec_heads,
        )
        writer.finish(provenance)
    truncated = tuple(
        p.id for i, p in enumerate(pairs)
        if src.untruncated_lengths[i] > src_lengths[i] or tgt.untruncated_lengths[i] > tgt_lengths[i]
    )
    return ExtractResult(
        output=config.output,
        num_texts=len(pairs),
        num_tokens=sum(src_lengths) + sum(tgt_lengths),
        layers=layers,
        heads=heads,
        truncated_ids=truncated,
        max_length=max_length,
        parity_max_abs_diff=parity if config.verify else None,
        parity_hidden_max_abs_diff=hidden_parity if config.verify else None,
        decoder_layers=dec_layers,
        decoder_heads=dec_heads,
    )
