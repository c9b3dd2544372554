"""Broken model folders for the reliability tests and docs/ERRORS.md rows: a tiny BERT whose
weights do not fit its config.json in one way each, or whose config numbers or safetensors file
transformers cannot load (issue 16)."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def _edit_weights(folder: Path, edit) -> None:
    state = load_file(folder / "model.safetensors")
    save_file(edit(dict(state)), folder / "model.safetensors", metadata={"format": "pt"})


QUERY = "encoder.layer.0.attention.self.query.weight"
MISFITS = {  # name -> how the copy of a good tiny BERT (2 layers, hidden 32) is broken
    "ddp": lambda d: _edit_weights(d, lambda s: {"module." + k: v for k, v in s.items()}),
    "noquery": lambda d: _edit_weights(d, lambda s: {k: v for k, v in s.items() if k != QUERY}),
    "nowords": lambda d: _edit_weights(d, lambda s: {k: v for k, v in s.items() if "word_embeddings" not in k}),
    "shape": lambda d: _edit_weights(d, lambda s: {**s, QUERY: torch.zeros(32, 30)}),
    "layers3": lambda d: _set_config(d, num_hidden_layers=3),
    "layers1": lambda d: _set_config(d, num_hidden_layers=1),
    "notokenizer": lambda d: [p.unlink() for p in d.iterdir() if p.name.startswith("tokenizer")],
}


def _set_config(folder: Path, **values) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **values}))


def misfit_folders(good: Path, into: Path) -> dict[str, Path]:
    """One broken copy of the model folder `good` per MISFITS entry, under `into`."""
    folders = {}
    for name, breakage in MISFITS.items():
        folder = into / f"misfit_{name}"
        if not folder.exists():
            shutil.copytree(good, folder)
            breakage(folder)
        folders[name] = folder
    return folders


# ----------------------------------------------------------------------------- folders that cannot load at all


def _config(**values):
    def apply(folder: Path) -> None:
        path = folder / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **values}))
    return apply


def _safetensors(change):
    def apply(folder: Path) -> None:
        path = folder / "model.safetensors"
        path.write_bytes(change(path.read_bytes()))
    return apply


BROKEN_MODELS = {  # name -> (breakage, what the one line must say)
    "heads-nan": (_config(num_attention_heads=float("nan")), "num_attention_heads is nan, not a positive integer"),
    "heads-zero": (_config(num_attention_heads=0), "num_attention_heads is 0, not a positive integer"),
    "layers-negative": (_config(num_hidden_layers=-1), "num_hidden_layers is -1, not a positive integer"),
    "hidden-string": (_config(hidden_size="32"), "hidden_size is '32', not a positive integer"),
    "heads-do-not-divide": (_config(num_attention_heads=5), "hidden_size 32 is not a multiple of num_attention_heads 5"),
    "safetensors-truncated": (_safetensors(lambda b: b[:len(b) // 2]), "model.safetensors is damaged (truncated?)"),
    "safetensors-garbage-header": (_safetensors(lambda b: b[:8] + b"\xff" * 40 + b[48:]),
                                   "model.safetensors is damaged: its header is not JSON"),
    "safetensors-header-too-long": (_safetensors(lambda b: struct.pack("<Q", 10**9) + b[8:]),
                                    "model.safetensors is damaged: its header claims 1000000000 bytes"),
    "safetensors-too-short": (_safetensors(lambda b: b[:5]), "model.safetensors is not a safetensors file"),
}


def broken_model_folders(good: Path, into: Path) -> dict[str, Path]:
    """One copy of the model folder `good` per BROKEN_MODELS entry, under `into`."""
    folders = {}
    for name, (breakage, _) in BROKEN_MODELS.items():
        folders[name] = into / f"broken_{name}"
        if not folders[name].exists():
            shutil.copytree(good, folders[name])
            breakage(folders[name])
    return folders
