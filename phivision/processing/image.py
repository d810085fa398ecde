"""Image preprocessing for Phi-3.5-vision (spec §4): HD resize + pad, normalise, global view, crops.

Pure functions of a PIL image and `num_crops` (N). Pixel output equals the reference
`Phi3VImageProcessor` bit for bit (golden data: `shared/golden/processor`), but it is computed
differently to be fast:

* The reference transposes portrait images, resizes, pads and transposes back. A PIL bilinear
  resize is two separable passes (horizontal, then vertical) with a uint8 intermediate, so we run
  the same two passes in the mirrored order on the untransposed image instead: identical bytes,
  no transposes.
* Each pass is still PIL's own resampler (exact by construction, whatever the Pillow version),
  but cut into pieces that run on several threads (PIL releases the GIL while it resamples): a
  horizontal pass treats rows independently and a vertical pass columns. When the long side
  shrinks by a whole factor (e.g. 4032 -> 1344) each thread resizes a whole strip of the output,
  reading the source in place; otherwise the passes run band by band on cropped copies.
* Normalisation runs once on the HD tensor with the reference's float32 operations
  ((x / 255 - mean) / std); padding is written as the normalised white value directly; the crops
  are one strided copy into the output instead of a per-crop loop and concatenations.
* The global view is `torch.nn.functional.interpolate(bicubic, antialias=False)` on the
  normalised HD tensor, exactly as the reference does it.
* With a GPU (`preprocess_images(..., device=...)`) the decoded image itself goes to the device and
  everything after decoding runs there, the resize included: `resize.py` computes PIL's two passes
  with its integer arithmetic, so the bytes are the same.

Deliberate difference: for extremely elongated images the reference computes a resized short
side of 0 pixels and crashes inside PIL (golden case `strip_1x1000__nc1`); we use 1 pixel.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..model.transfer import to_device
from .resize import resize_bilinear

CROP_SIZE = 336  # CLIP ViT-L/14 input side; HD images are tiled in CROP_SIZE squares
TOKENS_PER_CROP_SIDE = 12  # 24x24 CLIP patches merged 2x2
TOKENS_PER_CROP = TOKENS_PER_CROP_SIDE * TOKENS_PER_CROP_SIDE  # 144
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PAD_VALUE = 255  # the HD padding is white
RESAMPLE = Image.Resampling.BILINEAR  # torchvision's default for PIL images; antialiased when shrinking

# The GPU path sends same-sized images to the device in batches of at most this many bytes of pixels.
MAX_UPLOAD_BYTES = 1 << 28
# Resize passes are cut into bands for threads; below this many source pixels a band is not worth a thread.
_MIN_BAND_PIXELS = 1 << 18
_BANDS_PER_THREAD = 2  # more bands than threads keep threads busy when one is slowed down


@dataclass(frozen=True)
class ProcessedImage:
    """One image as the model consumes it."""

    pixel_values: torch.Tensor  # (N+1, 3, 336, 336) float32: global view, row-major crops, zero padding
    image_size: tuple[int, int]  # HD (height, width), multiples of CROP_SIZE
    num_tokens: int  # image placeholder tokens in the prompt
    grid: tuple[int, int]  # (rows, cols) of crops


@dataclass(frozen=True)
class ImageBatch:
    """Several images preprocessed with the same num_crops."""

    pixel_values: torch.Tensor  # (I, N+1, 3, 336, 336) float32
    image_sizes: torch.Tensor  # (I, 2) int64, HD [height, width]
    num_image_tokens: list[int]


@dataclass(frozen=True)
class _HDGeometry:
    """Where the resized image sits in the HD canvas. `long`/`short` refer to the landscape view."""

    transposed: bool  # the source is portrait (width < height)
    long_size: int  # resized long side = 336 * scale
    short_size: int  # resized short side, before padding
    short_padded: int  # short side padded up to a multiple of CROP_SIZE
    pad_before: int  # white pixels above (landscape) / left of (portrait) the image

    @property
    def hd_size(self) -> tuple[int, int]:
        if self.transposed:
            return self.long_size, self.short_padded
        return self.short_padded, self.long_size

    @property
    def resized_size(self) -> tuple[int, int]:
        """(width, height) of the resized image before padding, in the source orientation."""
        if self.transposed:
            return self.short_size, self.long_size
        return self.long_size, self.short_size


def _check_num_crops(num_crops: int) -> None:
    if isinstance(num_crops, bool) or not isinstance(num_crops, int) or num_crops < 1:
        raise ValueError(f"num_crops must be a positive integer, got {num_crops!r}")


def _hd_geometry(width: int, height: int, num_crops: int) -> _HDGeometry:
    """Spec §4 step 2 as arithmetic, in the reference's floating-point operations."""
    _check_num_crops(num_crops)
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    transposed = width < height
    if transposed:
        width, height = height, width
    ratio = width / height
    scale = 1
    while scale * math.ceil(scale / ratio) <= num_crops:
        scale += 1
    scale -= 1
    long_size = scale * CROP_SIZE
    # Departure: the reference lets this reach 0 (then PIL refuses to resize); 1 keeps a valid image.
    short_size = max(int(long_size / ratio), 1)
    short_padded = -(-short_size // CROP_SIZE) * CROP_SIZE
    return _HDGeometry(transposed, long_size, short_size, short_padded, (short_padded - short_size) // 2)


def hd_size(width: int, height: int, num_crops: int) -> tuple[int, int]:
    """HD (height, width) that a width x height image becomes with num_crops; no pixels needed.

    For extremely elongated images (short side resized to 0 by the reference's formula, which then
    crashes) the resized short side is taken as 1 pixel, so the result is one crop row/column.
    """
    return _hd_geometry(width, height, num_crops).hd_size


def hd_grid(width: int, height: int, num_crops: int) -> tuple[int, int]:
    """(rows, cols) of 336x336 crops for a width x height image; rows * cols <= num_crops."""
    hd_height, hd_width = hd_size(width, height, num_crops)
    return hd_height // CROP_SIZE, hd_width // CROP_SIZE


def num_image_tokens(hd_height: int, hd_width: int) -> int:
    """Placeholder tokens for an HD image: crops with a separator per token row, glb_GN, global view.

    rows * 12 * (cols * 12 + 1) + 1 + 12 * 13 == (rows * cols + 1) * 144 + 1 + (rows + 1) * 12.
    """
    if hd_height < CROP_SIZE or hd_width < CROP_SIZE or hd_height % CROP_SIZE or hd_width % CROP_SIZE:
        raise ValueError(f"HD size must be positive multiples of {CROP_SIZE}, got {hd_height}x{hd_width}")
    rows, cols = hd_height // CROP_SIZE, hd_width // CROP_SIZE
    return (rows * cols + 1) * TOKENS_PER_CROP + 1 + (rows + 1) * TOKENS_PER_CROP_SIDE


def num_image_tokens_for_size(width: int, height: int, num_crops: int) -> int:
    """Placeholder tokens for a width x height image (the reference's calc_num_image_tokens_from_image_size)."""
    return num_image_tokens(*hd_size(width, height, num_crops))


def image_size(image: Image.Image | np.ndarray) -> tuple[int, int]:
    """(width, height) of a PIL image or of an (H, W, 3) RGB array (`load_image_or_pixels`)."""
    if isinstance(image, np.ndarray):
        return image.shape[1], image.shape[0]
    return image.size


def _to_rgb(image: Image.Image | np.ndarray) -> Image.Image:
    """The reference's convert("RGB"): alpha dropped without compositing, palettes mapped, grey replicated.
    An (H, W, 3) uint8 array is taken as RGB pixels already."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise TypeError(f"expected an (H, W, 3) uint8 RGB array, got {image.dtype} {image.shape}")
        return Image.fromarray(np.ascontiguousarray(image))
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image or an (H, W, 3) uint8 RGB array, got {type(image).__name__} "
                        "(use phivision.processing.loading.load_image)")
    if image.mode != "RGB":
        return image.convert("RGB")
    image.load()  # decode now: a lazily opened file must not be decoded by several resize threads at once
    return image


def _default_num_threads() -> int:
    return max(1, min(torch.get_num_threads(), os.cpu_count() or 1))


def _num_bands(width: int, height: int, across: int, num_threads: int, bands_per_thread: int = 1) -> int:
    """How many bands to cut a width x height source into for num_threads: never tiny ones."""
    if num_threads <= 1:
        return 1
    return max(1, min(across, num_threads * bands_per_thread, width * height // _MIN_BAND_PIXELS))


def _resize_pass(image: Image.Image, size: tuple[int, int], num_threads: int) -> Image.Image:
    """One separable PIL bilinear pass (width or height changes, not both), on several threads.

    A horizontal pass maps every row on its own and a vertical pass every column, so the source is
    cut into bands of rows (resp. columns), each resized by PIL (which releases the GIL while it
    resamples), and pasted together: the result equals `image.resize(size)` byte for byte.
    """
    width, height = image.size
    if size == image.size:
        return image
    horizontal = size[1] == height
    if not horizontal and size[0] != width:
        raise ValueError(f"one pass changes one axis only: {image.size} -> {size}")
    across = height if horizontal else width  # the bands are cut along this axis
    num_bands = _num_bands(width, height, across, num_threads, _BANDS_PER_THREAD)
    if num_bands == 1:
        return image.resize(size, RESAMPLE)
    edges = [across * i // num_bands for i in range(num_bands + 1)]

    def resize_band(band: int) -> Image.Image:
        lo, hi = edges[band], edges[band + 1]
        if horizontal:
            return image.crop((0, lo, width, hi)).resize((size[0], hi - lo), RESAMPLE)
        return image.crop((lo, 0, hi, height)).resize((hi - lo, size[1]), RESAMPLE)

    with ThreadPoolExecutor(min(num_threads, num_bands)) as pool:
        parts = list(pool.map(resize_band, range(num_bands)))
    result = Image.new(image.mode, size)
    for lo, part in zip(edges, parts):
        result.paste(part, (0, lo) if horizontal else (lo, 0))
    return result


def _resize_in_strips(image: Image.Image, geometry: _HDGeometry, num_strips: int) -> np.ndarray:
    """Both passes strip by strip, for a long side shrunk by a whole factor f >= 2.

    The output's long axis is cut into strips; each thread runs the first pass for its strip with
    PIL's `box` (reading the source in place, no crop copy), then the second pass on that strip
    alone (the second pass maps lines across the strip independently).

    Why the first pass is exact: PIL derives the filter taps of output i from in0 + (i + 0.5) * scale
    with scale = (in1 - in0) / out_size. With in0 = a * f, in1 = b * f and b - a outputs, scale == f
    and every center is a small multiple of 0.5, so all of it is exact in floating point and equals
    the full resize's (a + i + 0.5) * f. Same taps, same integer weights, same bytes. (For a
    non-integer factor the rounding of those expressions could differ, so that case uses bands.)
    """
    width, height = image.size
    new_width, new_height = geometry.resized_size
    long_in = height if geometry.transposed else width
    factor = long_in // geometry.long_size
    edges = [geometry.long_size * i // num_strips for i in range(num_strips + 1)]
    out = np.empty((new_height, new_width, 3), dtype=np.uint8)

    def resize_strip(strip: int) -> None:
        lo, hi = edges[strip], edges[strip + 1]
        if geometry.transposed:  # long axis = rows: vertical pass first, then horizontal
            part = image.resize((width, hi - lo), RESAMPLE, box=(0, lo * factor, width, hi * factor))
            out[lo:hi] = np.asarray(part.resize((new_width, hi - lo), RESAMPLE))
        else:  # long axis = columns: horizontal pass first, then vertical
            part = image.resize((hi - lo, height), RESAMPLE, box=(lo * factor, 0, hi * factor, height))
            out[:, lo:hi] = np.asarray(part.resize((hi - lo, new_height), RESAMPLE))

    with ThreadPoolExecutor(num_strips) as pool:
        list(pool.map(resize_strip, range(num_strips)))
    return out


def _resize_core(image: Image.Image, geometry: _HDGeometry, num_threads: int) -> np.ndarray:
    """The resized, unpadded image as (h, w, 3) uint8, equal to the reference's transpose/resize/transpose.

    PIL resizes horizontally first, then vertically. For a portrait source the reference resizes
    the transposed image, i.e. it scales the source's height first and its width second; we do
    exactly that on the source orientation, so no transposes are needed.
    """
    width, height = image.size
    new_width, new_height = geometry.resized_size
    long_in = height if geometry.transposed else width
    num_strips = _num_bands(width, height, geometry.long_size, num_threads, bands_per_thread=1)
    if num_strips > 1 and long_in % geometry.long_size == 0 and long_in >= 2 * geometry.long_size:
        return _resize_in_strips(image, geometry, num_strips)
    if geometry.transposed:
        staged = _resize_pass(image, (width, new_height), num_threads)  # long side (source height) first
    else:
        staged = _resize_pass(image, (new_width, height), num_threads)  # long side (source width) first
    resized = _resize_pass(staged, (new_width, new_height), num_threads)
    return np.asarray(resized)  # (new_height, new_width, 3)


def _pad_slices(geometry: _HDGeometry) -> tuple[slice, slice]:
    """(rows, cols) of the HD canvas holding the resized image."""
    width, height = geometry.resized_size
    before = geometry.pad_before
    if geometry.transposed:
        return slice(0, height), slice(before, before + width)
    return slice(before, before + height), slice(0, width)


def _padding_slices(geometry: _HDGeometry) -> list[tuple[slice, slice]]:
    """(rows, cols) of the white strips around the resized image: before and after it on the short axis."""
    rows, cols = _pad_slices(geometry)
    inner = cols if geometry.transposed else rows
    strips = [slice(0, inner.start), slice(inner.stop, geometry.short_padded)]
    full = slice(None)
    return [(full, strip) if geometry.transposed else (strip, full) for strip in strips if strip.stop > strip.start]


def hd_transform(image: Image.Image, num_crops: int, num_threads: int | None = None) -> np.ndarray:
    """The HD image (spec §4 step 2): resized and white-padded, (h, w, 3) uint8 RGB (may be read-only).

    `num_threads` caps the threads one resize splits itself over (default: all cores); callers that
    resize several images side by side give each a share, so that threads are not oversubscribed.
    """
    image = _to_rgb(image)
    geometry = _hd_geometry(image.width, image.height, num_crops)
    core = _resize_core(image, geometry, num_threads or _default_num_threads())
    if core.shape[:2] == geometry.hd_size:
        return core  # no padding (e.g. 1344x1344 at 16 crops, 672x672 at 4): the resized image is the canvas
    canvas = np.empty((*geometry.hd_size, 3), dtype=np.uint8)
    for pad_rows, pad_cols in _padding_slices(geometry):  # white strips written once, the image once
        canvas[pad_rows, pad_cols] = PAD_VALUE
    rows, cols = _pad_slices(geometry)
    canvas[rows, cols] = core
    return canvas


def _normalise_(values: torch.Tensor) -> torch.Tensor:
    """In place on float32 (3, ...) holding 0..255: (x / 255 - mean) / std, the reference's float32 ops in its order."""
    shape = (3,) + (1,) * (values.dim() - 1)
    # Copied through pinned memory, without waiting (see model/transfer.py).
    mean = to_device(torch.tensor(CLIP_MEAN, dtype=torch.float32), values.device).view(shape)
    std = to_device(torch.tensor(CLIP_STD, dtype=torch.float32), values.device).view(shape)
    return values.div_(255).sub_(mean).div_(std)


def _hd_tensor(core: np.ndarray, geometry: _HDGeometry) -> torch.Tensor:
    """Normalised HD canvas (1, 3, h, w) float32: the resized pixels plus normalised white padding."""
    hd = torch.empty((1, 3, *geometry.hd_size), dtype=torch.float32)
    white = _normalise_(torch.full((3, 1, 1), float(PAD_VALUE)))  # the same float32 ops as for image pixels
    for pad_rows, pad_cols in _padding_slices(geometry):
        hd[0, :, pad_rows, pad_cols] = white
    rows, cols = _pad_slices(geometry)
    region = hd[0, :, rows, cols]
    # np.asarray(PIL image) is read-only and torch wants writable memory: copy only in that case.
    region.copy_(torch.from_numpy(np.require(core, requirements="W")).permute(2, 0, 1))  # (3, h', w') uint8 -> float32
    _normalise_(region)
    return hd


def _fill_pixel_values(out: torch.Tensor, hd: torch.Tensor) -> tuple[int, int]:
    """Write [global view, crops row-major, zeros] into out (N+1, 3, 336, 336); returns (rows, cols)."""
    _, _, hd_height, hd_width = hd.shape
    rows, cols = hd_height // CROP_SIZE, hd_width // CROP_SIZE
    num_real = rows * cols
    if num_real + 1 > out.shape[0]:  # cannot happen: rows * cols <= num_crops by construction
        raise RuntimeError(f"{rows}x{cols} crops do not fit {out.shape[0] - 1} slots")
    out[0] = F.interpolate(hd, size=(CROP_SIZE, CROP_SIZE), mode="bicubic", align_corners=False, antialias=False)[0]
    # (1, 3, rows*336, cols*336) -> (rows, cols, 3, 336, 336): one strided copy, no per-crop loop
    tiles = hd.view(3, rows, CROP_SIZE, cols, CROP_SIZE).permute(1, 3, 0, 2, 4)
    out[1 : 1 + num_real].view(rows, cols, 3, CROP_SIZE, CROP_SIZE).copy_(tiles)
    out[1 + num_real :].zero_()
    return rows, cols


def _preprocess_into(out: torch.Tensor, image: Image.Image, num_crops: int, num_threads: int) -> tuple[tuple[int, int], tuple[int, int]]:
    image = _to_rgb(image)
    geometry = _hd_geometry(image.width, image.height, num_crops)
    core = _resize_core(image, geometry, num_threads)
    hd = _hd_tensor(core, geometry)
    grid = _fill_pixel_values(out, hd)
    return geometry.hd_size, grid


def preprocess_image(image: Image.Image, num_crops: int) -> ProcessedImage:
    """One PIL image -> model pixels (spec §4), equal to the reference's output for that image."""
    _check_num_crops(num_crops)
    out = torch.empty((num_crops + 1, 3, CROP_SIZE, CROP_SIZE), dtype=torch.float32)
    size, grid = _preprocess_into(out, image, num_crops, _default_num_threads())
    return ProcessedImage(pixel_values=out, image_size=size, num_tokens=num_image_tokens(*size), grid=grid)


def preprocess_images(images: Sequence[Image.Image], num_crops: int, device: torch.device | str | None = None,
                      staged: Sequence[torch.Tensor | None] | None = None) -> ImageBatch:
    """Several images with one num_crops, written straight into one batch tensor (no stacking copy).

    With a (CUDA) `device`, only decoding stays on the CPU: the uint8 images go to the device, where
    the resize (PIL's integer arithmetic, `resize.py`), the padding and the float work
    (normalisation, crops, the bicubic global view, with the same float32 operations) run, so the
    host is not the bottleneck in front of the GPU. There, `staged` may bring `staged_rgb` of the
    images, made where they were decoded; the CPU path ignores it.
    """
    _check_num_crops(num_crops)
    if device is not None and torch.device(device).type != "cpu":
        return _preprocess_images_on(images, num_crops, torch.device(device), staged)
    out = torch.empty((len(images), num_crops + 1, 3, CROP_SIZE, CROP_SIZE), dtype=torch.float32)
    sizes = []
    num_threads = _default_num_threads()
    for index, image in enumerate(images):
        size, _ = _preprocess_into(out[index], image, num_crops, num_threads)
        sizes.append(size)
    image_sizes = torch.tensor(sizes, dtype=torch.int64).reshape(len(images), 2)
    return ImageBatch(pixel_values=out, image_sizes=image_sizes, num_image_tokens=[num_image_tokens(*s) for s in sizes])


def staged_rgb(image: Image.Image | np.ndarray, pin_memory: bool) -> torch.Tensor:
    """The image's RGB pixels as an (H, W, 3) uint8 tensor, in pinned memory when asked: the host
    copy the GPU path needs, made wherever the image was decoded (side by side for many images).
    An RGB array (`load_image_or_pixels`) is copied as it is, without going through PIL."""
    pixels = image if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3 else np.asarray(_to_rgb(image))
    staged = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=pin_memory)  # (H, W, 3)
    staged.numpy()[...] = pixels
    return staged


def hd_canvases_on(images: Sequence[Image.Image], num_crops: int, device: torch.device,
                   staged: Sequence[torch.Tensor | None] | None = None) -> list[torch.Tensor]:
    """`hd_transform(image, num_crops)` of each image, computed on `device`: (h, w, 3) uint8 tensors,
    the same bytes. Images of the same size share one set of resize kernels. `staged` may bring
    `staged_rgb` of some images, made elsewhere (None entries are made here)."""
    staged = list(staged) if staged is not None else [None] * len(images)
    sizes = [image_size(image) for image in images]
    by_size: dict[tuple[int, int], list[int]] = {}
    for index, size in enumerate(sizes):
        by_size.setdefault(size, []).append(index)
    canvases: list[torch.Tensor | None] = [None] * len(images)
    pinned = device.type == "cuda"
    for (width, height), same_size in by_size.items():
        geometry = _hd_geometry(width, height, num_crops)
        # Batches of same-sized images, as many as MAX_UPLOAD_BYTES of pixels (at least one).
        per_batch = max(1, MAX_UPLOAD_BYTES // (width * height * 3))
        for start in range(0, len(same_size), per_batch):
            indices = same_size[start : start + per_batch]
            # Asynchronous transfers from pinned memory, then one batch for the resize kernels.
            uploads = [(staged[i] if staged[i] is not None else staged_rgb(images[i], pinned)).to(device, non_blocking=True)
                       for i in indices]
            sources = uploads[0][None] if len(uploads) == 1 else torch.stack(uploads)  # (n, H, W, 3)
            core = resize_bilinear(sources, *geometry.resized_size, vertical_first=geometry.transposed)
            if tuple(core.shape[1:3]) != geometry.hd_size:
                padded = torch.full((len(indices), *geometry.hd_size, 3), PAD_VALUE, dtype=torch.uint8, device=device)
                rows, cols = _pad_slices(geometry)
                padded[:, rows, cols] = core
                core = padded
            for slot, index in enumerate(indices):
                canvases[index] = core[slot]
    return canvases  # type: ignore[return-value]


def hd_canvas_on(image: Image.Image, num_crops: int, device: torch.device) -> torch.Tensor:
    """`hd_transform(image, num_crops)` computed on `device`: (h, w, 3) uint8, the same bytes."""
    return hd_canvases_on([image], num_crops, device)[0]


def _preprocess_images_on(images: Sequence[Image.Image], num_crops: int, device: torch.device,
                          staged: Sequence[torch.Tensor | None] | None = None) -> ImageBatch:
    out = torch.zeros((len(images), num_crops + 1, 3, CROP_SIZE, CROP_SIZE), dtype=torch.float32, device=device)
    canvases = hd_canvases_on(images, num_crops, device, staged)
    sizes = [tuple(canvas.shape[:2]) for canvas in canvases]
    # Images with the same HD size share one set of float kernels (a server adding many same-sized
    # images at once pays per batch, not per image); the float32 operations per pixel are the same
    # as image by image.
    by_size: dict[tuple[int, int], list[int]] = {}
    for index, size in enumerate(sizes):
        by_size.setdefault(size, []).append(index)
    for (height, width), indices in by_size.items():
        stacked = torch.stack([canvases[i] for i in indices])  # (n, h, w, 3) uint8
        hd = stacked.permute(3, 0, 1, 2).float()  # (3, n, h, w)
        hd = _normalise_(hd).transpose(0, 1)  # (n, 3, h, w) float32
        rows, cols = height // CROP_SIZE, width // CROP_SIZE
        num_real = rows * cols
        everyone = len(indices) == len(images)
        where = None if everyone else to_device(torch.tensor(indices), device)
        target = out if everyone else out[where]
        target[:, 0] = F.interpolate(hd, size=(CROP_SIZE, CROP_SIZE), mode="bicubic", align_corners=False, antialias=False)
        # (n, 3, rows*336, cols*336) -> (n, rows, cols, 3, 336, 336): one strided copy for all tiles
        tiles = hd.reshape(len(indices), 3, rows, CROP_SIZE, cols, CROP_SIZE).permute(0, 2, 4, 1, 3, 5)
        target[:, 1 : 1 + num_real].view(len(indices), rows, cols, 3, CROP_SIZE, CROP_SIZE).copy_(tiles)
        if target is not out:
            out[where] = target
    image_sizes = torch.tensor(sizes, dtype=torch.int64).reshape(len(images), 2)
    return ImageBatch(pixel_values=out, image_sizes=image_sizes, num_image_tokens=[num_image_tokens(*s) for s in sizes])
