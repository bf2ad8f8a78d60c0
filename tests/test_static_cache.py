"""`CasaStaticCache`: preallocated text K/V and CASA windows, the same tokens as the dynamic cache, and decode steps
that `torch.compile(fullgraph=True)` compiles once (no recompiles across steps or new images), equal to eager."""

import pytest
import torch
from tiny import IMAGE_TOKEN, PLACEMENTS, left_pad, random_images, random_text, samples, tiny_model
from transformers import CompileConfig

from casa_hf import CasaCache, CasaStaticCache, CasaStaticLayer, CasaStaticWindow
from casa_hf.casa_cache import CasaWindowLayer

TOLERANCE = 1e-5


def batch_inputs():
    rows, images = samples()  # left-padded: two images, none, one
    ids, mask = left_pad(rows)
    pixel_values = torch.cat([pv for pv, _ in images if pv is not None])
    grid_thw = torch.cat([g for _, g in images if g is not None])
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, image_grid_thw=grid_thw)


@pytest.mark.parametrize("placement", ["parallel", "parallel_shared", "replace"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_static_cache_generates_the_tokens_of_the_dynamic_cache(attn, num_beams, placement):
    """Also where CASA replaces block 0's self-attention: that block's layer holds only its window."""
    model = tiny_model(attn=attn, **PLACEMENTS[placement])
    options = dict(batch_inputs(), max_new_tokens=12, do_sample=False, num_beams=num_beams)
    options.update(return_dict_in_generate=True, output_logits=True)
    dynamic = model.generate(**options)
    static = model.generate(**options, cache_implementation="static")
    assert isinstance(static.cache, CasaStaticCache)
    layer_class = CasaWindowLayer if placement == "replace" else CasaStaticLayer
    assert isinstance(static.cache.layers[0], layer_class) and isinstance(static.cache.layers[1], CasaStaticLayer)
    assert isinstance(static.cache.get_casa_state(0), CasaStaticWindow)
    assert static.sequences.tolist() == dynamic.sequences.tolist()
    assert (torch.stack(static.logits) - torch.stack(dynamic.logits)).abs().max() <= TOLERANCE


def conversation():
    ids = torch.tensor([random_text(4, 1) + [IMAGE_TOKEN] + random_text(5, 2)])
    pixel_values, grid_thw = random_images([(4, 4)], seed=0)  # 4 image tokens
    return ids, pixel_values, grid_thw


def decode(forward, cache, token, position, steps):
    """Greedy decode steps as generate() makes them (one token, its position); the logits of each."""
    logits = []
    for step in range(steps):
        out = forward(input_ids=token, cache=cache, position_ids=torch.tensor([[position + step]]), use_cache=True)
        logits.append(out.logits.clone())
        token = out.logits[:, -1:].argmax(-1)
    return torch.cat(logits, dim=1), token


def prefill(model, cache):
    ids, pixel_values, grid_thw = conversation()
    out = model(input_ids=ids, pixel_values=pixel_values, image_grid_thw=grid_thw, cache=cache, use_cache=True)
    return out.logits[:, -1:].argmax(-1), ids.shape[1]


def feed_image_turn(model, cache, position: int, grid: tuple[int, int]) -> None:
    """A new turn (an image and 3 text tokens) at `position`, prefilled eagerly into `cache`."""
    pixel_values, grid_thw = random_images([grid], seed=3)
    model(
        input_ids=torch.tensor([[IMAGE_TOKEN] + random_text(3, 7)]),
        pixel_values=pixel_values,
        image_grid_thw=grid_thw,
        position_ids=torch.arange(position, position + 4)[None],
        cache=cache,
        use_cache=True,
    )


def test_static_windows_equal_dynamic_ones_through_decode_crop_text_and_a_new_image():
    model = tiny_model(attn="sdpa")
    logits = []
    for cache in (CasaCache(config=model.config), CasaStaticCache(model.config, max_cache_len=48, max_image_tokens=8)):
        with torch.no_grad():
            token, length = prefill(model, cache)
            first, token = decode(model, cache, token, length, 4)
            cache.crop(-2)  # assisted decoding rejecting a draft
            again, token = decode(model, cache, token, length + 2, 3)
            chunk = torch.tensor([random_text(3, 5)])  # several tokens, no image: the decode path's causal mask
            position = torch.arange(length + 5, length + 8)[None]
            text = model(input_ids=chunk, cache=cache, position_ids=position, use_cache=True).logits
            feed_image_turn(model, cache, length + 8, grid=(2, 4))
            after, _ = decode(model, cache, token, length + 12, 3)
        logits.append(torch.cat([first, again, text, after], dim=1))
    assert (logits[0] - logits[1]).abs().max() <= TOLERANCE


def test_static_cache_refuses_what_it_was_not_sized_for():
    model = tiny_model(attn="sdpa")
    with torch.no_grad(), pytest.raises(ValueError, match="max_image_tokens=2"):
        prefill(model, CasaStaticCache(model.config, max_cache_len=48, max_image_tokens=2))
    cache = CasaStaticCache(model.config, max_cache_len=48, max_image_tokens=4, max_text_since_image=7)
    with torch.no_grad():
        token, length = prefill(model, cache)  # the image's window: 4 image tokens + 6 text tokens since it
        decode(model, cache, token, length, 1)
        with pytest.raises(ValueError, match="larger max_text_since_image"):
            decode(model, cache, token, length + 1, 1)
        with pytest.raises(ValueError, match="holds 1 conversation"):
            model(input_ids=torch.ones(2, 3, dtype=torch.long), pixel_values=None, cache=cache, use_cache=True)


@pytest.mark.parametrize(
    "mode,placement",
    [("casa", "parallel"), ("cross_attention", "parallel"), ("casa", "parallel_shared"), ("casa", "replace")],
)
def test_compiled_decode_steps_equal_eager_without_recompiles(mode, placement):
    """fullgraph: a graph break is an error; error_on_recompile: after the first compiled step, neither the next
    steps nor a new image (eager prefill into the same cache) may recompile."""
    model = tiny_model(attn="sdpa", casa_attention=mode, **PLACEMENTS[placement])
    compiled_forward = torch.compile(model.forward, fullgraph=True)
    results = []
    for forward in (model.forward, compiled_forward):
        cache = CasaStaticCache(model.config, max_cache_len=48, max_image_tokens=8)
        with torch.no_grad():
            token, length = prefill(model, cache)
            first, token = decode(forward, cache, token, length, 1)
            with torch._dynamo.config.patch(error_on_recompile=True):
                steps, token = decode(forward, cache, token, length + 1, 4)
                feed_image_turn(model, cache, length + 5, grid=(4, 4))
                after, _ = decode(forward, cache, token, length + 9, 3)
        results.append(torch.cat([first, steps, after], dim=1))
    assert (results[0] - results[1]).abs().max() <= TOLERANCE


def test_generate_compiles_static_decode_steps_and_gives_the_eager_tokens():
    """What `generate()` does on an accelerator, forced on CPU: prepared 4D masks, a compiled forward per step."""
    model = tiny_model(attn="sdpa")
    ids, pixel_values, grid_thw = conversation()
    options = dict(
        input_ids=ids, pixel_values=pixel_values, image_grid_thw=grid_thw, max_new_tokens=8, do_sample=False
    )
    dynamic = model.generate(**options)
    compile_config = CompileConfig(fullgraph=True)
    compile_config._compile_all_devices = True
    torch._dynamo.reset()
    static = model.generate(**options, cache_implementation="static", compile_config=compile_config)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the decode steps ran compiled
    assert static.tolist() == dynamic.tolist()
