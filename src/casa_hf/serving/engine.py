"""The model worker: one loaded CASA model whose every call (chat generations, session frames) runs in turn on one
inference thread (`InferenceThread`), with tokens streamed back through a `TokenStreamer`.

Requests queue there in arrival order; each call's exception goes to that call's future only, so one failing
request never touches another's state. The processor and tokenizer are used on that thread only too (a fast
tokenizer must not be called from two threads at once).
"""

from __future__ import annotations

import asyncio
import copy
import json
import uuid
from collections.abc import AsyncIterator

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from .chat import ChatRequest, StopHoldBack, chunk_body, completion_body, trim_at_stop, usage
from .errors import ApiError
from .inference_thread import InferenceThread, TokenStreamer


def sse(payload: dict | str) -> str:
    """One server-sent event."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


class StopOnText(StoppingCriteria):
    """Stop once the decoded answer holds a stop string. (Transformers' `stop_strings` needs a tokenizer whose
    vocabulary it can parse for prefixes; word-level tokenizers such as the shipped model's fail there.)"""

    def __init__(self, tokenizer, prompt_tokens: int, stop: list[str]):
        self.tokenizer, self.prompt_tokens, self.stop = tokenizer, prompt_tokens, stop

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_tokens :], skip_special_tokens=True)
        return torch.tensor([any(s in text for s in self.stop) for text in texts], device=input_ids.device)


class Engine:
    """One model and processor behind a queue of work on a single inference thread."""

    def __init__(self, model, processor, model_id: str):
        self.model, self.processor, self.model_id = model.eval(), processor, model_id
        self.tokenizer = processor.tokenizer
        self.context_tokens = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        self.thread = InferenceThread()

    def encode(self, request: ChatRequest):
        """Processor inputs of a chat request, checked against the model's context length."""
        try:
            inputs = self.processor.apply_chat_template(
                request.messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
            )
        except (ValueError, TypeError) as error:
            raise ApiError(400, f"messages cannot be encoded: {error}", "messages") from error
        prompt_tokens = inputs["input_ids"].shape[1]
        if self.context_tokens is not None and prompt_tokens + request.max_tokens > self.context_tokens:
            raise ApiError(
                400,
                f"the prompt is {prompt_tokens} tokens; with max_tokens={request.max_tokens} it exceeds the model's "
                f"context of {self.context_tokens} tokens",
                "messages",
                "context_length_exceeded",
            )
        return inputs

    def generation_kwargs(self, request: ChatRequest, inputs) -> dict:
        config = copy.deepcopy(self.model.generation_config)
        config.max_new_tokens = request.max_tokens
        if request.temperature is not None:
            config.do_sample = request.temperature > 0
            config.temperature = request.temperature if request.temperature > 0 else 1.0
        stops = [StopOnText(self.tokenizer, inputs["input_ids"].shape[1], request.stop)] if request.stop else []
        return {**inputs, "generation_config": config, "stopping_criteria": StoppingCriteriaList(stops)}

    async def run(self, fn, *args):
        """`fn(*args)` on the inference thread, after the work queued before it."""
        return await self.thread.async_submit(fn, *args)

    async def complete(self, request: ChatRequest) -> dict:
        """A whole `chat.completion` body."""
        inputs = await self.run(self.encode, request)
        prompt_tokens = inputs["input_ids"].shape[1]
        sequences = await self.run(self._generate, self.generation_kwargs(request, inputs), request.seed)
        generated = sequences[0, prompt_tokens:]
        text, stopped = trim_at_stop(self.tokenizer.decode(generated, skip_special_tokens=True), request.stop)
        finish = "length" if len(generated) >= request.max_tokens and not stopped else "stop"
        return completion_body(self.model_id, text, finish, prompt_tokens, len(generated))

    async def stream(self, request: ChatRequest) -> AsyncIterator[str]:
        """`chat.completion.chunk` events as tokens come (encoding errors raise here, before the stream starts)."""
        inputs = await self.run(self.encode, request)
        queue, streamer = self._start_streaming(self._generate, self.generation_kwargs(request, inputs), request.seed)
        return self._chunks(request, inputs["input_ids"].shape[1], queue, streamer)

    async def _chunks(self, request: ChatRequest, prompt_tokens: int, queue, streamer) -> AsyncIterator[str]:
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        holdback = StopHoldBack(request.stop)
        try:
            yield sse(chunk_body(completion_id, self.model_id, {"role": "assistant", "content": ""}))
            while (item := await queue.get()) is not None:
                if isinstance(item, Exception):
                    yield sse(ApiError(500, f"generation failed: {item}").body())
                    return
                if text := holdback.push(item):
                    yield sse(chunk_body(completion_id, self.model_id, {"content": text}))
            if text := holdback.flush():
                yield sse(chunk_body(completion_id, self.model_id, {"content": text}))
            length = streamer.total_tokens >= request.max_tokens and not holdback.stopped
            yield sse(chunk_body(completion_id, self.model_id, {}, "length" if length else "stop"))
            if request.include_usage:
                final = chunk_body(completion_id, self.model_id, {})
                final.update(choices=[], usage=usage(prompt_tokens, streamer.total_tokens))
                yield sse(final)
            yield sse("[DONE]")
        except (GeneratorExit, asyncio.CancelledError):
            streamer.cancel()  # the client left: the next token aborts the generation
            raise

    def _start_streaming(self, fn, *args) -> tuple[asyncio.Queue, TokenStreamer]:
        """Run `fn(*args, streamer=...)` on the inference thread; its text, then None or the exception, on a queue."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        streamer = TokenStreamer(self.tokenizer.backend_tokenizer, loop, queue)

        def run() -> None:
            try:
                fn(*args, streamer=streamer)
            except Exception as error:  # noqa: BLE001  (reported to this request only)
                loop.call_soon_threadsafe(queue.put_nowait, error)

        self.thread.submit(run)
        return queue, streamer

    @torch.no_grad()
    def _generate(self, kwargs: dict, seed: int | None, streamer=None) -> torch.Tensor:
        if seed is not None:  # on the inference thread, right before sampling: reproducible whatever else is queued
            torch.manual_seed(seed)
        return self.model.generate(**kwargs, streamer=streamer)

    def feed_streaming(self, stream, frame, text: str | None, done: asyncio.Future):
        """Feed one session turn on the inference thread (a frame asked `text`, default the session's question, or a
        text-only turn); text deltas on the returned queue, the `StreamStep` (or the exception) in `done`."""
        loop = asyncio.get_running_loop()

        def feed(streamer) -> None:
            try:
                step = stream.feed(frame, text, streamer=streamer)
                loop.call_soon_threadsafe(done.set_result, step)
            except Exception as error:  # noqa: BLE001
                loop.call_soon_threadsafe(done.set_exception, error)
                raise

        queue, _ = self._start_streaming(feed)
        return queue
