"""vLLM renders a chat itself (its own message parsing, then the chat template), so `CasaProcessor`'s
`group_images` never runs there. For a CASA model whose processor groups images, the plugin puts each user message's
image parts first, in order, before vLLM parses the messages: the prompt is the one `processor.apply_chat_template`
renders, and a question about two images sees both (one window of consecutive images)."""

from __future__ import annotations

from ..configuration_casa import CasaConfig
from ..processing_casa import put_images_first

# OpenAI-style content parts that carry an image, as vLLM parses them (a part may name its kind by key alone)
IMAGE_PART_TYPES = frozenset({"image", "image_url", "image_pil", "image_embeds", "input_image"})


def is_image_part(part: object) -> bool:
    if not isinstance(part, dict):
        return False
    kind = part.get("type")
    return kind in IMAGE_PART_TYPES if kind is not None else any(key in part for key in IMAGE_PART_TYPES)


def group_image_parts(messages: list) -> list:
    """Each user message's image parts first, in order, then its other parts, in order."""
    return put_images_first(messages, is_image_part)


def renders_images_first(renderer) -> bool:
    """Whether `renderer` (vLLM's `HfRenderer`) serves a CASA model whose processor groups a turn's images."""
    if not isinstance(renderer.model_config.hf_config, CasaConfig):
        return False
    return renderer.get_mm_processor().info.get_hf_processor().group_images


def group_chat_images() -> None:
    """Wrap `HfRenderer.render_messages` and its async twin (vLLM's offline `LLM.chat` and its OpenAI server) so that
    a CASA model's chats are rendered with each user message's images first when its processor says so."""
    from vllm.renderers.hf import HfRenderer

    if getattr(HfRenderer.render_messages, "groups_casa_images", False):
        return
    render, render_async = HfRenderer.render_messages, HfRenderer.render_messages_async

    def ordered(renderer, messages: list) -> list:
        return group_image_parts(messages) if renders_images_first(renderer) else messages

    def render_messages(self, messages, params):
        return render(self, ordered(self, messages), params)

    async def render_messages_async(self, messages, params):
        return await render_async(self, ordered(self, messages), params)

    render_messages.groups_casa_images = render_messages_async.groups_casa_images = True
    HfRenderer.render_messages, HfRenderer.render_messages_async = render_messages, render_messages_async


__all__ = ["group_chat_images", "group_image_parts", "is_image_part", "renders_images_first"]
