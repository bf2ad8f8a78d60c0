"""`generate()` with the text-only cache: batching, decoding strategies, conversations continued with new images."""

import pytest
import torch
from tiny import IMAGE_TOKEN, PLACEMENTS, left_pad, random_images, random_text, samples, tiny_model
from transformers import TextStreamer

from casa_hf import CasaCache


@pytest.mark.parametrize("placement", list(PLACEMENTS))
@pytest.mark.parametrize("backbone", ["qwen2", "llama"])
def test_batched_left_padded_generation_equals_per_sample(backbone, placement):
    model = tiny_model(backbone, attn="sdpa", **PLACEMENTS[placement])
    rows, images = samples()
    ids, mask = left_pad(rows)
    pixel_values = torch.cat([pv for pv, _ in images if pv is not None])
    grid_thw = torch.cat([g for _, g in images if g is not None])
    batched = model.generate(
        input_ids=ids,
        attention_mask=mask,
        pixel_values=pixel_values,
        image_grid_thw=grid_thw,
        max_new_tokens=8,
        do_sample=False,
    )
    for i, row in enumerate(rows):
        pv, grid = images[i]
        single = model.generate(
            input_ids=torch.tensor([row]), pixel_values=pv, image_grid_thw=grid, max_new_tokens=8, do_sample=False
        )
        alone = single[0, len(row) :].tolist()  # stops at end-of-sequence, where the batch pads on
        together = batched[i, ids.shape[1] :].tolist()
        assert together[: len(alone)] == alone and set(together[len(alone) :]) <= {
            model.config.text_config.pad_token_id
        }


def test_beams_of_a_batch_pair_each_sample_with_its_images():
    """`get_image_features` gives one `[tokens, hidden]` tensor per image, as Qwen2.5-VL's does, and `generate()`
    repeats each sample's images (one placeholder each) for its beams and returned sequences: the beams of a batch
    with two, no and one image are each sample's own."""
    model = tiny_model(attn="sdpa")
    rows, images = samples()
    ids, mask = left_pad(rows)
    pixel_values = torch.cat([pv for pv, _ in images if pv is not None])
    grid_thw = torch.cat([g for _, g in images if g is not None])
    with torch.no_grad():
        features = model.get_image_features(pixel_values, grid_thw).pooler_output
    hidden = model.config.text_config.hidden_size
    assert [tuple(image.shape) for image in features] == [(int(g.prod()) // 4, hidden) for g in grid_thw]
    options = dict(num_beams=2, num_return_sequences=2, min_new_tokens=5, max_new_tokens=5, do_sample=False)
    batched = model.generate(
        input_ids=ids, attention_mask=mask, pixel_values=pixel_values, image_grid_thw=grid_thw, **options
    )
    for i, row in enumerate(rows):
        pv, grid = images[i]
        single = model.generate(input_ids=torch.tensor([row]), pixel_values=pv, image_grid_thw=grid, **options)
        assert batched[2 * i : 2 * i + 2, ids.shape[1] :].tolist() == single[:, len(row) :].tolist()


@pytest.mark.parametrize("mode", ["casa", "cross_attention"])
@pytest.mark.parametrize("cache_implementation", [None, "static"], ids=["dynamic", "static"])
def test_chunked_prefill_with_images_matches_one_prefill(cache_implementation, mode):
    """`generate(prefill_chunk_size=k)` on a left-padded batch with images gives one prefill's tokens and logits: each
    chunk gets the whole images whose placeholders it holds (one placeholder per image, whatever its token count),
    in order, also when a chunk takes the images of two samples that another image comes between in the batch's
    order (chunks of 5: the first of sample 0 and the one of sample 2)."""
    model = tiny_model(attn="sdpa", casa_attention=mode)
    rows, images = samples()
    ids, mask = left_pad(rows)
    columns = (ids == IMAGE_TOKEN).nonzero()[:, 1].tolist()
    boundaries = set(range(3, ids.shape[1], 3))  # chunks of 3 split right before an image and right after one
    assert any(col in boundaries for col in columns) and any(col + 1 in boundaries for col in columns)
    options = dict(
        input_ids=ids,
        attention_mask=mask,
        pixel_values=torch.cat([pv for pv, _ in images if pv is not None]),
        image_grid_thw=torch.cat([g for _, g in images if g is not None]),
        max_new_tokens=4,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
    )
    reference = model.generate(**options)
    for chunk_size in (1, 2, 3, 5):
        chunked = model.generate(**options, cache_implementation=cache_implementation, prefill_chunk_size=chunk_size)
        difference = float((torch.stack(chunked.logits) - torch.stack(reference.logits)).abs().max())
        assert difference <= 1e-5, f"prefill_chunk_size={chunk_size}: logits {difference:.3g} off one prefill"
        assert chunked.sequences.tolist() == reference.sequences.tolist(), chunk_size


def greedy_without_cache(model, input_ids, pixel_values, grid_thw, steps):
    """Reference: re-run the whole sequence for every new token."""
    ids = input_ids
    for _ in range(steps):
        logits = model(input_ids=ids, pixel_values=pixel_values, image_grid_thw=grid_thw, use_cache=False).logits
        logits[..., IMAGE_TOKEN] = float("-inf")
        ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    return ids


@pytest.mark.parametrize("mode", ["casa", "cross_attention", "cross_attention_with_rope"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("placement", list(PLACEMENTS))
@pytest.mark.parametrize("backbone", ["qwen2", "llama"])
def test_greedy_generate_equals_uncached_loop(backbone, placement, attn, mode):
    attention, rope = mode.removesuffix("_with_rope"), mode.endswith("_with_rope")
    options = dict(PLACEMENTS[placement], casa_attention=attention, casa_cross_attention_rope=rope)
    model = tiny_model(backbone, attn=attn, **options)
    rows, images = samples()
    ids = torch.tensor([rows[0]])
    pv, grid = images[0]
    generated = model.generate(input_ids=ids, pixel_values=pv, image_grid_thw=grid, max_new_tokens=10, do_sample=False)
    assert generated.tolist() == greedy_without_cache(model, ids, pv, grid, 10).tolist()


@pytest.mark.parametrize("prefill_chunk_size", [None, 3])
def test_conversation_continues_with_new_images_through_passed_back_cache(prefill_chunk_size):
    """Turn 2 brings a new image on top of turn 1's cache: same tokens as generating from the whole history, also
    when each turn is prefilled in chunks (turn 2's chunks start after the cached tokens, one right at its image)."""
    model = tiny_model(attn="sdpa")
    turn1 = torch.tensor([random_text(4, 1) + [IMAGE_TOKEN] + random_text(3, 2)])
    pv1, grid1 = random_images([(4, 4)], seed=1)
    cache = CasaCache()
    options = dict(cache=cache, max_new_tokens=5, do_sample=False, prefill_chunk_size=prefill_chunk_size)
    out1 = model.generate(input_ids=turn1, pixel_values=pv1, image_grid_thw=grid1, **options)
    turn2 = torch.tensor([random_text(2, 3) + [IMAGE_TOKEN] + random_text(3, 4)])
    pv2, grid2 = random_images([(2, 4)], seed=2)
    history = torch.cat([out1, turn2], dim=1)
    out2 = model.generate(input_ids=history, pixel_values=pv2, image_grid_thw=grid2, **options)

    full = model.generate(
        input_ids=history,
        pixel_values=torch.cat([pv1, pv2]),
        image_grid_thw=torch.cat([grid1, grid2]),
        max_new_tokens=5,
        do_sample=False,
    )
    assert out2.tolist() == full.tolist()
    assert cache.get_seq_length() == out2.shape[1] - 1  # the last sampled token is not fed back
    assert cache.get_casa_state(0).image_tokens.tolist() == [int(grid2.prod()) // 4]


def test_decoding_strategies_and_streamer(capsys):
    model = tiny_model(attn="sdpa")
    rows, images = samples()
    ids = torch.tensor([rows[2]])
    pv, grid = images[2]
    kwargs = dict(input_ids=ids, pixel_values=pv, image_grid_thw=grid)

    torch.manual_seed(0)
    sampled = model.generate(**kwargs, do_sample=True, top_k=20, temperature=0.9, max_new_tokens=6)
    assert sampled.shape == (1, ids.shape[1] + 6)

    beams = model.generate(**kwargs, num_beams=3, num_return_sequences=2, max_new_tokens=6, do_sample=False)
    assert beams.shape[0] == 2
    best = beams[0, ids.shape[1] :]

    # the best beam is a sequence the model scores at least as high as the greedy one
    def score(seq):
        full = torch.cat([ids, seq[None]], dim=1)
        with torch.no_grad():
            logp = model(input_ids=full, pixel_values=pv, image_grid_thw=grid).logits.log_softmax(-1)
        return sum(float(logp[0, ids.shape[1] - 1 + i, t]) for i, t in enumerate(seq.tolist()))

    greedy = model.generate(**kwargs, max_new_tokens=6, do_sample=False)[0, ids.shape[1] :]
    assert score(best) >= score(greedy) - 1e-4

    eos = int(greedy[2])
    stopped = model.generate(**kwargs, max_new_tokens=6, do_sample=False, eos_token_id=eos)
    assert stopped[0, -1].item() == eos and stopped.shape[1] <= ids.shape[1] + 3

    class Collect(TextStreamer):
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.reshape(-1).tolist())

        def end(self):
            self.chunks.append("end")

    streamer = Collect()
    streamed = model.generate(**kwargs, max_new_tokens=4, do_sample=False, streamer=streamer)
    assert streamer.chunks[0] == ids[0].tolist() and streamer.chunks[-1] == "end"
    assert [c[0] for c in streamer.chunks[1:-1]] == streamed[0, ids.shape[1] :].tolist()


def test_generate_from_inputs_embeds_equals_input_ids():
    """`inputs_embeds` (image placeholders found by their embedding) give the tokens of the `input_ids` path, also
    when beams and return sequences repeat samples with different numbers of images."""
    model = tiny_model(attn="sdpa")
    rows, images = samples()
    ids, mask = left_pad(rows)
    inputs = dict(
        attention_mask=mask,
        pixel_values=torch.cat([pv for pv, _ in images if pv is not None]),
        image_grid_thw=torch.cat([g for _, g in images if g is not None]),
        max_new_tokens=6,
    )
    embeds = model.get_input_embeddings()(ids)
    vision_calls = []
    model.model.visual.register_forward_hook(lambda *args: vision_calls.append(1))
    strategies = [
        dict(do_sample=False),
        dict(do_sample=True, top_k=20, num_return_sequences=2),
        dict(num_beams=3, num_return_sequences=2, do_sample=False),
    ]
    for strategy in strategies:
        torch.manual_seed(0)
        from_ids = model.generate(input_ids=ids, **inputs, **strategy)[:, ids.shape[1] :]
        torch.manual_seed(0)
        from_embeds = model.generate(inputs_embeds=embeds, **inputs, **strategy)
        assert from_embeds.tolist() == from_ids.tolist(), strategy
    assert len(vision_calls) == 2 * len(strategies)  # images encoded once per generate(), not per beam or step


def test_the_image_token_is_never_generated(tmp_path):
    """Even when it is the most likely token: through the generation config (the model's, a caller's, or that of a
    checkpoint saved without it), beams, and streaming."""
    import json

    from tiny import tiny_processor
    from transformers import AutoModel, GenerationConfig

    from casa_hf.streaming import CasaStream

    model = tiny_model(attn="sdpa")

    def favour_the_image_token(module, args, logits):
        logits[..., IMAGE_TOKEN] += 1e4  # it wins every argmax

    model.lm_head.register_forward_hook(favour_the_image_token)
    ids = torch.tensor([random_text(5)])
    assert int(model(input_ids=ids).logits[0, -1].argmax()) == IMAGE_TOKEN
    outputs = [
        model.generate(input_ids=ids, max_new_tokens=4, do_sample=False),
        model.generate(input_ids=ids, generation_config=GenerationConfig(max_new_tokens=4, do_sample=False)),
        model.generate(input_ids=ids, max_new_tokens=4, num_beams=2, do_sample=False),
    ]
    model.save_pretrained(tmp_path)
    config_file = tmp_path / "generation_config.json"
    saved = json.loads(config_file.read_text())
    assert saved["suppress_tokens"] == [IMAGE_TOKEN]
    config_file.write_text(json.dumps({k: v for k, v in saved.items() if k != "suppress_tokens"}))
    reloaded = AutoModel.from_pretrained(tmp_path)
    reloaded.lm_head.register_forward_hook(favour_the_image_token)
    outputs.append(reloaded.generate(input_ids=ids, max_new_tokens=4, do_sample=False))
    for out in outputs:
        assert IMAGE_TOKEN not in out[0, ids.shape[1] :].tolist()
    step = CasaStream(model, tiny_processor(), max_new_tokens=4, eos_token_id=-1).feed(text="what colour")
    assert len(step.token_ids) == 4 and IMAGE_TOKEN not in step.token_ids
