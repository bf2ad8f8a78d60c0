"""OpenAI chat-completion requests in, processor messages and generation settings out; response and chunk bodies."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from .errors import ApiError
from .images import load_image_url


@dataclass
class ServeLimits:
    """What one request (or session) may ask of the server; beyond it the request gets a 4xx naming the limit."""

    max_image_bytes: int = 8 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    max_images: int = 8
    max_tokens: int = 512
    max_stop: int = 4
    max_sessions: int = 8
    session_ttl_s: float = 300.0
    session_window_tokens: int = 512


@dataclass
class ChatRequest:
    """A validated chat completion: messages in the processor's format (images decoded) and decoding settings."""

    messages: list[dict]
    max_tokens: int
    temperature: float | None
    stop: list[str]
    stream: bool
    include_usage: bool
    seed: int | None


ROLES = ("system", "user", "assistant")


def parse_chat_request(body: dict, model_id: str, limits: ServeLimits) -> ChatRequest:
    """Check an OpenAI `/v1/chat/completions` body field by field; images are decoded here, before any model work."""
    if body.get("model") not in (None, model_id):
        served = f"this server serves {model_id!r}"
        raise ApiError(404, f"model {body.get('model')!r} is not served here; {served}", "model", "model_not_found")
    if body.get("n", 1) != 1:
        raise ApiError(400, "n: only one choice per request is supported", "n")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects", "messages")
    images = sum(
        isinstance(part, dict) and part.get("type") == "image_url"
        for message in messages
        if isinstance(message, dict) and isinstance(message.get("content"), list)
        for part in message["content"]
    )
    if images > limits.max_images:
        raise ApiError(400, f"too many images ({images}): this server takes at most {limits.max_images}", "messages")
    parsed = []
    for m, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ApiError(400, f"messages[{m}].role must be one of {', '.join(ROLES)}", f"messages[{m}].role")
        content = message.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise ApiError(400, f"messages[{m}].content must be a string or a list of parts", f"messages[{m}].content")
        items = []
        for p, part in enumerate(parts):
            param = f"messages[{m}].content[{p}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                items.append({"type": "text", "text": part["text"]})
            elif kind == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                image = load_image_url(url, f"{param}.image_url", limits.max_image_bytes, limits.max_image_pixels)
                items.append({"type": "image", "image": image})
            else:
                raise ApiError(
                    400, f"{param}: unsupported content part {kind!r}; expected 'text' or 'image_url'", f"{param}.type"
                )
        parsed.append({"role": message["role"], "content": items})
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens")) or 16
    if not isinstance(max_tokens, int) or not 1 <= max_tokens <= limits.max_tokens:
        expected = f"an integer in [1, {limits.max_tokens}]"
        raise ApiError(400, f"max_tokens must be {expected}, got {max_tokens!r}", "max_tokens")
    temperature = body.get("temperature")
    if temperature is not None and (not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2):
        raise ApiError(400, f"temperature must be a number in [0, 2], got {temperature!r}", "temperature")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > limits.max_stop or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, f"stop must be a string or a list of at most {limits.max_stop} non-empty strings", "stop")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ApiError(400, f"seed must be an integer, got {seed!r}", "seed")
    options = body.get("stream_options") or {}
    return ChatRequest(
        parsed, max_tokens, temperature, stop, bool(body.get("stream")), bool(options.get("include_usage")), seed
    )


def trim_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """`text` cut before the first stop string (OpenAI leaves stop strings out of the output), and whether one hit."""
    cuts = [text.find(s) for s in stop if s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


class StopHoldBack:
    """Streams text deltas without ever emitting a stop string: holds back a tail that could begin one."""

    def __init__(self, stop: list[str]):
        self.stop, self.text, self.sent, self.stopped = stop, "", 0, False
        self.hold = max((len(s) for s in stop), default=1) - 1

    def push(self, delta: str) -> str:
        """The text that can be sent now."""
        if self.stopped:
            return ""
        self.text += delta
        kept, self.stopped = trim_at_stop(self.text, self.stop)
        end = len(kept) if self.stopped else max(self.sent, len(kept) - self.hold)
        out, self.sent = kept[self.sent : end], end
        return out

    def flush(self) -> str:
        """The held-back tail at the end of generation."""
        kept, _ = trim_at_stop(self.text, self.stop)
        out, self.sent = kept[self.sent :], len(kept)
        return out


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_body(model_id: str, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model_id,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chunk_body(completion_id: str, model_id: str, delta: dict, finish_reason: str | None = None) -> dict:
    return {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model_id,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }
