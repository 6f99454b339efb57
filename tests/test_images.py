"""Image loading for every mode, and transforms equal to the model's own image processor."""

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from utils.images import (
    ImageLoadError,
    ImageTransformSpec,
    build_image_transform,
    load_image,
    normalize_pixels,
    random_resized_crop_box,
)


def gradient_rgb(width=40, height=30):
    x = np.linspace(0, 255, width, dtype=np.float64)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.float64)[:, None].repeat(width, 1)
    return np.stack([x, y, 255 - x], -1).astype(np.uint8)


def make_image(mode):
    rgb = Image.fromarray(gradient_rgb())
    if mode == "RGB":
        return rgb
    if mode in ("L", "CMYK", "1", "LA", "RGBA"):
        return rgb.convert(mode)
    if mode == "P":
        return rgb.convert("P", palette=Image.Palette.ADAPTIVE)
    if mode == "P_transparent":
        image = rgb.convert("P", palette=Image.Palette.ADAPTIVE)
        image.info["transparency"] = 0
        return image
    if mode == "I;16":
        array = (np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)
        return Image.fromarray(array)
    if mode == "I":
        return Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.int32) * 257)
    if mode == "F":
        return Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.float32))
    raise AssertionError(mode)


FILE_FORMATS = {"RGB": "JPEG", "L": "PNG", "CMYK": "JPEG", "1": "PNG", "LA": "PNG", "RGBA": "PNG", "P": "PNG",
                "P_transparent": "PNG", "I;16": "PNG", "I": "TIFF", "F": "TIFF"}


@pytest.mark.parametrize("mode", sorted(FILE_FORMATS))
def test_every_mode_becomes_rgb_from_a_real_file(mode, tmp_path):
    path = tmp_path / f"image.{FILE_FORMATS[mode].lower()}"
    make_image(mode).save(path, format=FILE_FORMATS[mode])
    image = load_image(str(path))
    assert image.mode == "RGB" and image.size == (40, 30)
    array = np.asarray(image)
    # The gradient survives the conversion: not clipped to white (16-bit), not blacked out (alpha).
    assert array.std() > 20, (mode, array.std())


def test_sixteen_bit_is_rescaled_not_clipped(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16)).save(path)
    assert np.asarray(load_image(str(path)))[0, 0].tolist() == [128, 128, 128]


def test_transparent_pixels_become_white():
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert np.asarray(load_image(rgba))[0, 0].tolist() == [255, 255, 255]


def test_exif_orientation_is_applied(tmp_path):
    image = Image.fromarray(gradient_rgb(40, 30))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif)
    assert load_image(str(path)).size == (30, 40)


def test_relative_paths_resolve_against_base_dir_and_values_of_every_kind(tmp_path):
    Image.fromarray(gradient_rgb()).save(tmp_path / "a.png")
    raw = (tmp_path / "a.png").read_bytes()
    for value in ("a.png", {"bytes": raw, "path": None}, {"bytes": None, "path": "a.png"}, raw, Image.open(tmp_path / "a.png")):
        assert load_image(value, base_dir=str(tmp_path)).size == (40, 30)


@pytest.mark.parametrize("content", [b"", b"not an image at all", "truncated"])
def test_bad_files_raise_image_load_error_naming_the_file(content, tmp_path):
    path = tmp_path / "bad.jpg"
    if content == "truncated":
        buffer = io.BytesIO()
        Image.fromarray(gradient_rgb(200, 200)).save(buffer, format="JPEG")
        content = buffer.getvalue()[: len(buffer.getvalue()) // 2]
    path.write_bytes(content)
    with pytest.raises(ImageLoadError, match="bad.jpg"):
        load_image(str(path))
    with pytest.raises(ImageLoadError, match="missing.jpg"):
        load_image(str(tmp_path / "missing.jpg"))


def processors():
    from transformers import BlipImageProcessor, CLIPImageProcessor, ViTImageProcessor

    yield "clip", CLIPImageProcessor(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24})
    yield "clip_default", CLIPImageProcessor()
    yield "blip", BlipImageProcessor(size={"height": 32, "width": 32})
    yield "vit_bilinear", ViTImageProcessor(size={"height": 20, "width": 28})


@pytest.mark.parametrize("name,processor", list(processors()))
@pytest.mark.parametrize("size", [(40, 30), (31, 57), (300, 200), (12, 9)])
def test_transform_matches_the_models_image_processor(name, processor, size):
    rng = np.random.default_rng(sum(size))
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    expected = processor(images=image, return_tensors="pt")["pixel_values"]
    spec = ImageTransformSpec.from_image_processor(processor)
    ours = normalize_pixels(build_image_transform(spec)(image)[None], spec)
    assert ours.shape == expected.shape
    # Same resize and crop on uint8; only float rounding in the normalization may differ.
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_normalize_is_rescale_then_standardize():
    spec = ImageTransformSpec(mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 2.0))
    pixels = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 2, 2).contiguous()
    out = normalize_pixels(pixels, spec)
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([-1.0, (0.2 - 0.25) / 0.25, 0.5]))


def test_augmentation_replays_from_the_same_seed_and_varies_across_seeds():
    spec = ImageTransformSpec(resize_shortest_edge=24, crop_height=24, crop_width=24)
    transform = build_image_transform(spec, augment=True)
    image = Image.fromarray(gradient_rgb(64, 48))
    a = transform(image, random.Random(5))
    b = transform(image, random.Random(5))
    assert a.shape == (3, 24, 24) and a.dtype == torch.uint8
    assert torch.equal(a, b)
    assert any(not torch.equal(a, transform(image, random.Random(s))) for s in range(6, 12))


def test_random_resized_crop_box_stays_inside_and_covers_the_scale():
    rng = random.Random(0)
    for _ in range(500):
        top, left, h, w = random_resized_crop_box(48, 64, (0.5, 1.0), rng)
        assert 0 <= top and top + h <= 48 and 0 <= left and left + w <= 64
        assert h * w >= 0.45 * 48 * 64
