"""load_image / read_image_size: every accepted input kind, and a clear ImageLoadError for every failure."""

from __future__ import annotations

import base64
import http.server
import io
import struct
import threading
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from phivision.errors import ImageLoadError, PhiVisionError
from phivision.processing import loading
from phivision.processing.loading import DEFAULT_MAX_PIXELS, load_image, read_image_size


def pixels(width: int = 40, height: int = 30) -> np.ndarray:
    rng = np.random.default_rng(width * 1000 + height)
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def encode(array: np.ndarray, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (RGB) and that has no pixel data at all."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def expect_error(source, match: str, **kwargs) -> ImageLoadError:
    with pytest.raises(ImageLoadError, match=match) as info:
        load_image(source, **kwargs)
    error = info.value
    assert isinstance(error, PhiVisionError) and isinstance(error, ValueError)
    assert str(error) == f"cannot read image {error.source}: {error.reason}"
    return error


# ---------------------------------------------------------------------------------------------
# Accepted inputs


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"])
def test_bytes_in_common_formats(fmt):
    array = pixels()
    image = load_image(encode(array, fmt))
    assert image.size == (40, 30)
    if fmt in ("PNG", "BMP", "TIFF"):  # lossless: the same pixels come back
        assert np.array_equal(np.asarray(image.convert("RGB")), array)


def test_paths_as_str_and_path(tmp_path):
    array = pixels(23, 17)
    path = tmp_path / "photo.png"
    path.write_bytes(encode(array, "PNG"))
    for source in (str(path), path):
        image = load_image(source)
        assert image.size == (23, 17) and np.array_equal(np.asarray(image), array)
    assert read_image_size(path) == (23, 17)


def test_file_is_fully_decoded_and_closed(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(encode(pixels(), "PNG"))
    image = load_image(path)
    path.unlink()  # the image must not depend on the file any more
    assert np.asarray(image).shape == (30, 40, 3)


def test_mode_is_kept():
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert load_image(encode(grey, "PNG")).mode == "L"
    rgba = np.dstack([pixels(4, 3), np.full((3, 4), 7, dtype=np.uint8)])
    assert load_image(encode(rgba, "PNG")).mode == "RGBA"


def test_pil_image_is_returned_as_is():
    image = Image.fromarray(pixels())
    assert load_image(image) is image


def test_lazily_opened_pil_image_is_decoded():
    lazy = Image.open(io.BytesIO(encode(pixels(), "PNG")))
    loaded = load_image(lazy)
    assert np.array_equal(np.asarray(loaded), pixels())


@pytest.mark.parametrize(("shape", "mode"), [((30, 40, 3), "RGB"), ((30, 40), "L"), ((30, 40, 1), "L"), ((30, 40, 4), "RGBA")])
def test_numpy_arrays(shape, mode):
    array = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    image = load_image(array)
    assert image.mode == mode and image.size == (40, 30)
    assert np.array_equal(np.asarray(image), array.reshape(image.height, image.width, -1).squeeze(-1) if mode == "L" else array)
    assert read_image_size(array) == (40, 30)


def test_non_contiguous_array():
    array = pixels(80, 60)[::2, ::2]
    assert np.array_equal(np.asarray(load_image(array)), array)


def test_data_uri():
    data = encode(pixels(), "PNG")
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    assert np.array_equal(np.asarray(load_image(uri)), pixels())
    wrapped = uri[:50] + "\n" + uri[50:120] + " \n" + uri[120:]  # line-wrapped base64 is fine
    assert load_image(wrapped).size == (40, 30)
    # the declared subtype does not have to match: the bytes decide
    assert load_image("data:image/jpeg;base64," + base64.b64encode(data).decode()).size == (40, 30)


# ---------------------------------------------------------------------------------------------
# Errors


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.jpg"
    error = expect_error(str(missing), "no such file")
    assert error.source == str(missing)
    with pytest.raises(ImageLoadError, match="no such file"):
        read_image_size(missing)


def test_directory(tmp_path):
    expect_error(tmp_path, "is a directory")


def test_empty_inputs(tmp_path):
    assert expect_error(b"", "empty data").source == "<bytes>"
    empty = tmp_path / "empty.png"
    empty.touch()
    assert expect_error(empty, "empty data").source == str(empty)


def test_not_an_image(tmp_path):
    expect_error(b"hello, I am text" * 10, "not an image")
    text = tmp_path / "notes.png"
    text.write_text("just some text\n")
    error = expect_error(text, "not an image")
    assert error.source == str(text)
    with pytest.raises(ImageLoadError, match="not an image"):
        read_image_size(text)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files(tmp_path, fmt):
    data = encode(pixels(300, 200), fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    expect_error(path, "truncated")
    expect_error(data[: len(data) // 2], "truncated")
    # The header is intact, so the size can still be read without decoding.
    assert read_image_size(path) == (300, 200)


def test_corrupt_data():
    data = bytearray(encode(pixels(300, 200), "PNG"))
    data[200:260] = b"\x00" * 60  # inside the compressed pixel stream
    expect_error(bytes(data), "corrupt|truncated")


def test_broken_lazy_pil_image():
    data = encode(pixels(300, 200), "PNG")
    lazy = Image.open(io.BytesIO(data[: len(data) // 2]))
    assert expect_error(lazy, "truncated").source == "<PIL image>"


def test_pixel_limit_is_checked_before_decoding():
    # 12000 x 10000 = 120 MP from a 60-byte file: refused from the header alone.
    bomb = png_header_only(12000, 10000)
    error = expect_error(bomb, "over the limit", max_pixels=50_000_000)
    assert "120,000,000" in error.reason
    with pytest.raises(ImageLoadError, match="over the limit"):
        read_image_size(bomb, max_pixels=50_000_000)
    expect_error(pixels(), "over the limit", max_pixels=1000)
    expect_error(Image.fromarray(pixels()), "over the limit", max_pixels=1000)


def test_pil_decompression_bomb_becomes_our_error():
    # Over PIL's own hard limit (2 x PIL.Image.MAX_IMAGE_PIXELS): PIL refuses while opening.
    bomb = png_header_only(20000, 20000)
    expect_error(bomb, "decompression-bomb", max_pixels=None)
    expect_error(bomb, "decompression-bomb|over the limit")


def test_pil_bomb_warning_does_not_leak_when_our_limit_allows_the_size():
    # Between PIL's warning and error thresholds: our max_pixels decides, PIL's warning stays quiet.
    header = png_header_only(12000, 10000)
    assert 12000 * 10000 <= DEFAULT_MAX_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_image_size(header) == (12000, 10000)
        expect_error(header, "truncated|corrupt")  # header only, no pixel data


@pytest.mark.parametrize(
    ("uri", "match"),
    [
        ("data:image/png;base64,@@@@", "invalid base64"),
        ("data:image/png;base64,iVBORw0KGgo", "invalid base64|truncated|not an image|corrupt"),
        ("data:image/png;base64", "no ','"),
        ("data:text/plain;base64,aGVsbG8=", "not an image type"),
        ("data:image/png,rawbytes", "only base64"),
        ("data:image/png;base64,", "empty data"),
        ("data:image/png;base64," + base64.b64encode(b"not an image at all").decode(), "not an image"),
    ],
)
def test_bad_data_uris(uri, match):
    assert expect_error(uri, match).source == "<data URI>"


def test_urls_are_off_by_default():
    error = expect_error("https://example.com/cat.jpg", "allow_urls=True")
    assert error.source == "https://example.com/cat.jpg"
    expect_error("HTTP://EXAMPLE.COM/cat.jpg", "allow_urls=True")


@pytest.mark.parametrize(
    ("source", "match"),
    [
        (123, "unsupported input type"),
        ("", "empty path"),
        (None, "unsupported input type"),
        (np.zeros((4, 4, 3), dtype=np.float32), "uint8"),
        (np.zeros((4, 4, 2), dtype=np.uint8), r"shape"),
        (np.zeros((4,), dtype=np.uint8), r"shape"),
        (np.zeros((0, 4, 3), dtype=np.uint8), "no pixels"),
    ],
)
def test_unsupported_inputs(source, match):
    expect_error(source, match)


# ---------------------------------------------------------------------------------------------
# URLs (a local server; nothing leaves the machine)


@pytest.fixture
def http_server():
    routes: dict[str, bytes] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server API
            body = routes.get(self.path)
            if body is None:
                self.send_error(404, "Not Found")
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", routes
    server.shutdown()
    server.server_close()


def test_url_fetch_when_allowed(http_server):
    base, routes = http_server
    routes["/cat.png"] = encode(pixels(), "PNG")
    image = load_image(f"{base}/cat.png", allow_urls=True)
    assert np.array_equal(np.asarray(image), pixels())
    assert read_image_size(f"{base}/cat.png", allow_urls=True) == (40, 30)


def test_url_errors(http_server, monkeypatch):
    base, routes = http_server
    expect_error(f"{base}/missing.png", "HTTP error 404", allow_urls=True)
    routes["/text"] = b"not an image"
    expect_error(f"{base}/text", "not an image", allow_urls=True)
    routes["/big.png"] = encode(pixels(), "PNG")
    monkeypatch.setattr(loading, "MAX_URL_BYTES", 100)
    expect_error(f"{base}/big.png", "100-byte limit", allow_urls=True)


def test_unreachable_url():
    # Port 9 on localhost (discard) is closed on any sane test machine: connection refused at once.
    expect_error("http://127.0.0.1:9/x.png", "cannot fetch", allow_urls=True)


def test_source_descriptions():
    assert loading.describe_source(Path("a/b.png")) == str(Path("a/b.png"))
    assert loading.describe_source(b"x") == "<bytes>"
    assert loading.describe_source("data:image/png;base64,xx") == "<data URI>"
    assert loading.describe_source(np.zeros(1)) == "<array>"
