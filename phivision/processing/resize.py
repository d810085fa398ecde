"""PIL's bilinear resize of 8-bit images as integer tensor operations, byte for byte.

The reference resizes with PIL (spec §4). On a GPU engine the host's part of preprocessing was
mostly that resize (e.g. 11 ms per 1280x720 frame on the lent H200's host, 88 ms for W2's eight
frames one after another); here it runs on the device in a fraction of a millisecond, from the same
arithmetic as Pillow's `Resample.c`:

* per output pixel, a window of source pixels and weights from the triangle filter, stretched by
  the shrink factor (antialiasing), computed in double precision in Pillow's order of operations
  (the sum of the weights included: left to right, not numpy's pairwise sum);
* weights turned into 22-bit fixed point, rounded half away from zero;
* each pass sums pixel * weight in 32-bit integers from a rounding offset of 2**21, shifts right by
  22 and clamps to 0..255; the first pass's output is 8-bit, like PIL's intermediate image;
* the horizontal pass runs first, unless the caller asks for the vertical one first (the
  reference's portrait images are transposed before PIL sees them).

That is PIL's resize as two one-axis calls, which is how the host path resizes and what the golden
HD images confirm; Pillow's own one-call resize may run its passes in the other order for some
sizes (e.g. Pillow 13 here), which changes some pixels by one.

Integer sums do not depend on their order, so the result equals PIL's whatever the device.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from ..model.transfer import to_device

PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed-point precision for 8-bit images
# A pass keeps its taps' pixels and their weighted values for every output pixel (uint8 and int32,
# taps times its output's size); a larger output is computed in bands across the other axis (each
# band on its own is exact), so a 100-megapixel photo does not take gigabytes of device memory.
MAX_PASS_BYTES = 1 << 29


def _bilinear(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


def pil_coefficients(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(first source index (out,), fixed-point weights (out, taps)) of one bilinear pass, as Pillow's
    precompute_coeffs + normalize_coeffs_8bpc compute them for the whole source (box 0..in_size).
    Weights past a window's end are 0."""
    scale = float(in_size) / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale  # the bilinear filter's support is 1
    taps = int(math.ceil(support)) * 2 + 1
    center = 0.0 + (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    ss = 1.0 / filterscale
    xmin = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)  # C's (int) truncates
    xmax = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - xmin
    offsets = np.arange(taps)
    weights = _bilinear(((offsets[None, :] + xmin[:, None]).astype(np.float64) - center[:, None] + 0.5) * ss)
    weights = np.where(offsets[None, :] < xmax[:, None], weights, 0.0)  # (out, taps)
    total = np.zeros(out_size, dtype=np.float64)
    for tap in range(taps):  # left to right, as the C loop adds them
        total += weights[:, tap]
    weights = np.divide(weights, total[:, None], out=weights.copy(), where=total[:, None] != 0.0)
    scaled = weights * (1 << PRECISION_BITS)
    fixed = np.where(weights < 0, np.trunc(-0.5 + scaled), np.trunc(0.5 + scaled)).astype(np.int32)
    return xmin, fixed


@functools.lru_cache(maxsize=64)
def _pass_tables(in_size: int, out_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(source index (out, taps) int64, clamped to the image; weights (out, taps) int32) of one pass,
    on the host. Cached: they depend on the sizes only, and a video's frames (or a server's images
    of one size) all need the same ones. Read-only: callers copy them to the device."""
    xmin, fixed = pil_coefficients(in_size, out_size)
    taps = fixed.shape[1]
    index = torch.from_numpy(np.minimum(xmin[:, None] + np.arange(taps)[None, :], in_size - 1))  # (out, taps)
    return index, torch.from_numpy(fixed)


def _resize_axis(image: torch.Tensor, out_size: int, axis: int) -> torch.Tensor:
    """One pass along `axis` (-3: rows, i.e. vertical; -2: columns, horizontal) of (..., H, W, C) uint8."""
    in_size = image.shape[axis]
    if in_size == out_size:
        return image  # PIL skips a pass that keeps the size
    index, weights = (to_device(t, image.device) for t in _pass_tables(in_size, out_size))  # (out, taps) each
    taps = index.shape[1]
    across = -2 if axis == -3 else -3  # a horizontal pass maps rows independently, a vertical one columns
    # Bytes per output value: its taps' pixels (uint8), their weighted values and the sum (int32).
    bands = math.ceil((5 * taps + 4) * (image.numel() // in_size) * out_size / MAX_PASS_BYTES)
    if bands > 1 and image.shape[across] > 1:
        parts = image.tensor_split(min(bands, image.shape[across]), dim=across)
        return torch.cat([_apply_pass(part, index, weights, axis) for part in parts], dim=across)
    return _apply_pass(image, index, weights, axis)


def _apply_pass(image: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, axis: int) -> torch.Tensor:
    """sum over taps of image[index[:, tap]] * weights[:, tap] along `axis`, in int32, rounded, clamped.

    All taps in one gather, product and sum (seven kernels a pass, not four per tap plus four: the
    host launches them while the GPU waits, for the frames of a request)."""
    out_size, taps = index.shape
    gathered = image.index_select(axis, index.reshape(-1)).unflatten(axis, (out_size, taps))  # taps at `axis`
    tap_weights = weights.view(out_size, taps, *[1] * (-axis - 1))  # broadcasts over the axes after `axis`
    acc = (gathered * tap_weights).sum(dim=axis, dtype=torch.int32)  # uint8 * int32 -> int32, out_size along axis
    return acc.add_(1 << (PRECISION_BITS - 1)).bitwise_right_shift_(PRECISION_BITS).clamp_(0, 255).to(torch.uint8)


def resize_bilinear(image: torch.Tensor, width: int, height: int, *, vertical_first: bool = False) -> torch.Tensor:
    """(..., H, W, C) uint8 -> (..., height, width, C) uint8, each image equal to PIL's
    `Image.resize((width, height), BILINEAR)` run as two passes, horizontal first (with
    vertical_first: to the same of the transposed image, transposed back). Leading axes batch
    same-sized images into one set of kernels."""
    if image.dtype != torch.uint8 or image.dim() < 3:
        raise ValueError(f"expected an (..., H, W, C) uint8 tensor, got {image.dtype} {tuple(image.shape)}")
    if width < 1 or height < 1:
        raise ValueError(f"the target size must be positive, got {width}x{height}")
    if vertical_first:
        return _resize_axis(_resize_axis(image, height, -3), width, -2)
    return _resize_axis(_resize_axis(image, width, -2), height, -3)
