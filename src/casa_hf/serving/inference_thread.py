"""The serving worker's thread and its token streamer.

Transformers 5.24's `transformers serve` had both (`InferenceThread`, `DirectStreamer` in `transformers.cli.serving`);
5.25 replaced them with a multi-process engine, so the server keeps its own: a thread that runs every call in turn
(compiled steps keep thread-local state, and a fast tokenizer must not be used from two threads at once) and a
`generate()` streamer that decodes each new token once and hands its text to the event loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future
from queue import Queue

import torch


class InferenceThread:
    """One daemon thread running submitted calls in arrival order; each call's result or exception goes to its own
    future only."""

    def __init__(self):
        self._calls: Queue = Queue()
        threading.Thread(target=self._run, daemon=True, name="casa-hf-inference").start()

    def _run(self) -> None:
        while True:
            fn, args, future, loop = self._calls.get()
            try:
                settle, outcome = future.set_result, fn(*args)
            except Exception as error:  # noqa: BLE001  (reported to this call's future only)
                settle, outcome = future.set_exception, error
            if loop is None:
                settle(outcome)
            else:
                loop.call_soon_threadsafe(settle, outcome)
            del fn, args, outcome  # drop the call's references (model inputs) before waiting for the next

    def submit(self, fn: Callable, *args) -> Future:
        """Run `fn(*args)` on the thread; a blocking future."""
        future: Future = Future()
        self._calls.put((fn, args, future, None))
        return future

    def async_submit(self, fn: Callable, *args) -> asyncio.Future:
        """Run `fn(*args)` on the thread; a future to await on the running event loop."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._calls.put((fn, args, future, loop))
        return future


class GenerationCancelled(Exception):
    """Raised inside `generate()` by a cancelled `TokenStreamer`: it ends that generation."""


class TokenStreamer:
    """`generate(streamer=...)`: the new tokens (not the prompt, which the first `put` brings) decoded incrementally
    with the tokenizer's `DecodeStream`, their text put on `queue` on `loop`, then `None` at the end. `cancel()` makes
    the next token abort the generation (the client left)."""

    def __init__(self, tokenizer, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue):
        from tokenizers.decoders import DecodeStream

        self._tokenizer, self._loop, self._queue = tokenizer, loop, queue
        self._decode_stream = DecodeStream(skip_special_tokens=True)
        self._prompt = True
        self._cancelled = threading.Event()
        self.total_tokens = 0

    def put(self, value: torch.Tensor) -> None:
        if self._cancelled.is_set():
            raise GenerationCancelled()
        if self._prompt:
            self._prompt = False
            return
        for token_id in value.reshape(-1).tolist():
            self.total_tokens += 1
            if (text := self._decode_stream.step(self._tokenizer, token_id)) is not None:
                self._loop.call_soon_threadsafe(self._queue.put_nowait, text)

    def end(self) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, None)

    def cancel(self) -> None:
        self._cancelled.set()
