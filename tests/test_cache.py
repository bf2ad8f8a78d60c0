"""Cached and streamed computation against one full forward; the cache holds text only."""

import copy
import itertools
import os
import traceback

import pytest
import torch
from tiny import (
    IMAGE_TOKEN,
    PLACEMENTS,
    conversation,
    incremental_logits,
    random_images,
    random_text,
    tiny_config,
    tiny_model,
)
from transformers.cache_utils import Cache
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from casa_hf import CasaCache, CasaDynamicLayer, CasaStaticCache, CasaStaticLayer, CasaStaticWindow, CasaWindow
from casa_hf.casa_cache import CasaDynamicSlidingWindowLayer, CasaStaticSlidingWindowLayer

TOLERANCE = 1e-4


@pytest.mark.parametrize(
    "backbone,mode,shared",
    [
        ("qwen2", "casa", False),
        ("llama", "casa", False),
        ("helium", "casa", False),
        ("qwen2", "cross_attention", False),
        ("llama", "cross_attention", False),
        ("qwen2", "cross_attention_with_rope", False),
        ("llama", "casa", True),
    ],
)
@pytest.mark.parametrize("num_images", [0, 1, 4])
@pytest.mark.parametrize("placement", ["parallel", "sequential", "replace"])
def test_incremental_decoding_matches_full_forward(backbone, mode, shared, num_images, placement):
    """`cross_attention_with_rope`: the RoPE'd cross-attention of checkpoints saved before the config key existed.
    CASA replacing self-attention is always shared (its case with `shared=False` runs it too)."""
    attention, rope = mode.removesuffix("_with_rope"), mode.endswith("_with_rope")
    options = dict(casa_attention=attention, casa_cross_attention_rope=rope, casa_shared=shared)
    options.update(PLACEMENTS[placement])
    assert_decoding_matches_full_forward(tiny_model(backbone, attn="sdpa", **options), num_images)


def assert_decoding_matches_full_forward(model, num_images):
    """Token by token after a prefill, and in uneven chunks, through one `CasaCache`."""
    input_ids, pixel_values, grid_thw = conversation(num_images)
    with torch.no_grad():
        full = model(
            input_ids=input_ids,
            pixel_values=pixel_values if num_images else None,
            image_grid_thw=grid_thw if num_images else None,
        ).logits
        length = input_ids.shape[1]
        prefill = 6
        token_by_token, _ = incremental_logits(
            model, input_ids, pixel_values, grid_thw, [prefill] + [1] * (length - prefill)
        )
        uneven, _ = incremental_logits(model, input_ids, pixel_values, grid_thw, [3, 5, length - 8])
    assert (full - token_by_token).abs().max() <= TOLERANCE
    assert (full - uneven).abs().max() <= TOLERANCE


def test_cache_holds_text_and_one_image_per_sample():
    model = tiny_model(attn="sdpa")
    input_ids, pixel_values, grid_thw = conversation(12, seed=3)
    length = input_ids.shape[1]
    with torch.no_grad():
        _, cache = incremental_logits(model, input_ids, pixel_values, grid_thw, [10, 9, length - 19])
    assert cache.get_seq_length() == length  # text tokens (placeholders included), no image tokens
    last_image = max(t for t, token in enumerate(input_ids[0].tolist()) if token == IMAGE_TOKEN)
    latest_tokens = int(grid_thw[-1].prod()) // 4
    text_since = length - last_image
    for layer_idx in range(model.config.text_config.num_hidden_layers):
        state = cache.get_casa_state(layer_idx)
        assert state.keys.shape[2] == latest_tokens + text_since
        assert cache.casa_state_lengths(layer_idx).tolist() == [latest_tokens + text_since]
        assert state.image_tokens.tolist() == [latest_tokens]


def check_past_key_values_for_generate(cache, batch_size: int, cache_length: int, config) -> None:
    """What Transformers' generation tests check of every decoder's cache (`_check_past_key_values_for_generate`):
    one layer per decoder block, each holding its block's K/V as `[batch, kv_heads, cache_length, head_dim]`."""
    text_config = config.get_text_config(decoder=True)
    assert isinstance(cache, Cache)
    assert len(cache) == len(cache.layers) == text_config.num_hidden_layers
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    expected = (batch_size, text_config.num_key_value_heads, cache_length, head_dim)
    for layer in cache.layers:
        assert layer.keys.shape == layer.values.shape == expected


def check_caches_are_equal(cache1, cache2) -> None:
    """Transformers' `_check_caches_are_equal` (block by block, the layers' K/V), and each block's CASA window."""
    assert len(cache1) == len(cache2)
    for layer1, layer2 in zip(cache1.layers, cache2.layers, strict=True):
        torch.testing.assert_close(layer1.keys, layer2.keys, atol=TOLERANCE, rtol=0)
        torch.testing.assert_close(layer1.values, layer2.values, atol=TOLERANCE, rtol=0)
        assert (layer1.window is None) == (layer2.window is None)
        if layer1.window is not None:
            for name in ("keys", "values", "valid", "image_tokens", "text_tokens"):
                torch.testing.assert_close(
                    getattr(layer1.window, name), getattr(layer2.window, name), atol=TOLERANCE, rtol=0
                )


GREEDY_DICT = dict(do_sample=False, return_dict_in_generate=True)


@pytest.mark.parametrize("num_beams", [1, 2])
@pytest.mark.parametrize("cache_implementation", [None, "static"], ids=["dynamic", "static"])
def test_generate_returns_one_cache_layer_per_block(cache_implementation, num_beams):
    """`generate(..., return_dict_in_generate=True)` gives a cache of one layer per decoder block (Transformers' own
    check), the CASA window inside its block's layer: block 1's here, block 0 having no CASA sub-layer."""
    model = tiny_model(attn="sdpa", casa_layers=[1])
    input_ids, pixel_values, grid_thw = conversation(2)
    inputs = dict(input_ids=input_ids, pixel_values=pixel_values, image_grid_thw=grid_thw, num_beams=num_beams)
    out = model.generate(**inputs, max_new_tokens=3, cache_implementation=cache_implementation, **GREEDY_DICT)
    cache = out.past_key_values
    static = cache_implementation == "static"
    length = cache.get_max_length() if static else out.sequences.shape[1] - 1  # the last token is not fed back
    check_past_key_values_for_generate(cache, num_beams, length, model.config)
    assert [type(layer) for layer in cache.layers] == [CasaStaticLayer if static else CasaDynamicLayer] * 2
    assert cache.layers[0].window is None
    assert type(cache.get_casa_state(1)) is (CasaStaticWindow if static else CasaWindow)
    assert cache.get_casa_state(1).image_tokens.tolist() == [int(grid_thw[-1].prod()) // 4] * num_beams


def test_generated_cache_equals_the_cache_of_one_forward():
    """Decode steps leave each block's layer (text K/V and window) as one forward over the same tokens does."""
    model = tiny_model(attn="sdpa")
    input_ids, pixel_values, grid_thw = conversation(2)
    images = dict(pixel_values=pixel_values, image_grid_thw=grid_thw)
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, **images, max_new_tokens=4, **GREEDY_DICT)
        forward = model(input_ids=out.sequences[:, :-1], **images, cache=CasaCache(), use_cache=True).cache
    check_caches_are_equal(out.past_key_values, forward)


def test_batch_operations_move_each_blocks_text_and_window_together():
    """Batch repeat, beam reorder, batch select (contrastive search, on the Hub) and reset go through each block's
    layer to its window: after them, the conversation goes on as one forward computes it."""
    model = tiny_model(attn="sdpa")
    input_ids, pixel_values, grid_thw = conversation(2)
    images = dict(pixel_values=pixel_values, image_grid_thw=grid_thw)
    with torch.no_grad():
        full = model(input_ids=input_ids, **images).logits
        cache = model(input_ids=input_ids[:, :-1], **images, use_cache=True).cache
        cache.batch_repeat_interleave(3)
        assert all(layer.keys.shape[0] == layer.window.keys.shape[0] == 3 for layer in cache.layers)
        cache.reorder_cache(torch.tensor([2, 0, 1]))
        cache.batch_select_indices(torch.tensor([1]))
        step = model(input_ids=input_ids[:, -1:], cache=cache, use_cache=True).logits
        assert (step - full[:, -1:]).abs().max() <= TOLERANCE
    cache.reset()
    assert cache.get_seq_length() == 0 and not cache.has_windows()


def test_layers_follow_the_blocks_attention_types():
    """A backbone with sliding-window blocks gets Transformers' sliding layer classes, each with its window, whether
    the cache is built from the config or takes its layout from the model on the first forward."""
    text = tiny_config().text_config.to_dict()
    text.pop("layer_types")
    text.update(use_sliding_window=True, sliding_window=6, max_window_layers=1)
    model = tiny_model(attn="sdpa", text_config=text)
    dynamic = [CasaDynamicLayer, CasaDynamicSlidingWindowLayer]
    assert [type(layer) for layer in CasaCache(config=model.config).layers] == dynamic
    static = CasaStaticCache(model.config, max_cache_len=16, max_image_tokens=4)
    assert [type(layer) for layer in static.layers] == [CasaStaticLayer, CasaStaticSlidingWindowLayer]
    assert all(isinstance(layer.window, CasaStaticWindow) for layer in static.layers)
    for cache in (CasaCache(), CasaCache(config=model.config.text_config)):
        with torch.no_grad():
            model(input_ids=torch.tensor([random_text(4)]), cache=cache, use_cache=True)
        assert [type(layer) for layer in cache.layers] == dynamic
        assert all(type(layer.window) is CasaWindow for layer in cache.layers)


def test_decode_steps_write_the_window_in_place_and_stay_differentiable():
    """A decode step writes its text K/V into free slots after the stored window (no copy of the window per step);
    with gradients it concatenates instead, so that a backward pass through several steps still works."""
    model = tiny_model(attn="sdpa")
    input_ids, pixel_values, grid_thw = conversation(2, seed=1)
    prefill = int((input_ids[0] == IMAGE_TOKEN).nonzero().max()) + 1
    steps = input_ids.shape[1] - prefill
    with torch.no_grad():
        _, cache = incremental_logits(model, input_ids[:, :prefill], pixel_values, grid_thw, [prefill])
        storages = []
        for t in range(prefill, input_ids.shape[1]):
            cache = model(input_ids=input_ids[:, t : t + 1], cache=cache, use_cache=True).cache
            storages.append(cache.get_casa_state(0).keys.untyped_storage().data_ptr())
    assert steps >= 3 and len(set(storages[1:])) == 1  # the first step makes room, the next ones write in place
    chunks = [prefill] + [1] * steps
    with torch.no_grad():
        reference, _ = incremental_logits(model, input_ids, pixel_values, grid_thw, chunks)
    differentiable, _ = incremental_logits(model, input_ids, pixel_values, grid_thw, chunks)
    differentiable.square().sum().backward()
    assert (differentiable.detach() - reference).abs().max() <= TOLERANCE
    assert model.model.language_model.layers[0].casa_attn.k_proj.weight.grad.abs().sum() > 0


READ_BACKS = ("__bool__", "__int__", "__float__", "__index__", "item", "tolist")  # what copies a tensor to the host


def _recording_read_backs(name: str, calls: list[str]):
    """`torch.Tensor.<name>`, noting each call made under casa_hf's code, except in Transformers' SA mask functions
    (they read the padding back, as for any built-in model)."""
    original = getattr(torch.Tensor, name)

    def read_back(self, *args, **kwargs):
        files = [frame.filename for frame in traceback.extract_stack()[:-1]]
        ours = [file for file in files if os.sep + "casa_hf" + os.sep in file]
        if ours and not any(file.endswith(os.path.join("transformers", "masking_utils.py")) for file in files):
            calls.append(f"{name} under {os.path.basename(ours[-1])}")
        return original(self, *args, **kwargs)

    return read_back


def chunk_splits(length: int):
    """Every way to cut `length` tokens into consecutive chunks, as `(start, end)` pairs (2^(length - 1) ways)."""
    for count in range(length):
        for cuts in itertools.combinations(range(1, length), count):
            yield list(itertools.pairwise([0, *cuts, length]))


def left_padded_batch(seed: int, width: int, with_image: bool):
    """Three rows of random lengths, one of them a single token, left-padded to `width`, with their 2D mask; with an
    image, its placeholder at a random real token of a random row."""
    g = torch.Generator().manual_seed(seed)
    lengths = [1, *torch.randint(1, width + 1, (2,), generator=g).tolist()]
    lengths = [lengths[i] for i in torch.randperm(3, generator=g).tolist()]
    input_ids = torch.tensor(
        [[0] * (width - length) + random_text(length, seed + row) for row, length in enumerate(lengths)]
    )
    mask = (torch.arange(width)[None] >= width - torch.tensor(lengths)[:, None]).long()
    images = {}
    if with_image:
        row = int(torch.randint(3, (1,), generator=g))
        input_ids[row, width - 1 - int(torch.randint(lengths[row], (1,), generator=g))] = IMAGE_TOKEN
        images = dict(zip(("pixel_values", "image_grid_thw"), random_images([(4, 4)], seed), strict=True))
    return input_ids, mask, images


def chunked_prefill_logits(model, input_ids, mask, images, chunks, cache):
    """The batch fed chunk by chunk through `cache`, each chunk with the mask up to its end (as `generate()`'s
    chunked prefill passes it) and the image with the chunk that holds its placeholder."""
    logits = []
    for start, end in chunks:
        has_image = bool((input_ids[:, start:end] == IMAGE_TOKEN).any())
        out = model(
            input_ids=input_ids[:, start:end],
            attention_mask=mask[:, :end],
            cache=cache,
            use_cache=True,
            **(images if has_image else {}),
        )
        logits.append(out.logits)
    return torch.cat(logits, 1)


@pytest.mark.parametrize("with_image", [False, True], ids=["text", "image"])
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize(
    "placement,mode",
    [
        ("parallel", "casa"),
        ("sequential", "casa"),
        ("parallel", "cross_attention"),
        ("parallel_shared", "casa"),
        ("replace", "casa"),
        ("replace", "cross_attention"),
    ],
)
def test_chunked_prefill_of_left_padded_batches_matches_full_forward(static, with_image, placement, mode):
    """Random left-padded layouts (a row of one token among them) prefilled in every split into chunks give one full
    forward's logits at the rows' real tokens, within 1e-5 in float32: one-token chunks that are padding for a row
    that has had no real token yet must not enter its CASA window."""
    model, width = tiny_model(attn="sdpa", casa_attention=mode, **PLACEMENTS[placement]), 6
    worst = 0.0
    with torch.no_grad():
        for seed in range(3):
            input_ids, mask, images = left_padded_batch(seed, width, with_image)
            full = model(input_ids=input_ids, attention_mask=mask, **images).logits[mask.bool()]
            for chunks in chunk_splits(width):
                cache = CasaStaticCache(model.config, width, max_image_tokens=4) if static else CasaCache()
                chunked = chunked_prefill_logits(model, input_ids, mask, images, chunks, cache)[mask.bool()]
                worst = max(worst, float((chunked - full).abs().max()))
    assert worst <= 1e-5, f"chunked prefill is {worst:.3g} off the full forward"


@pytest.mark.parametrize("cache_implementation", [None, "static"], ids=["dynamic", "static"])
def test_generate_prefilling_a_left_padded_batch_in_chunks_matches_one_prefill(cache_implementation):
    """`generate(prefill_chunk_size=...)` on left-padded text (rows of 1, 2 and 6 tokens) gives the tokens and logits
    of a prefill in one forward: with a static cache too, whose prefill chunks keep their 2D mask for the windows."""
    model = tiny_model(attn="sdpa")
    input_ids, mask, _ = left_padded_batch(1, width=6, with_image=False)
    options = dict(input_ids=input_ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    options.update(return_dict_in_generate=True, output_logits=True)
    reference = model.generate(**options)
    for chunk_size in (1, 2, 4):
        chunked = model.generate(**options, cache_implementation=cache_implementation, prefill_chunk_size=chunk_size)
        assert chunked.sequences.tolist() == reference.sequences.tolist()
        assert (torch.stack(chunked.logits) - torch.stack(reference.logits)).abs().max() <= 1e-5


@pytest.mark.parametrize("prefill", [[(0, 6)], [(0, 1), (1, 2), (2, 6)]], ids=["one_forward", "chunks"])
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("mode", ["casa", "cross_attention"])
def test_decode_steps_read_nothing_back_from_the_device(mode, attn, static, prefill, monkeypatch):
    """A one-token step never reads a tensor back in casa_hf's code (on a GPU each read-back synchronises, at every
    generated token), with the dynamic or the static cache: a left-padded batch, one sample with an image and one
    before any image (no CASA update), its 2D mask given; the steps' logits equal one full forward's. Also after a
    chunked prefill whose one-token chunks are padding for the second sample (those chunks check their mask)."""
    model = tiny_model(attn=attn, casa_attention=mode, casa_text_only_windows="skip")
    rows = (random_text(2, seed=5) + [IMAGE_TOKEN] + random_text(3, seed=6), random_text(4, seed=4))
    width, steps = max(map(len, rows)), 3
    prompt = torch.tensor([[0] * (width - len(row)) + row for row in rows])
    new_tokens = torch.tensor([random_text(steps, seed=7), random_text(steps, seed=8)])
    mask = (prompt != 0).long()
    images = dict(zip(("pixel_values", "image_grid_thw"), random_images([(4, 4)]), strict=True))
    read_backs = []
    with torch.no_grad():
        full_mask = torch.cat([mask, torch.ones_like(new_tokens)], 1)
        full = model(input_ids=torch.cat([prompt, new_tokens], 1), attention_mask=full_mask, **images).logits
        cache = CasaStaticCache(model.config, max_cache_len=16, max_image_tokens=4) if static else CasaCache()
        chunked_prefill_logits(model, prompt, mask, images, prefill, cache)
        for name in READ_BACKS:
            monkeypatch.setattr(torch.Tensor, name, _recording_read_backs(name, read_backs))
        logits = []
        for step in range(steps):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
            step_ids = new_tokens[:, step : step + 1]
            positions = mask.sum(1, keepdim=True) - 1  # as generate() passes them (a static cache's length is data)
            step = model(input_ids=step_ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
            logits.append(step.logits)
        monkeypatch.undo()
    assert read_backs == []
    torch.testing.assert_close(torch.cat(logits, 1), full[:, width:], atol=TOLERANCE, rtol=0)


def test_passed_back_cache_on_plain_dynamic_cache_is_refused():
    from transformers import DynamicCache

    model = tiny_model()
    with pytest.raises(TypeError, match="CasaCache"):
        model(input_ids=torch.tensor([random_text(4)]), cache=DynamicCache(), use_cache=True)


def test_incremental_decoding_with_raster_image_positions():
    model = tiny_model(attn="sdpa", casa_image_positions="raster")
    input_ids, pixel_values, grid_thw = conversation(4)
    with torch.no_grad():
        full = model(input_ids=input_ids, pixel_values=pixel_values, image_grid_thw=grid_thw).logits
        steps, _ = incremental_logits(model, input_ids, pixel_values, grid_thw, [6] + [1] * (input_ids.shape[1] - 6))
    assert (full - steps).abs().max() <= TOLERANCE


ROPE_PARAMETERS = {
    "linear": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4, "original_max_position_embeddings": 8},
}


def rope_model(rope_type: str, max_positions: int = 32, **overrides):
    text = tiny_config().text_config.to_dict()
    text.update(rope_parameters=dict(ROPE_PARAMETERS[rope_type]), max_position_embeddings=max_positions)
    return tiny_model(attn="sdpa", text_config=text, **overrides)


@pytest.mark.parametrize("rope_type,positions", [("linear", "raster"), ("yarn", "insertion"), ("dynamic", "raster")])
def test_scaled_rope_decoding_matches_full_forward(rope_type, positions):
    """Text and image keys rotated with the scaled RoPE (yarn past its original 8 positions). Dynamic RoPE equals a
    full forward only within `max_position_embeddings`: past it, cached keys keep the frequencies of their step."""
    model = rope_model(rope_type, casa_image_positions=positions)
    assert model.model.language_model.rotary_emb.rope_type == rope_type
    assert_decoding_matches_full_forward(model, num_images=4)
    if rope_type != "dynamic":  # fixed frequencies: attention sees relative positions only, image keys included
        input_ids, pixel_values, grid_thw = conversation(4)
        inputs = dict(input_ids=input_ids, pixel_values=pixel_values, image_grid_thw=grid_thw)
        offset = torch.arange(input_ids.shape[1])[None] + 7
        with torch.no_grad():
            assert (model(**inputs).logits - model(**inputs, position_ids=offset).logits).abs().max() <= TOLERANCE


def test_dynamic_rope_rotates_image_keys_with_the_frequencies_of_the_text():
    """Past `max_position_embeddings`, dynamic RoPE rescales to the longest position of the forward: a default-RoPE
    copy holding those frequencies is the reference for text and image keys alike."""
    model = rope_model("dynamic", max_positions=8)
    input_ids, pixel_values, grid_thw = conversation(4)
    reference = copy.deepcopy(model)
    rotary = reference.model.language_model.rotary_emb
    rotary.rope_type = "default"
    rotary.inv_freq, _ = ROPE_INIT_FUNCTIONS["dynamic"](model.config.text_config, seq_len=input_ids.shape[1])
    with torch.no_grad():
        expected = reference(input_ids=input_ids, pixel_values=pixel_values, image_grid_thw=grid_thw).logits
        logits = model(input_ids=input_ids, pixel_values=pixel_values, image_grid_thw=grid_thw).logits
    assert (expected - logits).abs().max() <= TOLERANCE


@pytest.mark.parametrize("rope_type", list(ROPE_PARAMETERS))
def test_key_shift_refuses_scaled_rope(rope_type):
    """Shifting cached keys (the streaming text budget) is plain RoPE only: yarn scales cos/sin, dynamic rescales."""
    language_model = rope_model(rope_type).model.language_model
    with pytest.raises(ValueError, match=f"needs plain RoPE; this backbone uses rope_type='{rope_type}'"):
        language_model.shift_key_positions(torch.randn(1, 2, 6, 16), -3)


@pytest.mark.parametrize("attn", ["eager", pytest.param("flex_attention", marks=pytest.mark.slow)])
def test_cross_attention_decodes_before_the_first_image(attn):
    """A cross-attention window before any image holds no key: decode steps there give no update, on every backend
    (flex_attention cannot run over zero keys)."""
    model = tiny_model(attn=attn, casa_attention="cross_attention")
    input_ids, pixel_values, grid_thw = conversation(1)
    # see test_attention.py: torch's CPU flex template needs static recompiles
    with torch.no_grad(), torch._dynamo.config.patch(automatic_dynamic_shapes=attn != "flex_attention"):
        full = model(input_ids=input_ids, pixel_values=pixel_values, image_grid_thw=grid_thw).logits
        chunks = [3, 1, input_ids.shape[1] - 4]
        chunked, _ = incremental_logits(model, input_ids, pixel_values, grid_thw, chunks)
    assert (full - chunked).abs().max() <= TOLERANCE
