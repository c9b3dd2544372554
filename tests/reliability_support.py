"""Broken model folders for the reliability tests and docs/ERRORS.md rows: a tiny BERT whose
weights do not fit its config.json in one way each (issue 16)."""

from __future__ import annotations

import json
import shutil
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
