"""Processor of CASA models: the Qwen2-VL image processor (PIL backend) + a tokenizer, one token per image."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import PIL.Image
from transformers.processing_utils import ProcessingKwargs, ProcessorMixin

from .image_inputs import load_image_input, to_uint8_hwc

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
        group_images (`bool`, *optional*, defaults to `True`): `apply_chat_template` puts the images (and video
            frames) of each user message together, in order, before its text, so that with the paper's windows
            (`CasaConfig.casa_window_images="consecutive"`) they share one CASA window and a question about them
            sees them all. Processors saved without this key predate it and load with `False` (the turn rendered
            as written, which the models trained with them saw).
    """

    valid_processor_kwargs = CasaProcessorKwargs

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template: str | None = None,
        image_token: str = "<|image_pad|>",
        image_size: int | None = None,
        group_images: bool = True,
        **kwargs,
    ):
        self.group_images = group_images
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
                image = PIL.Image.fromarray(to_uint8_hwc(image))
            image = image.convert("RGB").resize((image_size, image_size), PIL.Image.BICUBIC)
        return image

    @classmethod
    def get_processor_dict(cls, pretrained_model_name_or_path, **kwargs):
        """As `ProcessorMixin`'s, but a saved processor without `group_images` predates it: it loads with `False`,
        rendering chats as the models trained with it saw them."""
        processor_dict, kwargs = super().get_processor_dict(pretrained_model_name_or_path, **kwargs)
        return {"group_images": False, **processor_dict}, kwargs

    def apply_chat_template(self, conversation, *args, group_images: bool | None = None, **kwargs):
        """Chat template with `{"type": "video", "video": [frames]}` support: a video is its frames, one image each.
        With `group_images` (default: the processor's), each user message's images and frames come first, together
        and in order, then its text: consecutive images share a CASA window, so the text sees them all."""
        conversation = _expand_videos(conversation)
        if self.group_images if group_images is None else group_images:
            conversation = put_images_first(conversation)
        return super().apply_chat_template(conversation, *args, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "image_grid_thw"]


def _flatten(images: Any) -> list:
    """Images of a flat or per-sample nested list (or one image) as a flat list."""
    if isinstance(images, (list, tuple)):
        return [image for item in images for image in _flatten(item)]
    return [images]


def _is_image_item(item: dict) -> bool:
    return item.get("type") == "image"


def put_images_first(conversation: Any, is_image: Callable[[dict], bool] = _is_image_item) -> Any:
    """Each user message's image items (`is_image`) first, in order, then its other items, in order. Also serves
    vLLM's chat rendering (`casa_hf.vllm.chat`), whose messages carry OpenAI's image parts."""
    if isinstance(conversation, (list, tuple)) and conversation and isinstance(conversation[0], (list, tuple)):
        return [put_images_first(chat, is_image) for chat in conversation]
    grouped = []
    for message in conversation:
        content = message.get("content")
        if message.get("role") != "user" or not isinstance(content, list):
            grouped.append(message)
            continue
        images = [item for item in content if is_image(item)]
        others = [item for item in content if not is_image(item)]
        grouped.append({**message, "content": images + others})
    return grouped


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


__all__ = ["CasaProcessor", "DEFAULT_CHAT_TEMPLATE", "put_images_first"]
