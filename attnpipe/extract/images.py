"""The extraction stage for images: image files -> the folder's image processor -> our ViT pass.

Each image becomes one entry of the attention file: tokens "[CLS]" then "patch_<row>_<col>" in
row-major order, [CLS] flagged as special, and the image's path, original size and patch grid
stored beside the attention (store.ImageInfo) so stage 2 can draw attention back on the image.
The image itself is not copied into the file: its path and size are stored, and
`visualize_attention.py --mode image` reads the image from that path (or from --image).

The model folder needs config.json (model_type "vit"), weights and preprocessor_config.json.
Images are prepared by the folder's processor through transformers' PIL backend (no
torchvision needed): ViTImageProcessor resizes the whole image to the model's size without
cropping, so the patch grid covers the whole image.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from attnpipe import store
from attnpipe.errors import AttnpipeError
from attnpipe.extract.runner import DEFAULT_VERIFY_TOL, ExtractResult, parse_indices, run_provenance
from attnpipe.extract.loading import hash_files, read_model_config, resolve_device, weight_files
from attnpipe.models import vit

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
CLS_TOKEN = "[CLS]"


@dataclass(frozen=True)
class ImageExtractConfig:
    images: tuple[Path, ...]
    output: Path
    model_dir: Path
    layers: tuple[str, ...] = ("all",)
    heads: tuple[str, ...] = ("all",)
    device: str = "cpu"
    batch_size: int = 32
    dtype: store.StorageDtype = "float32"
    verify: bool = False
    verify_tol: float = DEFAULT_VERIFY_TOL
    progress: bool | None = None


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


@dataclass(frozen=True)
class VisionModel:
    hf_model: torch.nn.Module
    weights: vit.Weights
    processor: object
    weights_sha256: str
    weight_files: tuple[str, ...]
    checkpoint_dtype: str | None


def load_vision_model(model_dir: Path, device: torch.device) -> VisionModel:
    """A local ViT folder in float32 on eager attention, with its image processor (PIL backend)."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    config_path = model_dir / "config.json"
    config = read_model_config(model_dir)
    if config.get("model_type") not in vit.MODEL_TYPES:
        raise AttnpipeError(
            f"--image needs a vision transformer (model_type {', '.join(vit.MODEL_TYPES)}); "
            f"{config_path} has {config.get('model_type')!r}"
        )
    if not (model_dir / "preprocessor_config.json").is_file():
        raise AttnpipeError(f"{model_dir} has no preprocessor_config.json: the image processor's "
                            "settings (size, mean, std) are needed to prepare images")
    files = weight_files(model_dir)
    if not files:
        raise AttnpipeError(f"no weight files in {model_dir} (expected model.safetensors)")
    try:
        # The PIL backend needs no torchvision (which this project does not install).
        processor = transformers.AutoImageProcessor.from_pretrained(model_dir, backend="pil")
        hf_model = transformers.AutoModel.from_pretrained(
            model_dir, attn_implementation="eager", dtype=torch.float32,
            use_safetensors=any(p.suffix == ".safetensors" for p in files),
        )
    except (OSError, ValueError, KeyError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise AttnpipeError(f"could not load model from {model_dir}: {first_line}") from err
    if getattr(processor, "do_center_crop", False):
        # The stored patch grid is mapped onto the whole image (store.ImageInfo); a crop would
        # make that mapping wrong, so refuse rather than draw attention on the wrong pixels.
        raise AttnpipeError(f"{model_dir}'s image processor center-crops images; attnpipe maps patches "
                            "onto the whole image: set do_center_crop to false in preprocessor_config.json")
    hf_model = hf_model.to(device).eval()
    return VisionModel(
        hf_model=hf_model,
        weights=vit.load_weights(hf_model),
        processor=processor,
        weights_sha256=hash_files(files),
        weight_files=tuple(p.name for p in files),
        checkpoint_dtype=config.get("dtype") or config.get("torch_dtype"),
    )


def _open_image(path: Path, channels: int):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB" if channels == 3 else "L")
    except (UnidentifiedImageError, OSError) as err:
        raise AttnpipeError(f"cannot read image {path}: {err}") from err


def extract_images(config: ImageExtractConfig) -> ExtractResult:
    """Run the image extraction and write `config.output`; return what was done."""
    store.check_output_path(config.output)
    if not config.images:
        raise AttnpipeError("no images given: use --image FILE or --image-dir DIR")
    if config.output.suffix == ".json" and len(config.images) > 1:
        raise AttnpipeError(
            f"a .json output holds one image, got {len(config.images)}: write .h5 for several images"
        )
    if config.batch_size < 1:
        raise AttnpipeError(f"--batch-size must be at least 1, got {config.batch_size}")
    ids = image_ids(list(config.images))
    device = resolve_device(config.device)
    model = load_vision_model(config.model_dir, device)
    weights = model.weights
    layers = parse_indices(config.layers, weights.num_layers, "--layer", "layers")
    heads = parse_indices(config.heads, weights.num_heads, "--heads", "heads")
    rows, cols = weights.grid
    tokens = patch_tokens(rows, cols)
    n = len(tokens)
    special = np.zeros(n, dtype=bool)
    special[0] = True  # [CLS]
    keep = frozenset(layers)
    head_index = torch.tensor(heads, device=device)
    parity = hidden_parity = 0.0

    with contextlib.ExitStack() as stack:
        writer = stack.enter_context(store.open_writer(config.output, len(config.images), config.dtype))
        bar = stack.enter_context(tqdm(total=len(config.images), unit="image", file=sys.stderr,
                                       disable=None if config.progress is None else not config.progress))
        for start in range(0, len(config.images), config.batch_size):
            paths = config.images[start:start + config.batch_size]
            pictures = [_open_image(p, weights.num_channels) for p in paths]
            pixels = model.processor(images=pictures, return_tensors="pt")["pixel_values"]
            pixels = pixels.to(device=device, dtype=torch.float32)  # (B, C, H, W)
            with torch.inference_mode():
                try:
                    out = vit.forward(weights, {"pixel_values": pixels}, keep_layers={"self": keep})
                except ValueError as err:  # image size / channels do not fit the model
                    raise AttnpipeError(f"{config.model_dir}: {err}") from err
                if config.verify:
                    ref = model.hf_model(pixel_values=pixels, output_attentions=True)
                    if not ref.attentions:
                        raise AttnpipeError("transformers returned no attentions: the model is not on eager attention")
                    for layer, probs in out.attentions["self"].items():
                        diff = (ref.attentions[layer] - probs).abs()  # (B, H, T, T), no padding
                        if diff.max().item() > parity:
                            parity = diff.max().item()
                            row, head = divmod(int(diff.amax(dim=(2, 3)).argmax()), weights.num_heads)
                            if parity > config.verify_tol:
                                raise AttnpipeError(
                                    f"--verify failed: image {ids[start + row]!r} layer {layer} head {head} "
                                    f"differs from transformers eager by {parity:.3g} (tolerance {config.verify_tol:g})"
                                )
                    hidden_parity = max(hidden_parity, (ref.last_hidden_state - out.hidden).abs().max().item())
                stacked = torch.stack([out.attentions["self"][layer] for layer in layers], dim=1)  # (B, L, H, T, T)
                stacked = stacked.index_select(2, head_index).float().cpu().numpy()
            for row, (path, picture) in enumerate(zip(paths, pictures)):
                i = start + row
                item = store.TextAttention(
                    id=ids[i],
                    text=str(path),
                    tokens=tokens,
                    token_ids=np.full(n, -1, dtype=np.int64),  # no vocabulary
                    special_tokens_mask=special,
                    offsets=np.full((n, 2), -1, dtype=np.int64),
                    word_ids=np.full(n, -1, dtype=np.int64),
                    truncated=False,
                    num_tokens_untruncated=n,
                    attention=np.ascontiguousarray(stacked[row]),
                    input_kind="image",
                    image=store.ImageInfo(path=str(path), size=picture.size, patch_grid=(rows, cols),
                                          patch_size=weights.patch_size),
                )
                writer.write(i, item)
            bar.update(len(paths))
        provenance = run_provenance(
            dtype=config.dtype, verify=config.verify, parity=parity, hidden_parity=hidden_parity,
            model=str(config.model_dir),
            model_type="vit",
            weights_sha256=model.weights_sha256,
            weight_files=model.weight_files,
            num_layers=weights.num_layers,
            num_heads=weights.num_heads,
            layers=layers,
            heads=heads,
            max_length=n,
            trust_remote_code=False,
            checkpoint_dtype=model.checkpoint_dtype,
        )
        writer.finish(provenance)
    return ExtractResult(
        output=config.output, num_texts=len(config.images), num_tokens=n * len(config.images),
        layers=layers, heads=heads, truncated_ids=(), max_length=n,
        parity_max_abs_diff=parity if config.verify else None,
        parity_hidden_max_abs_diff=hidden_parity if config.verify else None,
    )
