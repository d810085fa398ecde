"""The commonest PNGs (8-bit RGB or RGBA) decoded by Wuffs or libspng, when an optional binding of
one is installed: `pywuffs` first, else `pyspng` for a lone image and `imagecodecs` for several
decoded side by side.

Why: a PNG's decoding is on the critical path of the time to first token, before the vision tower
can start. For W1's 1344x1344 PNG on two H200 hosts, Pillow decoded in 10.1 and 18.0 ms, and
staging its RGB pixels took 2.0 and 3.2 ms more (Pillow keeps RGB as four bytes a pixel); through
libspng, 6.2-6.4 ms and 0.5-0.7 ms (benchmarks/exp_new_lengths.py).

The bindings differ where it matters:
- pywuffs (Google's Wuffs) is the fastest and releases the GIL. On an H200's 16-core host, with
  the staging in pinned memory (benchmarks/exp_png_threads.py): W1's PNG in 3.8 ms against
  pyspng's 6.7 and imagecodecs' 8.7; W2's eight frames side by side in 3.7 against imagecodecs'
  6.4; a W4 burst of 64 small images in 19.3 against 17.5, about even. It serves both cases when
  installed.
- pyspng is the faster libspng binding for one image (W1's PNG and its staging: 5.2 ms against
  imagecodecs' 7.0 on an H200's 16-core host), but it holds the GIL while it decodes, so images on
  several threads decode one after another: W2's eight frames took 32.0 ms through it, 17.3
  through Pillow.
- imagecodecs' libspng releases the GIL: W2's frames took 6.4 ms, and a W4 burst of 64 672x672
  images 14.7 ms against Pillow's 58.1.
So a caller decoding several images at once asks for a decoder that runs `side_by_side`.

Only files whose pixels equal Pillow's byte for byte come here: 8-bit truecolour with or without
alpha, not animated, every chunk's CRC intact. The decoders ignore the gamma, colour-profile and
significant-bits chunks, and a truecolour tRNS key only matters to an alpha channel, which the
model never sees. Wuffs, asked for RGB, would paint the tRNS key's pixels black, so such files go
to libspng (or Pillow). Anything else (palette, grey, 16-bit, animated, damaged, or no binding for
the case) returns None and Pillow decodes it, with its own error messages.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable

import numpy as np

try:
    import pyspng
except ImportError:  # optional: `pip install "phivision[fast]"`
    pyspng = None
try:
    import imagecodecs
except ImportError:  # optional: `pip install "phivision[fast]"`
    imagecodecs = None
try:
    import pywuffs
    import pywuffs.aux
except ImportError:  # optional: `pip install "phivision[fast]"`
    pywuffs = None

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# IHDR is the first chunk: 8 signature bytes, 4 length bytes, "IHDR", width, height, then bit
# depth (byte 24) and colour type (byte 25).
_IHDR_END = 33
_TRUECOLOUR = {2: 3, 6: 4}  # colour type -> channels (RGB, RGBA)


def _decoder(side_by_side: bool, *, colour_type: int = 2, trns: bool = False) -> Callable[[bytes], np.ndarray] | None:
    """The binding that suits the caller: Wuffs when installed (fastest, releases the GIL) unless
    the file is RGB with a tRNS key; else libspng through one that releases the GIL when several
    images decode on threads at once, or the fastest installed for a lone image."""
    if pywuffs is not None and not (colour_type == 2 and trns):
        return _wuffs_decoder(colour_type)
    releases_gil = None
    if imagecodecs is not None and getattr(getattr(imagecodecs, "SPNG", None), "available", False):
        releases_gil = imagecodecs.spng_decode
    if side_by_side:
        return releases_gil
    return pyspng.load if pyspng is not None else releases_gil


def _wuffs_decoder(colour_type: int) -> Callable[[bytes], np.ndarray]:
    """Wuffs decoding to RGB for an RGB file, to non-premultiplied RGBA (the stored bytes) for an
    RGBA one: asked for RGB, it would blend the alpha in rather than drop it as Pillow does."""
    def decode(data: bytes) -> np.ndarray:
        config = pywuffs.aux.ImageDecoderConfig()
        config.enabled_decoders = [pywuffs.ImageDecoderType.PNG]
        config.pixel_format = pywuffs.PixelFormat.RGB if colour_type == 2 else pywuffs.PixelFormat.RGBA_NONPREMUL
        # A decoder per call: they are not thread-safe, and one costs about a microsecond to make.
        result = pywuffs.aux.ImageDecoder(config).decode(bytes(data))
        if result.error_message:
            raise ValueError(result.error_message)
        return result.pixbuf
    return decode


def available(side_by_side: bool = False) -> bool:
    """Whether a binding is installed for this case (`side_by_side`: several images decoded on
    threads at once, which needs pywuffs or imagecodecs)."""
    return _decoder(side_by_side) is not None


def decode_truecolour(data: bytes, size: tuple[int, int], *, side_by_side: bool = False) -> np.ndarray | None:
    """The pixels of an 8-bit RGB / RGBA PNG of `size` (width, height, from its header) as an
    (H, W, 3 or 4) uint8 array; None for any other file, or without a binding: Pillow's turn.
    side_by_side: the caller decodes several images on threads at once."""
    if len(data) < _IHDR_END or not data.startswith(_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    bit_depth, colour_type = data[24], data[25]
    channels = _TRUECOLOUR.get(colour_type)
    if bit_depth != 8 or channels is None:
        return None
    if not available(side_by_side):
        return None  # no binding for this case: spare the chunk walk
    kinds = _chunk_kinds(data)
    if kinds is None:
        return None
    decode = _decoder(side_by_side, colour_type=colour_type, trns=b"tRNS" in kinds)
    if decode is None:
        return None
    try:
        pixels = decode(data)
    except Exception:  # noqa: BLE001 - corrupt or truncated: Pillow decodes it again and words the error
        return None
    width, height = size
    if pixels.dtype != np.uint8 or pixels.shape != (height, width, channels):
        return None
    return pixels


def _chunk_kinds(data: bytes) -> set[bytes] | None:
    """The kinds of the file's chunks, or None unless every chunk up to IEND is whole and matches
    its CRC, and none is an animation's.

    libspng as pyspng drives it checks neither the chunk CRCs nor zlib's checksum of the pixel
    stream (nor are imagecodecs and Wuffs relied on to: Wuffs returned the pixels of a file whose
    zlib checksum was wrong), so damaged data would decode into wrong pixels where Pillow (which
    checks the latter) refuses the file. Checking the CRCs here (microseconds for W1's 14 KB) sends
    damaged files to Pillow and its error. An animation control chunk (acTL)
    sends APNGs to Pillow, which knows their frames.
    """
    view = memoryview(data)
    offset = len(_SIGNATURE)
    kinds = set()
    while offset + 12 <= len(data):
        (length,) = struct.unpack_from(">I", data, offset)
        kind = bytes(view[offset + 4 : offset + 8])
        end = offset + 8 + length
        if end + 4 > len(data) or kind == b"acTL":
            return None
        (crc,) = struct.unpack_from(">I", data, end)
        if zlib.crc32(view[offset + 4 : end]) != crc:
            return None
        kinds.add(kind)
        if kind == b"IEND":
            return kinds
        offset = end + 4
    return None
