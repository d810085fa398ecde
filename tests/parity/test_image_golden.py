"""Image preprocessing against the reference's golden outputs (shared/golden/processor, `image_cases`).

Tolerances from the manifest: HD image, sizes and token counts exact; per-crop sha256 bit-exact
(we also match the bicubic global crop bit for bit, since we run the same torch kernel on the same
tensor); per-crop stats relative 1e-6; float subsamples / exact tensors max abs diff 1e-6.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file

from phivision.processing.image import (
    CROP_SIZE,
    _preprocess_images_on,
    hd_canvas_on,
    hd_grid,
    hd_size,
    hd_transform,
    num_image_tokens,
    num_image_tokens_for_size,
    preprocess_image,
    preprocess_images,
)

FLOAT_TOLERANCE = 1e-6
STATS_RTOL = 1e-6
# Parametrised by index so that collection does not need the golden data (the fixtures decide
# between skip and fail); the manifest fixture checks the count.
NUM_IMAGE_CASES = 22


@pytest.fixture(scope="module")
def golden_tensors(processor_golden):
    return load_file(processor_golden / "pixel_values.safetensors")


@pytest.fixture(scope="module")
def image_cases(processor_manifest):
    cases = processor_manifest["image_cases"]
    assert len(cases) == NUM_IMAGE_CASES, "the golden README promises 22 image cases"
    return cases


def _tensor(golden_tensors, reference: str | dict) -> np.ndarray:
    """A manifest tensor reference, "file.safetensors:NAME" (bare or under a "tensor" key)."""
    if isinstance(reference, dict):
        reference = reference["tensor"]
    _, name = reference.split(":", 1)
    return golden_tensors[name]


def _sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


@pytest.fixture(scope="module")
def results(image_cases, processor_golden):
    """Each case run once (hd_transform + preprocess_image), shared by the checks below."""
    cache = {}

    def run(index):
        if index not in cache:
            case = image_cases[index]
            with Image.open(processor_golden / case["image"]) as image:
                image.load()
                assert image.mode == case["source_mode"] and list(image.size) == case["source_size_wh"]
                cache[index] = (case, image, hd_transform(image, case["num_crops"]), preprocess_image(image, case["num_crops"]))
        return cache[index]

    return run


@pytest.mark.parametrize("index", range(NUM_IMAGE_CASES))
def test_image_case(index, results, golden_tensors, processor_golden):
    case, image, hd, processed = results(index)
    expected = case["expected"]
    num_crops = case["num_crops"]
    width, height = case["source_size_wh"]

    if "raises" in expected:
        # Deliberate difference: the reference crashes (resized short side 0); we use 1 pixel.
        assert case["id"] == "strip_1x1000__nc1"
        _check_degenerate_case(image, num_crops, hd, processed)
        return

    # Geometry and token counts, exact, with and without pixels.
    assert list(hd.shape) == [*expected["image_sizes_hw"], 3]
    assert list(processed.image_size) == expected["image_sizes_hw"]
    assert list(hd_size(width, height, num_crops)) == expected["image_sizes_hw"]
    assert list(processed.grid) == expected["grid_rows_cols"] == list(hd_grid(width, height, num_crops))
    assert processed.num_tokens == expected["num_img_tokens"] == num_image_tokens(*expected["image_sizes_hw"])
    assert num_image_tokens_for_size(width, height, num_crops) == expected["calc_num_image_tokens_from_image_size"]

    # HD image: exact bytes.
    assert _sha256(hd) == expected["hd_sha256"], _first_mismatch(hd.reshape(-1)[::211], _tensor(golden_tensors, expected["hd_subsample"]))
    assert np.array_equal(hd.reshape(-1)[::211], _tensor(golden_tensors, expected["hd_subsample"]))
    if expected.get("hd_transform_png"):
        with Image.open(processor_golden / expected["hd_transform_png"]) as png:
            assert np.array_equal(hd, np.asarray(png.convert("RGB")))
    # The GPU path's HD image (resize as integer tensor ops, run on the CPU here): the same bytes.
    assert _sha256(hd_canvas_on(image, num_crops, torch.device("cpu")).numpy()) == expected["hd_sha256"]

    # Pixel values: shape, every slot's sha256 (global view included), stats, subsamples.
    pixel_values = processed.pixel_values.numpy()
    assert [1, *pixel_values.shape] == expected["pixel_values_shape"]
    assert not pixel_values[expected["num_real_crops_incl_global"] :].any()
    slot_hashes = [_sha256(slot.astype("<f4")) for slot in pixel_values]
    assert slot_hashes == expected["per_crop_sha256_f32"]
    on_device = _preprocess_images_on([image], num_crops, torch.device("cpu")).pixel_values[0].numpy()
    assert [_sha256(slot.astype("<f4")) for slot in on_device] == expected["per_crop_sha256_f32"]  # the GPU path's code
    for slot, stats in zip(pixel_values, expected["per_crop_stats"]):
        values = slot.astype(np.float64)
        got = {"sum": values.sum(), "abs_sum": np.abs(values).sum(), "sum_sq": (values * values).sum(), "min": values.min(), "max": values.max()}
        for key, value in stats.items():
            assert got[key] == pytest.approx(value, rel=STATS_RTOL, abs=1e-9), key
    subsample = _tensor(golden_tensors, expected["pixel_values_subsample"])
    np.testing.assert_allclose(pixel_values.reshape(-1)[::997], subsample, rtol=0, atol=FLOAT_TOLERANCE)
    global_subsample = _tensor(golden_tensors, expected["global_crop_subsample"])
    np.testing.assert_allclose(pixel_values[0].reshape(-1)[::97], global_subsample, rtol=0, atol=FLOAT_TOLERANCE)
    if "pixel_values_exact" in expected:
        exact = _tensor(golden_tensors, expected["pixel_values_exact"])
        np.testing.assert_allclose(pixel_values, exact.reshape(pixel_values.shape), rtol=0, atol=FLOAT_TOLERANCE)
    if "global_crop_exact" in expected:
        exact = _tensor(golden_tensors, expected["global_crop_exact"])
        np.testing.assert_allclose(pixel_values[0], exact.reshape(pixel_values[0].shape), rtol=0, atol=FLOAT_TOLERANCE)


def _check_degenerate_case(image, num_crops, hd, processed):
    """1x1000 with N=1: a valid 336x336 result whose one real column is the strip resized to 336 rows."""
    assert hd_size(*image.size, num_crops) == (336, 336)  # the formula with the resized short side = 1
    assert hd.shape == (336, 336, 3)
    column = (CROP_SIZE - 1) // 2  # padding splits 335 white columns 167 left / 168 right
    strip = np.asarray(image.convert("RGB").resize((1, CROP_SIZE), Image.Resampling.BILINEAR))
    assert np.array_equal(hd[:, column : column + 1], strip)
    white = np.delete(hd, column, axis=1)
    assert (white == 255).all()
    assert processed.image_size == (336, 336) and processed.grid == (1, 1) and processed.num_tokens == 313
    assert processed.pixel_values.shape == (num_crops + 1, 3, CROP_SIZE, CROP_SIZE)
    assert torch.isfinite(processed.pixel_values).all()


def test_batch_of_golden_images(image_cases, processor_golden, golden_tensors):
    """preprocess_images on several golden images with one num_crops equals the per-image goldens."""
    chosen = [case for case in image_cases if case["num_crops"] == 4][:4]
    images = []
    for case in chosen:
        with Image.open(processor_golden / case["image"]) as image:
            image.load()
            images.append(image)
    batch = preprocess_images(images, 4)
    assert batch.image_sizes.tolist() == [case["expected"]["image_sizes_hw"] for case in chosen]
    assert batch.num_image_tokens == [case["expected"]["num_img_tokens"] for case in chosen]
    for pixel_values, case in zip(batch.pixel_values.numpy(), chosen):
        assert [_sha256(slot.astype("<f4")) for slot in pixel_values] == case["expected"]["per_crop_sha256_f32"]


def _first_mismatch(got: np.ndarray, expected: np.ndarray) -> str:
    diff = np.flatnonzero(got != expected)
    if not diff.size:
        return "HD sha256 differs but the subsample matches"
    i = diff[0]
    return f"HD subsample differs at {diff.size} of {got.size} positions; first at element {i * 211}: {got[i]} vs {expected[i]}"
