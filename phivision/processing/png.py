"""The commonest PNGs (8-bit RGB or RGBA) decoded by libspng, when the optional `pyspng` is installed.

Why: a PNG's decoding is on the critical path of the time to first token, before the vision tower
can start. For W1's 1344x1344 PNG on two H200 hosts, Pillow decoded in 10.1 and 18.0 ms, and
staging its RGB pixels took 2.0 and 3.2 ms more (Pillow keeps RGB as four bytes a pixel); through
libspng, 6.2-6.4 ms and 0.5-0.7 ms (benchmarks/exp_new_lengths.py).

Only files whose pixels equal Pillow's byte for byte come here: 8-bit truecolour with or without
alpha, not animated, every chunk's CRC intact. Both decoders ignore the gamma, colour-profile and
significant-bits chunks, and a truecolour tRNS key only matters to an alpha channel, which the
model never sees. Anything else (palette, grey, 16-bit, animated, damaged, or pyspng missing)
returns None and Pillow decodes it, with its own error messages.

pyspng holds the GIL while it decodes, so several images on several threads decode one after
another, where Pillow's decoder releases it and decodes them side by side: W2's eight frames took
36 ms through libspng against ~22 through Pillow. Callers with several images choose Pillow
(`fast_png=False` in loading.py).
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

try:
    import pyspng
except ImportError:  # optional: `pip install "phivision[fast]"`
    pyspng = None

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# IHDR is the first chunk: 8 signature bytes, 4 length bytes, "IHDR", width, height, then bit
# depth (byte 24) and colour type (byte 25).
_IHDR_END = 33
_TRUECOLOUR = {2: 3, 6: 4}  # colour type -> channels (RGB, RGBA)


def available() -> bool:
    """Whether libspng (pyspng) is installed."""
    return pyspng is not None


def decode_truecolour(data: bytes, size: tuple[int, int]) -> np.ndarray | None:
    """The pixels of an 8-bit RGB / RGBA PNG of `size` (width, height, from its header) as an
    (H, W, 3 or 4) uint8 array; None for any other file (or without pyspng): Pillow's turn."""
    if pyspng is None or len(data) < _IHDR_END or not data.startswith(_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    bit_depth, colour_type = data[24], data[25]
    channels = _TRUECOLOUR.get(colour_type)
    if bit_depth != 8 or channels is None:
        return None
    if not _chunks_intact(data):
        return None
    try:
        pixels = pyspng.load(data)
    except Exception:  # noqa: BLE001 - corrupt or truncated: Pillow decodes it again and words the error
        return None
    width, height = size
    if pixels.dtype != np.uint8 or pixels.shape != (height, width, channels):
        return None
    return pixels


def _chunks_intact(data: bytes) -> bool:
    """Whether every chunk up to IEND is whole and matches its CRC, and none is an animation's.

    libspng as pyspng drives it checks neither the chunk CRCs nor zlib's checksum of the pixel
    stream, so damaged data would decode into wrong pixels where Pillow (which checks the latter)
    refuses the file. Checking the CRCs here (microseconds for W1's 14 KB) sends damaged files to
    Pillow and its error. An animation control chunk (acTL) sends APNGs to Pillow, which knows
    their frames.
    """
    view = memoryview(data)
    offset = len(_SIGNATURE)
    while offset + 12 <= len(data):
        (length,) = struct.unpack_from(">I", data, offset)
        kind = bytes(view[offset + 4 : offset + 8])
        end = offset + 8 + length
        if end + 4 > len(data) or kind == b"acTL":
            return False
        (crc,) = struct.unpack_from(">I", data, end)
        if zlib.crc32(view[offset + 4 : end]) != crc:
            return False
        if kind == b"IEND":
            return True
        offset = end + 4
    return False
