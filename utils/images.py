"""Image loading and transforms shared by the training scripts.

Two halves, split so the expensive float work happens once per batch, not once per sample:

* per sample (in the data loader workers): `load_image` decodes any file or `datasets` image value to an RGB
  `PIL.Image`, and the transform from `build_image_transform` resizes and crops it to a uint8 tensor (3, H, W).
  In training, a JPEG may be decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, `PIL.Image.draft`) when
  the result is still at least as large as the resize needs (`ImageTransform.min_decode_size`): decoding and
  resizing then start from a quarter of the pixels or fewer. Evaluation decodes in full, so its inputs equal
  the image processor's;
* per batch (in the collator): `normalize_pixels` turns the stacked uint8 batch into the float tensor the model
  takes, `(x / 255 - mean) / std`.

Sizes, crop, mean, std and resampling come from the model's own image processor (`ImageTransformSpec`), so
fine-tuning sees the pixels pretraining saw: resize and crop are the operations of the transformers torchvision
backend (`image_processing_backends.TorchvisionBackend`), checked against it in tests/test_images.py.
"""

from __future__ import annotations

import io
import math
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

# PIL's resampling filter ids (what image processors store) -> torchvision's interpolation modes.
_PIL_TO_TORCHVISION = {
    0: InterpolationMode.NEAREST,
    1: InterpolationMode.LANCZOS,
    2: InterpolationMode.BILINEAR,
    3: InterpolationMode.BICUBIC,
    4: InterpolationMode.BOX,
    5: InterpolationMode.HAMMING,
}


class ImageLoadError(ValueError):
    """An image value that cannot be turned into pixels; the message says which file and why."""


def load_image(value, base_dir: str | None = None, min_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode an image column value to an RGB `PIL.Image`.

    Accepts a file path (a relative one is resolved against `base_dir`, the data file's folder), a `datasets`
    Image value (`{"bytes": ..., "path": ...}` or an already decoded `PIL.Image`), or raw bytes. EXIF
    orientation is applied, and every mode becomes 8-bit RGB (see `to_rgb`). Raises `ImageLoadError` naming the
    file for anything that does not decode, so callers can skip the sample and say why.

    `min_size` (width, height), for JPEG data only: decode at the strongest of libjpeg's 1/2, 1/4 and 1/8
    reductions that keeps the image at least this size in both dimensions (Pillow's `JpegImageFile.draft` takes the scale
    `s` in 8, 4, 2, 1 with `s <= min(W // width, H // height)`), cut to floor(W / s) x floor(H / s) whole pixels.
    The size is that of the stored image, before EXIF rotation: pass a square to be safe from it. Other
    formats, and already decoded images, are decoded as they are.
    """
    source = _describe(value, base_dir)
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, dict) and value.get("bytes") is not None:
            image = Image.open(io.BytesIO(value["bytes"]))
        elif isinstance(value, dict) and value.get("path"):
            image = Image.open(_resolve(value["path"], base_dir))
        elif isinstance(value, (bytes, bytearray)):
            image = Image.open(io.BytesIO(value))
        elif isinstance(value, (str, os.PathLike)):
            image = Image.open(_resolve(os.fspath(value), base_dir))
        else:
            raise ImageLoadError(f"image value of type {type(value).__name__} is neither a path nor image data")
        drafted = image.draft("RGB", min_size) if min_size is not None and image.format == "JPEG" else None
        image.load()  # decode now: a truncated file fails here, inside the try, not later in a transform
        if drafted:
            # A side that the scale does not divide ends in a partial pixel (ceil(W / s)): drop it, so the image
            # keeps the original's aspect ratio (to one original pixel) and resizes to the same output size.
            width, height = int(drafted[1][2]), int(drafted[1][3])
            if (width, height) != image.size:
                image = image.crop((0, 0, width, height))
        return to_rgb(ImageOps.exif_transpose(image))
    except ImageLoadError as err:
        raise ImageLoadError(f"{source}: {err}") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ImageLoadError(f"{source}: {type(err).__name__}: {err}") from err


def _resolve(path: str, base_dir: str | None) -> str:
    if base_dir and not os.path.isabs(path) and "://" not in path:
        return os.path.join(base_dir, path)
    return path


def _describe(value, base_dir: str | None) -> str:
    if isinstance(value, (str, os.PathLike)):
        return f"image file {_resolve(os.fspath(value), base_dir)!r}"
    if isinstance(value, dict) and value.get("path"):
        return f"image {value['path']!r}"
    return "image"


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    Transparent images (RGBA, LA, P with a transparency key) are composited onto white rather than keeping
    whatever colour hides under alpha 0; 16- and 32-bit images (I;16, I, F) are rescaled from their range to
    0..255 instead of being clipped, as a plain `convert("RGB")` would do.
    """
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
        array = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(array).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


@dataclass(frozen=True)
class ImageTransformSpec:
    """What a model's image processor does to an image, in the terms the transforms need.

    `resize_shortest_edge` resizes keeping the aspect ratio (CLIP, ViLT); `resize_height`/`resize_width` resize
    to a fixed size (BLIP). `crop_height`/`crop_width` are a center crop, or None.
    """

    resize_shortest_edge: int | None = None
    resize_height: int | None = None
    resize_width: int | None = None
    crop_height: int | None = None
    crop_width: int | None = None
    interpolation: InterpolationMode = InterpolationMode.BICUBIC
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(H, W) of every transformed image, or None when it depends on the image's aspect ratio."""
        if self.crop_height and self.crop_width:
            return (self.crop_height, self.crop_width)
        if self.resize_height and self.resize_width:
            return (self.resize_height, self.resize_width)
        return None

    @classmethod
    def from_image_processor(cls, processor) -> "ImageTransformSpec":
        """Read size, crop, mean, std and resampling from a transformers image processor (or a processor
        holding one as `.image_processor`)."""
        processor = getattr(processor, "image_processor", processor)
        size = _as_dict(getattr(processor, "size", None))
        crop = _as_dict(getattr(processor, "crop_size", None)) if getattr(processor, "do_center_crop", False) else {}
        resample = getattr(processor, "resample", 3)
        interpolation = (
            resample if isinstance(resample, InterpolationMode) else _PIL_TO_TORCHVISION.get(int(resample), InterpolationMode.BICUBIC)
        )
        if not getattr(processor, "do_resize", True):
            size = {}
        mean = getattr(processor, "image_mean", None) or (0.0, 0.0, 0.0)
        std = getattr(processor, "image_std", None) or (1.0, 1.0, 1.0)
        if not getattr(processor, "do_normalize", True):
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        rescale = getattr(processor, "rescale_factor", 1 / 255) if getattr(processor, "do_rescale", True) else 1.0
        return cls(
            resize_shortest_edge=size.get("shortest_edge"),
            resize_height=size.get("height"),
            resize_width=size.get("width"),
            crop_height=crop.get("height"),
            crop_width=crop.get("width"),
            interpolation=interpolation,
            mean=tuple(float(m) for m in _triple(mean)),
            std=tuple(float(s) for s in _triple(std)),
            rescale_factor=float(rescale),
        )


def _as_dict(size) -> dict:
    if size is None:
        return {}
    if isinstance(size, int):
        return {"height": size, "width": size}
    if hasattr(size, "items"):
        return {k: v for k, v in size.items() if v is not None}
    return {k: v for k, v in vars(size).items() if v is not None}


def _triple(values) -> tuple:
    values = tuple(values) if isinstance(values, (list, tuple)) else (values,) * 3
    return values if len(values) == 3 else values * 3


def shortest_edge_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """Output (H, W) when the short side becomes `shortest_edge` and the long one keeps the aspect ratio,
    rounded down as transformers' `get_resize_output_image_size(default_to_square=False)` does."""
    short, long = (height, width) if height <= width else (width, height)
    new_short, new_long = shortest_edge, int(shortest_edge * long / short)
    return (new_short, new_long) if height <= width else (new_long, new_short)


class ImageTransform:
    """RGB `PIL.Image` -> uint8 tensor (3, H, W): resize and center crop as the model's image processor does,
    or, with `augment=True`, a random resized crop and a horizontal flip (training only; a flip swaps left and
    right, so leave it off when captions say "left" or "right").

    With `draft=True`, `min_decode_size` tells `load_image` how far a JPEG may be scaled down while decoding.

    A class rather than a closure so that data loader workers can pickle it.
    """

    def __init__(self, spec: ImageTransformSpec, augment: bool = False, crop_scale: tuple[float, float] = (0.9, 1.0), draft: bool = False):
        self.spec = spec
        self.augment = augment
        self.crop_scale = crop_scale
        self.draft = draft
        if augment and spec.output_size is None:
            raise ValueError("augmentation needs a fixed output size (a crop_size or a height/width size)")

    @property
    def min_decode_size(self) -> tuple[int, int] | None:
        """(width, height) a JPEG may be decoded down to without the resize ever upsampling where the full-size
        decode would not: the resize's output size, and with augmentation the output over the smallest crop scale
        (a crop keeping a fraction `scale` of the area keeps at least `scale` of each side). Square, so an EXIF
        rotation after decoding changes nothing. None (decode in full) without `draft`, or without a resize."""
        spec = self.spec
        if not self.draft:
            return None
        if self.augment:
            side = math.ceil(max(spec.output_size) / self.crop_scale[0])
        elif spec.resize_shortest_edge:
            side = spec.resize_shortest_edge  # both sides >= it, so the resized image's are too
        elif spec.resize_height and spec.resize_width:
            side = max(spec.resize_height, spec.resize_width)
        else:
            return None
        return (side, side)

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        """`rng` drives the augmentation; pass one seeded per sample (see `utils.data.sample_seed`) so the
        draws replay identically after a resume, whatever the global RNG state."""
        spec = self.spec
        pixels = F.pil_to_tensor(image)  # (3, H, W) uint8
        if self.augment:
            rng = rng or random.Random()
            top, left, h, w = random_resized_crop_box(pixels.shape[-2], pixels.shape[-1], self.crop_scale, rng)
            pixels = F.resized_crop(pixels, top, left, h, w, list(spec.output_size), spec.interpolation, antialias=True)
            if rng.random() < 0.5:
                pixels = F.horizontal_flip(pixels)
            return pixels
        if spec.resize_shortest_edge:
            new_size = shortest_edge_size(pixels.shape[-2], pixels.shape[-1], spec.resize_shortest_edge)
            pixels = F.resize(pixels, list(new_size), interpolation=spec.interpolation, antialias=True)
        elif spec.resize_height and spec.resize_width:
            pixels = F.resize(pixels, [spec.resize_height, spec.resize_width], interpolation=spec.interpolation, antialias=True)
        if spec.crop_height and spec.crop_width:
            pixels = center_crop(pixels, spec.crop_height, spec.crop_width)
        return pixels


def center_crop(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Center crop with transformers' rounding: the offset is floored (torchvision rounds it, one pixel off
    for odd margins), and an image smaller than the crop is zero-padded first."""
    image_height, image_width = pixels.shape[-2:]
    if height > image_height or width > image_width:
        pad_w, pad_h = max(width - image_width, 0), max(height - image_height, 0)
        pixels = F.pad(pixels, [pad_w // 2, pad_h // 2, (pad_w + 1) // 2, (pad_h + 1) // 2], fill=0)
        image_height, image_width = pixels.shape[-2:]
    top, left = int((image_height - height) / 2.0), int((image_width - width) / 2.0)
    return F.crop(pixels, top, left, height, width)


def random_resized_crop_box(
    height: int, width: int, scale: tuple[float, float], rng: random.Random, ratio: tuple[float, float] = (3 / 4, 4 / 3)
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a crop covering a `scale` fraction of the area at an aspect ratio in `ratio`:
    torchvision's RandomResizedCrop sampling (ten tries, then a center crop), drawn from `rng`."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def build_image_transform(spec: ImageTransformSpec, augment: bool = False, draft: bool = False) -> ImageTransform:
    """The per-sample transform for one split: `augment=True` and `draft=True` (reduced-scale JPEG decoding)
    only for training."""
    return ImageTransform(spec, augment=augment, draft=draft)


def normalize_pixels(pixels: torch.Tensor, spec: ImageTransformSpec, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> normalized float (B, 3, H, W): `(x * rescale_factor - mean) / std`, once per batch."""
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1)
    out = pixels.to(torch.float32).mul_(spec.rescale_factor).sub_(mean).div_(std)
    return out.to(dtype)
