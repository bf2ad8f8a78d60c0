"""Processor of CASA models: the Qwen2-VL image processor (PIL backend) + a tokenizer, one token per image."""

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
from transformers.processing_utils import ProcessingKwargs, ProcessorMixin

# Qwen-style chat format. Each image (and each frame of a video, expanded by `CasaProcessor.apply_chat_template`)
# becomes `<|vision_start|><|image_pad|><|vision_end|>` at its place; `{% generation %}` marks what the assistant
# says, so `return_assistant_tokens_mask=True` recovers training labels.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{{ '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Each image's markup and the default chat template's turn markers: single tokens of a CASA model's tokenizer.
IMAGE_TOKENS = ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>")
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")


def add_missing_tokens(tokenizer) -> list[str]:
    """Add to a text LLM's `tokenizer`, as special tokens, those of `IMAGE_TOKENS` and `CHAT_TOKENS` it lacks, in
    that order (their ids follow its vocabulary; their embedding rows start at the mean row, `casa_init.grow_rows`).
    Returns the added tokens."""
    missing = [token for token in IMAGE_TOKENS + CHAT_TOKENS if token not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    return missing


class CasaProcessorKwargs(ProcessingKwargs, total=False):
    # left padding per call (batched generation appends to the right), leaving the tokenizer's own setting alone
    _defaults = {"text_kwargs": {"padding": True, "padding_side": "left"}}


class CasaProcessor(ProcessorMixin):
    r"""
    Pairs a Qwen2-VL image processor with a tokenizer. Unlike token-insertion VLMs, each image stays **one**
    `image_token` at its place in the text: the model reads the image's features through its CASA layers.

    Args:
        image_processor (`Qwen2VLImageProcessorPil`): turns images into patches and `image_grid_thw`.
        tokenizer (`PreTrainedTokenizerBase`): must know `image_token` as a single token.
        chat_template (`str`, *optional*): Jinja chat template; defaults to a Qwen-style one.
        image_token (`str`, *optional*, defaults to `"<|image_pad|>"`): the per-image placeholder.
        image_size (`int`, *optional*): resize every image to `image_size x image_size` pixels first (CASA's
            released models use fixed 448/896-px frames); otherwise `min_pixels`/`max_pixels` of the image processor
            bound the resolution, aspect ratio kept.
    """

    valid_processor_kwargs = CasaProcessorKwargs

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template: str | None = None,
        image_token: str = "<|image_pad|>",
        image_size: int | None = None,
        **kwargs,
    ):
        self.image_token = getattr(tokenizer, "image_token", None) or image_token
        token_ids = tokenizer.encode(self.image_token, add_special_tokens=False)
        if len(token_ids) != 1:
            raise ValueError(
                f"The tokenizer must encode image_token {self.image_token!r} as one token, got {token_ids}"
            )
        self.image_token_id = token_ids[0]
        self.image_size = image_size
        super().__init__(image_processor, tokenizer, chat_template=chat_template or DEFAULT_CHAT_TEMPLATE, **kwargs)

    def __call__(
        self,
        images=None,
        text=None,
        videos=None,
        audio=None,
        image_size: int | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        **kwargs,
    ):
        """Tokenize `text` (one `image_token` per image, in order) and process `images` (flat or one list per
        sample: PIL, numpy, torch, file paths, URLs when online). Returns `input_ids`, `attention_mask`,
        `pixel_values`, `image_grid_thw`. `image_size` (square resize) or `min_pixels` / `max_pixels` (area bounds,
        aspect kept) override the resolution for this call."""
        if min_pixels is not None or max_pixels is not None:
            size = dict(kwargs.pop("size", None) or self.image_processor.size)
            size["shortest_edge"] = min_pixels or size["shortest_edge"]
            size["longest_edge"] = max_pixels or size["longest_edge"]
            kwargs["size"] = size
        if videos is not None or audio is not None:
            raise ValueError(
                "CasaProcessor takes videos as lists of frames passed to `images` (or as chat content "
                '{"type": "video", "video": [frames]}); it has no audio input'
            )
        if text is None:
            raise ValueError("CasaProcessor needs `text`: every image must be placed by an image token in the text")
        texts = [text] if isinstance(text, str) else list(text)
        if not texts:
            raise ValueError("text is an empty list: pass at least one prompt")
        for index, sample in enumerate(texts):
            if not isinstance(sample, str):
                raise TypeError(f"text[{index}] must be a string, got {type(sample).__name__}")
            if not sample.strip():
                raise ValueError(f"text[{index}] is an empty prompt")
        if images is not None:
            self._check_image_counts(images, texts)
            images = self._load_images(images, image_size or self.image_size) if _flatten(images) else None
        return super().__call__(images=images, text=texts, **kwargs)

    def _check_image_counts(self, images: Any, texts: list[str]) -> None:
        """Images given per sample (one list each) must match that sample's image tokens; a flat list, the total.
        Only totals would let a sample silently take its neighbour's image."""
        tokens = [sample.count(self.image_token) for sample in texts]
        per_sample = isinstance(images, (list, tuple)) and any(isinstance(item, (list, tuple)) for item in images)
        if not per_sample:
            given = len(_flatten(images))
            if given != sum(tokens):
                raise ValueError(
                    f"Got {given} image(s) but the text holds {sum(tokens)} image token(s) {self.image_token!r}; "
                    "each image needs exactly one image token at its place"
                )
            return
        if len(images) != len(texts):
            raise ValueError(f"images has {len(images)} per-sample lists but text has {len(texts)} samples")
        for index, (sample_images, count) in enumerate(zip(images, tokens, strict=True)):
            given = len(_flatten(sample_images))
            if given != count:
                raise ValueError(
                    f"Sample {index} has {given} image(s) in images[{index}] but {count} image token(s) "
                    f"{self.image_token!r} in text[{index}]"
                )

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return self.image_token  # CASA: the placeholder stays a single token

    def _load_images(self, images: Any, image_size: int | None) -> Any:
        """Load paths and URLs, check every item is an image, and apply `image_size`; nested lists keep their shape."""
        if isinstance(images, (list, tuple)):
            return [self._load_images(item, image_size) for item in images]
        image = load_image_input(images)
        if image_size is not None:
            if not isinstance(image, PIL.Image.Image):
                image = PIL.Image.fromarray(_to_uint8_hwc(image))
            image = image.convert("RGB").resize((image_size, image_size), PIL.Image.BICUBIC)
        return image

    def apply_chat_template(self, conversation, *args, **kwargs):
        """Chat template with `{"type": "video", "video": [frames]}` support: a video is its frames, one image each."""
        return super().apply_chat_template(_expand_videos(conversation), *args, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "image_grid_thw"]


def _flatten(images: Any) -> list:
    """Images of a flat or per-sample nested list (or one image) as a flat list."""
    if isinstance(images, (list, tuple)):
        return [image for item in images for image in _flatten(item)]
    return [images]


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


def _to_uint8_hwc(array: np.ndarray | torch.Tensor) -> np.ndarray:
    array = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    if array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)
    if array.dtype != np.uint8:
        array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8) if array.max() <= 1 else array.astype(np.uint8)
    return array[..., 0] if array.shape[-1] == 1 else array


def _expand_videos(conversation: Any) -> Any:
    """Replace video items (a list of frames) by one image item per frame, in order."""
    if isinstance(conversation, (list, tuple)) and conversation and isinstance(conversation[0], (list, tuple)):
        return [_expand_videos(chat) for chat in conversation]
    expanded = []
    for message in conversation:
        content = message.get("content")
        if not isinstance(content, list):
            expanded.append(message)
            continue
        items = []
        for item in content:
            if item.get("type") != "video":
                items.append(item)
                continue
            frames = item.get("video", item.get("frames"))
            if not isinstance(frames, (list, tuple)) or not frames:
                raise ValueError(
                    "A video item must carry its frames as a non-empty list: "
                    '{"type": "video", "video": [frame, frame, ...]}'
                )
            items.extend({"type": "image", "image": frame} for frame in frames)
        expanded.append({**message, "content": items})
    return expanded


__all__ = ["CasaProcessor", "DEFAULT_CHAT_TEMPLATE", "load_image_input"]
