"""Which image sources a request may name, and reading them within the server's limits.

`data:` URIs are always accepted. http(s) URLs only when the server was started with
`--allow-urls`; local files (`file://` URLs or plain paths) only under the folder given with
`--image-dir`, after resolving symbolic links and `..`, so a request cannot read other files.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image

from ..errors import ImageLoadError
from ..processing.loading import load_image, read_image_size
from .protocol import APIError

DEFAULT_MAX_IMAGE_BYTES = 20 * 2**20
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000


@dataclass(frozen=True)
class ImagePolicy:
    allow_urls: bool = False
    image_dir: Path | None = None  # local files are readable only below this folder
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES  # encoded size of one image
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS


def _too_large(what: str, size: int, limit: int) -> APIError:
    return APIError(400, f"{what} is {size:,} bytes, over the server's limit of {limit:,} bytes per image",
                    code="image_too_large")


def _data_uri_bytes(uri: str, policy: ImagePolicy, where: str) -> bytes:
    header, sep, payload = uri.partition(",")
    if not sep or not header.endswith(";base64"):
        raise APIError(400, f"{where}: a data URI must look like data:image/png;base64,<data>", code="invalid_image")
    # base64 holds 3 bytes per 4 characters: refuse before decoding a payload that is too big.
    if len(payload) * 3 // 4 > policy.max_image_bytes:
        raise _too_large(f"{where} (data URI)", len(payload) * 3 // 4, policy.max_image_bytes)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise APIError(400, f"{where}: the data URI is not valid base64 ({exc})", code="invalid_image") from exc


def _local_path(source: str, policy: ImagePolicy, where: str) -> Path:
    if policy.image_dir is None:
        raise APIError(400, f"{where}: local image paths are not allowed on this server (start it with --image-dir)",
                       code="image_source_not_allowed")
    raw = unquote(urlparse(source).path) if source.startswith("file://") else source
    root = policy.image_dir.resolve()
    path = (root / raw).resolve()  # an absolute `raw` replaces root, then must still land under it
    if not path.is_relative_to(root):
        raise APIError(400, f"{where}: {raw!r} is outside the server's image folder", code="image_source_not_allowed")
    if not path.is_file():
        raise APIError(400, f"{where}: no image file {raw!r} in the server's image folder", code="invalid_image")
    size = path.stat().st_size
    if size > policy.max_image_bytes:
        raise _too_large(f"{where} ({raw})", size, policy.max_image_bytes)
    return path


@dataclass(frozen=True)
class FetchedImage:
    image: Image.Image  # decoded whole: corrupt or truncated data has been refused already
    data: bytes | None  # the encoded file, when the request carried it (data: URI) or named it (local file)


def fetch_image(source: str, policy: ImagePolicy, where: str) -> FetchedImage:
    """Reads one image part's URL under `policy` and decodes it whole; APIError (400) for anything
    refused or unreadable."""
    data = _source_data(source, policy, where)
    with _image_errors(where):
        # A request's images are checked side by side on threads.
        image = load_image(data, allow_urls=policy.allow_urls, max_pixels=policy.max_image_pixels, side_by_side=True)
    return FetchedImage(image, data if isinstance(data, bytes) else None)


def fetch_image_size(source: str, policy: ImagePolicy, where: str) -> tuple[int, int]:
    """(width, height) of one image part from its header, under the same policy and limits as
    fetch_image but without decoding the pixels (counting tokens needs no more); corrupt pixel data
    past the header is found when the image is sent for an answer."""
    data = _source_data(source, policy, where)
    with _image_errors(where):
        return read_image_size(data, allow_urls=policy.allow_urls, max_pixels=policy.max_image_pixels)


def _source_data(source: str, policy: ImagePolicy, where: str) -> bytes | str:
    """The encoded bytes of a data: URI or an allowed local file, or an allowed http(s) URL as is."""
    if not isinstance(source, str) or not source:
        raise APIError(400, f"{where}: image_url.url must be a non-empty string", code="invalid_image")
    lowered = source[:16].lower()
    if lowered.startswith("data:"):
        return _data_uri_bytes(source, policy, where)
    if lowered.startswith(("http://", "https://")):
        if not policy.allow_urls:
            raise APIError(400, f"{where}: http(s) image URLs are not allowed on this server (start it with "
                                "--allow-urls, or send the image as a data: URI)", code="image_source_not_allowed")
        return source
    path = _local_path(source, policy, where)
    try:
        return path.read_bytes()
    except OSError as exc:  # the file vanished or is unreadable
        raise APIError(400, f"{where}: cannot read the image file ({exc.strerror or exc})", code="invalid_image") from exc


@contextlib.contextmanager
def _image_errors(where: str):
    try:
        yield
    except ImageLoadError as exc:
        code = "image_too_large" if "over the limit" in exc.reason else "invalid_image"
        raise APIError(400, f"{where}: {exc.reason}", code=code) from exc
