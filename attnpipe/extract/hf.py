"""`--method hf`: attention read from transformers' own eager `output_attentions`, for any model.

This is the fallback for model types attnpipe has no explicit forward pass for. The numbers are
whatever transformers computes; nothing here proves them, so files carry `method = "hf"`.
It plugs into the text extraction (attnpipe.extract.runner) as one more "family": `load_hf_model`
returns the same LoadedModel, and this module's `forward` has the family interface.

Guards against the silent failures seen with transformers 5 (docs: shared pitfalls):
- the model is loaded with attn_implementation="eager": sdpa returns an *empty* attention
  tuple; an empty or short tuple is still checked and reported, never written;
- weights are loaded in float32 whatever the checkpoint's dtype (bf16/fp16 would give bf16
  attention); the checkpoint's own dtype is recorded as `checkpoint_dtype`;
- NaN (or inf) in the attention of real tokens stops the run.
Encoder-decoder models (T5, BART, ...) need a target sequence and are not handled here.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from attnpipe.errors import AttnpipeError
from attnpipe.extract.loading import LoadedModel, hash_files, read_model_config, weight_files
from attnpipe.models.parts import Output


@dataclass(frozen=True)
class HFWeights:
    """Stands in for a family's Weights: the transformers model itself and its sizes."""

    model: torch.nn.Module
    num_layers: int
    num_heads: int
    token_type: None = None  # token types are left to the model's defaults (all zero)


def _config_size(config, names: tuple[str, ...], what: str, model_dir: Path) -> int:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise AttnpipeError(f"--method hf: cannot tell the number of {what} from {model_dir}/config.json")


def load_hf_model(model_dir: Path, device: torch.device, trust_remote_code: bool = False) -> LoadedModel:
    """Any local transformers folder with a tokenizer, in float32 on eager attention."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    model_type = read_model_config(model_dir).get("model_type", "unknown")
    files = weight_files(model_dir)
    if not files:
        raise AttnpipeError(f"no weight files in {model_dir} (expected model.safetensors or pytorch_model.bin)")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        hf_model = transformers.AutoModel.from_pretrained(
            model_dir,
            attn_implementation="eager",  # sdpa / flash return no attention weights
            dtype=torch.float32,  # a bf16/fp16 checkpoint is computed in float32 (recorded)
            use_safetensors=any(p.suffix == ".safetensors" for p in files),
            trust_remote_code=trust_remote_code,
        )
    except (OSError, ValueError, KeyError, ImportError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise AttnpipeError(f"could not load model from {model_dir}: {first_line}") from err
    config = hf_model.config
    if getattr(config, "is_encoder_decoder", False):
        raise AttnpipeError(f"--method hf takes one input sequence; {model_type!r} is an encoder-decoder model")
    hf_model = hf_model.to(device).eval()
    weights = HFWeights(
        model=hf_model,
        num_layers=_config_size(config, ("num_hidden_layers", "n_layer", "num_layers"), "layers", model_dir),
        num_heads=_config_size(config, ("num_attention_heads", "n_head", "num_heads"), "heads", model_dir),
    )
    return LoadedModel(
        model_dir=model_dir, model_type=model_type, family=sys.modules[__name__], hf_model=hf_model,
        weights=weights, tokenizer=tokenizer, weights_sha256=hash_files(files),
        weight_files=tuple(p.name for p in files), device=device, trust_remote_code=trust_remote_code,
    )


def check_attentions(attentions, attention_mask: torch.Tensor, num_layers: int, num_heads: int) -> None:
    """Refuse what transformers returned when it is empty, mis-shaped or not finite on real tokens."""
    if not attentions:
        raise AttnpipeError("transformers returned no attentions (an empty tuple): the model is not on "
                            "eager attention or does not support output_attentions")
    b, t = attention_mask.shape
    if len(attentions) != num_layers:
        raise AttnpipeError(f"transformers returned attention for {len(attentions)} layers, "
                            f"but the config says {num_layers}")
    real = attention_mask.bool()
    pairs = real[:, None, :, None] & real[:, None, None, :]  # (B, 1, Q, K) real query and key
    for index, probs in enumerate(attentions):
        if probs is None or tuple(probs.shape) != (b, num_heads, t, t):
            shape = None if probs is None else tuple(probs.shape)
            raise AttnpipeError(f"layer {index} attention has shape {shape}; expected {(b, num_heads, t, t)}")
        if not torch.isfinite(probs.masked_fill(~pairs, 0.0)).all():
            raise AttnpipeError(f"layer {index} attention holds NaN or inf on real tokens: refusing to store it")


def forward(
    weights: HFWeights,
    input_ids: torch.Tensor,  # (B, T)
    attention_mask: torch.Tensor,  # (B, T)
    token_type_ids: torch.Tensor | None = None,
    keep_layers: frozenset[int] | None = None,
    on_layer=None,  # as the families' forward: each kept layer handed over instead of kept
) -> Output:
    """The family interface over transformers' eager output_attentions."""
    out = weights.model(input_ids=input_ids, attention_mask=attention_mask, output_attentions=True)
    check_attentions(out.attentions, attention_mask, weights.num_layers, weights.num_heads)
    hidden = getattr(out, "last_hidden_state", None)
    attentions = {
        index: probs.float() for index, probs in enumerate(out.attentions)
        if keep_layers is None or index in keep_layers
    }
    if on_layer is not None:  # transformers computed every layer already: hand them over in order
        for index in sorted(attentions):
            on_layer(index, attentions.pop(index))
    return Output(hidden=hidden, attentions=attentions)
