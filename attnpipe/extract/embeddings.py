"""Input adapter for a plain PyTorch model: the user's factory + state dict + an .npy array.

`--torch-model package.module:build` (or `path/to/file.py:build`) names a function that takes
no arguments and returns an `nn.Module` holding an `nn.TransformerEncoder` (or
`nn.TransformerEncoderLayer`s). **This imports and runs the user's own Python code**, by their
explicit request, like `python -c "from package.module import build"` would; the current
folder is put on `sys.path` first so a module beside the data can be found. Nothing else of
theirs runs: only the encoder layers' weights are read, and attnpipe's own pass
(models/torch_encoder.py) computes every head's attention.

`--weights` is a `.safetensors` file (preferred) or a `.pt`/`.pth`/`.bin` state dict read by
attnpipe.extract.loading.read_state_dict (`torch.load(weights_only=True)`), which refuses pickled code. A checkpoint dict with a
`model_state_dict` or `state_dict` entry (what training loops such as seed 003's save) is
unwrapped. Without `--weights` the factory's own initialisation is used (recorded as no weights).

`--data embeddings.npy` holds float embeddings of shape (batch, seq, dim) (or (seq, dim) for one
sample), fed directly to the first encoder layer: whatever the model does before its encoder
(token embedding, positional encoding, scaling) is *not* applied. Sample i becomes entry
"sample-<i>" with tokens "0".."n-1". No padding by default; with `mask_zero_rows`, trailing rows
that are exactly zero are padding: masked as keys (src_key_padding_mask) and not stored.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from torch import nn

from attnpipe import store
from attnpipe.errors import AttnpipeError
from attnpipe.extract.batching import mask
from attnpipe.extract.inputs import Batch
from attnpipe.extract.loading import hash_files, read_state_dict
from attnpipe.models import torch_encoder


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


def build_module(factory_spec: str, weights: Path | None) -> tuple[nn.Module, str | None]:
    """Call the user's factory and load the weights into it; return it and the weights' dtype."""
    state = read_state_dict(weights, "--weights file") if weights is not None else None  # bad weights fail before user code runs
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


@dataclass(frozen=True)
class TorchModel:
    """A user's torch encoder, as the runner drives a model: family, weights and provenance."""

    factory: str
    family: ModuleType
    weights: object  # torch_encoder.Weights (its `causal` carries --causal)
    weights_file: Path | None
    checkpoint_dtype: str | None
    hf_model: None = None  # no transformers reference: --verify is refused
    trust_remote_code: bool = True  # the user's own factory code ran, at their request

    @property
    def num_layers(self) -> int:
        return self.weights.num_layers

    @property
    def num_heads(self) -> int:
        return self.weights.num_heads

    def provenance_fields(self) -> dict:
        return dict(
            model=self.factory,
            model_type="torch",
            weights_sha256=hash_files([self.weights_file]) if self.weights_file is not None else "",
            weight_files=(self.weights_file.name,) if self.weights_file is not None else (),
            trust_remote_code=self.trust_remote_code,
            checkpoint_dtype=self.checkpoint_dtype,
        )


def load_torch_model(factory: str, weights_file: Path | None, device: torch.device, causal: bool) -> TorchModel:
    """Build the user's module, load its weights, map its encoder layers (torch_encoder)."""
    module, stored_dtype = build_module(factory, weights_file)
    try:
        weights = torch_encoder.load_weights(module.to(device))
    except ValueError as err:
        raise AttnpipeError(f"--torch-model {factory}: {err}") from err
    if causal:  # --causal: the run's mask, carried by the weights (models/torch_encoder.py)
        weights = dataclasses.replace(weights, causal=True)
    return TorchModel(factory, torch_encoder, weights, weights_file, stored_dtype)


class EmbeddingInputs:
    """(batch, seq, dim) embeddings from an .npy file: sample i is entry "sample-<i>"."""

    label = "text"  # guards and messages name entries as texts ("text 'sample-0' layer ...")
    input_kind = "embeddings"
    generation = None  # the settings when the model generated the text (PairInputs, ContinuationInputs)
    generated_tokens = 0

    def __init__(self, data: Path, model: TorchModel, mask_zero_rows: bool):
        self.data = data
        self.array = read_embeddings(data, model.weights.d_model)
        self.lengths = real_lengths(self.array, mask_zero_rows)
        self.ids = [f"sample-{i}" for i in range(self.array.shape[0])]
        self.max_length = self.array.shape[1]
        self.widths = [self.max_length] * len(self.ids)  # the array is padded already: all one width

    def prepare(self, indices: list[int], device: torch.device) -> Batch:
        lengths = [self.lengths[i] for i in indices]
        # Cropped to the batch's longest real sample: the positions after it are padding of every
        # row (masked keys, never stored), and one sample alone (--explain) then has none at all,
        # so no padding enters a gradient.
        x = torch.from_numpy(self.array[indices, :max(lengths)]).to(device)  # (B, T, E)
        attention_mask = mask(lengths, device)  # (B, T)
        items = []
        for i, n in zip(indices, lengths, strict=True):
            items.append(store.TextAttention(
                id=self.ids[i],
                text=f"{self.data}[{i}]",
                tokens=tuple(str(p) for p in range(n)),  # positions: the array carries no tokens
                token_ids=np.arange(n, dtype=np.int64),
                special_tokens_mask=np.zeros(n, dtype=bool),
                offsets=np.full((n, 2), -1, dtype=np.int64),
                word_ids=np.full(n, -1, dtype=np.int64),
                truncated=False,
                num_tokens_untruncated=n,
                attention=None,
                input_kind="embeddings",
            ))
        return Batch(indices, {"inputs_embeds": x, "attention_mask": attention_mask}, items,
                     {"self": (lengths, lengths)})
