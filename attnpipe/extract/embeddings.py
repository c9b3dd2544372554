"""The extraction stage for a plain PyTorch model: the user's factory + state dict + an .npy array.

`--torch-model package.module:build` (or `path/to/file.py:build`) names a function that takes
no arguments and returns an `nn.Module` holding an `nn.TransformerEncoder` (or
`nn.TransformerEncoderLayer`s). **This imports and runs the user's own Python code**, by their
explicit request, like `python -c "from package.module import build"` would; the current
folder is put on `sys.path` first so a module beside the data can be found. Nothing else of
theirs runs: only the encoder layers' weights are read, and attnpipe's own pass
(models/torch_encoder.py) computes every head's attention.

`--weights` is a `.safetensors` file (preferred) or a `.pt`/`.pth`/`.bin` state dict read with
`torch.load(weights_only=True)`, which refuses pickled code. A checkpoint dict with a
`model_state_dict` or `state_dict` entry (what training loops such as seed 003's save) is
unwrapped. Without `--weights` the factory's own initialisation is used (recorded as no weights).

`--data embeddings.npy` holds float embeddings of shape (batch, seq, dim) (or (seq, dim) for one
sample), fed directly to the first encoder layer: whatever the model does before its encoder
(token embedding, positional encoding, scaling) is *not* applied. Sample i becomes entry
"sample-<i>" with tokens "0".."n-1". No padding by default; with `mask_zero_rows`, trailing rows
that are exactly zero are padding: masked as keys (src_key_padding_mask) and not stored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from attnpipe import store
from attnpipe.errors import AttnpipeError
from attnpipe.extract.runner import ExtractResult, parse_indices, run_provenance
from attnpipe.extract.loading import hash_files, resolve_device
from attnpipe.models import torch_encoder

STATE_DICT_KEYS = ("model_state_dict", "state_dict")  # checkpoint dicts that wrap a state dict


@dataclass(frozen=True)
class TorchExtractConfig:
    factory: str  # "package.module:build" or "path/to/file.py:build"
    data: Path
    output: Path
    weights: Path | None = None
    layers: tuple[str, ...] = ("all",)
    heads: tuple[str, ...] = ("all",)
    device: str = "cpu"
    batch_size: int = 32
    dtype: store.StorageDtype = "float32"
    mask_zero_rows: bool = False
    causal: bool = False


def import_factory(spec: str):
    """The callable named by 'package.module:build' or 'file.py:build' (imports user code)."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise AttnpipeError(f"--torch-model takes 'package.module:function' or 'file.py:function', got {spec!r}")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise AttnpipeError(f"--torch-model file not found: {path}")
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())  # as `python -m` does: modules of the current folder
            module = importlib.import_module(module_name)
    except AttnpipeError:
        raise
    except Exception as err:  # noqa: BLE001 - the user's module may raise anything while importing
        raise AttnpipeError(f"--torch-model: cannot import {module_name!r}: {type(err).__name__}: {err}") from err
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise AttnpipeError(f"--torch-model: {module_name!r} has no function {attr!r}")
    return factory


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or .pt/.pth/.bin through torch.load(weights_only=True)."""
    if not path.is_file():
        raise AttnpipeError(f"--weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except (SafetensorError, OSError) as err:
            raise AttnpipeError(f"cannot read {path}: {err}") from err
    if path.suffix not in (".pt", ".pth", ".bin"):
        raise AttnpipeError(f"--weights must be .safetensors, .pt, .pth or .bin, got {path.name}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # never unpickles code
    except Exception as err:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise AttnpipeError(f"cannot read {path} with torch.load(weights_only=True): {first}") from err
    if isinstance(state, dict):
        for key in STATE_DICT_KEYS:
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AttnpipeError(f"{path} holds no state dict (a dict of tensor names to tensors)")
    return state


def build_module(factory_spec: str, weights: Path | None) -> tuple[nn.Module, str | None]:
    """Call the user's factory and load the weights into it; return it and the weights' dtype."""
    state = read_state_dict(weights) if weights is not None else None  # bad weights fail before user code runs
    factory = import_factory(factory_spec)
    try:
        with warnings.catch_warnings():
            # torch warns that a norm_first / batch_first=False encoder cannot use nested tensors:
            # irrelevant here, the module's own forward is never called.
            warnings.filterwarnings("ignore", message="enable_nested_tensor is True")
            module = factory()
    except Exception as err:  # noqa: BLE001 - the user's factory may raise anything
        raise AttnpipeError(f"--torch-model {factory_spec} raised {type(err).__name__}: {err}") from err
    if not isinstance(module, nn.Module):
        raise AttnpipeError(f"--torch-model {factory_spec} returned {type(module).__name__}, not a torch.nn.Module")
    stored_dtype = None
    if state is not None:
        floats = [v.dtype for v in state.values() if v.is_floating_point()]
        stored_dtype = str(floats[0]).removeprefix("torch.") if floats else None
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as err:
            first = str(err).strip().splitlines()
            raise AttnpipeError(f"{weights} does not fit the module built by {factory_spec}: "
                                f"{' '.join(line.strip() for line in first[:2])}") from err
    return module.float().eval(), stored_dtype  # float32 compute whatever the stored dtype; no dropout


def read_embeddings(path: Path, dim: int) -> np.ndarray:
    """(batch, seq, dim) float32 from an .npy file (never pickled objects)."""
    if not path.is_file():
        raise AttnpipeError(f"--data file not found: {path}")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise AttnpipeError(f"cannot read {path} as a NumPy .npy array: {err}") from err
    if array.ndim == 2:
        array = array[None]  # one sample
    if array.ndim != 3 or not np.issubdtype(array.dtype, np.number):
        raise AttnpipeError(f"{path} holds a {array.dtype} array of shape {array.shape}; "
                            "expected numbers of shape (batch, seq, dim)")
    if array.shape[2] != dim:
        raise AttnpipeError(f"{path} has embedding size {array.shape[2]}, the model's encoder takes {dim}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise AttnpipeError(f"{path} has shape {array.shape}: no samples or no positions")
    if not np.isfinite(array).all():
        raise AttnpipeError(f"{path} holds NaN or inf values")
    return array.astype(np.float32)


def real_lengths(array: np.ndarray, mask_zero_rows: bool) -> list[int]:
    """Per sample, the positions before its trailing all-zero rows (or all of them)."""
    batch, seq, _ = array.shape
    if not mask_zero_rows:
        return [seq] * batch
    nonzero = np.any(array != 0, axis=2)  # (batch, seq)
    lengths = [int(np.flatnonzero(row)[-1]) + 1 if row.any() else 0 for row in nonzero]
    empty = [i for i, n in enumerate(lengths) if n == 0]
    if empty:
        raise AttnpipeError(f"--mask-zero-rows: sample {empty[0]} is all zeros, nothing is left to attend to")
    return lengths


def extract_torch(config: TorchExtractConfig) -> ExtractResult:
    """Run a user's torch encoder on embeddings and write `config.output`."""
    store.check_output_path(config.output)
    if config.batch_size < 1:
        raise AttnpipeError(f"--batch-size must be at least 1, got {config.batch_size}")
    device = resolve_device(config.device)
    module, stored_dtype = build_module(config.factory, config.weights)
    try:
        weights = torch_encoder.load_weights(module.to(device))
    except ValueError as err:
        raise AttnpipeError(f"--torch-model {config.factory}: {err}") from err
    array = read_embeddings(config.data, weights.d_model)
    if config.output.suffix == ".json" and array.shape[0] > 1:
        raise AttnpipeError(f"a .json output holds one sample, {config.data} has {array.shape[0]}: write .h5")
    lengths = real_lengths(array, config.mask_zero_rows)
    layers = parse_indices(config.layers, weights.num_layers, "--layer", "layers")
    heads = parse_indices(config.heads, weights.num_heads, "--heads", "heads")
    keep = frozenset(layers)
    head_index = torch.tensor(heads, device=device)
    batch, seq, _ = array.shape

    with contextlib.ExitStack() as stack:
        writer = stack.enter_context(store.open_writer(config.output, batch, config.dtype))
        for start in range(0, batch, config.batch_size):
            rows = range(start, min(start + config.batch_size, batch))
            x = torch.from_numpy(array[rows.start:rows.stop]).to(device)  # (B, T, E)
            mask = torch.tensor([[1] * lengths[i] + [0] * (seq - lengths[i]) for i in rows], device=device)
            with torch.inference_mode():
                out = torch_encoder.forward(dataclasses.replace(weights, causal=config.causal),
                                            {"inputs_embeds": x, "attention_mask": mask}, keep_layers={"self": keep})
                stacked = torch.stack([out.attentions["self"][layer] for layer in layers], dim=1)  # (B, L, H, T, T)
                stacked = stacked.index_select(2, head_index).float().cpu().numpy()
            if not np.isfinite(stacked).all():
                raise AttnpipeError("the attention holds NaN or inf: check the weights and --data")
            for row, i in enumerate(rows):
                n = lengths[i]
                item = store.TextAttention(
                    id=f"sample-{i}",
                    text=f"{config.data}[{i}]",
                    tokens=tuple(str(p) for p in range(n)),  # positions: the array carries no tokens
                    token_ids=np.arange(n, dtype=np.int64),
                    special_tokens_mask=np.zeros(n, dtype=bool),
                    offsets=np.full((n, 2), -1, dtype=np.int64),
                    word_ids=np.full(n, -1, dtype=np.int64),
                    truncated=False,
                    num_tokens_untruncated=n,
                    attention=np.ascontiguousarray(stacked[row, :, :, :n, :n]),  # real positions only
                    input_kind="embeddings",
                )
                writer.write(i, item)
        provenance = run_provenance(
            dtype=config.dtype,
            model=config.factory,
            model_type="torch",
            weights_sha256=hash_files([config.weights]) if config.weights is not None else "",
            weight_files=(config.weights.name,) if config.weights is not None else (),
            num_layers=weights.num_layers,
            num_heads=weights.num_heads,
            layers=layers,
            heads=heads,
            max_length=seq,
            trust_remote_code=True,  # the user's own factory code ran, at their request
            checkpoint_dtype=stored_dtype,
        )
        writer.finish(provenance)
    return ExtractResult(
        output=config.output, num_texts=batch, num_tokens=sum(lengths), layers=layers, heads=heads,
        truncated_ids=(), max_length=seq, parity_max_abs_diff=None, parity_hidden_max_abs_diff=None,
    )
