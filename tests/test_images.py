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


# --- Reduced-scale JPEG decoding (training only) ---------------------------------------------------------------


def photo_jpeg(path, width, height, orientation=None):
    """A smooth random colour field with some texture, saved as a JPEG (EXIF orientation optional)."""
    rng = np.random.default_rng(width * 1000 + height)
    field = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    noise = rng.normal(0, 6, (height, width, 3))
    image = Image.fromarray(np.clip(np.asarray(field, np.float64) + noise, 0, 255).astype(np.uint8))
    exif = image.getexif()
    if orientation:
        exif[0x0112] = orientation
    image.save(path, quality=90, exif=exif)
    return str(path)


CLIP_LIKE = ImageTransformSpec(resize_shortest_edge=24, crop_height=24, crop_width=24)
BLIP_LIKE = ImageTransformSpec(resize_height=24, resize_width=32)


@pytest.mark.parametrize("spec,augment,needed", [(CLIP_LIKE, False, 24), (BLIP_LIKE, False, 32), (CLIP_LIKE, True, 27)])
@pytest.mark.parametrize("size,orientation", [
    ((100, 75), None), ((75, 100), None),  # landscape, portrait: halved (a quarter would leave 25 x 19)
    ((300, 200), None), ((200, 300), 6),   # a quarter or an eighth; stored landscape, shown portrait
    ((47, 47), None), ((48, 48), None), ((54, 54), None), ((64, 64), None), ((1000, 30), None),  # at the thresholds
])
def test_draft_decodes_at_the_strongest_reduction_that_keeps_the_size_the_resize_needs(tmp_path, spec, augment, needed, size, orientation):
    path = photo_jpeg(tmp_path / "photo.jpg", *size, orientation=orientation)
    transform = build_image_transform(spec, augment=augment, draft=True)
    assert transform.min_decode_size == (needed, needed)
    full = load_image(path)
    draft = load_image(path, min_size=transform.min_decode_size)
    stored = size if orientation is None else size[::-1]  # as displayed (EXIF 6 turns the stored image)
    assert full.size == stored
    # Pillow's rule: the strongest of 1/8, 1/4, 1/2 that leaves both sides >= what is needed, else none.
    scale = next((s for s in (8, 4, 2, 1) if s <= min(side // needed for side in size)), 1)
    assert draft.size == tuple(side // scale for side in stored), (draft.size, scale)
    if scale > 1:
        assert min(draft.size) >= needed  # never below what the resize needs, in either side
    if not augment:  # the same output shape, pixels close to the full decode's
        exact, reduced = transform(full).float(), transform(draft).float()
        assert exact.shape == reduced.shape
        # Loose: it catches a wrong rotation or crop (tens of levels). On photo-like 640 x 480 JPEGs the mean
        # difference is 0.8 levels (BENCHMARKS.md); these tiny fields with steep gradients differ more.
        assert (exact - reduced).abs().mean() < 8, (exact - reduced).abs().mean()


@pytest.mark.parametrize("size", [(60, 54), (54, 60), (200, 60), (60, 200), (400, 300)])
def test_augmented_crops_of_a_draft_decode_are_never_smaller_than_the_output(tmp_path, size):
    """A crop keeping at least 90% of the area keeps at least 90% of each side, so a decode of at least
    ceil(24 / 0.9) px a side leaves every crop >= 24 px a side (the ten-try fallback too)."""
    path = photo_jpeg(tmp_path / "photo.jpg", *size)
    transform = build_image_transform(CLIP_LIKE, augment=True, draft=True)
    image = load_image(path, min_size=transform.min_decode_size)
    rng = random.Random(0)
    for _ in range(300):
        _, _, h, w = random_resized_crop_box(image.size[1], image.size[0], transform.crop_scale, rng)
        assert h >= 24 and w >= 24, (image.size, h, w)


def test_without_draft_or_for_other_formats_images_decode_in_full(tmp_path):
    assert build_image_transform(CLIP_LIKE).min_decode_size is None  # evaluation: equal to the processor's pixels
    assert build_image_transform(ImageTransformSpec(crop_height=24, crop_width=24), draft=True).min_decode_size is None
    Image.fromarray(gradient_rgb(100, 80)).save(tmp_path / "a.png")
    assert load_image(str(tmp_path / "a.png"), min_size=(24, 24)).size == (100, 80)
    raw = (tmp_path / "b.jpg")
    photo_jpeg(raw, 100, 80)
    assert load_image({"bytes": raw.read_bytes(), "path": None}, min_size=(24, 24)).size == (50, 40)


def test_the_training_set_decodes_drafts_and_the_evaluation_set_in_full(tmp_path):
    from utils.data import ImageTextDataset, load_splits

    photo_jpeg(tmp_path / "photo.jpg", 100, 76)
    (tmp_path / "rows.jsonl").write_text('{"image": "photo.jpg", "caption": "a photo"}\n')
    split = load_splits(data_files={"train": str(tmp_path / "rows.jsonl")}, cache_dir=str(tmp_path / "cache"))["train"]
    full, draft = load_image(str(tmp_path / "photo.jpg")), load_image(str(tmp_path / "photo.jpg"), min_size=(24, 24))
    assert draft.size == (50, 38)
    for is_train, image in ((True, draft), (False, full)):
        transform = build_image_transform(CLIP_LIKE, draft=is_train)
        dataset = ImageTextDataset(split, "image", "caption", transform, sample_caption=is_train)
        assert torch.equal(dataset[0]["pixel_values"], transform(image))
