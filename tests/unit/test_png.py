"""The fast path for PNGs (processing/png.py): the same pixels as Pillow, or no answer at all,
through each binding (pywuffs, pyspng, imagecodecs) on its own."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from phivision.errors import ImageLoadError
from phivision.processing import png
from phivision.generation.image_cache import image_key
from phivision.processing.image import preprocess_image, staged_rgb
from phivision.processing.image import image_size
from phivision.processing.loading import load_image, load_image_or_pixels

BINDINGS = ("pywuffs", "pyspng", "imagecodecs")


@pytest.fixture(params=BINDINGS)
def binding(request, monkeypatch) -> str:
    """Only this binding installed, as far as png.py can tell (the others hidden)."""
    name = request.param
    if getattr(png, name) is None:
        pytest.skip(f"{name} is not installed (pip install 'phivision[fast]')")
    for other in BINDINGS:
        if other != name:
            monkeypatch.setattr(png, other, None)
    assert png.available()
    return name


def picture(width: int, height: int, channels: int, seed: int = 0) -> np.ndarray:
    """Smooth gradients plus noise: compresses with every PNG filter type in play."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x * 3 + y) % 256, (y * 5) % 256, (x * y) % 256, (x + 7 * y) % 256][:channels], axis=-1)
    noise = rng.integers(0, 40, size=(height, width, channels))
    return ((base + noise) % 256).astype(np.uint8)


def encode(array: np.ndarray, mode: str | None = None, **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, "PNG", **kwargs)
    return buffer.getvalue()


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def with_chunk(data: bytes, kind: bytes, body: bytes) -> bytes:
    """`data` with one more chunk right after IHDR (where gAMA, tRNS, acTL and friends go)."""
    return data[:33] + chunk(kind, body) + data[33:]


def pillow_rgb(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.mark.parametrize("size", [(1, 1), (37, 23), (640, 3), (3, 500), (1344, 1344)])
@pytest.mark.parametrize("channels", [3, 4])
def test_truecolour_pngs_give_pillows_pixels(binding, size, channels):
    array = picture(*size, channels, seed=size[0])
    for options in ({}, {"optimize": True}, {"compress_level": 0}):
        data = encode(array, **options)
        pixels = load_image_or_pixels(data)
        assert isinstance(pixels, np.ndarray) and pixels.shape == (size[1], size[0], 3)
        assert np.array_equal(pixels, pillow_rgb(data))
        assert image_size(pixels) == size
        # load_image gives what Pillow would have given: its mode and its pixels.
        image = load_image(data)
        assert image.mode == ("RGB" if channels == 3 else "RGBA")
        assert np.array_equal(np.asarray(image), np.asarray(Image.open(io.BytesIO(data))))
        assert np.array_equal(staged_rgb(pixels, pin_memory=False).numpy(), pillow_rgb(data))
        # The same feature-cache key as the RGB PIL image of those pixels.
        assert image_key(pixels, 4) == image_key(Image.open(io.BytesIO(data)).convert("RGB"), 4)


def test_pixel_arrays_preprocess_like_pil_images(binding):
    data = encode(picture(500, 300, 4))
    pixels = load_image_or_pixels(data)
    assert isinstance(pixels, np.ndarray)
    for num_crops in (4, 16):
        ours, pil = preprocess_image(pixels, num_crops), preprocess_image(load_image(data), num_crops)
        assert ours.image_size == pil.image_size and ours.grid == pil.grid
        assert torch.equal(ours.pixel_values, pil.pixel_values)


def test_ancillary_chunks_change_nothing(binding):
    data = encode(picture(64, 48, 3))
    for kind, body in [(b"gAMA", struct.pack(">I", 100000)),  # gamma 1.0: not applied by either decoder
                       (b"sBIT", bytes([5, 6, 5])),
                       (b"tRNS", struct.pack(">HHH", 1, 2, 3))]:
        marked = with_chunk(data, kind, body)
        pixels = load_image_or_pixels(marked)
        # A tRNS key is the one chunk Wuffs would act on: such files go to Pillow when it is alone.
        assert isinstance(pixels, np.ndarray) != (binding == "pywuffs" and kind == b"tRNS"), kind
        assert np.array_equal(np.asarray(pixels), pillow_rgb(marked)), kind
        assert np.array_equal(np.asarray(load_image(marked).convert("RGB")), pillow_rgb(marked)), kind


@pytest.mark.parametrize("array, mode", [
    (picture(30, 20, 1)[..., 0], "L"),  # grey
    (picture(30, 20, 2), "LA"),  # grey + alpha
    ((picture(30, 20, 1)[..., 0].astype(np.uint16) * 257), None),  # 16-bit grey
])
def test_other_pngs_are_left_to_pillow(array, mode):
    data = encode(array, mode)
    assert data[25] in (0, 4)  # the colour type: grey, grey + alpha
    image = load_image_or_pixels(data)
    assert isinstance(image, Image.Image)
    assert np.array_equal(np.asarray(image), np.asarray(Image.open(io.BytesIO(data))))


def test_palette_and_animated_pngs_are_left_to_pillow():
    palette = Image.fromarray(picture(30, 20, 3)).quantize(16)
    buffer = io.BytesIO()
    palette.save(buffer, "PNG")
    image = load_image_or_pixels(buffer.getvalue())
    assert isinstance(image, Image.Image) and image.mode == "P"
    frames = [Image.fromarray(picture(30, 20, 3, seed)) for seed in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "PNG", save_all=True, append_images=frames[1:])
    assert b"acTL" in buffer.getvalue()
    assert png.decode_truecolour(buffer.getvalue(), (30, 20)) is None
    image = load_image_or_pixels(buffer.getvalue())
    assert isinstance(image, Image.Image) and np.array_equal(np.asarray(image.convert("RGB")), np.asarray(frames[0]))


def interlaced(array: np.ndarray) -> bytes:
    """An Adam7-interlaced PNG of an 8-bit RGB / RGBA array (Pillow writes no interlaced files):
    seven passes of sub-images, every row unfiltered, in one zlib stream."""
    height, width, channels = array.shape
    passes = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]
    raw = b"".join(b"\x00" + row.tobytes() for x0, y0, dx, dy in passes
                   for row in array[y0::dy, x0::dx] if array[y0::dy, x0::dx].size)
    header = struct.pack(">IIBBBBB", width, height, 8, {3: 2, 4: 6}[channels], 0, 0, 1)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("channels", [3, 4])
def test_interlaced_pngs_give_pillows_pixels(binding, channels):
    for size in [(1, 1), (5, 3), (37, 23), (300, 200)]:
        array = picture(*size, channels, seed=size[0])
        data = interlaced(array)
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), array)  # the file is what we meant
        pixels = load_image_or_pixels(data)
        assert isinstance(pixels, np.ndarray), size
        assert np.array_equal(pixels, pillow_rgb(data)), size


def test_corrupt_and_truncated_pngs_get_pillows_errors(binding):
    data = encode(np.random.default_rng(1).integers(0, 256, size=(200, 300, 3), dtype=np.uint8))
    with pytest.raises(ImageLoadError, match="truncated"):
        load_image(data[: len(data) // 2])
    broken = bytearray(data)
    broken[200:260] = b"\x00" * 60  # inside the compressed pixel stream
    with pytest.raises(ImageLoadError, match="corrupt|truncated"):
        load_image_or_pixels(bytes(broken))
    assert png.decode_truecolour(bytes(broken), (300, 200)) is None
    # Damage libspng itself would decode without a word (it checks neither CRCs nor zlib's checksum):
    # the CRC check sends it to Pillow, which refuses it as before.
    near_end = bytearray(data)
    near_end[-20] ^= 0xFF
    with pytest.raises(ImageLoadError, match="corrupt|truncated"):
        load_image(bytes(near_end))
    # A bad CRC alone: Pillow decodes it (it checks no CRC of the pixel data), so it still loads.
    bad_crc = bytearray(data)
    bad_crc[33 + 8 + struct.unpack(">I", data[33:37])[0]] ^= 1  # the first IDAT's CRC
    assert png.decode_truecolour(bytes(bad_crc), (300, 200)) is None
    assert np.array_equal(np.asarray(load_image(bytes(bad_crc))), np.asarray(Image.open(io.BytesIO(data))))


def test_not_a_png_or_a_wrong_size_gives_no_pixels(binding):
    data = encode(picture(30, 20, 3))
    assert png.decode_truecolour(data[:20], (30, 20)) is None
    assert png.decode_truecolour(b"GIF89a" + data[6:], (30, 20)) is None
    assert png.decode_truecolour(data, (30, 21)) is None
    assert png.decode_truecolour(data, (30, 20)) is not None


def test_without_a_binding_pillow_decodes_everything(monkeypatch):
    for name in BINDINGS:
        monkeypatch.setattr(png, name, None)
    data = encode(picture(50, 40, 3))
    for side_by_side in (False, True):
        image = load_image_or_pixels(data, side_by_side=side_by_side)
        assert isinstance(image, Image.Image) and not png.available(side_by_side)
        assert np.array_equal(np.asarray(image), pillow_rgb(data))


def test_side_by_side_decoding_only_through_a_binding_that_releases_the_gil(binding):
    """pyspng holds the GIL, so several images on threads go to Pillow instead; pywuffs and
    imagecodecs serve both cases."""
    data = encode(picture(50, 40, 3))
    pixels = load_image_or_pixels(data, side_by_side=True)
    if binding == "pyspng":
        assert isinstance(pixels, Image.Image) and not png.available(side_by_side=True)
    else:
        assert isinstance(pixels, np.ndarray) and png.available(side_by_side=True)
    assert np.array_equal(np.asarray(pixels), pillow_rgb(data))
    assert isinstance(load_image_or_pixels(data), np.ndarray)  # a lone image: any binding


def spy(monkeypatch, calls: list[str]) -> None:
    """Record which installed binding decodes each file."""
    if png.pywuffs is not None:
        decoder = png.pywuffs.aux.ImageDecoder

        def wuffs(config):
            calls.append("pywuffs")
            return decoder(config)
        monkeypatch.setattr(png.pywuffs.aux, "ImageDecoder", wuffs)
    if png.pyspng is not None:
        monkeypatch.setattr(png.pyspng, "load", lambda data, load=png.pyspng.load: calls.append("pyspng") or load(data))
    if png.imagecodecs is not None:
        monkeypatch.setattr(png.imagecodecs, "spng_decode",
                            lambda data, decode=png.imagecodecs.spng_decode: calls.append("imagecodecs") or decode(data))


def test_the_fastest_binding_is_preferred(monkeypatch):
    """pywuffs decodes fastest, alone or side by side (W1's PNG in 2.3 ms against pyspng's 3.2 on a
    2-core machine); without it, pyspng takes a lone image (5.2 against imagecodecs' 7.0 ms for W1's
    PNG and its staging on an H200's host) and imagecodecs several."""
    if None in (png.pywuffs, png.pyspng, png.imagecodecs):
        pytest.skip("needs pywuffs, pyspng and imagecodecs")
    calls: list[str] = []
    spy(monkeypatch, calls)
    data = encode(picture(50, 40, 3))
    assert isinstance(load_image_or_pixels(data), np.ndarray)
    assert isinstance(load_image_or_pixels(data, side_by_side=True), np.ndarray)
    assert calls == ["pywuffs", "pywuffs"]
    monkeypatch.setattr(png, "pywuffs", None)
    calls.clear()
    assert isinstance(load_image_or_pixels(data), np.ndarray)
    assert isinstance(load_image_or_pixels(data, side_by_side=True), np.ndarray)
    assert calls == ["pyspng", "imagecodecs"]


@pytest.mark.parametrize("alone", [True, False])
def test_a_trns_key_never_reaches_wuffs(monkeypatch, alone):
    """Wuffs, asked for RGB, paints the pixels matching an RGB file's tRNS key black; Pillow's RGB
    keeps them. Such files go to libspng, or to Pillow when pywuffs is the only binding."""
    if png.pywuffs is None:
        pytest.skip("pywuffs is not installed (pip install 'phivision[fast]')")
    array = picture(40, 30, 3)
    array[:10, :10] = (10, 20, 30)
    data = encode(array, transparency=(10, 20, 30))
    assert b"tRNS" in data
    if alone:
        for other in BINDINGS[1:]:
            monkeypatch.setattr(png, other, None)
    calls: list[str] = []
    spy(monkeypatch, calls)
    for side_by_side in (False, True):
        decoded = load_image_or_pixels(data, side_by_side=side_by_side)
        assert np.array_equal(np.asarray(decoded.convert("RGB") if isinstance(decoded, Image.Image) else decoded), array)
        assert isinstance(decoded, Image.Image) == (alone or (side_by_side and png.imagecodecs is None))
    assert "pywuffs" not in calls
    # Without the key the same pixels are Wuffs' to decode, and come out the same.
    plain = encode(array)
    assert np.array_equal(load_image_or_pixels(plain), array) and "pywuffs" in calls


def test_fast_png_off_leaves_the_file_to_pillow(binding):
    data = encode(picture(50, 40, 3))
    image = load_image_or_pixels(data, fast_png=False)
    assert isinstance(image, Image.Image) and np.array_equal(np.asarray(image), pillow_rgb(data))
    assert np.array_equal(np.asarray(load_image(data, fast_png=False)), np.asarray(load_image(data)))
