"""`visualize_attention.py --mode image`: a ViT's [CLS] attention over the patches, on the image.

Seed 004's spatial view: the [CLS] row of one head (or the mean over heads, or the attention
rollout up to the layer) without its [CLS] → [CLS] entry, reshaped to the stored patch grid
(rows, cols) and stretched over the image, which the ViT processor resized as a whole (no crop),
so patch (r, c) covers rows r/rows .. (r+1)/rows of the image height and the same for columns.
The map is scaled to its own maximum for display (the colour bar says so), because the [CLS]
self-weight and the patch count make raw values hard to compare across images.

The image is read from `--image` or, when not given, from the path stored in the file.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from attnpipe.visualize import plots
from attnpipe.analyze import rollout
from attnpipe.store import selection
from attnpipe.errors import AttnpipeError
from attnpipe.store.atomic import check_folder
from attnpipe.visualize.outputs import check_output_path
from attnpipe.store import Provenance, TextAttention, open_attention

HEAD_CHOICES = ("mean", "rollout")  # besides a head index
OVERLAY_ALPHA = 0.55  # heatmap opacity over the image: the image stays readable under it


def cls_patch_map(item: TextAttention, meta: Provenance, layer_pos: int, head: str) -> tuple[np.ndarray, str]:
    """(rows, cols) [CLS] → patch weights for stored layer position `layer_pos`, and a label.

    head: a model head index, "mean" (over the stored heads) or "rollout" (Abnar & Zuidema,
    heads fused by their mean, from the first stored layer up to and including this one).
    """
    if item.image is None:
        raise AttnpipeError(f"text {item.id!r} is not an image (input_kind {item.input_kind!r}): "
                            "--mode image needs a file written with --image")
    rows, cols = item.image.patch_grid
    if item.num_tokens != 1 + rows * cols:
        raise AttnpipeError(f"{item.id!r} has {item.num_tokens} tokens, not 1 + {rows}x{cols} patches")
    if head == "rollout":
        rollout.start_position(meta.layers[:layer_pos + 1], None)  # consecutive layers, or a clear error
        row = rollout.rollout(item.attention[:layer_pos + 1])[0]  # (n,): [CLS] query
        label = f"rollout of layers {meta.layers[0]}-{meta.layers[layer_pos]}"
    elif head == "mean":
        row = item.attention[layer_pos, :, 0].mean(axis=0)  # (n,): mean over heads of the [CLS] row
        label = f"layer {meta.layers[layer_pos]} · mean over {len(meta.heads)} heads"
    else:
        try:
            value = int(head)
        except ValueError as err:
            raise AttnpipeError(f"--head takes a head index, 'mean' or 'rollout' in image mode, got {head!r}") from err
        head_pos = selection.position(value, meta.heads, "--head", "heads", "the file")
        row = item.attention[layer_pos, head_pos, 0]
        label = f"layer {meta.layers[layer_pos]} · head {meta.heads[head_pos]}"
    return np.asarray(row[1:], dtype=np.float64).reshape(rows, cols), label  # drop [CLS] → [CLS]


def overlay(ax: Axes, image: np.ndarray, grid_map: np.ndarray, *, cmap: str = plots.DEFAULT_CMAP,
            alpha: float = OVERLAY_ALPHA) -> Axes:
    """Draw `image` (H, W[, C]) and the (rows, cols) map stretched over it, scaled to its maximum."""
    height, width = image.shape[:2]
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None, extent=(0, width, height, 0))
    peak = grid_map.max()
    scaled = grid_map / peak if peak > 0 else grid_map
    ax.imshow(scaled, cmap=cmap, alpha=alpha, vmin=0.0, vmax=1.0, interpolation="nearest",
              extent=(0, width, height, 0))  # each patch cell covers its share of the image
    ax.set_xticks([])
    ax.set_yticks([])
    return ax


def image_figure(image: np.ndarray, grid_map: np.ndarray, title: str, *, cmap: str = plots.DEFAULT_CMAP) -> Figure:
    """The image, and the image with the [CLS] attention overlay, side by side."""
    height, width = image.shape[:2]
    panel = 4.0
    fig = Figure(figsize=(2 * panel * min(2.0, max(0.5, width / height)) + 1.0, panel + 0.8), layout="constrained")
    left, right = fig.subplots(1, 2)
    left.imshow(image, cmap="gray" if image.ndim == 2 else None)
    left.set_xticks([])
    left.set_yticks([])
    left.set_title("image", fontsize=9)
    overlay(right, image, grid_map, cmap=cmap)
    right.set_title(f"[CLS] → patches ({grid_map.shape[0]}x{grid_map.shape[1]})", fontsize=9)
    fig.colorbar(right.images[-1], ax=right, fraction=0.046, pad=0.02,
                 label="[CLS] attention / its maximum")
    fig.suptitle(title, fontsize=10)
    return fig


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise AttnpipeError(f"image not found: {path} (give --image FILE)")
    try:
        with Image.open(path) as picture:
            return np.asarray(picture.convert("RGB"))
    except (UnidentifiedImageError, OSError) as err:
        raise AttnpipeError(f"cannot read image {path}: {err}") from err


def run_image(req) -> Iterator[str]:
    """--mode image for a visualize.Request: one overlay figure."""
    with open_attention(req.input_file) as attn:
        meta = attn.meta
        item = selection.pick_text(attn, req.text_id, req.index)
    try:
        layer_value = int(req.layer)
    except ValueError as err:
        raise AttnpipeError(f"--layer takes an integer in image mode, got {req.layer!r}") from err
    layer_pos = selection.position(layer_value, meta.layers, "--layer", "layers", req.input_file)
    if (req.output_file is None) == (req.output_dir is None):
        raise AttnpipeError("give --output_file FILE or --output-dir DIR (one of them)")
    if req.output_file is not None:
        path = req.output_file
    else:
        check_folder(req.output_dir)  # made when the first output is written
        path = req.output_dir / req.names["image"].format(layer=meta.layers[layer_pos], ext=req.figure_format)
    check_output_path(path, "figure")
    grid_map, label = cls_patch_map(item, meta, layer_pos, str(req.head))
    image_path = req.image if req.image is not None else Path(item.image.path)
    image = _read_image(image_path)
    fig = image_figure(image, grid_map, f"{plots.model_name(meta)} · {item.id} · {label}", cmap=req.cmap)
    plots.save_figure(fig, path, dpi=req.dpi)
    yield f"wrote {path}"
