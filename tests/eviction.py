"""What a text budget's eviction tests need: the CASA call of the frame whose feed evicts text, the window as it was
before the eviction, and CASA recomputed at the positions from before the eviction."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from casa_hf import CasaCache


@dataclass
class EvictingCall:
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    kwargs: dict[str, Any]  # the CASA call's keyword arguments (image_states, casa_inputs, self_attn, cache_window)
    output: torch.Tensor
    window_before: Any  # block 1's CASA window before the eviction
    evicted: int  # text tokens dropped (every later position moved back by it)


def feed_evicting_frame(stream, frame, monkeypatch) -> EvictingCall:
    """Feed `frame` into `stream` (its text budget must be exceeded by it) and record block 1's CASA call."""
    saved, calls = {}, []
    evict = CasaCache.evict_text

    def remember(self, *args):
        saved["state"] = copy.deepcopy(self.get_casa_state(1))
        saved["excess"] = evict(self, *args)
        return saved["excess"]

    monkeypatch.setattr(CasaCache, "evict_text", remember)
    casa = stream.model.model.language_model.layers[1].casa_attn
    handle = casa.register_forward_hook(
        lambda module, args, kwargs, output: calls.append((args, kwargs, output)), with_kwargs=True
    )
    try:
        stream.feed(frame, max_new_tokens=1)
    finally:
        handle.remove()
    assert saved["excess"] > 0, "the frame did not exceed the stream's text budget"
    (query, key, value), kwargs, (output, _) = calls[0]
    return EvictingCall(query, key, value, kwargs, output, saved["state"], saved["excess"])


def casa_before_eviction(stream, call: EvictingCall, image_position_embeddings) -> torch.Tensor:
    """Block 1's CASA output at the positions from before the eviction, from the window as it was then: the text's
    q/k moved forward by the evicted count (RoPE composes) and the image keys at `image_position_embeddings`."""
    text_model = stream.model.model.language_model
    casa_inputs = dataclasses.replace(call.kwargs["casa_inputs"], image_position_embeddings=image_position_embeddings)
    kwargs = {**call.kwargs, "casa_inputs": casa_inputs, "cache_window": call.window_before}
    shift = text_model.shift_key_positions
    with torch.no_grad():
        output, _ = text_model.layers[1].casa_attn(
            shift(call.query, call.evicted), shift(call.key, call.evicted), call.value, **kwargs
        )
    return output


def positions_before_eviction(stream, call: EvictingCall) -> torch.Tensor:
    """The fed chunk's text positions before the eviction, `[1, chunk]`."""
    chunk = call.query.shape[2]
    return stream.cache.get_seq_length() - chunk + torch.arange(chunk)[None] + call.evicted
