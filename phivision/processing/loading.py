"""Turning user image inputs into PIL images, with clear errors instead of PIL tracebacks.

Accepted sources: a file path (str or pathlib.Path), encoded bytes, a PIL image, a numpy uint8
array (H, W, 3) / (H, W) / (H, W, 4), a `data:image/...;base64,...` URI, and an http(s) URL when
`allow_urls=True`. Every failure raises `ImageLoadError(source, reason)`, where `source` names the
input ("photo.jpg", "<bytes>", "<data URI>", ...).

Files are decoded completely on load, so a truncated or corrupt file fails here and not later
inside preprocessing. The pixel count is checked from the header before any decoding (guard
against decompression bombs). Like the reference, EXIF orientation is not applied: the model
sees the pixels as stored.
"""

from __future__ import annotations

import base64
import binascii
import io
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import ImageLoadError
from . import png

# = 2 x PIL's default Image.MAX_IMAGE_PIXELS (~179 MP): PIL itself refuses anything larger unless
# PIL.Image.MAX_IMAGE_PIXELS is raised, so a higher max_pixels also needs that PIL setting.
DEFAULT_MAX_PIXELS = 178_956_970
URL_TIMEOUT_S = 30.0
MAX_URL_BYTES = 64 * 1024 * 1024
_URL_SCHEMES = ("http://", "https://")
_DATA_URI_PREFIX = "data:"
_ARRAY_MODES = {1: "L", 3: "RGB", 4: "RGBA"}  # channels -> PIL mode


def load_image(source: Any, *, allow_urls: bool = False, max_pixels: int | None = DEFAULT_MAX_PIXELS,
               fast_png: bool = True, side_by_side: bool = False) -> Image.Image:
    """Decode `source` into a fully loaded PIL image (mode kept as stored: RGB, L, RGBA, P, ...).

    max_pixels: refuse images with more pixels than this (checked before decoding); None = only
    PIL's own limit. fast_png: 8-bit RGB/RGBA PNGs through Wuffs or libspng when a binding is
    installed (`png.py`: the same pixels, faster). side_by_side: the caller decodes several images
    on threads at once, so only a binding that releases the GIL is used (pywuffs or imagecodecs;
    else Pillow, which does).
    """
    if isinstance(source, Image.Image):
        return _check_loaded(source, "<PIL image>", max_pixels)
    if isinstance(source, np.ndarray):
        return _from_array(source, max_pixels)
    decoded = _load_encoded(source, allow_urls, max_pixels, fast_png, side_by_side)
    # The fast decoder's array as the PIL image Pillow would have made ("RGB" / "RGBA").
    return Image.fromarray(decoded) if isinstance(decoded, np.ndarray) else decoded


def load_image_or_pixels(source: Any, *, allow_urls: bool = False, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                         fast_png: bool = True, side_by_side: bool = False) -> Image.Image | np.ndarray:
    """`load_image(source)`, except that an image the fast decoder (`png.py`) decoded comes as its
    RGB pixels, an (H, W, 3) uint8 array (possibly a strided view), with no PIL image made: what the
    GPU engine wants, which copies the pixels to pinned memory (`image.staged_rgb`), and which the
    preprocessing functions take as well as PIL images.

    On an H200's host, W1's 1344x1344 PNG took 18.0 ms through Pillow plus 3.2 ms to stage its
    pixels, and 6.4 plus 0.7 ms this way through libspng (benchmarks/exp_new_lengths.py). Making a
    PIL image of the array costs ~2 ms more on a 2-core machine (too little to see on the H200's host).
    """
    if isinstance(source, (Image.Image, np.ndarray)):
        return load_image(source, allow_urls=allow_urls, max_pixels=max_pixels)
    decoded = _load_encoded(source, allow_urls, max_pixels, fast_png, side_by_side)
    return decoded[:, :, :3] if isinstance(decoded, np.ndarray) else decoded  # alpha dropped, as convert("RGB")


def _load_encoded(source: Any, allow_urls: bool, max_pixels: int | None, fast_png: bool,
                  side_by_side: bool) -> Image.Image | np.ndarray:
    """An encoded source decoded whole: the fast decoder's (H, W, 3 or 4) array, or a loaded PIL image."""
    data, description = _read_source(source, allow_urls)
    image = _open(data, description, max_pixels)
    use_spng = fast_png and image.format == "PNG"
    pixels = png.decode_truecolour(data, image.size, side_by_side=side_by_side) if use_spng else None
    if pixels is not None:
        image.close()
        return pixels
    try:
        with image:
            image.load()  # full decode: truncation and corrupt data surface here
    except ImageLoadError:
        raise
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, EOFError, struct.error, ...
        raise ImageLoadError(description, _decode_reason(exc)) from exc
    return image


def read_image_size(source: Any, *, allow_urls: bool = False, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) of `source` from its header, without decoding the pixels.

    Same inputs, checks and errors as `load_image`, except that corrupt pixel data past the header
    is not detected.
    """
    if isinstance(source, Image.Image):
        _check_pixels(source.size, "<PIL image>", max_pixels)
        return source.size
    if isinstance(source, np.ndarray):
        return _from_array(source, max_pixels).size
    with _open(*_read_source(source, allow_urls), max_pixels) as image:
        return image.size


def describe_source(source: Any) -> str:
    """How error messages name an input: a path as given, a URL, or a placeholder like "<bytes>"."""
    if isinstance(source, Path):
        return str(source)
    if isinstance(source, str):
        if source.startswith(_DATA_URI_PREFIX):
            return "<data URI>"
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "<bytes>"
    if isinstance(source, Image.Image):
        return "<PIL image>"
    if isinstance(source, np.ndarray):
        return "<array>"
    return f"<{type(source).__name__}>"


def _read_source(source: Any, allow_urls: bool) -> tuple[bytes, str]:
    """An encoded source's bytes, and how errors name it."""
    description = describe_source(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif isinstance(source, str) and source.startswith(_DATA_URI_PREFIX):
        data = _decode_data_uri(source)
    elif isinstance(source, str) and source.lower().startswith(_URL_SCHEMES):
        data = _fetch_url(source, allow_urls)
    elif isinstance(source, (str, Path)):
        if not str(source):
            raise ImageLoadError("''", "empty path")
        data = _read_file(Path(source).expanduser(), description)
    else:
        raise ImageLoadError(
            description,
            "unsupported input type; expected a path, bytes, a PIL image, a uint8 numpy array, a data URI or a URL",
        )
    if not data:
        raise ImageLoadError(description, "empty data (0 bytes)")
    return data, description


def _open(data: bytes, description: str, max_pixels: int | None) -> Image.Image:
    """Open encoded bytes lazily (header only) and check the pixel count."""
    try:
        with warnings.catch_warnings():
            # PIL warns above its own pixel limit; our max_pixels check below decides instead.
            # (catch_warnings swaps the process-wide filters: the usual caveat for threaded callers.)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(
            description,
            f"too many pixels for PIL's decompression-bomb limit ({exc}); raise PIL.Image.MAX_IMAGE_PIXELS if you trust it",
        ) from exc
    except UnidentifiedImageError as exc:
        raise ImageLoadError(description, "not an image, or an image format PIL cannot read") from exc
    except Exception as exc:
        raise ImageLoadError(description, _decode_reason(exc)) from exc
    try:
        _check_pixels(image.size, description, max_pixels)
    except ImageLoadError:
        image.close()
        raise
    return image


def _check_pixels(size: tuple[int, int], description: str, max_pixels: int | None) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise ImageLoadError(description, f"image has no pixels ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageLoadError(
            description,
            f"{width}x{height} = {width * height:,} pixels is over the limit of {max_pixels:,} "
            "(possible decompression bomb; pass a larger max_pixels if you trust it)",
        )


def _check_loaded(image: Image.Image, description: str, max_pixels: int | None) -> Image.Image:
    _check_pixels(image.size, description, max_pixels)
    try:
        image.load()  # a lazily opened PIL image may still hold undecoded (possibly broken) data
    except Exception as exc:
        raise ImageLoadError(description, _decode_reason(exc)) from exc
    return image


def _from_array(array: np.ndarray, max_pixels: int | None) -> Image.Image:
    description = "<array>"
    if array.dtype != np.uint8:
        raise ImageLoadError(description, f"expected dtype uint8 (0..255), got {array.dtype}")
    channels = array.shape[2] if array.ndim == 3 else 1 if array.ndim == 2 else None
    if channels not in _ARRAY_MODES:
        raise ImageLoadError(description, f"expected shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {array.shape}")
    height, width = array.shape[:2]
    _check_pixels((width, height), description, max_pixels)
    if channels == 1:
        array = array.reshape(height, width)
    return Image.fromarray(np.ascontiguousarray(array), mode=_ARRAY_MODES[channels])


def _read_file(path: Path, description: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise ImageLoadError(description, "no such file") from exc
    except IsADirectoryError as exc:
        raise ImageLoadError(description, "is a directory, not an image file") from exc
    except PermissionError as exc:
        raise ImageLoadError(description, "permission denied") from exc
    except OSError as exc:
        raise ImageLoadError(description, f"cannot read the file ({exc.strerror or exc})") from exc


def _decode_data_uri(uri: str) -> bytes:
    description = "<data URI>"
    header, comma, payload = uri.partition(",")
    if not comma:
        raise ImageLoadError(description, "malformed data URI: no ',' before the data")
    media_type, *params = header[len(_DATA_URI_PREFIX) :].split(";")
    if media_type and not media_type.lower().startswith("image/"):
        raise ImageLoadError(description, f"media type {media_type!r} is not an image type")
    if "base64" not in (p.strip().lower() for p in params):
        raise ImageLoadError(description, "only base64 data URIs are supported (data:image/...;base64,...)")
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageLoadError(description, f"invalid base64 data ({exc})") from exc


def _fetch_url(url: str, allow_urls: bool) -> bytes:
    if not allow_urls:
        raise ImageLoadError(url, "fetching URLs is turned off; pass allow_urls=True to allow it")
    request = urllib.request.Request(url, headers={"User-Agent": "phivision"})
    try:
        with urllib.request.urlopen(request, timeout=URL_TIMEOUT_S) as response:
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > MAX_URL_BYTES:
                raise ImageLoadError(url, f"response is {int(declared):,} bytes, over the {MAX_URL_BYTES:,}-byte limit")
            data = response.read(MAX_URL_BYTES + 1)
    except ImageLoadError:
        raise
    except urllib.error.HTTPError as exc:
        raise ImageLoadError(url, f"HTTP error {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        raise ImageLoadError(url, f"cannot fetch ({exc.reason})") from exc
    except (TimeoutError, OSError, ValueError) as exc:
        raise ImageLoadError(url, f"cannot fetch ({exc})") from exc
    if len(data) > MAX_URL_BYTES:
        raise ImageLoadError(url, f"response is over the {MAX_URL_BYTES:,}-byte limit")
    return data


def _decode_reason(exc: Exception) -> str:
    message = str(exc).strip() or type(exc).__name__
    if "truncated" in message.lower():
        return f"truncated or incomplete image data ({message})"
    return f"corrupt or unsupported image data ({message})"
