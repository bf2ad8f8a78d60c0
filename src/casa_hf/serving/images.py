"""Images of a request: `data:` URLs and local file paths, decoded once with size limits; remote URLs are refused."""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path
from urllib.parse import unquote, urlparse

import PIL.Image

from ..image_inputs import describe_undecodable_image
from .errors import ApiError


def load_image_url(url: str, param: str, max_bytes: int, max_pixels: int) -> PIL.Image.Image:
    """An RGB image from `data:image/...;base64,...`, `file:///path` or a plain local path (the server is offline)."""
    if not isinstance(url, str) or not url:
        raise ApiError(400, f"{param} must be a non-empty string (a data: URL or a local file path)", param)
    if url.startswith("data:"):
        data = _data_url_bytes(url, param, max_bytes)
        source = "the data URL"
    elif url.startswith(("http://", "https://", "ftp://")):
        raise ApiError(
            400,
            f"{param}: remote image URLs are not fetched (the server is offline): send the image as a "
            "data:image/...;base64 URL or a local file path",
            param,
            "remote_url_refused",
        )
    else:
        path = Path(unquote(urlparse(url).path) if url.startswith("file://") else url)
        if not path.is_file():
            raise ApiError(400, f"{param}: no image file at {str(path)!r} on the server", param, "image_not_found")
        if path.stat().st_size > max_bytes:
            raise ApiError(413, f"{param}: the image file is over the {max_bytes} byte limit", param, "image_too_big")
        data = path.read_bytes()
        source = str(path)
    return _decode(data, source, param, max_pixels)


def _data_url_bytes(url: str, param: str, max_bytes: int) -> bytes:
    header, sep, payload = url.partition(",")
    media_type = header[len("data:") :].split(";")[0].lower()
    if not sep or not header.endswith(";base64"):
        raise ApiError(400, f"{param}: expected a data:image/<format>;base64,<data> URL", param, "invalid_image_url")
    if not media_type.startswith("image/"):
        raise ApiError(
            415, f"{param}: the data URL holds {media_type or 'no media type'!r}, not an image/* type", param
        )
    if len(payload) * 3 // 4 > max_bytes:
        raise ApiError(413, f"{param}: the image is over the {max_bytes} byte limit", param, "image_too_big")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ApiError(400, f"{param}: the data URL is not valid base64 ({error})", param, "invalid_image") from error


def _decode(data: bytes, source: str, param: str, max_pixels: int) -> PIL.Image.Image:
    try:
        with PIL.Image.open(io.BytesIO(data)) as opened:
            if opened.width * opened.height > max_pixels:
                raise ApiError(
                    413,
                    f"{param}: the image is {opened.width}x{opened.height}, over the {max_pixels} pixel limit",
                    param,
                    "image_too_big",
                )
            opened.load()  # decode now: a truncated or corrupt image fails here, with its request only
            return opened.convert("RGB")
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as error:
        message = f"{param}: cannot decode the image in {source} {describe_undecodable_image(data, error)}"
        raise ApiError(400, message, param, "invalid_image") from error
