"""The text-only cache of CASA models: one layer per decoder block, holding the block's self-attention text K/V and,
in blocks with a CASA sub-layer, that sub-layer's window (the latest image and the text since it)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers.cache_utils import (
    Cache,
    CacheLayerMixin,
    DynamicCache,
    DynamicLayer,
    DynamicSlidingWindowLayer,
    StaticCache,
    StaticLayer,
    StaticSlidingWindowLayer,
    get_layer_types_and_kwargs,
)
from transformers.configuration_utils import PreTrainedConfig
from transformers.utils import is_torchdynamo_compiling

from .transformers_compat import DummyLayer

WINDOW_HEADROOM = 64  # free slots kept after a window, so that the text appended by decode steps is written in place


def pad_slots(tensor: torch.Tensor, width: int, dim: int, fill: float | bool = 0) -> torch.Tensor:
    """`tensor` with `fill` (zeros, or False) appended along `dim` up to `width` slots."""
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor, tensor.new_full(shape, fill)], dim=dim)


def front_aligned(
    keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Windows with their used slots moved to the front, in order, and the slots no sample uses dropped."""
    order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices[:, : int(valid.sum(1).max())]
    gather = order[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[-1])
    return keys.gather(2, gather), values.gather(2, gather), valid.gather(1, order)


def kv_nbytes(layer: CacheLayerMixin) -> int:
    """Memory of a cache layer's K/V, as allocated (all of a static layer)."""
    return sum(tensor.numel() * tensor.element_size() for tensor in (layer.keys, layer.values) if tensor is not None)


def _runs_open(
    image_tokens: torch.Tensor, text_tokens: torch.Tensor, run_text: torch.Tensor, tail_markers: torch.Tensor
) -> torch.Tensor:
    """Per sample, whether a window's images are followed by marker tokens only (a next image would join them)."""
    return (image_tokens > 0) & (tail_markers == text_tokens - run_text)


@dataclass
class StoredWindows:
    """Every sample's stored window, as CASA attention reads it: the window's own tensors (no copy), and what it
    knows of them without reading anything back from the device."""

    keys: torch.Tensor  # [batch, kv_heads, slots, head_dim], RoPE applied
    values: torch.Tensor
    valid: torch.Tensor  # [batch, slots]: the slots in use
    image_tokens: torch.Tensor  # [batch]: leading slots that hold the latest image (0 before a sample's first image)
    image_width: int  # the largest of `image_tokens`
    all_valid: bool  # every slot of every window in use
    all_see_images: bool  # every window holds an image
    text_start: int | torch.Tensor = 0  # a decode step's first slot (per sample in a static window)


class CasaWindow:
    """The window one CASA sub-layer continues from: the latest image's K/V (or the latest run of consecutive images',
    `CasaConfig.casa_window_images="consecutive"`) and the text K/V since that image (or the run's first image).

    `keys` / `values` are `[batch, kv_heads, slots, head_dim]` (RoPE applied); `valid` (`[batch, slots]`) marks the
    slots in use, since the samples of a batch have windows of different lengths; `image_tokens` (`[batch]`) counts
    the image slots among them, which lead (0 before a sample's first image), and `text_tokens` (`[batch]`) the text
    tokens seen since that image, its placeholder included (whether or not the window attends to them:
    cross-attention does not). `run_text` (`[batch]`) counts those up to the window's last image placeholder, and
    `tail_markers` the marker tokens (vision start / end) right after it: while every token after the last
    placeholder is a marker (`tail_markers == text_tokens - run_text`), the window's run of images is open: a next
    image would join it, which a later chunk cannot do (`open_runs`). Its size is bounded by its images plus the text
    since them, however long the conversation. It lives in its block's cache layer (`layer.window`), whose beam
    reorder, crop, batch repeat and select, and reset it follows.
    """

    def __init__(self):
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.is_initialized = False
        self.valid: torch.Tensor | None = None
        self.image_tokens: torch.Tensor | None = None
        self.text_tokens: torch.Tensor | None = None
        self.run_text: torch.Tensor | None = None
        self.tail_markers: torch.Tensor | None = None
        self.may_run_on = False  # some window's run of images may be open (known on the host when stored)
        self.all_valid = False  # every slot of every window in use: a one-token decode step then needs no mask
        self.all_see_images = False  # every window holds an image: a decode step then updates every sample
        self.image_width = 0  # tokens of the largest image in the windows, read by decode steps without a sync
        # every sample has had a real token: left padding, which comes before it, is over (see `padding_is_over`)
        self.all_started = False
        # keys, values and valid slots with free slots after them; `keys` etc. are their leading views while
        # decode steps append in place (anything that replaces the windows, e.g. `_write`, ends that)
        self._buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def _write(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        valid: torch.Tensor,
        image_tokens: torch.Tensor,
        text_tokens: torch.Tensor,
        run_text: torch.Tensor,
        tail_markers: torch.Tensor,
        compact: bool = True,
    ) -> None:
        """Keep each sample's window as given, and what decode steps know of it without reading it back.

        With `compact`, used slots move to the front and slots no sample uses are dropped, so memory tracks the
        longest window (unused slots come from images padded to a common width, or left padding).
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if compact and not bool(valid.all()):
            key_states, value_states, valid = front_aligned(key_states, value_states, valid)
        self.keys, self.values, self.valid = key_states, value_states, valid
        self.image_tokens, self.text_tokens = image_tokens, text_tokens
        self.run_text, self.tail_markers = run_text, tail_markers
        self.may_run_on = _runs_open(image_tokens, text_tokens, run_text, tail_markers).any().item()
        # read here, once per stored window, rather than by each decode step
        self.all_valid, self.all_see_images = bool(valid.all()), bool((image_tokens > 0).all())
        self.image_width = int(image_tokens.max())
        self.all_started = bool((text_tokens > 0).all())

    def read(self) -> StoredWindows | None:
        """The stored windows a chunk continues; None before the first chunk."""
        return self._stored() if self.is_initialized else None

    def _stored(self, text_start: int | torch.Tensor = 0) -> StoredWindows:
        return StoredWindows(
            self.keys,
            self.values,
            self.valid,
            self.image_tokens,
            self.image_width,
            self.all_valid,
            self.all_see_images,
            text_start,
        )

    def store(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        valid: torch.Tensor,
        image_tokens: torch.Tensor,
        new_text_tokens: torch.Tensor,
        continued: torch.Tensor,
        images_padded: bool,
        tail: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    ) -> None:
        """Keep each sample's last window of a chunk, computed by CASA attention from the stored one and the chunk.

        `image_tokens` (`[batch]`) sizes each window's image, `new_text_tokens` counts the chunk's text in it (its
        placeholder included) and `continued` marks the windows that go on from the stored ones: those add the
        chunk's text to their count, the others (opened in the chunk by an image, or empty where a packed
        conversation starts) count from zero. `tail` is, per window, whether it has an image placeholder in the chunk
        (or starts there), and its valid tokens after the last one (all of them without one) and their leading
        markers: the window's run of images is then followed by markers only, or not. Unused slots, from images
        padded to a common width (`images_padded`) or from left padding at the front of a window, are compacted away.
        """
        restart, tail_tokens, tail_markers = tail
        if self.is_initialized:
            text_tokens = new_text_tokens + self.text_tokens * continued
            was_open = self.tail_markers == self.text_tokens - self.run_text
            run_text = torch.where(restart, text_tokens - tail_tokens, self.run_text)
            tail_markers = torch.where(restart, tail_markers, self.tail_markers + tail_markers * was_open)
        else:
            text_tokens, run_text = new_text_tokens, new_text_tokens - tail_tokens
        leading_gap = valid.shape[1] > 0 and not bool(valid[:, 0].all())
        self._write(
            key_states,
            value_states,
            valid,
            image_tokens,
            text_tokens,
            run_text,
            tail_markers,
            compact=images_padded or leading_gap,
        )

    def open_runs(self) -> list[bool]:
        """Per sample, whether the window's images are followed by marker tokens only: a chunk whose first image
        follows markers only would join them, which is refused (read back from the device when some may be open)."""
        if not self.is_initialized or not self.may_run_on:
            return [False] * (self.keys.shape[0] if self.is_initialized else 0)
        return _runs_open(self.image_tokens, self.text_tokens, self.run_text, self.tail_markers).tolist()

    def note_markers(self, markers: torch.Tensor | None) -> None:
        """Before a decode step's text is appended: `markers` (`[batch, new tokens]`) marks its marker tokens, which
        keep an open run of images open (nothing to do, and nothing read, while no run may be open)."""
        if not self.is_initialized or not self.may_run_on:
            return
        open_now = _runs_open(self.image_tokens, self.text_tokens, self.run_text, self.tail_markers)
        leading = markers.long().cumprod(1).sum(1) if markers is not None else 0
        self._set_tail_markers(self.tail_markers + leading * open_now)

    def _set_tail_markers(self, tail_markers: torch.Tensor) -> None:
        self.tail_markers = tail_markers

    def append_text(self, key_states: torch.Tensor, value_states: torch.Tensor, attends_text: bool) -> StoredWindows:
        """Every sample's window goes on with the chunk's text (no image, no padding): the decode step. The text K/V
        are added after the stored slots when the window attends to its text (CASA; cross-attention only counts it).
        Returns the windows, the chunk's first slot being the same for every sample here."""
        new, first_new_slot = key_states.shape[-2], self.keys.shape[-2]
        if attends_text:
            self._append_text_slots(key_states, value_states)
        self.text_tokens = self.text_tokens + new
        return self._stored(first_new_slot)

    def _append_text_slots(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Write the chunk's K/V after the stored slots: in place while the buffers behind the windows have room, so
        that a decode step copies nothing already stored; otherwise into new buffers with `WINDOW_HEADROOM` free
        slots, marked valid in advance (text fills them in order). Under autograd it concatenates, as in-place
        writes would alter slots saved for the backward pass."""
        used, new = self.keys.shape[-2], key_states.shape[-2]
        if torch.is_grad_enabled() and (key_states.requires_grad or self.keys.requires_grad):
            self.keys = torch.cat([self.keys, key_states], dim=2)
            self.values = torch.cat([self.values, value_states], dim=2)
            self.valid = pad_slots(self.valid, used + new, 1, fill=True)
            return
        if not self._holds_views() or used + new > self._buffers[0].shape[2]:
            capacity = used + new + WINDOW_HEADROOM
            self._buffers = (
                pad_slots(self.keys, capacity, 2),
                pad_slots(self.values, capacity, 2),
                pad_slots(self.valid, capacity, 1, fill=True),
            )
        keys, values, valid = self._buffers
        keys.narrow(2, used, new).copy_(key_states)
        values.narrow(2, used, new).copy_(value_states)
        self.keys, self.values = keys.narrow(2, 0, used + new), values.narrow(2, 0, used + new)
        self.valid = valid.narrow(1, 0, used + new)

    def _holds_views(self) -> bool:
        """Whether the stored windows are still the leading slots of `_buffers`."""
        return (
            self._buffers is not None and self.keys._base is self._buffers[0] and self.valid._base is self._buffers[2]
        )

    def lengths(self) -> torch.Tensor:
        """Used slots per sample (image tokens + text since that image)."""
        return self.valid.sum(1)

    def nbytes(self) -> int:
        """Memory of the window K/V, free slots kept for decoding included (the bookkeeping is a few bytes more)."""
        if not self.is_initialized:
            return 0
        keys, values = self._buffers[:2] if self._holds_views() else (self.keys, self.values)
        return keys.numel() * keys.element_size() + values.numel() * values.element_size()

    def shift_positions(self, shift: Callable[[torch.Tensor, int], torch.Tensor], delta: int) -> None:
        """Move the RoPE'd keys by `delta` positions (a bounded text cache dropped `-delta` older tokens)."""
        if self.is_initialized:
            self.keys = shift(self.keys, delta)

    def select(self, rows: torch.Tensor) -> None:
        """Keep the samples `rows` (in that order): beam reorder, batch repeat and select."""
        if self.is_initialized:
            self.keys = self.keys.index_select(0, rows.to(self.keys.device))
            self.values = self.values.index_select(0, rows.to(self.values.device))
            self.valid = self.valid.index_select(0, rows.to(self.valid.device))
            self.image_tokens = self.image_tokens.index_select(0, rows.to(self.image_tokens.device))
            self.text_tokens = self.text_tokens.index_select(0, rows.to(self.text_tokens.device))
            self.run_text = self.run_text.index_select(0, rows.to(self.run_text.device))
            self.tail_markers = self.tail_markers.index_select(0, rows.to(self.tail_markers.device))

    def repeat_interleave(self, repeats: int) -> None:
        """Each sample `repeats` times in a row (generate() expanding a batch)."""
        if self.is_initialized:
            self.select(torch.arange(self.keys.shape[0], device=self.keys.device).repeat_interleave(repeats))

    def reset(self) -> None:
        self.keys = self.values = self.valid = self.image_tokens = self.text_tokens = self._buffers = None
        self.run_text = self.tail_markers = None
        self.all_valid = self.all_see_images = self.all_started = self.may_run_on = False
        self.image_width = 0
        self.is_initialized = False

    def check_crop(self, tokens_to_remove: int) -> None:
        """A window can lose text since its last image, not that image's placeholder: the window before it is gone."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        if not self.is_initialized:
            return
        removable = self.text_tokens - self.run_text
        if bool((removable < -tokens_to_remove).any()):
            raise ValueError(
                f"Cannot crop {-tokens_to_remove} tokens from a CasaCache: a sample would lose its latest image "
                f"(only {removable.tolist()} tokens per sample were written since it), and the window before that "
                "image is no longer stored"
            )

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last `-tokens_to_remove` text tokens of every window (assisted decoding rejecting a draft)."""
        self.check_crop(tokens_to_remove)
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        remove = -tokens_to_remove
        valid = self.valid
        if bool((valid.sum(1) > self.image_tokens).any()):  # the windows hold their text (CASA, not cross-attention)
            valid = valid & (valid.flip(1).cumsum(1).flip(1) > remove)
        text_tokens = self.text_tokens - remove
        tail_markers = torch.minimum(self.tail_markers, text_tokens - self.run_text)
        self._write(self.keys, self.values, valid, self.image_tokens, text_tokens, self.run_text, tail_markers)


class CasaStaticWindow(CasaWindow):
    """A `CasaWindow` preallocated for `torch.compile` and CUDA graphs, as Transformers' `StaticLayer` is for text
    K/V: `keys` / `values` / `valid` hold `max_image_tokens + max_text_since_image` slots per sample and are
    written in place at fixed addresses, each window front-aligned with `used` slots (`valid` = slot < `used`).

    A window that outgrows it (a larger image, or more text since the latest image) is refused with a `ValueError`
    when the window is stored, and before a decode step writes past the end (in eager mode; compiled steps trust the
    sizes `generate()` chose, which cannot be exceeded).
    """

    def __init__(self, max_image_tokens: int, max_text_since_image: int):
        super().__init__()
        self.max_image_tokens, self.max_text_since_image = max_image_tokens, max_text_since_image
        self.max_slots = max_image_tokens + max_text_since_image
        self.used: torch.Tensor | None = None
        # slots of the longest window, counted on the host: eager decode steps check the bound without reading `used`
        self.longest_window = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads = key_states.shape[:2]
        self.keys = key_states.new_zeros(batch, heads, self.max_slots, key_states.shape[-1])
        self.values = value_states.new_zeros(batch, heads, self.max_slots, value_states.shape[-1])
        self.valid = torch.zeros(batch, self.max_slots, dtype=torch.bool, device=key_states.device)
        self.used, self.image_tokens, self.text_tokens, self.run_text, self.tail_markers = (
            torch.zeros(batch, dtype=torch.long, device=key_states.device) for _ in range(5)
        )
        if not is_torchdynamo_compiling():  # fixed addresses: no recompiles, and CUDA graphs can replay the step
            for tensor in self._state():
                torch._dynamo.mark_static_address(tensor)
        super().lazy_initialization(key_states, value_states)

    def _state(self) -> tuple[torch.Tensor, ...]:
        return (
            self.keys,
            self.values,
            self.valid,
            self.used,
            self.image_tokens,
            self.text_tokens,
            self.run_text,
            self.tail_markers,
        )

    def _write(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        valid: torch.Tensor,
        image_tokens: torch.Tensor,
        text_tokens: torch.Tensor,
        run_text: torch.Tensor,
        tail_markers: torch.Tensor,
        compact: bool = True,
    ) -> None:
        """Copy each sample's window, front-aligned, into the preallocated slots."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        key_states, value_states, valid = front_aligned(key_states, value_states, valid)
        largest_image, slots = int(image_tokens.max()), key_states.shape[2]
        if largest_image > self.max_image_tokens:
            raise ValueError(
                f"The images of a CASA window ({largest_image} tokens: one image, or a run of consecutive images) do "
                f"not fit this static CASA cache (max_image_tokens={self.max_image_tokens}): build the cache with a "
                "larger max_image_tokens, or use the dynamic cache"
            )
        if slots > self.max_slots:
            raise ValueError(
                f"A CASA window of {slots} slots (its image and the text since it) does not fit this static cache "
                f"(max_image_tokens + max_text_since_image = {self.max_slots}): build the cache with a larger "
                "max_text_since_image, or use the dynamic cache"
            )
        self.longest_window, self.image_width = slots, largest_image
        self.all_started = bool((text_tokens > 0).all())
        self.keys[:, :, :slots].copy_(key_states)
        self.values[:, :, :slots].copy_(value_states)
        self.valid.zero_()
        self.valid[:, :slots].copy_(valid)
        self.used.copy_(valid.sum(1))
        self.image_tokens.copy_(image_tokens)
        self.text_tokens.copy_(text_tokens)
        self.run_text.copy_(run_text)
        self.tail_markers.copy_(tail_markers)
        self.may_run_on = _runs_open(image_tokens, text_tokens, run_text, tail_markers).any().item()

    def append_text(self, key_states: torch.Tensor, value_states: torch.Tensor, attends_text: bool) -> StoredWindows:
        """The decode step, in place: each sample's text K/V go to its next free slots (`used` onwards)."""
        new = key_states.shape[-2]
        first_new_slot = self.used.clone()
        if attends_text:
            if not is_torchdynamo_compiling():  # compiled steps trust the sizes generate() chose
                if self.longest_window + new > self.max_slots:
                    raise ValueError(
                        f"The text since the latest image no longer fits this static CASA cache (max_image_tokens + "
                        f"max_text_since_image = {self.max_slots} slots): build it with a larger max_text_since_image"
                    )
                self.longest_window += new
            slots = first_new_slot[:, None] + torch.arange(new, device=self.used.device)
            index = slots[:, None, :, None].expand(-1, self.keys.shape[1], -1, self.keys.shape[-1])
            self.keys.scatter_(2, index, key_states)
            self.values.scatter_(2, index, value_states)
            self.valid.scatter_(1, slots, True)
            self.used.add_(new)
        self.text_tokens.add_(new)
        return self._stored(first_new_slot)

    def shift_positions(self, shift: Callable[[torch.Tensor, int], torch.Tensor], delta: int) -> None:
        if self.is_initialized:
            self.keys.copy_(shift(self.keys, delta))

    def select(self, rows: torch.Tensor) -> None:
        """Beam search reorders samples in place; a static cache cannot change its batch size."""
        if not self.is_initialized:
            return
        if rows.numel() != self.keys.shape[0]:
            raise ValueError(
                f"A static CASA cache keeps the batch size it was allocated for ({self.keys.shape[0]}), "
                f"{rows.numel()} rows were asked for"
            )
        for tensor in self._state():
            tensor.copy_(tensor.index_select(0, rows.to(tensor.device)))

    def _set_tail_markers(self, tail_markers: torch.Tensor) -> None:
        self.tail_markers.copy_(tail_markers)

    def reset(self) -> None:
        self.longest_window, self.all_started, self.may_run_on = 0, False, False
        if self.is_initialized:
            for tensor in self._state():
                tensor.zero_()

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last `-tokens_to_remove` text tokens of every window: their slots become free again."""
        self.check_crop(tokens_to_remove)
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        remove = -tokens_to_remove
        holds_text = (self.used > self.image_tokens).long()  # CASA windows hold their text, cross-attention's not
        self.used.sub_(remove * holds_text)
        self.text_tokens.sub_(remove)
        self.tail_markers.copy_(torch.minimum(self.tail_markers, self.text_tokens - self.run_text))
        self.valid.copy_(torch.arange(self.max_slots, device=self.used.device)[None] < self.used[:, None])
        self.longest_window = int(self.used.max())


class CasaLayerMixin:
    """A decoder block's cache layer in a CASA model: Transformers' layer for the block's self-attention (its text
    K/V, `keys` / `values`) and, in a block with a CASA sub-layer, that sub-layer's `window`. Beam reorder, crop,
    batch repeat and select, and reset apply to both, so code that walks `cache.layers` block by block moves the
    whole state of each block."""

    window: CasaWindow | None

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.window = None

    def reset(self) -> None:
        super().reset()
        if self.window is not None:
            self.window.reset()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.window is not None:
            self.window.select(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.window is not None:
            self.window.repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.window is not None:
            self.window.select(torch.as_tensor(indices).reshape(-1))

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if self.window is not None:
            self.window.crop(tokens_to_remove)

    def nbytes(self) -> int:
        """Memory of the block's text K/V and of its CASA window."""
        return kv_nbytes(self) + (self.window.nbytes() if self.window is not None else 0)


class CasaDynamicLayer(CasaLayerMixin, DynamicLayer):
    """A `DynamicLayer` (the block's text K/V, growing with the conversation) with its block's CASA window."""

    def evict_text(
        self, sink_tokens: int, excess: int, shift: Callable[[torch.Tensor, int], torch.Tensor], shift_window: bool
    ) -> None:
        """Drop the `excess` text tokens after the first `sink_tokens`: the later keys, and the window's when they
        carry RoPE (`shift_window`), move back by `excess` positions (`shift` rotates RoPE'd keys), so that positions
        stay contiguous."""
        recent = slice(sink_tokens + excess, None)
        self.keys = torch.cat([self.keys[..., :sink_tokens, :], shift(self.keys[..., recent, :], -excess)], dim=-2)
        self.values = torch.cat([self.values[..., :sink_tokens, :], self.values[..., recent, :]], dim=-2)
        if self.window is not None and shift_window:
            self.window.shift_positions(shift, -excess)


class CasaWindowLayer(CasaLayerMixin, DummyLayer):
    """The layer of a block whose self-attention CASA replaces (`casa_placement="replace"`): its window and no text
    K/V. To Transformers' cache it is a `DummyLayer`, as a layer storing no K/V is, so masks and lengths are read
    from the blocks that keep their self-attention."""

    def evict_text(
        self, sink_tokens: int, excess: int, shift: Callable[[torch.Tensor, int], torch.Tensor], shift_window: bool
    ) -> None:
        """No text to drop; the window's keys move back as the other blocks' do."""
        if self.window is not None and shift_window:
            self.window.shift_positions(shift, -excess)


class CasaDynamicSlidingWindowLayer(CasaLayerMixin, DynamicSlidingWindowLayer):
    """A `DynamicSlidingWindowLayer` (a sliding self-attention block's text K/V) with its block's CASA window."""


class CasaStaticLayer(CasaLayerMixin, StaticLayer):
    """A `StaticLayer` (the block's text K/V, preallocated) with its block's CASA window, a `CasaStaticWindow`."""


class CasaStaticSlidingWindowLayer(CasaLayerMixin, StaticSlidingWindowLayer):
    """A `StaticSlidingWindowLayer` with its block's CASA window, a `CasaStaticWindow`."""


# The layer class of a block, by its attention type (as Transformers' DYNAMIC / STATIC_LAYER_TYPE_MAPPING)
DYNAMIC_LAYER_CLASSES = {
    "full_attention": CasaDynamicLayer,
    "sliding_attention": CasaDynamicSlidingWindowLayer,
    "chunked_attention": CasaDynamicSlidingWindowLayer,
}
STATIC_LAYER_CLASSES = {
    "full_attention": CasaStaticLayer,
    "sliding_attention": CasaStaticSlidingWindowLayer,
    "chunked_attention": CasaStaticSlidingWindowLayer,
}


def _layers_by_type(
    config: PreTrainedConfig, classes: dict[str, type[CasaLayerMixin]], **kwargs
) -> list[CasaLayerMixin]:
    """One layer per decoder block of `config`, of the class `classes` gives its attention type (`kwargs` to each),
    as Transformers' `DynamicCache` / `StaticCache` build theirs."""
    layer_types, per_layer_kwargs = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    return [classes[kind](**kwargs, **extra) for kind, extra in zip(layer_types, per_layer_kwargs, strict=True)]


class CasaWindowCache:
    """What `CasaCache` and `CasaStaticCache` add to Transformers' caches: one layer per decoder block
    (`layers[i]` for block i, as in any decoder's cache), whose `window` is the CASA window of a CASA block."""

    layers: list[CasaLayerMixin]

    def _block_layers(self, config: PreTrainedConfig) -> list[CasaLayerMixin]:
        raise NotImplementedError

    def _new_window(self) -> CasaWindow:
        raise NotImplementedError

    def add_casa_windows(
        self, config: PreTrainedConfig, casa_blocks: list[int], replaced_blocks: list[int] | tuple = ()
    ) -> None:
        """Give each CASA block's layer its window (once), after building the layers of a cache built without a
        config; blocks whose self-attention CASA replaces get a window-only layer. A cache that holds windows for
        other blocks is refused."""
        if not self.layers:
            self.layers = self._block_layers(config)
        held = [block for block, layer in enumerate(self.layers) if layer.window is not None]
        if held:
            if held != list(casa_blocks):
                raise ValueError(
                    f"This {type(self).__name__} holds CASA windows for blocks {held}, the model has CASA layers in "
                    f"blocks {list(casa_blocks)}"
                )
            return
        for block in replaced_blocks:
            self.layers[block] = CasaWindowLayer()
        for block in casa_blocks:
            self.layers[block].window = self._new_window()

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """As `Cache.get_seq_length`; asked of a replaced block (no text K/V), the first block with text answers."""
        if layer_idx < len(self.layers) and isinstance(self.layers[layer_idx], CasaWindowLayer):
            layer_idx = next(i for i, layer in enumerate(self.layers) if not isinstance(layer, CasaWindowLayer))
        return super().get_seq_length(layer_idx)

    def _first_window(self) -> CasaWindow | None:
        return next((layer.window for layer in self.layers if layer.window is not None), None)

    def crop(self, tokens_to_remove: int) -> None:
        """Crop every layer or none: the CASA windows, which cannot lose an image, are checked first."""
        for layer in self.layers:
            if layer.window is not None:
                layer.window.check_crop(tokens_to_remove)
        super().crop(tokens_to_remove)

    def has_windows(self) -> bool:
        """Whether a forward has gone through this cache (its CASA windows are stored): later chunks continue them."""
        window = self._first_window()
        return window is not None and window.is_initialized

    def padding_is_over(self) -> bool:
        """Whether every sample has had a real token (counted on the host when windows were stored). Left padding
        comes before a sample's first real token: until then a one-token chunk may be padding (chunked prefill),
        afterwards it never is, and decode steps need not read their mask back."""
        return self.has_windows() and self._first_window().all_started

    def check_batch_size(self, batch_size: int) -> None:
        """A cache continues the conversations it holds, one per sample: the batch must match them."""
        if self.has_windows():
            held = self._first_window().keys.shape[0]
            if held != batch_size:
                raise ValueError(
                    f"This {type(self).__name__} holds {held} conversation(s) but the input has a batch of "
                    f"{batch_size}: pass a new cache (or none) to start other conversations"
                )

    def open_runs(self) -> list[bool]:
        """Per sample, whether the CASA windows end with a run of images followed by marker tokens only, which a
        chunk's first image (after markers only) then joins (`CasaConfig.casa_window_images="consecutive"`)."""
        window = self._first_window()
        return window.open_runs() if window is not None and window.is_initialized else []

    def note_markers(self, markers: torch.Tensor | None) -> None:
        """A decode step's marker tokens (`[batch, new tokens]`), before its text enters the windows."""
        for layer in self.layers:
            if layer.window is not None:
                layer.window.note_markers(markers)

    def get_casa_state(self, layer_idx: int) -> CasaWindow:
        """The CASA window of block `layer_idx`."""
        return self.layers[layer_idx].window

    def casa_state_lengths(self, layer_idx: int) -> torch.Tensor:
        """Used slots per sample of one CASA block's window (image tokens + text since that image)."""
        return self.get_casa_state(layer_idx).lengths()


class CasaStaticCache(CasaWindowCache, StaticCache):
    """Transformers' `StaticCache` with a `CasaStaticWindow` in each CASA block's layer: what
    `generate(..., cache_implementation="static")` uses, and what compiled decode steps need.

    `max_image_tokens` bounds the images a window holds (tokens after the merger), `max_text_since_image` the text
    since the latest image (default: `max_cache_len`, which no window can exceed).
    """

    def __init__(
        self,
        config: PreTrainedConfig,
        max_cache_len: int,
        max_image_tokens: int,
        max_text_since_image: int | None = None,
        offloading: bool = False,
        offload_only_non_sliding: bool = True,
    ):
        self.max_cache_len = max_cache_len
        self.max_image_tokens = max_image_tokens
        self.max_text_since_image = max_text_since_image or max_cache_len
        # `StaticCache.__init__` would build Transformers' own layer classes
        Cache.__init__(
            self, self._block_layers(config), offloading=offloading, offload_only_non_sliding=offload_only_non_sliding
        )
        self.add_casa_windows(config, config.casa_layer_indices, config.casa_replaced_blocks)

    def _block_layers(self, config: PreTrainedConfig) -> list[CasaLayerMixin]:
        return _layers_by_type(config, STATIC_LAYER_CLASSES, max_cache_len=self.max_cache_len)

    def _new_window(self) -> CasaStaticWindow:
        return CasaStaticWindow(self.max_image_tokens, self.max_text_since_image)


class CasaCache(CasaWindowCache, DynamicCache):
    """A `DynamicCache` whose layers hold each block's text K/V only, with a `CasaWindow` in each CASA block's layer.

    It is what `generate()` and a passed-back `cache` carry between calls: the text keeps growing as in any LLM,
    while each CASA window stays bounded by one image plus the text since that image. Built without a config (or
    from a text config), it takes its layout from the model on the first forward.
    """

    def __init__(
        self, config: PreTrainedConfig | None = None, offloading: bool = False, offload_only_non_sliding: bool = False
    ):
        # `DynamicCache.__init__` would build Transformers' own layer classes
        layers = self._block_layers(config) if config is not None else []
        Cache.__init__(self, layers, offloading=offloading, offload_only_non_sliding=offload_only_non_sliding)
        if getattr(config, "casa_layer_indices", None) is not None:
            self.add_casa_windows(config, config.casa_layer_indices, config.casa_replaced_blocks)

    def _block_layers(self, config: PreTrainedConfig) -> list[CasaLayerMixin]:
        return _layers_by_type(config, DYNAMIC_LAYER_CLASSES)

    def _new_window(self) -> CasaWindow:
        return CasaWindow()

    def evict_text(
        self,
        sink_tokens: int,
        window_tokens: int,
        shift: Callable[[torch.Tensor, int], torch.Tensor],
        shift_windows: bool = True,
    ) -> int:
        """Keep the first `sink_tokens` and the last `window_tokens` text tokens of every block; drop the middle.

        Kept recent keys and every CASA window move back by the number of dropped tokens (`shift` rotates RoPE'd
        keys), so positions stay contiguous and the next token's position is the cache length again. Windows of
        CASA layers without RoPE (`shift_windows=False`: plain cross-attention's image keys) have no position to
        move. Returns the number of dropped tokens.
        """
        excess = self.get_seq_length() - sink_tokens - window_tokens
        if excess <= 0:
            return 0
        if any(self.is_sliding):
            raise ValueError("A text budget cannot be applied to sliding-window cache layers")
        for layer in self.layers:
            layer.evict_text(sink_tokens, excess, shift, shift_windows)
        return excess


__all__ = [
    "CasaCache",
    "CasaDynamicLayer",
    "CasaDynamicSlidingWindowLayer",
    "CasaLayerMixin",
    "CasaStaticCache",
    "CasaStaticLayer",
    "CasaStaticSlidingWindowLayer",
    "CasaStaticWindow",
    "CasaWindow",
    "CasaWindowCache",
    "CasaWindowLayer",
    "StoredWindows",
]
