"""The text-only cache of CASA models and the bounded side state of each CASA layer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache


@dataclass
class CasaLayerState:
    """What one CASA layer remembers between forward calls: its current window.

    `keys`/`values` (`[batch, kv_heads, slots, head_dim]`, RoPE applied) hold the latest image's tokens and the text
    since that image; `valid` (`[batch, slots]`) marks the slots in use (samples of a batch have windows of different
    lengths); `image_tokens` (`[batch]`) counts the image slots among them (0 before a sample's first image).
    """

    keys: torch.Tensor
    values: torch.Tensor
    valid: torch.Tensor
    image_tokens: torch.Tensor

    def select(self, index: torch.Tensor) -> CasaLayerState:
        """Rows `index` of the batch (beam reordering, batch expansion or selection)."""
        index = index.to(self.keys.device)
        return CasaLayerState(
            self.keys.index_select(0, index),
            self.values.index_select(0, index),
            self.valid.index_select(0, index.to(self.valid.device)),
            self.image_tokens.index_select(0, index.to(self.image_tokens.device)),
        )

    def compacted(self) -> CasaLayerState:
        """Move each row's used slots to the front and drop slots no row uses, so memory tracks the longest window."""
        if bool(self.valid.all()):
            return self
        order = torch.sort((~self.valid).to(torch.int8), dim=1, stable=True).indices
        width = int(self.valid.sum(1).max())
        order = order[:, :width]
        gather = order[:, None, :, None].expand(-1, self.keys.shape[1], -1, self.keys.shape[-1])
        return CasaLayerState(
            self.keys.gather(2, gather),
            self.values.gather(2, gather),
            self.valid.gather(1, order),
            self.image_tokens,
        )


class CasaCache(DynamicCache):
    """A `DynamicCache` whose self-attention layers hold text K/V only, plus one `CasaLayerState` per CASA layer.

    It is what `generate()` and a passed-back `cache` carry between calls: the text keeps growing as in any LLM,
    while each CASA layer's side state stays bounded by one image plus the text since that image.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.casa_states: dict[int, CasaLayerState] = {}

    def get_casa_state(self, layer_idx: int) -> CasaLayerState | None:
        return self.casa_states.get(layer_idx)

    def set_casa_state(self, layer_idx: int, state: CasaLayerState) -> None:
        self.casa_states[layer_idx] = state

    def casa_state_lengths(self, layer_idx: int) -> torch.Tensor:
        """Used slots per sample of one CASA layer's side state (image tokens + text since that image)."""
        return self.casa_states[layer_idx].valid.sum(1)

    def evict_text(
        self, sink_tokens: int, window_tokens: int, shift: Callable[[torch.Tensor, int], torch.Tensor]
    ) -> int:
        """Keep the first `sink_tokens` and the last `window_tokens` text tokens of every SA layer; drop the middle.

        Kept window keys and every CASA side state move back by the number of dropped tokens (`shift` rotates RoPE'd
        keys), so positions stay contiguous and the next token's position is the cache length again. Returns the
        number of dropped tokens.
        """
        excess = self.get_seq_length() - sink_tokens - window_tokens
        if excess <= 0:
            return 0
        for layer in self.layers:
            if getattr(layer, "is_sliding", False):
                raise ValueError("A text budget cannot be applied to sliding-window cache layers")
            keys, values = layer.keys, layer.values
            recent = slice(sink_tokens + excess, None)
            layer.keys = torch.cat([keys[..., :sink_tokens, :], shift(keys[..., recent, :], -excess)], dim=-2)
            layer.values = torch.cat([values[..., :sink_tokens, :], values[..., recent, :]], dim=-2)
        for state in self.casa_states.values():
            state.keys = shift(state.keys, -excess)
        return excess

    def _select_states(self, index: torch.Tensor) -> None:
        self.casa_states = {idx: state.select(index) for idx, state in self.casa_states.items()}

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._select_states(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        for idx, state in self.casa_states.items():
            rows = torch.arange(state.keys.shape[0], device=state.keys.device).repeat_interleave(repeats)
            self.casa_states[idx] = state.select(rows)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._select_states(torch.as_tensor(indices).reshape(-1))

    def reset(self) -> None:
        super().reset()
        self.casa_states = {}

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise NotImplementedError(
                "CasaCache cannot be cropped: a CASA side state may have been replaced by an image inside the "
                "cropped span (assisted/speculative decoding is not supported)."
            )

    @property
    def is_croppable(self) -> bool:
        return False


__all__ = ["CasaCache", "CasaLayerState"]
