"""Image preprocessing (spec §4): HD geometry, token counts, and pixels against independent re-creations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from phivision.processing import image as image_module
from phivision.processing.image import (
    CLIP_MEAN,
    CLIP_STD,
    CROP_SIZE,
    TOKENS_PER_CROP,
    TOKENS_PER_CROP_SIDE,
    hd_grid,
    hd_size,
    hd_transform,
    num_image_tokens,
    num_image_tokens_for_size,
    preprocess_image,
    preprocess_images,
    staged_rgb,
)


def reference_hd_transform(image: Image.Image, num_crops: int) -> np.ndarray:
    """The reference's HD_transform as it is written (spec §4): transpose, one PIL resize, pad, transpose back."""
    image = image.convert("RGB")
    width, height = image.size
    transposed = width < height
    if transposed:
        image = image.transpose(Image.Transpose.TRANSPOSE)
        width, height = image.size
    ratio = width / height
    scale = 1
    while scale * np.ceil(scale / ratio) <= num_crops:
        scale += 1
    scale -= 1
    new_w = int(scale * 336)
    new_h = int(new_w / ratio)
    resized = np.asarray(image.resize((new_w, new_h), Image.Resampling.BILINEAR))
    target = int(np.ceil(new_h / 336) * 336)
    top = int((target - new_h) / 2)
    padded = np.pad(resized, ((top, target - new_h - top), (0, 0), (0, 0)), constant_values=255)
    return padded.transpose(1, 0, 2) if transposed else padded


def normalise_numpy(hd: np.ndarray) -> np.ndarray:
    """(h, w, 3) uint8 -> (3, h, w) float32 with the reference's float32 operations."""
    x = hd.transpose(2, 0, 1).astype(np.float32) / np.float32(255)
    mean = np.array(CLIP_MEAN, dtype=np.float32)[:, None, None]
    std = np.array(CLIP_STD, dtype=np.float32)[:, None, None]
    return (x - mean) / std


def random_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": None}[mode]
    shape = (height, width) if channels is None else (height, width, channels)
    # Smooth ramps plus noise, so resampling has both structure and per-pixel variation to get right.
    ramp = np.add.outer(np.arange(height), np.arange(width)) % 256
    ramp = ramp if channels is None else ramp[:, :, None]
    pixels = (ramp + rng.integers(0, 64, size=shape)) % 256
    return Image.fromarray(pixels.astype(np.uint8), mode=mode)


# ---------------------------------------------------------------------------------------------
# Geometry and token counts


@pytest.mark.parametrize(
    ("hd", "tokens"),
    # spec §4: "Examples (h×w → tokens)"
    [((336, 336), 313), ((672, 672), 757), ((1008, 1344), 1921), ((1344, 1344), 2509), ((1344, 336), 781), ((336, 1344), 745), ((5376, 336), 2653)],
)
def test_num_image_tokens_spec_examples(hd, tokens):
    assert num_image_tokens(*hd) == tokens


@pytest.mark.parametrize("rows", range(1, 7))
@pytest.mark.parametrize("cols", range(1, 7))
def test_num_image_tokens_is_the_layout_count(rows, cols):
    # Spec §6.3 layout: rows*12 lines of cols*12 tokens + one separator each, glb_GN, 12 lines of 12 + 1.
    layout = rows * TOKENS_PER_CROP_SIDE * (cols * TOKENS_PER_CROP_SIDE + 1) + 1 + TOKENS_PER_CROP_SIDE * (TOKENS_PER_CROP_SIDE + 1)
    assert num_image_tokens(rows * CROP_SIZE, cols * CROP_SIZE) == layout
    assert layout == (rows * cols + 1) * TOKENS_PER_CROP + 1 + (rows + 1) * TOKENS_PER_CROP_SIDE


@pytest.mark.parametrize("bad", [(0, 336), (336, 0), (335, 336), (336, 700), (-336, 336)])
def test_num_image_tokens_rejects_non_hd_sizes(bad):
    with pytest.raises(ValueError, match="multiples of 336"):
        num_image_tokens(*bad)


def test_photo_sizes_from_the_spec():
    # "With N = 4 most photos become 672×672 (757 tokens); with N = 16 a 4:3 photo becomes 1008×1344."
    for width, height in [(4032, 3024), (1600, 1200), (640, 480), (1920, 1080)]:
        assert hd_size(width, height, 4) == (672, 672)
        assert num_image_tokens_for_size(width, height, 4) == 757
    assert hd_size(4032, 3024, 16) == (1008, 1344)
    assert hd_size(3024, 4032, 16) == (1344, 1008)
    assert hd_grid(4032, 3024, 16) == (3, 4)


SIZES = [(1, 1), (7, 5), (5, 7), (300, 200), (451, 300), (512, 512), (1, 1000), (1000, 1), (4000, 30), (30, 4000), (1920, 1080), (4032, 3024), (99991, 3)]


@pytest.mark.parametrize("num_crops", [1, 2, 3, 4, 6, 9, 12, 16, 25])
@pytest.mark.parametrize(("width", "height"), SIZES)
def test_hd_size_properties(width, height, num_crops):
    hd_height, hd_width = hd_size(width, height, num_crops)
    rows, cols = hd_grid(width, height, num_crops)
    assert hd_height % CROP_SIZE == 0 and hd_width % CROP_SIZE == 0
    assert (rows, cols) == (hd_height // CROP_SIZE, hd_width // CROP_SIZE)
    assert 1 <= rows * cols <= num_crops
    # Orientation only swaps the axes.
    assert hd_size(height, width, num_crops) == (hd_width, hd_height)
    # The long side is 336 * s for the largest s with s * ceil(s / ratio) <= num_crops (spec §4).
    scale = cols if width >= height else rows
    ratio = max(width, height) / min(width, height)
    assert scale * math.ceil(scale / ratio) <= num_crops < (scale + 1) * math.ceil((scale + 1) / ratio)
    assert num_image_tokens_for_size(width, height, num_crops) == num_image_tokens(hd_height, hd_width)


def test_degenerate_aspect_ratio_gets_one_pixel_instead_of_crashing():
    # The reference computes new_h = int(336 / 1000) = 0 and PIL refuses to resize; we use new_h = 1.
    assert hd_size(1, 1000, 1) == (336, 336)
    assert hd_size(1000, 1, 1) == (336, 336)
    hd = hd_transform(random_image(1, 1000), 1)
    assert hd.shape == (336, 336, 3)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "4"])
def test_invalid_num_crops(bad):
    with pytest.raises(ValueError, match="num_crops"):
        hd_size(100, 100, bad)
    with pytest.raises(ValueError, match="num_crops"):
        preprocess_image(random_image(8, 8), bad)


# ---------------------------------------------------------------------------------------------
# Pixels


@pytest.mark.parametrize(("width", "height"), [(7, 5), (5, 7), (300, 200), (200, 300), (451, 300), (640, 400), (1000, 3), (31, 977), (777, 777), (672, 672)])
@pytest.mark.parametrize("num_crops", [1, 4, 16])
def test_hd_transform_equals_the_reference_recipe(width, height, num_crops):
    image = random_image(width, height, seed=width * 7 + height)
    expected = reference_hd_transform(image, num_crops)
    got = hd_transform(image, num_crops)
    assert got.dtype == np.uint8 and got.shape == expected.shape
    assert np.array_equal(got, expected)


@pytest.mark.parametrize(
    ("width", "height", "strips"),
    [
        # non-integer shrink/grow of the long side: banded passes with crops
        (640, 480, False), (480, 640, False), (1200, 50, False), (50, 1200, False), (997, 613, False),
        # long side shrunk by a whole factor (2 or 3): strips read through PIL's box
        (1344, 500, True), (500, 1344, True), (2016, 1512, True), (1512, 2016, True), (4032, 100, True),
    ],
)
@pytest.mark.parametrize("num_threads", [2, 3, 5])
def test_threaded_resize_is_exact(monkeypatch, width, height, strips, num_threads):
    # Force many small bands/strips on a small image: the result must still equal one PIL resize.
    monkeypatch.setattr(image_module, "_MIN_BAND_PIXELS", 1)
    strip_calls = []
    real_strips = image_module._resize_in_strips
    monkeypatch.setattr(image_module, "_resize_in_strips", lambda *args: strip_calls.append(args) or real_strips(*args))
    image = random_image(width, height, seed=width + height)
    for num_crops in (4, 16):
        geometry = image_module._hd_geometry(width, height, num_crops)
        core = image_module._resize_core(image, geometry, num_threads)
        expected = reference_hd_transform(image, num_crops)
        rows, cols = image_module._pad_slices(geometry)
        assert np.array_equal(core, expected[rows, cols])
        # ... and the padding around it is white.
        mask = np.ones(expected.shape[:2], dtype=bool)
        mask[rows, cols] = False
        assert (expected[mask] == 255).all()
    assert bool(strip_calls) == strips


@pytest.mark.parametrize(("width", "height", "num_crops"), [(451, 300, 16), (300, 451, 4), (200, 200, 1), (1000, 1, 4), (90, 700, 9)])
def test_preprocess_image_layout(width, height, num_crops):
    image = random_image(width, height, seed=3)
    result = preprocess_image(image, num_crops)
    hd = reference_hd_transform(image, num_crops)
    hd_height, hd_width = hd.shape[:2]
    rows, cols = hd_height // CROP_SIZE, hd_width // CROP_SIZE
    assert result.pixel_values.shape == (num_crops + 1, 3, CROP_SIZE, CROP_SIZE)
    assert result.pixel_values.dtype == torch.float32
    assert result.image_size == (hd_height, hd_width)
    assert result.grid == (rows, cols)
    assert result.num_tokens == num_image_tokens(hd_height, hd_width)

    normalised = normalise_numpy(hd)  # (3, h, w)
    pixels = result.pixel_values.numpy()
    for index in range(rows * cols):  # crops in row-major order, bit-exact
        r, c = divmod(index, cols)
        tile = normalised[:, r * CROP_SIZE : (r + 1) * CROP_SIZE, c * CROP_SIZE : (c + 1) * CROP_SIZE]
        assert np.array_equal(pixels[1 + index], tile), f"crop {index}"
    assert not pixels[1 + rows * cols :].any()  # zero padding slots
    expected_global = F.interpolate(torch.from_numpy(normalised)[None], size=(CROP_SIZE, CROP_SIZE), mode="bicubic", align_corners=False)
    assert torch.equal(result.pixel_values[0], expected_global[0])


def test_modes_convert_like_the_reference():
    # RGBA: alpha is dropped without compositing, so colour under transparent pixels shows.
    rgba = np.zeros((40, 60, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 0
    from_rgba = hd_transform(Image.fromarray(rgba, mode="RGBA"), 1)
    assert from_rgba[168, 168].tolist() == [200, 0, 0]
    # L replicates grey; P maps through the palette.
    grey = random_image(50, 40, mode="L")
    assert np.array_equal(hd_transform(grey, 4), reference_hd_transform(grey.convert("RGB"), 4))
    palette = random_image(50, 40).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    assert np.array_equal(hd_transform(palette, 4), reference_hd_transform(palette.convert("RGB"), 4))
    assert torch.equal(preprocess_image(palette, 4).pixel_values, preprocess_image(palette.convert("RGB"), 4).pixel_values)


def test_input_image_is_not_modified():
    image = random_image(120, 80)
    before = np.asarray(image).copy()
    preprocess_image(image, 4)
    assert image.size == (120, 80) and image.mode == "RGB"
    assert np.array_equal(np.asarray(image), before)


def test_preprocess_images_batches_the_single_results():
    images = [random_image(300, 200, seed=1), random_image(100, 900, seed=2), random_image(64, 64, mode="L", seed=3)]
    batch = preprocess_images(images, 4)
    assert batch.pixel_values.shape == (3, 5, 3, CROP_SIZE, CROP_SIZE)
    assert batch.image_sizes.dtype == torch.int64 and batch.image_sizes.shape == (3, 2)
    for index, image in enumerate(images):
        single = preprocess_image(image, 4)
        assert torch.equal(batch.pixel_values[index], single.pixel_values)
        assert batch.image_sizes[index].tolist() == list(single.image_size)
        assert batch.num_image_tokens[index] == single.num_tokens
    empty = preprocess_images([], 4)
    assert empty.pixel_values.shape == (0, 5, 3, CROP_SIZE, CROP_SIZE) and empty.image_sizes.shape == (0, 2)


def test_rejects_non_pil_input():
    with pytest.raises(TypeError, match="PIL image"):
        preprocess_image([[0, 0, 0]], 4)
    # RGB uint8 arrays (what load_image_or_pixels gives) are taken; other arrays are not.
    for array in (np.zeros((10, 10), dtype=np.uint8), np.zeros((10, 10, 4), dtype=np.uint8), np.zeros((10, 10, 3))):
        with pytest.raises(TypeError, match=r"\(H, W, 3\) uint8 RGB array"):
            preprocess_image(array, 4)
    rgb = np.random.default_rng(0).integers(0, 256, size=(30, 50, 3), dtype=np.uint8)
    assert torch.equal(preprocess_image(rgb, 4).pixel_values, preprocess_image(Image.fromarray(rgb), 4).pixel_values)


def test_device_path_equals_cpu_path():
    """The path that sends decoded uint8 images to the GPU resizes (integer arithmetic), pads and does
    the same float32 work there; run on the CPU here, it must give the CPU path's exact pixels."""
    from phivision.processing.image import _preprocess_images_on

    rng = np.random.default_rng(7)
    # Two pairs of same-sized images (processed as batches) among others.
    shapes = ((300, 451), (720, 1280), (300, 451), (50, 40), (720, 1280), (1000, 333), (2, 900))
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in shapes]
    expected = preprocess_images(images, 4)
    got = _preprocess_images_on(images, 4, torch.device("cpu"))
    assert torch.equal(got.pixel_values, expected.pixel_values)
    assert torch.equal(got.image_sizes, expected.image_sizes)
    assert got.num_image_tokens == expected.num_image_tokens
    # Pixels staged beforehand (as an engine's preparing threads do) for some of the images...
    staged = [staged_rgb(image, pin_memory=False) if i % 2 == 0 else None for i, image in enumerate(images)]
    given = _preprocess_images_on(images, 4, torch.device("cpu"), staged)
    assert torch.equal(given.pixel_values, expected.pixel_values)
    # ...are what is used: image 2's pixels given for image 0 (same size) change image 0 only.
    staged[0] = staged[2]
    swapped = _preprocess_images_on(images, 4, torch.device("cpu"), staged).pixel_values
    assert torch.equal(swapped[0], expected.pixel_values[2]) and torch.equal(swapped[1:], expected.pixel_values[1:])
