"""Streaming images and video through a CASA model: one persistent text-only cache, each frame fed once.

A frame's features live only in the CASA layers' side state until the next frame replaces them, so memory does not
grow with the number of frames. The text keeps growing unless a `TextBudget` bounds it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache

from .casa_cache import CasaCache, CasaLayerMixin, kv_nbytes
from .image_inputs import load_image_input


@dataclass
class TextBudget:
    """Bound the text cache to `sink_tokens + window_tokens` tokens, StreamingLLM style.

    The first tokens (the attention sinks: system prompt start) and the most recent window stay; the middle is
    dropped and the kept keys are re-positioned so positions stay contiguous (no growth past the trained context).
    Trade-off: the model forgets text older than the window (it never sees old frames anyway: CASA keeps only the
    latest image); memory and per-token cost become truly constant over hours of video.
    """

    sink_tokens: int = 4
    window_tokens: int = 1024

    def __post_init__(self):
        if self.sink_tokens < 0 or self.window_tokens < 1:
            raise ValueError(f"TextBudget needs sink_tokens >= 0 and window_tokens >= 1, got {self}")


@dataclass
class StreamStep:
    """What one fed frame (or text) produced."""

    index: int
    text: str
    token_ids: list[int]
    time_to_first_token_s: float
    decode_tokens_per_s: float
    cache_tokens: int
    cache_bytes: int


def cache_nbytes(cache: Cache) -> int:
    """Bytes held by a cache: each layer's K/V and, in a CASA cache, each CASA block's window (the layers measure
    themselves; a Transformers cache, such as the benchmarks' token-insertion baseline's, is measured by its K/V)."""
    return sum(layer.nbytes() if isinstance(layer, CasaLayerMixin) else kv_nbytes(layer) for layer in cache.layers)


class CasaStream:
    """Feed frames (with optional text) one at a time and get the model's text for each.

    ```python
    stream = CasaStream(model, processor, prompt="What happens now?", max_new_tokens=16)
    for step in stream.run(frames):
        print(step.index, step.text)
    stream.feed(text="What colour was the car?")
    ```

    `prompt` is the question asked about every frame (`feed(frame, text)` asks `text` instead); `system` opens the
    conversation. By default the turns are the processor's chat template's: a frame is a user message (the image, then
    the question) followed by the generation prompt, a text-only `feed(text=...)` a user message with that text, and
    each answer is closed by the template's end of turn before the next user message: the stream holds exactly the
    template's rendering of the conversation. Raw mode (`chat_template=False`, `frame_prefix` / `frame_text` given, or
    a processor without a chat template) feeds text as written: `system` once, then per frame
    `frame_prefix + <image> + prompt + frame_text`, and a text-only turn as is.

    Decoding is greedy unless `do_sample=True`. The last generated token of a turn is fed at the start of the
    next one, exactly as `generate()` with a passed-back cache and the growing history would do.
    """

    def __init__(
        self,
        model,
        processor,
        *,
        prompt: str | None = None,
        system: str | None = None,
        chat_template: bool | None = None,
        frame_prefix: str = "",
        frame_text: str = "",
        max_new_tokens: int = 16,
        text_budget: TextBudget | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        eos_token_id: int | list[int] | None = None,
    ):
        raw_markup = bool(frame_prefix or frame_text)
        if chat_template is None:
            chat_template = processor.chat_template is not None and not raw_markup
        elif chat_template and (raw_markup or processor.chat_template is None):
            raise ValueError(
                "chat_template=True needs a processor with a chat template and no frame_prefix / frame_text "
                "(those write the turns' markup by hand: raw mode)"
            )
        self.model = model
        self.processor = processor
        self.prompt = prompt
        self.system = system
        self.chat_template = chat_template
        self.frame_prefix = frame_prefix
        self.frame_text = frame_text
        self.max_new_tokens = max_new_tokens
        self.text_budget = text_budget
        self.do_sample = do_sample
        self.temperature = temperature
        eos = eos_token_id if eos_token_id is not None else model.generation_config.eos_token_id
        self.eos_token_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        # each frame is its placeholder, wrapped in the vision start / end tokens when the model has them
        config, tokenizer = model.config, processor.tokenizer
        wrapping = (getattr(config, "vision_start_token_id", None), getattr(config, "vision_end_token_id", None))
        start, end = tokenizer.convert_ids_to_tokens(list(wrapping)) if None not in wrapping else ("", "")
        self.image_text = f"{start}{processor.image_token}{end}"
        self.reset()

    def reset(self) -> None:
        """Forget everything: a fresh cache, no pending token, frame counter at zero."""
        self.cache = self.new_cache()
        self._pending: list[int] = []
        self._steps = 0
        self.evicted_tokens = 0
        # chat mode: the last exchange (user message, then the answer) and the text the stream holds of it
        self._exchange: list[dict] = []
        self._fed_text = ""

    def new_cache(self) -> CasaCache:
        return CasaCache()

    def feed(
        self, frame=None, text: str | None = None, max_new_tokens: int | None = None, streamer=None
    ) -> StreamStep:
        """Feed one frame (PIL / numpy / tensor / path) asked `text` (default: `prompt`), or a text-only turn, then
        generate up to `max_new_tokens`.

        `streamer` follows `generate()`'s protocol (`put(prompt_ids)`, then `put` per new token, then `end()`), so
        Transformers' `TextStreamer` / `TextIteratorStreamer` show the text as it is produced.
        """
        if frame is None and not text:
            raise ValueError("feed() needs a frame or some text")
        input_ids, pixel_values, grid = self.encode_turn(frame, text)
        input_ids = torch.cat([torch.tensor([self._pending], dtype=torch.long), input_ids], dim=1)
        step = self._generate(input_ids, pixel_values, grid, max_new_tokens or self.max_new_tokens, streamer)
        if self.chat_template:
            self._close_exchange(self._user_message(frame is not None, text), step.token_ids)
        self._steps += 1
        return step

    def next_turn_ids(self, image: bool, text: str | None = None) -> list[int]:
        """The token ids the next `feed()` of a frame (`image=True`) or of `text` alone would feed, the pending last
        answer token first, without feeding them or changing any state: a caller (the server) checks that a turn fits
        its budget before queueing it. A frame counts as its one image token, as in the fed ids."""
        turn = self._turn_text(image, text)
        return self._pending + self.processor.tokenizer(turn, add_special_tokens=False)["input_ids"]

    def encode_turn(self, frame, text: str | None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Token ids (one image token per frame), pixels and image grid of one turn, as `feed` runs it."""
        image = None if frame is None else load_image_input(frame)  # a bad frame fails before any state changes
        turn = self._turn_text(image is not None, text)
        if image is None:
            return (
                self.processor.tokenizer(turn, add_special_tokens=False, return_tensors="pt")["input_ids"],
                None,
                None,
            )
        return self.encode_frame(image, turn)

    def encode_frame(self, image, turn: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """A frame's turn through the processor. Streams of other models (the token-insertion baselines of
        `benchmarks/`) override it with their processor's way."""
        encoded = self.processor(images=[image], text=turn, add_special_tokens=False, return_tensors="pt")
        return encoded["input_ids"], encoded["pixel_values"], encoded["image_grid_thw"]

    def _turn_text(self, image: bool, text: str | None) -> str:
        return (self._chat_turn if self.chat_template else self._raw_turn)(image, text)

    def _raw_turn(self, image: bool, text: str | None) -> str:
        system = self.system if self._steps == 0 and self.system else ""
        if not image:
            return system + text
        return "".join([system, self.frame_prefix, self.image_text, text or self.prompt or "", self.frame_text])

    def _chat_turn(self, image: bool, text: str | None) -> str:
        """What the chat template adds to the conversation for this turn: the end of the previous answer's turn, the
        user message and the generation prompt. Only the system message and the last exchange are rendered (the
        template must render a conversation as an extension of its start), so a turn costs the same at any length."""
        rendered = self._render([*self._exchange, self._user_message(image, text)])
        if not rendered.startswith(self._fed_text):
            raise ValueError(
                "The processor's chat template does not render the conversation as an extension of what the stream "
                f"already holds (it holds ...{self._fed_text[-80:]!r}, the template gives ...{rendered[-160:]!r}); "
                "write the turns' markup with frame_prefix / frame_text (raw mode) instead"
            )
        return rendered[len(self._fed_text) :]

    def _user_message(self, image: bool, text: str | None) -> dict:
        """A turn's user message: the image (for a frame), then its question (`text`; for a frame default `prompt`)."""
        question = text or self.prompt if image else text
        content = [{"type": "image"}] if image else []
        content += [{"type": "text", "text": question}] if question else []
        return {"role": "user", "content": content}

    def _close_exchange(self, asked: dict, answer_ids: list[int]) -> None:
        """Record the answer to `asked`: the exchange the next turn is rendered from, and the text the stream holds of
        it."""
        ended = answer_ids[-1] in self.eos_token_ids
        decode = self.processor.tokenizer.decode
        answer = decode(answer_ids[:-1] if ended else answer_ids)
        self._fed_text = self._render([asked]) + answer + (decode(answer_ids[-1:]) if ended else "")
        self._exchange = [asked, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]

    def _render(self, messages: list[dict]) -> str:
        """The chat template's text of the system message and `messages` (ending with a user message), then the
        generation prompt."""
        system = [{"role": "system", "content": [{"type": "text", "text": self.system}]}] if self.system else []
        return self.processor.apply_chat_template(system + messages, add_generation_prompt=True, tokenize=False)

    def run(self, frames: Iterable, text: str | None = None) -> Iterator[StreamStep]:
        """`feed` every frame of `frames` in turn (asked `text`, default: `prompt`), yielding each step."""
        for frame in frames:
            yield self.feed(frame, text)

    @torch.no_grad()
    def _generate(self, input_ids, pixel_values, grid, max_new_tokens: int, streamer=None) -> StreamStep:
        device = self.model.device
        if self.text_budget is not None:
            text_model, budget = self.model.model.language_model, self.text_budget
            self.evicted_tokens += self.cache.evict_text(
                budget.sink_tokens, budget.window_tokens, text_model.shift_key_positions, text_model.casa_uses_rope
            )
        if streamer is not None:
            streamer.put(input_ids)
        start = time.perf_counter()
        logits = self._forward(input_ids.to(device), pixel_values, grid)
        generated: list[int] = []
        first_token_at = decode_start = time.perf_counter()
        for _ in range(max_new_tokens):
            token = self._pick(logits)
            generated.append(token)
            if streamer is not None:
                streamer.put(torch.tensor([token]))
            if len(generated) == 1:
                first_token_at = decode_start = time.perf_counter()
            if token in self.eos_token_ids or len(generated) == max_new_tokens:
                break
            logits = self._forward(torch.tensor([[token]], device=device), None, None)
        decode_time = time.perf_counter() - decode_start
        if streamer is not None:
            streamer.end()
        self._pending = generated[-1:]
        return StreamStep(
            index=self._steps,
            text=self.processor.tokenizer.decode(generated, skip_special_tokens=True),
            token_ids=generated,
            time_to_first_token_s=first_token_at - start,
            decode_tokens_per_s=(len(generated) - 1) / decode_time if len(generated) > 1 and decode_time else 0.0,
            cache_tokens=self.cache.get_seq_length(),
            cache_bytes=cache_nbytes(self.cache),
        )

    def _forward(self, input_ids, pixel_values, grid) -> torch.Tensor:
        images = {}
        if pixel_values is not None:
            images["pixel_values"] = pixel_values.to(self.model.device)
        if grid is not None:
            images["image_grid_thw"] = grid.to(self.model.device)
        out = self.model(input_ids=input_ids, cache=self.cache, use_cache=True, logits_to_keep=1, **images)
        self.cache = out.cache
        logits = out.logits[0, -1].float()
        logits[self.model.generation_config.suppress_tokens or []] = float("-inf")  # e.g. the image token
        return logits

    def _pick(self, logits: torch.Tensor) -> int:
        if not self.do_sample:
            return int(logits.argmax())
        probabilities = torch.softmax(logits / self.temperature, dim=-1)
        return int(torch.multinomial(probabilities, 1))


__all__ = ["CasaStream", "StreamStep", "TextBudget", "cache_nbytes"]
