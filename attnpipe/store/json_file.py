"""The JSON attention file (one text): seed 001's format with extra keys, written and parsed.

See attnpipe.store.format for the keys. Writes are atomic; reading checks the structure and
returns the text as a TextAttention (the reader, attnpipe.store.reader, serves it).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from attnpipe import faults
from attnpipe.errors import AttnpipeError
from attnpipe.store.atomic import atomic_path, write_errors
from attnpipe.store.format import (ATTRIBUTION_FIELDS, DECODER_FIELDS, DIMS, FORMAT_NAME, TARGET_GRADIENTS, TEXT_ATTRIBUTIONS, ImageInfo,
                                   Provenance, TargetAttention, TextAttention, or_none)
from attnpipe.store.validate import check_gradient_shapes, check_meta, check_version_value, error_reason


def _json_payload(item: TextAttention, provenance: Provenance) -> dict:
    meta = asdict(provenance)
    meta["weight_files"] = list(provenance.weight_files)
    meta["layers"] = list(provenance.layers)
    meta["heads"] = list(provenance.heads)
    for key in DECODER_FIELDS:  # encoder-decoder models only
        if meta[key] is None:
            del meta[key]
        elif key in ("decoder_layers", "decoder_heads"):
            meta[key] = list(meta[key])
    for key in ATTRIBUTION_FIELDS:  # --attribution only
        if meta[key] is None:
            del meta[key]
    if meta["skipped_empty"]:  # written only when --skip-empty skipped texts
        meta["skipped_empty"] = list(meta["skipped_empty"])
    else:
        del meta["skipped_empty"]
    meta = {"format": FORMAT_NAME, "dims": list(DIMS), **meta}
    attention = item.attention.astype(np.dtype(provenance.dtype))
    gradients = {}
    if item.attention_grad is not None:
        gradients = {
            "attention_grad": item.attention_grad.astype(np.float32).tolist(),
            "head_gate_grad": item.head_gate_grad.astype(np.float32).tolist(),
            "head_importance": item.head_importance.astype(np.float32).tolist(),
            "token_grad_input": item.token_grad_input.astype(np.float32).tolist(),
            "gradient_target_value": float(item.gradient_target_value),
            "gradient_target_label": int(item.gradient_target_label),
        }
        if item.head_ablation is not None:
            gradients["head_ablation"] = item.head_ablation.astype(np.float32).tolist()
        gradients.update({name: getattr(item, name).astype(np.float32).tolist()  # --attribution ig
                          for name in TEXT_ATTRIBUTIONS if getattr(item, name) is not None})
    payload = {
        "tokens": list(item.tokens),
        "text": item.text,
        "attention_matrices": attention.tolist(),
        "id": item.id,
        "token_ids": item.token_ids.tolist(),
        "special_tokens_mask": item.special_tokens_mask.astype(bool).tolist(),
        "offsets": item.offsets.tolist(),
        "word_ids": item.word_ids.tolist(),
        "truncated": bool(item.truncated),
        "num_tokens_untruncated": int(item.num_tokens_untruncated),
        "layers": list(provenance.layers),
        "heads": list(provenance.heads),
        "metadata": meta,
        "input_kind": item.input_kind,
        "image": None if item.image is None else {
            "path": item.image.path, "size": list(item.image.size),
            "patch_grid": list(item.image.patch_grid), "patch_size": item.image.patch_size,
        },
        **gradients,
    }
    if item.generated is not None:  # generated text (version 2)
        payload["generated"] = np.asarray(item.generated).astype(bool).tolist()
    if item.generated_text is not None:
        payload["generated_text"] = item.generated_text
    if item.target is not None:
        payload.update(_target_payload(item.target, provenance))
    return payload


def _target_payload(target: TargetAttention, provenance: Provenance) -> dict:
    dtype = np.dtype(provenance.dtype)
    gradients = {name: getattr(target, name).astype(np.float32).tolist()  # --explain: float32 always
                 for name in TARGET_GRADIENTS if getattr(target, name) is not None}
    for kind in ("decoder", "cross"):
        importance = getattr(target, f"{kind}_head_importance")
        if importance is not None:
            gradients[f"{kind}_head_importance"] = importance.astype(np.float32).tolist()
    return {
        "decoder_attention_matrices": target.decoder_attention.astype(dtype).tolist(),
        "cross_attention_matrices": target.cross_attention.astype(dtype).tolist(),
        "decoder_layers": list(provenance.decoder_layers),
        "decoder_heads": list(provenance.decoder_heads),
        "target": {
            "text": target.text,
            "tokens": list(target.tokens),
            "token_ids": target.token_ids.tolist(),
            "special_tokens_mask": target.special_tokens_mask.astype(bool).tolist(),
            "labels": list(target.labels),
            "label_ids": target.label_ids.tolist(),
            "truncated": bool(target.truncated),
            "num_tokens_untruncated": int(target.num_tokens_untruncated),
            **({} if target.generated is None else {"generated": np.asarray(target.generated).astype(bool).tolist()}),
        },
        **gradients,
    }


def write_json(path: Path, item: TextAttention, provenance: Provenance) -> None:
    """Write one text in seed 001's JSON format (plus provenance), atomically."""
    if provenance.dtype not in ("float32", "float16"):
        raise AttnpipeError(f"--dtype {provenance.dtype} is for .h5 output; a .json file holds float32 or float16")
    check_gradient_shapes(path, item, provenance)  # a gradient that does not fit its attention is never stored
    payload = _json_payload(item, provenance)
    with write_errors(path), atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as handle:
        json.dump(payload, handle, ensure_ascii=False, allow_nan=False)
        faults.point("json")
        handle.write("\n")


class JSONWriter:
    """H5Writer's interface for a .json output: holds its one text until `finish` writes it."""

    def __init__(self, path: Path):
        self.path = path
        self._item: TextAttention | None = None

    def write(self, index: int, item: TextAttention) -> None:
        if index != 0 or self._item is not None:
            raise RuntimeError("a .json output holds exactly one text")
        self._item = item

    def finish(self, provenance: Provenance) -> None:
        if self._item is None:
            raise RuntimeError("no text was written")
        write_json(self.path, self._item, provenance)

    def __enter__(self) -> JSONWriter:
        return self

    def __exit__(self, *exc) -> None:
        pass  # nothing is on disk before finish()


# ----------------------------------------------------------------------------- reading


def read_json(path: Path) -> tuple[dict, Provenance]:
    """The parsed object of a JSON attention file and its provenance, its structure checked.

    A file of seed 001's original tool (tokens, text, attention_matrices only) gets a provenance
    of unknowns with every layer and head stored.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_unique_keys)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AttnpipeError(f"{path} is not valid JSON: {err}") from err
    except _DuplicateKey as err:
        raise AttnpipeError(f"{path} is a damaged attention file: the key {err.args[0]!r} occurs twice in one "
                            "object (JSON readers disagree on which one counts)") from err
    except (RecursionError, ValueError) as err:  # nesting deeper than Python's stack; a 4300-digit integer
        raise AttnpipeError(f"{path} is not an attention file: JSON nested too deeply or a number too large "
                            f"({type(err).__name__})") from err
    if not isinstance(data, dict):
        raise AttnpipeError(f"{path} is JSON but not an attention file (expected an object)")
    missing = [k for k in ("tokens", "text", "attention_matrices") if k not in data]
    if missing:
        raise AttnpipeError(f"{path} lacks the key(s) {', '.join(missing)}")
    if not isinstance(data["tokens"], list) or not all(isinstance(t, str) for t in data["tokens"]):
        raise AttnpipeError(f"{path}: 'tokens' must be a list of strings")
    if not isinstance(data["text"], str):
        raise AttnpipeError(f"{path}: 'text' must be a string")
    raw = data.get("metadata")
    if raw is not None:
        if not isinstance(raw, dict):
            raise AttnpipeError(f"{path}: 'metadata' must be an object")
        try:
            check_version_value(path, raw.get("schema_version", -1))
            fields = {k: v for k, v in raw.items() if k not in ("format", "dims")}
            for key in ("weight_files", "layers", "heads", "decoder_layers", "decoder_heads", "skipped_empty"):
                if fields.get(key) is not None:
                    fields[key] = tuple(fields[key])
            meta = Provenance(**fields)
        except (KeyError, TypeError, ValueError) as err:
            raise AttnpipeError(f"{path} has damaged metadata: {error_reason(err)}") from err
        check_meta(path, meta)
    else:  # a file written by seed 001's original tool: nothing but the three keys
        layers, heads = _json_matrices(path, data).shape[:2]
        meta = Provenance(
            model="unknown", model_type="unknown", weights_sha256="", weight_files=(),
            num_layers=layers, num_heads=heads, layers=tuple(range(layers)),
            heads=tuple(range(heads)), dtype="float32", compute_dtype="unknown",
            method="unknown", max_length=len(data["tokens"]), trust_remote_code=False,
        )
    return data, meta


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """json's object_pairs_hook: an object with a key given twice is refused, not last-one-wins."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _has_bool(nested) -> bool:
    """Whether a nested list holds a JSON true/false, which numpy would silently read as 1.0/0.0."""
    if isinstance(nested, bool):
        return True
    if not isinstance(nested, list) or not nested:
        return False
    if isinstance(nested[0], list):
        return any(_has_bool(item) for item in nested)
    return bool in set(map(type, nested))  # one C-level pass over a row


def _json_matrices(path: Path, data: dict) -> np.ndarray:
    """attention_matrices as a float32 array, refusing ragged or non-numeric nesting."""
    if _has_bool(data["attention_matrices"]):
        raise AttnpipeError(f"{path}: attention_matrices holds true/false where probabilities belong")
    try:
        with np.errstate(over="ignore"):  # 1e300 becomes inf, refused below by the NaN/inf check, not warned
            attention = np.asarray(data["attention_matrices"], dtype=np.float32)
    except (ValueError, TypeError, OverflowError) as err:
        raise AttnpipeError(
            f"{path}: attention_matrices is ragged or not numeric (every layer needs the same heads, "
            f"every matrix n x n): {error_reason(err)}"
        ) from err
    n = len(data["tokens"])
    if attention.ndim != 4 or attention.shape[2:] != (n, n):
        raise AttnpipeError(
            f"{path}: attention_matrices has shape {attention.shape}; expected (layer, head, {n}, {n}) "
            f"for {n} tokens"
        )
    return attention


def text_from_json(path: Path, data: dict) -> TextAttention:
    tokens = tuple(data["tokens"])
    n = len(tokens)
    attention = _json_matrices(path, data)

    def optional(name: str) -> np.ndarray | None:
        return np.asarray(data[name], dtype=np.float32) if name in data else None

    return TextAttention(
        id=str(data.get("id", "text-0")),
        text=data["text"],
        tokens=tokens,
        token_ids=np.asarray(data.get("token_ids", [-1] * n), dtype=np.int64),
        special_tokens_mask=np.asarray(data.get("special_tokens_mask", [False] * n), dtype=bool),
        offsets=np.asarray(data.get("offsets", [[-1, -1]] * n), dtype=np.int64).reshape(n, 2),
        word_ids=np.asarray(data.get("word_ids", [-1] * n), dtype=np.int64),
        truncated=bool(data.get("truncated", False)),
        num_tokens_untruncated=_json_int(path, "num_tokens_untruncated", data.get("num_tokens_untruncated", n)),
        attention=attention,
        target=_target_from_json(path, data, n),
        input_kind=str(data.get("input_kind", "text")),
        image=_image_from_json(path, data.get("image")),
        attention_grad=optional("attention_grad"),
        head_gate_grad=optional("head_gate_grad"),
        token_grad_input=optional("token_grad_input"),
        head_ablation=optional("head_ablation"),
        gradient_target_value=or_none(float, data.get("gradient_target_value")),
        gradient_target_label=or_none(int, data.get("gradient_target_label")),
        generated=or_none(lambda v: np.asarray(v, dtype=bool), data.get("generated")),
        generated_text=or_none(str, data.get("generated_text")),
        **{name: optional(name) for name in TEXT_ATTRIBUTIONS},  # --attribution ig
    )


def _json_int(path: Path, name: str, value) -> int:
    """An integer field as JSON stores it; a float, Infinity (Python's json reads it), a string,
    true/false or an object is one error naming the field, not int()'s traceback."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise AttnpipeError(f"{path} is a damaged attention file: '{name}' must be an integer, got {value!r:.60}")
    return value


def _json_object(path: Path, name: str, value, keys: tuple[str, ...]) -> dict:
    """A field that must be a JSON object holding `keys` (the file's 'image' or 'target')."""
    if not isinstance(value, dict):
        raise AttnpipeError(f"{path} is a damaged attention file: '{name}' must be an object with "
                            f"{', '.join(keys)}, got {type(value).__name__} {value!r:.60}")
    missing = [key for key in keys if key not in value]
    if missing:
        raise AttnpipeError(f"{path} is a damaged attention file: '{name}' lacks {', '.join(missing)}")
    return value


TARGET_KEYS = ("text", "tokens", "token_ids", "special_tokens_mask", "labels", "label_ids", "truncated",
               "num_tokens_untruncated")
IMAGE_KEYS = ("path", "size", "patch_grid", "patch_size")


def _target_from_json(path: Path, data: dict, n: int) -> TargetAttention | None:
    """The decoder side of a JSON file, or None when the file holds no target."""
    if "target" not in data:
        return None
    target = _json_object(path, "target", data["target"], TARGET_KEYS)
    if not isinstance(target["tokens"], list) or not all(isinstance(t, str) for t in target["tokens"]):
        raise AttnpipeError(f"{path} is a damaged attention file: 'target.tokens' must be a list of strings")
    t = len(target["tokens"])
    with np.errstate(over="ignore"):  # as attention_matrices: an overflow is inf, which the checks refuse
        decoder = np.asarray(data["decoder_attention_matrices"], dtype=np.float32)
        cross = np.asarray(data["cross_attention_matrices"], dtype=np.float32)
    for name, array, shape in (("decoder_attention_matrices", decoder, (t, t)),
                               ("cross_attention_matrices", cross, (t, n))):
        if array.ndim != 4 or array.shape[2:] != shape:
            raise AttnpipeError(f"{name} has shape {array.shape}; expected (layer, head, {shape[0]}, {shape[1]})")
    gradients = {name: np.asarray(data[name], dtype=np.float32) for name in TARGET_GRADIENTS if name in data}
    return TargetAttention(
        text=target["text"],
        tokens=tuple(target["tokens"]),
        token_ids=np.asarray(target["token_ids"], dtype=np.int64),
        special_tokens_mask=np.asarray(target["special_tokens_mask"], dtype=bool),
        labels=tuple(target["labels"]),
        label_ids=np.asarray(target["label_ids"], dtype=np.int64),
        truncated=bool(target["truncated"]),
        num_tokens_untruncated=_json_int(path, "target.num_tokens_untruncated", target["num_tokens_untruncated"]),
        decoder_attention=decoder,
        cross_attention=cross,
        generated=or_none(lambda v: np.asarray(v, dtype=bool), target.get("generated")),
        **gradients,  # --explain
    )


def _image_from_json(path: Path, value: dict | None) -> ImageInfo | None:
    if value is None:
        return None
    value = _json_object(path, "image", value, IMAGE_KEYS)
    sizes = {}
    for key in ("size", "patch_grid"):
        if not isinstance(value[key], list) or len(value[key]) != 2:
            raise AttnpipeError(f"{path} is a damaged attention file: 'image.{key}' must be a list of two integers")
        sizes[key] = tuple(_json_int(path, f"image.{key}", x) for x in value[key])
    return ImageInfo(path=str(value["path"]), size=sizes["size"], patch_grid=sizes["patch_grid"],
                     patch_size=_json_int(path, "image.patch_size", value["patch_size"]))
