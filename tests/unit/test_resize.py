"""PIL's bilinear resize as integer tensor operations (the GPU path's resize), against PIL itself."""

import numpy as np
import pytest
import torch
from PIL import Image

from phivision.processing.image import hd_canvas_on, hd_transform
from phivision.processing.resize import pil_coefficients, resize_bilinear

BILINEAR = Image.Resampling.BILINEAR


def _pil_two_passes(pixels: np.ndarray, width: int, height: int, vertical_first: bool) -> np.ndarray:
    image = Image.fromarray(pixels)
    if vertical_first:
        return np.asarray(image.resize((image.width, height), BILINEAR).resize((width, height), BILINEAR))
    return np.asarray(image.resize((width, image.height), BILINEAR).resize((width, height), BILINEAR))


@pytest.mark.parametrize("seed", range(6))
def test_equals_pil_for_random_sizes_both_orders(seed):
    rng = np.random.default_rng(seed)
    for _ in range(8):
        height, width, out_height, out_width = (int(v) for v in rng.integers(1, 400, 4))
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        for vertical_first in (False, True):
            ours = resize_bilinear(torch.from_numpy(pixels), out_width, out_height, vertical_first=vertical_first)
            expected = _pil_two_passes(pixels, out_width, out_height, vertical_first)
            assert np.array_equal(ours.numpy(), expected), (height, width, out_height, out_width, vertical_first)


@pytest.mark.parametrize("size", [(1280, 720, 672, 378), (4032, 3024, 1344, 1008), (1000, 1, 336, 1), (7, 5, 336, 240)])
def test_equals_pil_for_typical_and_extreme_shrinks_and_stretches(size):
    width, height, out_width, out_height = size
    pixels = np.random.default_rng(1).integers(0, 256, (height, width, 3), dtype=np.uint8)
    ours = resize_bilinear(torch.from_numpy(pixels), out_width, out_height)
    assert np.array_equal(ours.numpy(), _pil_two_passes(pixels, out_width, out_height, False))


def test_a_pass_that_keeps_the_size_is_skipped_and_the_identity():
    pixels = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    assert resize_bilinear(pixels, 40, 30) is pixels
    start, weights = pil_coefficients(40, 40)  # were it run: one tap of weight 1.0 in fixed point per pixel
    assert np.array_equal(start, np.arange(40)) and np.array_equal(weights[:, 0], np.full(40, 1 << 22))


def test_weights_of_each_output_pixel_sum_to_one_in_fixed_point():
    for in_size, out_size in [(1280, 672), (720, 378), (3, 1000), (4032, 1344)]:
        _, weights = pil_coefficients(in_size, out_size)
        assert np.all(np.abs(weights.sum(axis=1) - (1 << 22)) <= weights.shape[1])  # rounding of each tap


def test_rejects_what_is_not_an_hwc_uint8_image():
    with pytest.raises(ValueError, match="uint8"):
        resize_bilinear(torch.zeros((4, 4, 3)), 2, 2)
    with pytest.raises(ValueError, match="positive"):
        resize_bilinear(torch.zeros((4, 4, 3), dtype=torch.uint8), 0, 2)


@pytest.mark.parametrize("shape", [(720, 1280), (1280, 720), (300, 451), (1000, 333), (2, 900), (1344, 1344)])
def test_device_canvas_equals_hd_transform(shape):
    """hd_canvas_on (resize + white padding on the device; the CPU here) is hd_transform's bytes,
    portrait images (vertical pass first) and unpadded canvases included."""
    pixels = np.random.default_rng(3).integers(0, 256, (*shape, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    for num_crops in (4, 16):
        canvas = hd_canvas_on(image, num_crops, torch.device("cpu"))
        assert canvas.dtype == torch.uint8
        assert np.array_equal(canvas.numpy(), hd_transform(image, num_crops)), (shape, num_crops)


def test_large_passes_in_bands_and_large_groups_in_batches_give_the_same_bytes(monkeypatch):
    """With tiny memory budgets, every pass is cut into bands and every group of same-sized images
    into batches of one: the results do not change."""
    from phivision.processing import image as image_module
    from phivision.processing import resize as resize_module
    from phivision.processing.image import hd_canvases_on

    rng = np.random.default_rng(4)
    images = [Image.fromarray(rng.integers(0, 256, (300, 451, 3), dtype=np.uint8)) for _ in range(3)]
    images.append(Image.fromarray(rng.integers(0, 256, (451, 300, 3), dtype=np.uint8)))  # portrait: vertical first
    expected = [hd_transform(image, 4) for image in images]
    monkeypatch.setattr(resize_module, "MAX_PASS_BYTES", 50_000)
    monkeypatch.setattr(image_module, "MAX_UPLOAD_BYTES", 1)
    canvases = hd_canvases_on(images, 4, torch.device("cpu"))
    for canvas, want in zip(canvases, expected):
        assert np.array_equal(canvas.numpy(), want)
