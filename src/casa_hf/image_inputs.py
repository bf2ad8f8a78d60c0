"""What CASA's processor, streams and server take as an image: PIL, numpy and torch images as they are; paths, URLs
and data URLs decoded now, so that bytes that are no image are refused with what they are (their size and what their
first bytes look like), not deep in preprocessing with PIL's `cannot identify image file <_io.BytesIO ...>`."""

from __future__ import annotations

import base64
import binascii
import codecs
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from transformers.image_utils import load_image


def load_image_input(item: Any) -> PIL.Image.Image | np.ndarray | torch.Tensor:
    """One image as the processor takes it: PIL, numpy and torch as they are; paths, URLs and data URLs decoded."""
    if isinstance(item, PIL.Image.Image):
        return item
    if isinstance(item, (np.ndarray, torch.Tensor)):
        if item.ndim != 3 or (item.shape[0] not in (1, 3, 4) and item.shape[-1] not in (1, 3, 4)):
            raise ValueError(f"An image array must be (H, W, C) or (C, H, W), got shape {tuple(item.shape)}")
        return item
    if isinstance(item, (str, os.PathLike)):
        location = str(item)
        if location.startswith(("http://", "https://")):
            return load_image(location)
        if location.startswith("data:"):  # as `load_image` takes them, and `transformers serve` passes them on
            payload = location.partition(",")[2]
            try:
                data = base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError) as error:
                raise ValueError(f"The data URL holds invalid base64 ({error})") from error
            return _decode_image(data, "the image in a data URL")
        if not Path(location).is_file():
            raise FileNotFoundError(f"Image file not found: {location}")
        return _decode_image(Path(location).read_bytes(), f"image file {location}")
    raise TypeError(
        f"Unsupported image type {type(item).__name__}: use a PIL image, a numpy array, a torch tensor, a file path "
        "or a URL"
    )


def _decode_image(data: bytes, source: str) -> PIL.Image.Image:
    try:
        with PIL.Image.open(io.BytesIO(data)) as opened:
            opened.load()  # decode now: a truncated or corrupt file fails here, not deep in preprocessing
            return opened.convert("RGB")
    except (OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"Cannot read {source} {describe_undecodable_image(data, error)}") from error


def describe_undecodable_image(data: bytes, error: Exception) -> str:
    """`(size, what its first bytes look like): PIL's reason`, for the error about bytes sent as an image that are
    none: a PDF, a web page or text saved as `.png` says so, where PIL only says `cannot identify image file`."""
    reason = "not an image format PIL reads" if isinstance(error, PIL.UnidentifiedImageError) else str(error)
    return f"({len(data)} bytes{f', {_looks_like(data)}' if data else ''}): {reason}"


_SIGNATURES = {
    b"%PDF-": "a PDF file",
    b"\x89PNG\r\n\x1a\n": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"GIF8": "a GIF image",
    b"PK\x03\x04": "a ZIP archive (or an Office document)",
    b"\x1f\x8b": "a gzip file",
    b"\x1aE\xdf\xa3": "a Matroska or WebM video",
}


def _looks_like(data: bytes) -> str:
    kind = next((kind for magic, kind in _SIGNATURES.items() if data.startswith(magic)), None)
    if data[:4] == b"RIFF":
        kind = "a WebP image" if data[8:12] == b"WEBP" else "a RIFF file (WAV audio or AVI video)"
    elif data[4:8] == b"ftyp":
        kind = "an ISO media file (MP4 or MOV video, HEIF or AVIF image)"
    if kind is not None:
        return f"starts like {kind}"
    try:  # UTF-8 text, allowing a character cut at the end
        text = codecs.getincrementaldecoder("utf-8")().decode(data[:64])
    except UnicodeDecodeError:
        text = None
    if text and all(char.isprintable() or char in "\t\n\r" for char in text):
        start = text.lstrip().lower()
        if start.startswith(("<!doctype html", "<html")):
            return "looks like an HTML page"
        if start.startswith("<svg") or (start.startswith("<?xml") and "<svg" in start):
            return "looks like an SVG drawing (a vector format PIL does not read)"
        return f"looks like plain text ({text[:32]!r})"
    return f"starts with bytes {data[:8].hex(' ')} (no known file type)"


def to_uint8_hwc(array: np.ndarray | torch.Tensor) -> np.ndarray:
    """An image array (HWC or CHW, floats in [0, 1] or 0-255) as the uint8 HWC array PIL takes."""
    array = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    if array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)
    if array.dtype != np.uint8:
        array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8) if array.max() <= 1 else array.astype(np.uint8)
    return array[..., 0] if array.shape[-1] == 1 else array


__all__ = ["describe_undecodable_image", "load_image_input", "to_uint8_hwc"]
