"""CASA attention: text queries attend, per window, to the window's image tokens and causally to its text.

A chunk of text is cut into windows at image placeholders. Window 0 continues whatever window the cache holds
(or starts empty); every other window starts at a placeholder and sees its image, or with
`casa_window_images="consecutive"` the run of images whose placeholders follow one another with only vision start /
end tokens between (all of them, from the run's first placeholder on); in packed training rows a window also
starts, empty, where a new conversation begins. Windows are gathered into a
`[num_windows, slots]` layout whose keys are `[prefix (cached window or image) | the window's own text]`, so the
cost grows with the sum of window sizes, never with text length x all image tokens. That layout is then run through
Transformers' attention interface: the window pattern is a mask function that Transformers' mask interface turns into
each backend's format (dense for eager/sdpa, a `BlockMask` for flex_attention); flash-attention (varlen) kernels
instead get the windows packed with `cu_seqlens` (bottom-right causal alignment is exactly the CASA pattern when the
text keys come last).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import accumulate, pairwise
from typing import Any

import torch
from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils.generic import is_flash_attention_requested

from .backbones import BACKBONES
from .casa_cache import CasaWindow, StoredWindows, pad_slots

_FLEX_BLOCK_SIZE = 128  # torch's default BlockMask block size


@dataclass
class CasaWindows:
    """Window layout of one forward chunk, shared by every CASA layer.

    A window's prefix is a run of images: one image, or (`CasaConfig.casa_window_images="consecutive"`) several
    images separated only by marker tokens (vision start / end), concatenated in order. Runs are numbered in reading
    order; `image_token_index` gathers each run's tokens from the flat image features.
    """

    batch_size: int
    seq_len: int
    image_mask: torch.Tensor  # [B, T] image placeholders of the chunk
    chunk_token_valid: torch.Tensor  # [B, T] non-padding tokens of the chunk
    # [B, T] tokens that may stand between the images of one window; None: every image opens its window ("each")
    marker_mask: torch.Tensor | None
    query_index: torch.Tensor  # [G, Q] flat `b * seq_len + t` of each window slot (clamped where unused)
    query_valid: torch.Tensor  # [G, Q] slot holds a token of the window
    token_valid: torch.Tensor  # [G, Q] slot holds a non-padding token (a usable key)
    # [G] bank row: `b` continues sample b's cached window, `B + r` is run r, `B + num_runs` is empty (the start
    # of a packed conversation)
    prefix_source: torch.Tensor
    last_window: torch.Tensor  # [B] window holding each sample's last token (becomes its side state)
    image_token_index: torch.Tensor  # [num_runs, max_run_tokens] rows into the flat image features
    image_token_valid: torch.Tensor  # [num_runs, max_run_tokens]
    image_sizes: list[int]  # tokens per image
    run_sizes: list[int]  # tokens per run of images (a window's images)
    lengths: list[int]  # tokens per window
    sources: list[int]  # `prefix_source` as a list
    has_new_images: bool
    # each sample's last window, for the cache: whether it goes on from the cached window, and its tail (the valid
    # tokens after its last image placeholder in this chunk, all of its tokens in the chunk without one):
    # `tail_restart` (a placeholder in the chunk, or a fresh window), `tail_tokens`, `tail_markers` (the tail's
    # leading marker tokens)
    last_continues: torch.Tensor  # [B] bool
    tail_restart: torch.Tensor  # [B] bool
    tail_tokens: torch.Tensor  # [B] long
    tail_markers: torch.Tensor  # [B] long


def build_casa_windows(
    image_mask: torch.Tensor,
    token_valid: torch.Tensor,
    image_sizes: list[int],
    segment_starts: torch.Tensor | None = None,
    marker_mask: torch.Tensor | None = None,
    consecutive: bool = False,
    open_runs: list[bool] | None = None,
) -> CasaWindows:
    """Cut a chunk into CASA windows. `image_mask` marks placeholders, images are numbered in reading order.

    `segment_starts` marks where a packed conversation begins: a window starts there with nothing before it (no
    image, no cached window), so no CASA attention crosses conversations. With `consecutive`, an image whose
    placeholder follows the previous one with only `marker_mask` tokens (or padding) between joins its window,
    whose text, from its first image on, attends to all of its images. `open_runs` says, per sample, whether the
    cached window ends with images followed by markers only: an image of the chunk that would join them is refused
    (`ValueError`), since the cached tokens after those images would have attended to it too.
    """
    batch_size, seq_len = image_mask.shape
    device = image_mask.device
    # per sample, the placeholders and packed-conversation starts (the only places a window can start), and running
    # counts of valid tokens and of valid tokens that are not markers: what lies between two places, or after the
    # last one, is read from those counts rather than token by token
    events: list[dict[int, bool]] = [{} for _ in range(batch_size)]  # position: whether a conversation starts there
    for b, t in image_mask.nonzero().tolist():
        events[b][t] = False
    if segment_starts is not None:
        for b, t in segment_starts.nonzero().tolist():
            if t > 0:
                events[b][t] = True
    not_marker = token_valid if marker_mask is None else token_valid & ~marker_mask
    valid_count = token_valid.long().cumsum(1).tolist()
    other_count = not_marker.long().cumsum(1).tolist()
    open_rows = open_runs if open_runs is not None and consecutive else [False] * batch_size

    def tail_from(b: int, start: int) -> tuple[int, int]:
        """Valid tokens of sample b from `start` to the chunk's end, and how many of them lead as markers."""
        valid, other = valid_count[b], other_count[b]
        base_valid, base_other = (valid[start - 1], other[start - 1]) if start > 0 else (0, 0)
        tail = valid[-1] - base_valid
        first_other = bisect.bisect_right(other, base_other)  # the first valid token from `start` that is no marker
        if first_other >= seq_len:
            return tail, tail
        return tail, (valid[first_other - 1] - base_valid) if first_other > 0 else 0

    # windows as [sample, start, end, kind, run]: kind "cached" continues the cached window, "run" opens on run
    # `run`, "empty" starts a packed conversation
    spans: list[list] = []
    runs: list[list[int]] = []
    last_window, last_continues, tail_restart, tail_tokens, tail_markers = [], [], [], [], []
    next_image = 0
    for b in range(batch_size):
        sample_events = sorted(events[b].items())
        other = other_count[b]
        first = len(spans)
        if not sample_events or sample_events[0][0] > 0:
            spans.append([b, 0, 0, "cached", None])
        last_image = None  # the current window's last placeholder
        for t, new_segment in sample_events:
            if new_segment:  # a packed conversation starts: a window of its own, with or without an image
                last_image = None
                if not image_mask[b, t]:
                    spans.append([b, t, 0, "empty", None])
                    continue
                joins = False
            elif last_image is not None:
                joins = consecutive and other[t - 1] - other[last_image] == 0
            else:  # the chunk's first window: the cached one, whose images may be followed by markers only
                in_cached = len(spans) == first or spans[-1][3] == "cached"  # (an image at 0: before any span)
                joins = in_cached and open_rows[b] and (t == 0 or other[t - 1] == 0)
                if joins:
                    raise ValueError(
                        f"Sample {b}: this chunk's image at position {t} follows the cached window's images with only "
                        "vision start / end tokens between, so it shares their CASA window (casa_window_images="
                        "'consecutive'), which would change what the cached tokens after those images computed. Feed "
                        "the images of one window, and the markers between them, in one chunk"
                    )
            if joins:
                runs[spans[-1][4]].append(next_image)
            else:
                spans.append([b, t, 0, "run", len(runs)])
                runs.append([next_image])
            next_image += 1
            last_image = t
        spans[-1][2] = seq_len
        for previous, following in pairwise(spans[first:]):
            previous[2] = following[1]
        last = spans[-1]
        tail, markers = tail_from(b, last_image + 1 if last_image is not None else last[1])
        last_window.append(len(spans) - 1)
        last_continues.append(last[3] == "cached")
        tail_restart.append(last[3] != "cached")
        tail_tokens.append(tail)
        tail_markers.append(markers)

    num_runs = len(runs)
    sources = [
        b if kind == "cached" else batch_size + (run if kind == "run" else num_runs) for b, _, _, kind, run in spans
    ]

    max_len = max(end - start for _, start, end, _, _ in spans)
    slot = torch.arange(max_len, device=device)
    sample = torch.tensor([s[0] for s in spans], device=device)
    start = torch.tensor([s[1] for s in spans], device=device)
    length = torch.tensor([s[2] - s[1] for s in spans], device=device)
    query_valid = slot[None, :] < length[:, None]
    position = (start[:, None] + slot[None, :]).clamp(max=seq_len - 1)
    query_index = sample[:, None] * seq_len + position
    flat_valid = token_valid.reshape(-1)[query_index] & query_valid

    # each run's tokens: its images' rows of the flat features, back to back (a run's images are numbered in a row)
    offsets = [0, *accumulate(image_sizes)]
    run_sizes = [sum(image_sizes[i] for i in run) for run in runs]
    run_rows = [list(range(offsets[run[0]], offsets[run[-1] + 1])) for run in runs]
    max_run = max(run_sizes, default=0)
    image_token_index = torch.tensor(
        [rows + [0] * (max_run - len(rows)) for rows in run_rows], dtype=torch.long, device=device
    )
    image_token_index = image_token_index.reshape(num_runs, max_run)
    sizes = torch.tensor(run_sizes, device=device, dtype=torch.long)
    image_token_valid = torch.arange(max_run, device=device)[None, :] < sizes[:, None]

    return CasaWindows(
        batch_size=batch_size,
        seq_len=seq_len,
        image_mask=image_mask,
        chunk_token_valid=token_valid,
        marker_mask=marker_mask if consecutive else None,
        query_index=query_index,
        query_valid=query_valid,
        token_valid=flat_valid,
        prefix_source=torch.tensor(sources, device=device),
        last_window=torch.tensor(last_window, device=device),
        image_token_index=image_token_index,
        image_token_valid=image_token_valid,
        image_sizes=list(image_sizes),
        run_sizes=run_sizes,
        lengths=[end - start for _, start, end, _, _ in spans],
        sources=sources,
        has_new_images=bool(image_sizes),
        last_continues=torch.tensor(last_continues, device=device),
        tail_restart=torch.tensor(tail_restart, device=device),
        tail_tokens=torch.tensor(tail_tokens, device=device),
        tail_markers=torch.tensor(tail_markers, device=device),
    )


@dataclass
class CasaInputs:
    """What every CASA layer of one forward needs besides the text hidden states and the image features."""

    windows: CasaWindows | None  # None for a decode step: every sample goes on in its cached window
    # RoPE at each image's insertion point; None without images or when CASA carries no RoPE
    image_position_embeddings: tuple[torch.Tensor, torch.Tensor] | None
    # a decode step's attention mask per backend, built by the first CASA layer: all layers' windows share one layout
    step_masks: dict[str, Any] = field(default_factory=dict)


@dataclass
class _PrefixBank:
    """Cached windows (rows `0..B-1`) and new runs of images (rows `B + r`) stacked, padded to a common width."""

    keys: torch.Tensor  # [B + num_runs + 1, kv_heads, width, head_dim]
    values: torch.Tensor
    valid: torch.Tensor  # [B + num_runs + 1, width]
    extents: list[int]  # slots in use at most, per row
    image_slots: torch.Tensor  # [B + num_runs + 1] leading slots that hold image tokens, per row


def _prefix_bank(
    windows: CasaWindows,
    past: StoredWindows | None,
    image_keys: torch.Tensor | None,
    image_values: torch.Tensor | None,
    like: torch.Tensor,
) -> _PrefixBank:
    batch, kv_heads, head_dim = windows.batch_size, like.shape[1], like.shape[-1]
    past_width = past.keys.shape[2] if past is not None else 0
    width = max(past_width, windows.image_token_valid.shape[1])
    if past is None:
        past_keys = like.new_zeros(batch, kv_heads, width, head_dim)
        past_values, past_valid = past_keys, torch.zeros(batch, width, dtype=torch.bool, device=like.device)
    else:
        past_keys, past_values = pad_slots(past.keys, width, 2), pad_slots(past.values, width, 2)
        past_valid = pad_slots(past.valid, width, 1)
    keys, values, valid = [past_keys], [past_values], [past_valid]
    if image_keys is not None:
        keys.append(pad_slots(image_keys, width, 2))
        values.append(pad_slots(image_values, width, 2))
        valid.append(pad_slots(windows.image_token_valid, width, 1))
    # the empty row: windows that open a packed conversation start with nothing
    keys.append(past_keys[:1].new_zeros(1, kv_heads, width, head_dim))
    values.append(keys[-1])
    valid.append(torch.zeros(1, width, dtype=torch.bool, device=like.device))
    extents = [past_width] * batch + windows.run_sizes + [0]
    past_images = past.image_tokens if past is not None else torch.zeros(batch, dtype=torch.long, device=like.device)
    new_images = torch.tensor([*windows.run_sizes, 0], dtype=torch.long, device=like.device)
    image_slots = torch.cat([past_images.to(like.device), new_images])
    return _PrefixBank(torch.cat(keys), torch.cat(values), torch.cat(valid), extents, image_slots)


def _window_groups(windows: CasaWindows, bank: _PrefixBank) -> list[list[int]]:
    """Group windows of similar size (within 2x), so padding each group to its longest window stays cheap.

    One long window (a system prompt, a long cached window) must not make every short video window pay its size.
    """
    sizes = [length + bank.extents[source] for length, source in zip(windows.lengths, windows.sources, strict=True)]
    groups: list[list[int]] = []
    base = 0
    for window in sorted(range(len(sizes)), key=sizes.__getitem__):
        if not groups or sizes[window] > 2 * base:
            groups.append([])
            base = max(sizes[window], 1)
        groups[-1].append(window)
    return groups


def _to_windows(states: torch.Tensor, query_index: torch.Tensor) -> torch.Tensor:
    """`[B, heads, T, D]` -> `[windows, heads, slots, D]` following the window slots."""
    batch, heads, seq_len, head_dim = states.shape
    flat = states.transpose(1, 2).reshape(batch * seq_len, heads, head_dim)
    return flat[query_index].transpose(1, 2)


def attention_implementation(module: nn.Module) -> str:
    """The attention backend a CASA layer runs on: its config's, or SDPA (Transformers' default) when none is set."""
    return module.config._attn_implementation or "sdpa"


def casa_window_mask_function(
    key_valid: torch.Tensor, prefix_width: int | torch.Tensor, attends_text: bool
) -> Callable:
    """The CASA window pattern over the window layout, as a Transformers mask function.

    `batch_idx` is a window, keys are `[prefix (image or cached window) | the window's text]` and `key_valid`
    (`[windows, keys]`) marks the usable ones. A query sees the valid prefix and, for CASA, the window's valid text
    up to itself; it always sees itself (or, without text, the first key), so that no softmax row is empty.
    `prefix_width` is where the text starts: one slot for all windows, or one per window (`[windows]`, a static
    cache's windows, each followed by its own free slots).
    """
    # flex_attention evaluates whole blocks of keys, past the last one: pad the table with unusable keys
    padding = -key_valid.shape[1] % _FLEX_BLOCK_SIZE
    padded = torch.nn.functional.pad(key_valid, (0, padding), value=False)
    if attends_text:
        per_window = isinstance(prefix_width, torch.Tensor)

        def window_mask(batch_idx, head_idx, q_idx, kv_idx):
            text_idx = kv_idx - (prefix_width[batch_idx] if per_window else prefix_width)
            return (padded[batch_idx, kv_idx] & (text_idx <= q_idx)) | (text_idx == q_idx)

        return window_mask
    no_keys = ~key_valid.any(-1)

    def image_mask(batch_idx, head_idx, q_idx, kv_idx):
        return padded[batch_idx, kv_idx] | (no_keys[batch_idx] & (kv_idx == 0))

    return image_mask


class CasaAttention(nn.Module):
    """CASA sub-layer of one decoder block, shaped like the block's self-attention (same q/k/v/o and GQA).

    With `shared=True` it owns no projections and reuses those of `self_attn` (the "-Shared" variant).
    `skip_text_only_windows`: windows without an image give no update (`CasaConfig.casa_text_only_windows`).
    `rotary`: queries and image keys carry the backbone's RoPE (`CasaConfig.casa_uses_rope`); the paper's plain
    cross-attention has no positional embeddings.
    """

    def __init__(
        self,
        config,
        self_attn: nn.Module,
        layer_idx: int,
        mode: str,
        shared: bool,
        skip_text_only_windows: bool = False,
        rotary: bool = True,
    ):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.mode = mode
        # CASA's text part: a window's queries attend, causally, to the window's text as well as to its image
        self.attends_text = mode == "casa"
        self.shared = shared
        self.rotary = rotary
        # Plain cross-attention has no keys in a window without an image: no update there either
        self.updates_image_windows_only = skip_text_only_windows or not self.attends_text
        self.head_dim = self_attn.head_dim
        self.num_key_value_groups = self_attn.num_key_value_groups
        self.scaling = self_attn.scaling
        self.attention_dropout = getattr(self_attn, "attention_dropout", 0.0)
        self.backbone = BACKBONES[config.model_type]
        if not shared:
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                source: nn.Linear = getattr(self_attn, name)
                setattr(self, name, nn.Linear(source.in_features, source.out_features, bias=source.bias is not None))

    def projections(self, self_attn: nn.Module) -> nn.Module:
        """The module holding the q/k/v/o projections: the block's self-attention in the "-Shared" variant."""
        return self_attn if self.shared else self

    def text_states(
        self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor], self_attn: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values of the chunk's text, `[B, heads, T, head_dim]`, rotated where the sub-layer has
        positions. A parallel block that computes them with its self-attention's passes them to `forward` instead."""
        proj = self.projections(self_attn)
        hidden_shape = (*hidden_states.shape[:2], -1, self.head_dim)
        query = proj.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key = proj.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = proj.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        if self.rotary:
            query, key = self.backbone.apply_rotary_pos_emb(query, key, *position_embeddings)
        return query, key, value

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        image_states: torch.Tensor | None,
        casa_inputs: CasaInputs,
        self_attn: nn.Module,
        cache_window: CasaWindow | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """CASA attention of a chunk's text (`text_states`); with a `cache_window`, windows continue from it and it
        gets the new ones. The image keys/values are projected here, once per image.

        Returns the attention output before the output projection, `[batch, seq_len, heads * head_dim]` (the block
        applies `o_proj`, together with self-attention's in a shared parallel block) and, when the backend gives
        attention weights (eager), each token's weights on the tokens of the image its window sees,
        `[batch, heads, seq_len, image_tokens]` (zeros without an image).
        """
        image_keys = image_values = None
        if image_states is not None:
            proj = self.projections(self_attn)
            image_shape = (1, image_states.shape[0], -1, self.head_dim)
            image_keys = proj.k_proj(image_states).view(image_shape).transpose(1, 2)
            image_values = proj.v_proj(image_states).view(image_shape).transpose(1, 2)
            if self.rotary:
                image_cos, image_sin = casa_inputs.image_position_embeddings
                _, image_keys = self.backbone.apply_rotary_pos_emb(image_keys, image_keys, image_cos, image_sin)
            index = casa_inputs.windows.image_token_index
            image_keys = image_keys[0][:, index].transpose(0, 1)  # [num_images, kv_heads, max_tokens, head_dim]
            image_values = image_values[0][:, index].transpose(0, 1)

        windows, step_masks = casa_inputs.windows, casa_inputs.step_masks
        attn_output, image_weights = casa_window_attention(
            self, query, key, value, image_keys, image_values, windows, cache_window, step_masks
        )
        return attn_output.reshape(*query.shape[:1], query.shape[2], -1), image_weights


def casa_window_attention(
    module: CasaAttention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    image_keys: torch.Tensor | None,
    image_values: torch.Tensor | None,
    windows: CasaWindows | None,
    cache_window: CasaWindow | None,
    step_masks: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """CASA attention of a chunk (`query`/`key`/`value` as `[B, heads, T, D]`, RoPE applied where the sub-layer has
    it), output `[B, T, heads, D]`, and the image weights when the backend returns weights. Windows that continue the
    cached ones read `cache_window`, which then stores each sample's last window; a decode step (no `windows`) keeps
    its mask in `step_masks` for the next CASA layers."""
    if windows is None:
        return _continue_cached_windows(module, query, key, value, cache_window, step_masks)
    implementation = attention_implementation(module)
    varlen = is_flash_attention_requested(requested_attention_implementation=implementation)
    dropout = module.attention_dropout if module.training else 0.0
    past = cache_window.read() if cache_window is not None else None
    bank = _prefix_bank(windows, past, image_keys, image_values, key)
    batch, heads, seq_len, head_dim = query.shape
    output = image_weights = None  # allocated in the kernel's dtype (bfloat16 under autocast, as self-attention)
    for group in _window_groups(windows, bank):
        rows = torch.tensor(group, device=query.device)
        num_queries = max(windows.lengths[g] for g in group)
        width = max(bank.extents[windows.sources[g]] for g in group)
        query_index = windows.query_index[rows, :num_queries]
        query_valid = windows.query_valid[rows, :num_queries]
        token_valid = windows.token_valid[rows, :num_queries]
        source = windows.prefix_source[rows]
        keys, values = bank.keys[source, :, :width], bank.values[source, :, :width]
        key_valid = bank.valid[source, :width]
        if module.attends_text:
            keys = torch.cat([keys, _to_windows(key, query_index)], dim=2)
            values = torch.cat([values, _to_windows(value, query_index)], dim=2)
            key_valid = torch.cat([key_valid, token_valid], dim=1)
        has_keys = key_valid.any(-1)  # only cross-attention windows before any image have none
        updated = has_keys & (bank.image_slots[source] > 0) if module.updates_image_windows_only else has_keys
        if not bool(updated.any()):
            continue
        queries = _to_windows(query, query_index)
        if varlen:
            group_output = _varlen_window_attention(
                module, implementation, queries, keys, values, token_valid & updated[:, None], key_valid, dropout
            )
        else:
            group_output, weights = _masked_attention(module, queries, keys, values, key_valid, width, dropout)
            if weights is not None:
                if image_weights is None:
                    image_weights = weights.new_zeros(batch * seq_len, heads, int(bank.image_slots.max()))
                per_token = _weights_on_images(weights, width, bank.image_slots[source], image_weights.shape[-1])
                image_weights[query_index[query_valid]] = per_token.transpose(1, 2)[query_valid]
        group_output = group_output * updated[:, None, None, None].to(group_output.dtype)
        if output is None:
            output = group_output.new_zeros(batch * seq_len, heads, head_dim)
        output[query_index[query_valid]] = group_output[query_valid]
    if output is None:  # no window is updated: text before any image (cross-attention, or skipped)
        output = query.new_zeros(batch * seq_len, heads, head_dim)
    if cache_window is not None:
        _store_last_windows(cache_window, windows, bank, key, value, module.attends_text)
    if image_weights is not None:
        image_weights = image_weights.view(batch, seq_len, heads, -1).transpose(1, 2)
    return output.view(batch, seq_len, heads, head_dim), image_weights


def _continue_cached_windows(
    module: CasaAttention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cache_window: CasaWindow,
    step_masks: dict[str, Any] | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The decode step: no image, no padding, every sample goes on in its cached window. Its queries attend to the
    stored window plus the new text directly, one row per sample, with no window bookkeeping."""
    stored = cache_window.append_text(key, value, module.attends_text)
    if stored.keys.shape[2] == 0:  # cross-attention before any image: no key to attend to, no update (flex fails)
        output = query.new_zeros(query.transpose(1, 2).shape)
        eager = attention_implementation(module) == "eager"  # the backend that returns weights
        return output, query.new_zeros(*query.shape[:3], 0) if eager else None
    # one query per sample over windows without unused slots sees every key: no mask to build
    key_valid = None if stored.all_valid and query.shape[2] == 1 else stored.valid
    output, weights = _masked_attention(
        module, query, stored.keys, stored.values, key_valid, stored.text_start, dropout=0.0, masks=step_masks
    )
    if module.updates_image_windows_only and not stored.all_see_images:  # a window before any image: no update
        output = output * (stored.image_tokens > 0)[:, None, None, None].to(output.dtype)
    image_weights = None
    if weights is not None:
        image_weights = _weights_on_images(weights, stored.keys.shape[2], stored.image_tokens, stored.image_width)
    return output, image_weights


def _masked_attention(
    module: CasaAttention,
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    key_valid: torch.Tensor | None,
    prefix_width: int | torch.Tensor,
    dropout: float,
    masks: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows of `[prefix | text]` keys through the model's attention backend, the CASA window pattern as its mask
    (none when `key_valid` is None: every query sees every key). A mask found in `masks` under the backend's name is
    used as it is; one built here is put there."""
    implementation = attention_implementation(module)
    attention_mask = None if masks is None else masks.get(implementation)
    if key_valid is not None and attention_mask is None:
        attention_mask = ALL_MASK_ATTENTION_FUNCTIONS[implementation](
            batch_size=queries.shape[0],
            q_length=queries.shape[2],
            kv_length=keys.shape[2],
            mask_function=casa_window_mask_function(key_valid, prefix_width, module.attends_text),
            allow_is_causal_skip=False,
            dtype=queries.dtype,
            device=queries.device,
        )
        if masks is not None:
            masks[implementation] = attention_mask
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, module.backbone.eager_attention_forward)
    return attention(
        module, queries, keys, values, attention_mask, dropout=dropout, scaling=module.scaling, is_causal=False
    )


def _weights_on_images(
    weights: torch.Tensor, prefix_width: int, image_slots: torch.Tensor, image_width: int
) -> torch.Tensor:
    """`[rows, heads, queries, image_width]` weights on each row's image, which fills its first `image_slots` prefix
    slots (zeros past them)."""
    slots = torch.arange(prefix_width, device=weights.device)
    on_image = weights[..., :prefix_width] * (slots[None, :] < image_slots[:, None])[:, None, None, :]
    return torch.nn.functional.pad(on_image, (0, max(image_width - prefix_width, 0)))[..., :image_width]


def _store_last_windows(
    cache_window: CasaWindow,
    windows: CasaWindows,
    bank: _PrefixBank,
    key: torch.Tensor,
    value: torch.Tensor,
    attends_text: bool,
) -> None:
    """Each sample's last window (its image, or the continued cached window, plus its text) goes to the cache."""
    last = windows.last_window
    source = windows.prefix_source[last]
    keys, values, valid = bank.keys[source], bank.values[source], bank.valid[source]
    if attends_text:
        query_index = windows.query_index[last]
        keys = torch.cat([keys, _to_windows(key, query_index)], dim=2)
        values = torch.cat([values, _to_windows(value, query_index)], dim=2)
        valid = torch.cat([valid, windows.token_valid[last]], dim=1)
    new_text = windows.token_valid[last].sum(1)
    tail = (windows.tail_restart, windows.tail_tokens, windows.tail_markers)
    cache_window.store(
        keys, values, valid, bank.image_slots[source], new_text, windows.last_continues, windows.has_new_images, tail
    )


def _varlen_window_attention(
    module: CasaAttention,
    implementation: str,
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    query_used: torch.Tensor,
    key_valid: torch.Tensor,
    dropout: float,
) -> torch.Tensor:
    """Pack the used slots of every window back to back and run a varlen kernel (flash_attention_2 and the like).

    Keys of a window are its valid prefix slots followed by its text, so causal attention with bottom-right
    alignment (flash-attn >= 2.1) lets query i see the prefix and text up to itself, which is the CASA window.
    """
    query_counts = query_used.sum(1)
    key_used = key_valid & (query_counts > 0)[:, None]
    key_counts = key_used.sum(1)
    packed_q = queries.transpose(1, 2)[query_used][None].transpose(1, 2)
    packed_k = keys.transpose(1, 2)[key_used][None].transpose(1, 2)
    packed_v = values.transpose(1, 2)[key_used][None].transpose(1, 2)
    zero = query_counts.new_zeros(1)
    cu_q = torch.cat([zero, query_counts.cumsum(0)]).to(torch.int32)
    cu_k = torch.cat([zero, key_counts.cumsum(0)]).to(torch.int32)
    packed_out, _ = ALL_ATTENTION_FUNCTIONS[implementation](
        module,
        packed_q,
        packed_k,
        packed_v,
        None,
        dropout=dropout,
        scaling=module.scaling,
        is_causal=module.attends_text,
        cu_seq_lens_q=cu_q,
        cu_seq_lens_k=cu_k,
        max_length_q=int(query_counts.max()),
        max_length_k=int(key_counts.max()),
    )
    output = packed_out.new_zeros(queries.transpose(1, 2).shape)
    output[query_used] = packed_out[0]
    return output


__all__ = ["CasaAttention", "CasaInputs", "CasaWindows", "build_casa_windows", "casa_window_attention"]
