"""`--method hf`: attention read from transformers' own eager `output_attentions`, for any model.

This is the fallback for model types attnpipe has no explicit forward pass for. The numbers are
whatever transformers computes; nothing here proves them, so files carry `method = "hf"`.
It plugs into the text extraction (attnpipe.extract.runner) as one more "family": `load_hf_model`
returns the same LoadedModel whose family is attnpipe.models.hf (HFWeights, check_attentions and
the family-interface `forward` live there).

Guards against the silent failures seen with transformers 5 (docs: shared pitfalls):
- the model is loaded with attn_implementation="eager": sdpa returns an *empty* attention
  tuple; an empty or short tuple is still checked and reported, never written;
- weights are loaded in float32 whatever the checkpoint's dtype (bf16/fp16 would give bf16
  attention); the checkpoint's own dtype is recorded as `checkpoint_dtype`;
- NaN (or inf) in the attention of real tokens stops the run.
Encoder-decoder models (T5, BART, ...) need a target sequence and are not handled here.
"""

from __future__ import annotations

from pathlib import Path

import torch

from attnpipe.errors import AttnpipeError
from attnpipe.extract.loading import LoadedModel, hash_files, read_model_config, weight_files
from attnpipe.models import hf as hf_family
from attnpipe.models.hf import HFWeights, check_attentions, forward  # noqa: F401  (moved; re-exported)


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
    if getattr(hf_model.config, "is_encoder_decoder", False):
        raise AttnpipeError(f"--method hf takes one input sequence; {model_type!r} is an encoder-decoder model")
    hf_model = hf_model.to(device).eval()
    weights = hf_family.load_weights(hf_model)
    return LoadedModel(
        model_dir=model_dir, model_type=model_type, family=hf_family, hf_model=hf_model,
        weights=weights, tokenizer=tokenizer, weights_sha256=hash_files(files),
        weight_files=tuple(p.name for p in files), device=device, trust_remote_code=trust_remote_code,
    )
