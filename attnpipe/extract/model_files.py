"""Model folder files transformers would fail on with a traceback, checked before it reads them:
config.json's architecture numbers (NaN, 0, -1, "32", a width the heads do not divide) and
.safetensors headers (too short, a header length beyond the file, not JSON, tensors past the end).
The loader (attnpipe.extract.loading) and the workflow's check (checkpoint_fit.folder_problems,
run by `snakemake -n`) both call it; it imports neither.

    problems = loadable_problems(Path("model"), json.loads(Path("model/config.json").read_text()))
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from attnpipe.errors import AttnpipeError

# config.json numbers the architecture is built from: each, where present, must be a positive integer
# (NaN, -1, 0, 2.5 or "32" made transformers raise a traceback or build nonsense).
CONFIG_SIZES = ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "num_key_value_heads",
                "max_position_embeddings", "vocab_size", "embedding_size", "n_embd", "n_head", "n_layer",
                "n_positions", "n_inner", "dim", "n_heads", "n_layers", "hidden_dim", "d_model", "d_kv", "d_ff",
                "num_heads", "num_layers", "num_decoder_layers", "encoder_layers", "decoder_layers",
                "encoder_attention_heads", "decoder_attention_heads")
# Widths split evenly into heads, unless the config sets the head size itself (head_dim, d_kv) or
# factorises the embedding (ALBERT's embedding_size: transformers skips the check then too).
HEAD_SPLITS = (("hidden_size", "num_attention_heads"), ("n_embd", "n_head"), ("dim", "n_heads"))
OWN_HEAD_SIZE = ("head_dim", "d_kv", "embedding_size")


def config_number_problems(config: dict) -> list[str]:
    """Why config.json's architecture numbers cannot build a model (empty: they can)."""
    problems = []
    for key in CONFIG_SIZES:
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append(f"{key} is {value!r}, not a positive integer")
    if problems or any(key in config for key in OWN_HEAD_SIZE):
        return problems
    for width, heads in HEAD_SPLITS:
        w, h = config.get(width), config.get(heads)
        if w is not None and h is not None and w % h:
            problems.append(f"{width} {w} is not a multiple of {heads} {h}")
    return problems


def safetensors_problems(path: Path) -> list[str]:
    """Why a .safetensors file cannot be read (empty: its header is sound): too short, a header
    length beyond the file, a header that is not JSON, or tensors whose bytes lie past the end."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) != 8:
            return [f"{path.name} is not a safetensors file (too short: {size} bytes)"]
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            return [f"{path.name} is damaged: its header claims {n} bytes, the file holds {size}"]
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            return [f"{path.name} is damaged: its header is not JSON ({' '.join(str(exc).split())[:80]})"]
    if not isinstance(header, dict):
        return [f"{path.name} is damaged: its header is not a JSON object"]
    data = size - 8 - n
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                or not isinstance(entry.get("shape"), list)):
            return [f"{path.name} is damaged: the header entry of {name} has no shape and data offsets"]
        if not 0 <= offsets[0] <= offsets[1] <= data:
            return [f"{path.name} is damaged (truncated?): {name} lies at bytes {offsets[0]}-{offsets[1]} of the "
                    f"data, which holds {data}"]
    return []


def loadable_problems(folder: Path, config: dict) -> list[str]:
    """What transformers would fail on with a traceback: config numbers (of `config`, the folder's
    parsed config.json), damaged safetensors headers."""
    problems = [f"config.json: {p}" for p in config_number_problems(config)]
    for path in sorted(folder.glob("*.safetensors")):
        problems += safetensors_problems(path)
    return problems


def check_loadable(folder: Path, config: dict) -> None:
    """The loader's check before transformers reads `folder`: one error naming the key or file."""
    problems = loadable_problems(folder, config)
    if problems:
        raise AttnpipeError(f"cannot load {folder}: " + "; ".join(problems))
