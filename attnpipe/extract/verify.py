"""--verify: our pass against transformers' eager attention on the same batch, every kind.

The batch dict the family forward took runs the transformers model too
(`hf_model(**batch, output_attentions=True)`); each kind's attention is compared on real
positions only (padded query rows are noise in transformers' output), and the final hidden
states likewise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnpipe.errors import AttnpipeError

# Where transformers' output keeps each kind: (encoder-decoder field, single-stack field).
REFERENCE_FIELDS = {"self": ("encoder_attentions", "attentions"), "decoder": ("decoder_attentions", None),
                    "cross": ("cross_attentions", None)}


@dataclass(frozen=True)
class Parity:
    attention: float  # largest |ours - transformers eager| over real positions, every kind
    hidden: float  # the same for the final hidden states (and the encoder's, for encoder-decoders)
    where: tuple[int, str, int, int]  # (batch row, kind, layer, head) of the largest attention difference


def reference_diffs(hf_model, tensors: dict[str, torch.Tensor], lengths: dict[str, tuple[list[int], list[int]]],
                    out) -> Parity:
    """Compare the family's Output `out` with transformers eager on `tensors`, real positions only."""
    seq2seq = "decoder_input_ids" in tensors
    # use_cache=False: a cache copies the decoder keys, which changes the matmul's rounding (not the math).
    ref = hf_model(**tensors, output_attentions=True, **({"use_cache": False} if seq2seq else {}))
    attn, hidden, where = 0.0, 0.0, (0, "self", 0, 0)
    for kind, ours in out.attentions.items():
        theirs = getattr(ref, REFERENCE_FIELDS[kind][0 if seq2seq else 1])
        if not theirs:
            raise AttnpipeError("transformers returned no attentions: the model is not on eager attention")
        q_lengths, k_lengths = lengths[kind]
        for row, (q, k) in enumerate(zip(q_lengths, k_lengths, strict=True)):
            for layer, probs in ours.items():
                per_head = (theirs[layer][row, :, :q, :k] - probs[row, :, :q, :k]).abs().amax(dim=(1, 2))  # (H,)
                head = int(per_head.argmax())
                if per_head[head].item() > attn:
                    attn, where = per_head[head].item(), (row, kind, layer, head)
    q_lengths = lengths["decoder" if seq2seq else "self"][0]
    for row, n in enumerate(q_lengths):
        hidden = max(hidden, (ref.last_hidden_state[row, :n] - out.hidden[row, :n]).abs().max().item())
    if seq2seq:
        for row, n in enumerate(lengths["self"][0]):
            diff = (ref.encoder_last_hidden_state[row, :n] - out.encoder_hidden[row, :n]).abs().max().item()
            hidden = max(hidden, diff)
    return Parity(attn, hidden, where)
