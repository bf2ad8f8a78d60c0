"""A slow, obviously-correct CASA attention: explicit loops over samples, tokens and heads; the CASA sub-layer's
projections and positions as the paper writes them; and the decoder block written term by term for each
`casa_placement`.

The attention reads only the raw chunk (placeholder positions, padding) and the per-image keys, never the window
layout of the fast path, and it handles cache-free forwards only.
"""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import pad_sequence


def reference_casa_window_attention(
    module, query, key, value, image_keys, image_values, windows, cache_layer, step_masks=None
):
    """Token by token: a placeholder opens a window on its image, and under the "consecutive" rule
    (`windows.marker_mask` given) on the images whose placeholders follow it with only marker tokens (or padding)
    between; every text token from the window's first image on attends to all of its images and, in CASA, causally
    to the window's text."""
    past = cache_layer is not None and cache_layer.is_initialized
    assert not past, "the reference covers full forwards, from an empty cache or none"
    batch, heads, seq_len, head_dim = query.shape
    groups = heads // key.shape[1]
    output = torch.zeros(batch, seq_len, heads, head_dim, dtype=query.dtype, device=query.device)
    # each token's weights on the tokens of the images it sees (the first keys of its softmax, images in order)
    image_weights = torch.zeros(batch, heads, seq_len, sum(windows.image_sizes), dtype=query.dtype)
    widest = 0
    image = -1
    for b in range(batch):
        current, window_start = [], 0
        for t in range(seq_len):
            if windows.image_mask[b, t]:
                image += 1
                if image not in current:  # a new window: this image and those consecutive with it
                    current, window_start = [image], t
                    for s in range(t + 1, seq_len if windows.marker_mask is not None else t + 1):
                        if windows.image_mask[b, s]:
                            current.append(current[-1] + 1)
                        elif windows.chunk_token_valid[b, s] and not windows.marker_mask[b, s]:
                            break
            if not current and module.updates_image_windows_only:
                continue  # before any image: no update (cross-attention, or CASA skipping text-only windows)
            n = sum(windows.image_sizes[i] for i in current)
            widest = max(widest, n)
            for h in range(heads):
                keys, values = [], []
                for i in current:
                    keys.append(image_keys[i, h // groups, : windows.image_sizes[i]])
                    values.append(image_values[i, h // groups, : windows.image_sizes[i]])
                if module.mode == "casa":
                    for s in range(window_start, t + 1):
                        if windows.chunk_token_valid[b, s] or s == t:
                            keys.append(key[b, h // groups, s][None])
                            values.append(value[b, h // groups, s][None])
                k, v = torch.cat(keys), torch.cat(values)
                weights = torch.softmax((k @ query[b, h, t]) * module.scaling, dim=0)
                output[b, t, h] = weights @ v
                image_weights[b, h, t, :n] = weights[:n]
    return output, image_weights[..., :widest]


def reference_casa_attention(module, self_attn, hidden_states, image_states, position_embeddings, casa_inputs, cache):
    """The CASA sub-layer: q/k/v projections of the text, the backbone's RoPE on queries and text keys only where the
    sub-layer has positions (CASA; plain cross-attention has none, but for checkpoints that rotated, `module.rotary`),
    then `reference_casa_forward` and the output projection."""
    proj = module.projections(self_attn)
    query, key, value = (_heads(module, hidden_states, p) for p in (proj.q_proj, proj.k_proj, proj.v_proj))
    if module.mode == "casa" or module.rotary:
        query, key = module.backbone.apply_rotary_pos_emb(query, key, *position_embeddings)
    output, weights = reference_casa_forward(module, query, key, value, image_states, casa_inputs, self_attn, cache)
    return proj.o_proj(output), weights


def reference_casa_forward(module, query, key, value, image_states, casa_inputs, self_attn, cache_window=None):
    """`CasaAttention.forward` from the text's q/k/v: k/v projections of each image, RoPE on image keys where the
    sub-layer has positions, the loop attention; the output before `o_proj`, `[batch, seq_len, heads * head_dim]`."""
    proj = module.projections(self_attn)
    image_keys = image_values = None
    if image_states is not None:
        image_keys = _heads(module, image_states[None], proj.k_proj)
        image_values = _heads(module, image_states[None], proj.v_proj)
        if module.mode == "casa" or module.rotary:
            _, image_keys = module.backbone.apply_rotary_pos_emb(
                image_keys, image_keys, *casa_inputs.image_position_embeddings
            )
        # one row per image, `[num_images, kv_heads, its tokens (padded), head_dim]`
        per_image = [
            states[0].transpose(0, 1).split(casa_inputs.windows.image_sizes) for states in (image_keys, image_values)
        ]
        image_keys, image_values = (pad_sequence(list(rows), batch_first=True).transpose(1, 2) for rows in per_image)
    output, weights = reference_casa_window_attention(
        module, query, key, value, image_keys, image_values, casa_inputs.windows, cache_window
    )
    return output.reshape(*output.shape[:2], -1), weights


def _heads(module, states, projection):
    return projection(states).view(*states.shape[:-1], -1, module.head_dim).transpose(-3, -2)


def reference_decoder_block(layer, hidden_states, image_features=None, casa_inputs=None, **attention_kwargs):
    """`CasaDecoderLayer.forward` as the formulas write it: parallel (the paper's block) adds SA and CASA of the same
    block input h, each through its own norm (the shared variant: both through the block's norm, with the same
    projections); sequential feeds CASA the SA-updated stream; replace has CASA, on SA's projections and norm,
    instead of SA."""

    def sa(h):
        return layer.self_attn(hidden_states=layer.input_layernorm(h), **attention_kwargs)[0]

    def casa(h, norm):
        image = None if image_features is None else layer.casa_image_layernorm(image_features)
        cache = attention_kwargs.get("cache")
        state = cache.get_casa_state(layer.layer_idx) if cache is not None else None
        rope = attention_kwargs["position_embeddings"]
        return reference_casa_attention(layer.casa_attn, layer.self_attn, norm(h), image, rope, casa_inputs, state)[0]

    h = hidden_states
    if not layer.has_casa:
        h = h + sa(h)
    elif layer.casa_placement == "replace":
        h = h + casa(h, layer.input_layernorm)
    elif layer.casa_placement == "parallel":
        h = h + sa(h) + casa(h, layer.input_layernorm if layer.casa_attn.shared else layer.casa_input_layernorm)
    else:
        h = h + sa(h)
        h = h + casa(h, layer.casa_input_layernorm)
    return h + layer.mlp(layer.post_attention_layernorm(h))


def reference_mrope_image_positions(positions, insertion_points, image_sizes, image_grids):
    """`CasaPositions.image_positions` for `casa_image_positions="mrope"`, written as the paper and Qwen2.5-VL's
    `get_vision_position_ids` say: image i, placeholder at text position p, merged grid t x h x w, gives its tokens in
    raster order (frame, row, column) the positions (p + frame, p + row, p + column)."""
    merge = positions.spatial_merge_size
    ids = []
    for p, (frames, height, width), size in zip(
        insertion_points.tolist(), image_grids.tolist(), image_sizes, strict=True
    ):
        image = [
            (p + f, p + r, p + c) for f in range(frames) for r in range(height // merge) for c in range(width // merge)
        ]
        assert len(image) == size
        ids += image
    return torch.tensor(ids, device=insertion_points.device).T


def reference_mrope_position_embeddings(positions, inputs_embeds, position_ids, image_positions):
    """`CasaPositions.embeddings` with mRoPE image keys from Qwen2.5-VL's own rotary embedding (its
    `mrope_section` composition), the text from the backbone's."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRotaryEmbedding

    text = positions.rotary_emb(inputs_embeds, position_ids=position_ids)
    if image_positions is None:
        return text, None
    rotary = Qwen2_5_VLRotaryEmbedding(positions.text_config).to(inputs_embeds.device)
    return text, rotary(inputs_embeds, position_ids=image_positions[:, None])


def fast_and_reference_logits(monkeypatch, model, reference, inputs):
    """`model`'s logits, then those of `reference` (the same weights loaded into it) with the loop CASA attention and
    the block written term by term patched in."""
    import casa_hf.casa_attention as casa_attention
    from casa_hf.modeling_casa import CasaDecoderLayer

    reference.load_state_dict(model.state_dict())
    # torch 2.13's CPU flex template miscompiles once dynamo turns dynamic (C++ "cur_kvSplitSize5" error), which
    # happens as soon as the SA and CASA shapes differ; static recompiles avoid that torch bug.
    flex = model.config.get_text_config()._attn_implementation == "flex_attention"
    with torch.no_grad(), torch._dynamo.config.patch(automatic_dynamic_shapes=not flex):
        fast = model(**inputs).logits
    monkeypatch.setattr(casa_attention, "casa_window_attention", reference_casa_window_attention)
    monkeypatch.setattr(CasaDecoderLayer, "forward", reference_decoder_block)
    with torch.no_grad():
        slow = reference(**inputs).logits
    return fast, slow
