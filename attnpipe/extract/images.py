"""Input adapter for images: image files -> the folder's image processor -> pixel batches.

Each image becomes one entry of the attention file: tokens "[CLS]" then "patch_<row>_<col>" in
row-major order, [CLS] flagged as special, and the image's path, original size and patch grid
stored beside the attention (store.ImageInfo) so stage 2 can draw attention back on the image.
The image itself is not copied into the file: its path and size are stored, and
`visualize_attention.py --mode image` reads the image from that path (or from --image).

The model folder needs config.json (model_type "vit"), weights and preprocessor_config.json.
Images are prepared by the folder's processor through transformers' PIL backend (no
torchvision needed): ViTImageProcessor resizes the whole image to the model's size without
cropping, so the patch grid covers the whole image. The model is loaded by
attnpipe.extract.loading.load_model (which refuses a center-cropping processor).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from attnpipe import store
from attnpipe.errors import AttnpipeError
from attnpipe.extract.inputs import Batch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
CLS_TOKEN = "[CLS]"


def collect_images(files: list[Path], folders: list[Path]) -> list[Path]:
    """--image files in the order given, then each --image-dir's image files sorted by name."""
    images = []
    for path in files:
        if not path.is_file():
            raise AttnpipeError(f"image file not found: {path}")
        images.append(path)
    for folder in folders:
        if not folder.is_dir():
            raise AttnpipeError(f"--image-dir is not a folder: {folder}")
        found = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise AttnpipeError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
        images.extend(found)
    return images


def image_ids(images: list[Path]) -> list[str]:
    """File names when they are unique, else the paths as given."""
    names = [p.name for p in images]
    ids = names if len(set(names)) == len(names) else [str(p) for p in images]
    if len(set(ids)) != len(ids):
        raise AttnpipeError("the same image file is given twice")
    return ids


def patch_tokens(rows: int, cols: int) -> tuple[str, ...]:
    return (CLS_TOKEN, *(f"patch_{r}_{c}" for r in range(rows) for c in range(cols)))


def _open_image(path: Path, channels: int):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB" if channels == 3 else "L")
    except (UnidentifiedImageError, OSError) as err:
        raise AttnpipeError(f"cannot read image {path}: {err}") from err


class ImageInputs:
    """Images for a ViT: every image has the same tokens ([CLS] + the patch grid), no padding."""

    label = "image"
    input_kind = "image"
    generation = None  # the settings when the model generated the text (PairInputs, ContinuationInputs)
    generated_tokens = 0

    def __init__(self, images: list[Path], model):
        self.images = images
        self.ids = image_ids(images)
        self.processor = model.processor
        self.model_dir = model.model_dir
        weights = model.weights
        self.channels = weights.num_channels
        self.grid = weights.grid
        self.patch_size = weights.patch_size
        self.tokens = patch_tokens(*self.grid)
        self.max_length = len(self.tokens)
        self.widths = [self.max_length] * len(images)

    def prepare(self, indices: list[int], device: torch.device) -> Batch:
        n = self.max_length
        pictures = [_open_image(self.images[i], self.channels) for i in indices]
        pixels = self.processor(images=pictures, return_tensors="pt")["pixel_values"]
        pixels = pixels.to(device=device, dtype=torch.float32)  # (B, C, H, W)
        special = np.zeros(n, dtype=bool)
        special[0] = True  # [CLS]
        items = [
            store.TextAttention(
                id=self.ids[i],
                text=str(self.images[i]),
                tokens=self.tokens,
                token_ids=np.full(n, -1, dtype=np.int64),  # no vocabulary
                special_tokens_mask=special,
                offsets=np.full((n, 2), -1, dtype=np.int64),
                word_ids=np.full(n, -1, dtype=np.int64),
                truncated=False,
                num_tokens_untruncated=n,
                attention=None,
                input_kind="image",
                image=store.ImageInfo(path=str(self.images[i]), size=picture.size, patch_grid=self.grid,
                                      patch_size=self.patch_size),
            )
            for i, picture in zip(indices, pictures, strict=True)
        ]
        lengths = [n] * len(indices)
        return Batch(indices, {"pixel_values": pixels}, items, {"self": (lengths, lengths)})
