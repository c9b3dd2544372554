"""Does a raw state dict fit a base model? Checked by the workflow before any job starts (a
`state_dict` checkpoint in the config) and by `scripts/make_checkpoint.py state-dict`.

A state dict fits when it has the base's parameter names (up to one common leading prefix such as
``bert.``, and ignoring the ``position_ids`` buffer) with the base's shapes. Shapes of a
``.safetensors`` file are read from its header, without loading any tensor; a ``.pt``/``.pth``/
``.bin`` file is read with the library's one state-dict reader,
`attnpipe.extract.loading.read_state_dict` (``torch.load(weights_only=True, mmap=True)`` only).

    problems = state_dict_problems(Path("run/step_500.safetensors"), default_model_dir())
    # [] when it fits, else one line per problem
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from attnpipe.errors import AttnpipeError
from attnpipe.extract.loading import read_state_dict

IGNORED = ("position_ids",)  # a buffer some checkpoints save and others do not
MAX_HEADER_BYTES = 100_000_000  # a larger safetensors header length means the file is not one

Shapes = dict[str, tuple[int, ...]]


def safetensors_shapes(path: Path) -> Shapes:
    """Parameter name -> shape, from a .safetensors header (8-byte little-endian length + JSON)."""
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) != 8:
            raise AttnpipeError(f"{path} is not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES:
            raise AttnpipeError(f"{path} is not a safetensors file (header length {n})")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise AttnpipeError(f"{path} is not a safetensors file ({exc})") from None
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def file_shapes(path: Path) -> Shapes:
    """Parameter name -> shape of one weight file."""
    if path.suffix == ".safetensors":
        return safetensors_shapes(path)
    if path.suffix in (".pt", ".pth", ".bin"):
        try:
            tensors = read_state_dict(path, "state dict", mmap=True)
        except AttnpipeError as exc:  # refused pickled code, or not a state dict: say which loader
            raise AttnpipeError(f"{path} cannot be loaded with torch.load(weights_only=True): {exc}") from None
        return {k: tuple(v.shape) for k, v in tensors.items()}
    raise AttnpipeError(f"{path}: a state dict must be .safetensors or .pt/.pth/.bin")


def folder_shapes(folder: Path) -> Shapes:
    """Parameter shapes of a transformers model folder's weight files."""
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise AttnpipeError(f"{folder} has no weight files")
    shapes: Shapes = {}
    for f in files:
        shapes.update(file_shapes(f))
    return shapes


def _strip(names, prefix: str) -> dict[str, str]:
    return {n[len(prefix):] if prefix and n.startswith(prefix) else n: n for n in names}


def align(sd: dict, base: dict) -> tuple[dict[str, str], list[str], list[str], str]:
    """Match a state dict's names to a base's, allowing one leading prefix on either side (e.g.
    'bert.'): (base name -> state-dict name, base names missing, state-dict names left over, prefix)."""
    sd_names = {n for n in sd if not n.endswith(IGNORED)}
    base_names = {n for n in base if not n.endswith(IGNORED)}
    candidates = {""} | {n.split(".", 1)[0] + "." for n in sd_names | base_names if "." in n}
    best, best_prefix = None, ""
    for prefix in sorted(candidates):
        for sd_map, base_map in ((_strip(sd_names, prefix), {n: n for n in base_names}),
                                 ({n: n for n in sd_names}, _strip(base_names, prefix))):
            common = set(sd_map) & set(base_map)
            if best is None or len(common) > len(best[0]):
                best, best_prefix = (common, sd_map, base_map), prefix
    common, sd_map, base_map = best
    missing = sorted(base_map[k] for k in set(base_map) - common)
    unexpected = sorted(sd_map[k] for k in set(sd_map) - common)
    return {base_map[k]: sd_map[k] for k in common}, missing, unexpected, best_prefix


def state_dict_problems(state_dict: Path, base: Path) -> list[str]:
    """Why `state_dict` does not fit the model folder `base` (empty list: it fits)."""
    sd = file_shapes(state_dict)
    ref = folder_shapes(base)
    pairs, missing, unexpected, _ = align(sd, ref)
    problems = []
    if missing:
        problems.append(f"{len(missing)} parameter(s) of the base missing, e.g. {missing[:3]}")
    if unexpected:
        problems.append(f"{len(unexpected)} parameter(s) the base does not have, e.g. {unexpected[:3]}")
    bad = [(b, s) for b, s in sorted(pairs.items()) if tuple(ref[b]) != tuple(sd[s])]
    for b, s in bad[:3]:
        problems.append(f"{s} has shape {list(sd[s])}, the base's {b} has {list(ref[b])}")
    if len(bad) > 3:
        problems.append(f"... {len(bad) - 3} more shape mismatches")
    return problems
