"""Windows of consecutive images (`CasaConfig.casa_window_images`): images separated only by the vision start / end
markers, or adjacent placeholders, share one CASA window, and the text after them attends to all of them. Every path
(full forward on each backend, chunked prefill splitting a run of images, decode steps, crop, generate, static cache)
against the loop reference or one full forward."""

import pytest
import torch
from reference import fast_and_reference_logits, reference_casa_forward
from tiny import IMAGE_TOKEN, PLACEMENTS, left_pad, random_images, random_text, tiny_config, tiny_model, tiny_processor

import casa_hf.casa_attention as casa_attention
from casa_hf import CasaCache, CasaConfig, CasaForConditionalGeneration, CasaStaticCache
from casa_hf.streaming import CasaStream

TOLERANCE = 1e-4
VS, VE = 151, 152  # tiny_config's vision start / end tokens
GRIDS = [(4, 4), (2, 4), (4, 6), (2, 2)]  # 4, 2, 6 and 1 image tokens


def images_run(count: int, markers: bool = True) -> list[int]:
    """`count` consecutive images: each wrapped in the vision markers, or bare adjacent placeholders."""
    return [VS, IMAGE_TOKEN, VE] * count if markers else [IMAGE_TOKEN] * count


def rows_with_runs() -> list[list[int]]:
    """Sample 0: a run of two (markers), a single image, a run of three (adjacent); sample 1: text only, then a run
    of three (markers); sample 2: one image; sample 3: text only."""
    return [
        random_text(4, 1) + images_run(2) + random_text(3, 2) + [IMAGE_TOKEN] + random_text(2, 3)
        + images_run(3, markers=False) + random_text(3, 4),
        random_text(6, 5) + images_run(3) + random_text(4, 6),
        random_text(2, 7) + [IMAGE_TOKEN] + random_text(3, 8),
        random_text(5, 9),
    ]  # fmt: skip


def batch_inputs(rows: list[list[int]], seed: int = 0) -> dict:
    """Left-padded rows with one image per placeholder, in reading order (sizes cycling through `GRIDS`)."""
    ids, mask = left_pad(rows)
    count = int((ids == IMAGE_TOKEN).sum())
    pixel_values, grid = random_images([GRIDS[i % len(GRIDS)] for i in range(count)], seed)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, image_grid_thw=grid)


def chunk_images(inputs: dict, start: int, end: int) -> dict:
    """Pixels and grids of the images whose placeholder lies in columns `[start, end)`, in reading order."""
    positions = (inputs["input_ids"] == IMAGE_TOKEN).nonzero().tolist()  # (sample, column), in reading order
    patches = inputs["image_grid_thw"].prod(-1).tolist()
    offsets = [sum(patches[:i]) for i in range(len(patches) + 1)]
    chosen = [i for i, (_, column) in enumerate(positions) if start <= column < end]
    if not chosen:
        return {}
    pixels = torch.cat([inputs["pixel_values"][offsets[i] : offsets[i + 1]] for i in chosen])
    return dict(pixel_values=pixels, image_grid_thw=inputs["image_grid_thw"][chosen])


def chunked_logits(model, inputs: dict, bounds: list[int], cache=None) -> torch.Tensor:
    """Feed the batch in chunks `[bounds[i], bounds[i + 1])` through one cache."""
    cache = cache if cache is not None else CasaCache()
    logits = []
    for start, end in zip(bounds, bounds[1:], strict=False):
        out = model(
            input_ids=inputs["input_ids"][:, start:end],
            attention_mask=inputs["attention_mask"][:, :end],
            cache=cache,
            use_cache=True,
            **chunk_images(inputs, start, end),
        )
        logits.append(out.logits)
    return torch.cat(logits, dim=1)


MODES = {
    "casa": dict(casa_attention="casa"),
    "cross_attention": dict(casa_attention="cross_attention"),
}


@pytest.mark.parametrize("rule", ["consecutive", "each"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("attn", ["eager", "sdpa", "flash_varlen_reference"])
@pytest.mark.parametrize("backbone", ["qwen2", "llama"])
def test_full_forward_matches_the_loop_reference(monkeypatch, backbone, attn, mode, rule):
    """Runs of two and three images (with markers and adjacent), single-image and text-only windows in a
    left-padded batch: the fast path against the loop reference, which applies the rule token by token."""
    assert_matches_the_loop_reference(monkeypatch, backbone, attn, mode, rule)


@pytest.mark.parametrize("placement", ["sequential", "parallel_shared", "replace"])
@pytest.mark.parametrize("mode", ["casa", "cross_attention"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("backbone", ["qwen2", "llama"])
def test_every_placement_matches_the_loop_reference_on_runs(monkeypatch, backbone, attn, mode, placement):
    """The other blocks (the parallel one is above) on the same runs of images."""
    assert_matches_the_loop_reference(monkeypatch, backbone, attn, mode, "consecutive", **PLACEMENTS[placement])


@pytest.mark.slow  # a minute of flex compilation on CPU
def test_flex_attention_matches_the_loop_reference(monkeypatch):
    assert_matches_the_loop_reference(monkeypatch, "qwen2", "flex_attention", "casa", "consecutive")


def assert_matches_the_loop_reference(monkeypatch, backbone, attn, mode, rule, **placement):
    inputs = batch_inputs(rows_with_runs())
    options = dict(MODES[mode], casa_window_images=rule, **placement)
    model, reference = tiny_model(backbone, attn=attn, **options), tiny_model(backbone, attn="eager", **options)
    fast, slow = fast_and_reference_logits(monkeypatch, model, reference, inputs)
    valid = inputs["attention_mask"].bool()
    assert (fast[valid] - slow[valid]).abs().max() <= TOLERANCE


def test_the_rules_differ_from_a_runs_first_image_on():
    """Same weights: "consecutive" and "each" agree before a run and differ from its first image on (its
    placeholder and markers see the second image too)."""
    row = random_text(4, 1) + images_run(2) + random_text(3, 2)
    inputs = batch_inputs([row])
    logits = {}
    for rule in ("consecutive", "each"):
        with torch.no_grad():
            logits[rule] = tiny_model(casa_window_images=rule)(**inputs).logits[0]
    first = row.index(IMAGE_TOKEN)
    assert (logits["consecutive"][:first] - logits["each"][:first]).abs().max() <= 1e-5
    assert (logits["consecutive"][first:] - logits["each"][first:]).abs().amax(-1).min() > 1e-3


def test_attention_weights_cover_all_images_of_the_window(monkeypatch):
    """`cross_attentions`: each token's weights on the images of its window, all of a run's, as the reference."""
    inputs = batch_inputs(rows_with_runs())
    model = tiny_model(attn="eager")
    with torch.no_grad():
        fast = model(**inputs, output_attentions=True).cross_attentions

    monkeypatch.setattr(casa_attention.CasaAttention, "forward", reference_casa_forward)
    with torch.no_grad():
        slow = model(**inputs, output_attentions=True).cross_attentions
    valid = inputs["attention_mask"].bool()
    assert fast[0].shape[-1] == 6 + 1 + 4 == slow[0].shape[-1]  # sample 1's run of three, the widest window
    for mine, theirs in zip(fast, slow, strict=True):
        assert (mine.transpose(1, 2)[valid] - theirs.transpose(1, 2)[valid]).abs().max() <= TOLERANCE


def inside_runs(row: list[int]) -> set[int]:
    """Columns after a run's first placeholder, up to its last: a chunk starting there would split the run."""
    inside, previous = set(), None
    for column, token in enumerate(row):
        if token == IMAGE_TOKEN:
            if previous is not None:
                inside.update(range(previous + 1, column + 1))
            previous = column
        elif token not in (VS, VE, 0):
            previous = None
    return inside


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_chunked_prefill_matches_full_forward_and_refuses_to_split_a_run(attn, mode, static):
    """Every split of the left-padded batch into two chunks: the full forward's logits, except where the second chunk
    starts inside a run of images (its first image would join the cached window's images, whose text before it
    attended to it in the full forward): refused before anything changes, and the cache then goes on as if the
    refused chunk had not been fed. Chunks cutting right before a run's first marker or right after its last image
    continue the window as usual."""
    inputs = batch_inputs(rows_with_runs())
    model = tiny_model(attn=attn, **MODES[mode])
    with torch.no_grad():
        full = model(**inputs).logits
    width = inputs["input_ids"].shape[1]
    inside = set.union(*(inside_runs(row) for row in inputs["input_ids"].tolist()))
    valid = inputs["attention_mask"].bool()
    refused = 0
    for cut in range(1, width):
        cache = CasaStaticCache(model.config, max_cache_len=64, max_image_tokens=16) if static else CasaCache()
        with torch.no_grad():
            if cut in inside:
                first = chunked_logits(model, inputs, [0, cut], cache)
                with pytest.raises(ValueError, match="Feed the images of one window"):
                    chunked_logits(model, inputs, [cut, width], cache)
                refused += 1
                assert cache.get_seq_length() == cut  # nothing of the refused chunk entered the cache
                continue
            chunked = chunked_logits(model, inputs, [0, cut, width], cache)
        assert (chunked[valid] - full[valid]).abs().max() <= TOLERANCE, cut
    assert refused == len(inside) >= 5
    del first


@pytest.mark.parametrize("closing", [False, True], ids=["markers", "text"])
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_decode_steps_keep_a_run_open_until_text_comes(static, closing):
    """A prompt that ends inside a run, continued by one-token steps: markers keep the run open, so a chunk with the
    next image is refused; a text token closes it, and the chunk then opens a window of its own, as in the full
    forward."""
    row = random_text(3, 1) + [VS, IMAGE_TOKEN, VE] + [VS] + ([7] if closing else []) + [IMAGE_TOKEN, VE, 9, 10]
    inputs = batch_inputs([row])
    model = tiny_model(attn="sdpa")
    prefill, image = 6, row.index(IMAGE_TOKEN, 6)
    with torch.no_grad():
        full = model(**inputs).logits
        cache = CasaStaticCache(model.config, max_cache_len=32, max_image_tokens=8) if static else CasaCache()
        steps = chunked_logits(model, inputs, [0, prefill, *range(prefill + 1, image + 1)], cache)
        assert cache.open_runs() == [not closing]
        if not closing:
            with pytest.raises(ValueError, match="Feed the images of one window"):
                chunked_logits(model, inputs, [image, len(row)], cache)
            return
        steps = torch.cat([steps, chunked_logits(model, inputs, [image, len(row)], cache)], dim=1)
    assert (steps - full).abs().max() <= TOLERANCE
    assert cache.get_casa_state(0).image_tokens.tolist() == [2]  # the last image only


def test_crop_reopens_a_run_and_refuses_to_cross_its_last_image():
    """Assisted decoding drops a rejected text token after a run's markers: the run is open again (a next image
    would be refused); a crop past the run's last image is refused; text then goes on as in the full forward."""
    model = tiny_model(attn="sdpa")
    head = random_text(3, 1) + images_run(2)
    inputs = batch_inputs([head + [VS, 7]])
    with torch.no_grad():
        cache = CasaCache()
        chunked_logits(model, inputs, [0, len(head) + 2], cache)
        assert cache.open_runs() == [False]
        with pytest.raises(ValueError, match="latest image"):
            cache.crop(-4)  # VS, 7, and before them the second image's VE and placeholder
        cache.crop(-1)
        assert cache.open_runs() == [True]
        rest = [VE, 9, 10]
        full = model(
            input_ids=torch.tensor([head + [VS] + rest]),
            pixel_values=inputs["pixel_values"],
            image_grid_thw=inputs["image_grid_thw"],
        ).logits
        step = model(input_ids=torch.tensor([rest]), cache=cache, use_cache=True).logits
    assert (step[0] - full[0, -len(rest) :]).abs().max() <= TOLERANCE
    assert cache.open_runs() == [False]
    assert cache.get_casa_state(0).image_tokens.tolist() == [4 + 2]


def greedy_without_cache(model, inputs: dict, steps: int) -> torch.Tensor:
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    images = dict(pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, **images).logits
        logits[..., IMAGE_TOKEN] = float("-inf")
        ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids


@pytest.mark.parametrize("cache_implementation", [None, "static"], ids=["dynamic", "static"])
@pytest.mark.parametrize("prefill_chunk_size", [None, 2])
@pytest.mark.parametrize("backbone", ["qwen2", "llama"])
def test_generate_equals_the_uncached_greedy_loop(backbone, prefill_chunk_size, cache_implementation):
    """Greedy `generate()` on the left-padded batch whose last windows hold runs: decode steps continue windows of
    several images; the static cache is sized for them; a prefill in chunks of 2 never splits a run (its chunks
    grow to the run's last image)."""
    inputs = batch_inputs(rows_with_runs())
    model = tiny_model(backbone, attn="sdpa")
    model.generation_config.eos_token_id = None  # every sample generates all its tokens, as the loop does
    generated = model.generate(
        **inputs,
        max_new_tokens=6,
        do_sample=False,
        prefill_chunk_size=prefill_chunk_size,
        cache_implementation=cache_implementation,
    )
    assert generated.tolist() == greedy_without_cache(model, inputs, 6).tolist()


def test_a_static_cache_too_small_for_a_run_is_refused():
    model = tiny_model(attn="sdpa")
    inputs = batch_inputs([random_text(3, 1) + images_run(2) + random_text(2, 2)])  # 4 + 2 image tokens
    with pytest.raises(ValueError, match="max_image_tokens=5"), torch.no_grad():
        model(**inputs, cache=CasaStaticCache(model.config, max_cache_len=32, max_image_tokens=5), use_cache=True)


def test_new_configs_join_consecutive_images_and_saved_configs_without_the_key_do_not(tmp_path):
    assert CasaConfig().casa_window_images == tiny_config().casa_window_images == "consecutive"
    saved = tiny_config().to_dict()
    assert saved["casa_window_images"] == "consecutive"
    del saved["casa_window_images"]
    assert CasaConfig.from_dict(saved).casa_window_images == "each"
    assert CasaConfig.from_dict(saved, casa_window_images="consecutive").casa_window_images == "consecutive"
    with pytest.raises(ValueError, match="casa_window_images"):
        tiny_config(casa_window_images="all")


def test_a_two_image_question_puts_the_images_together_before_the_text():
    """The chat template gets each user message's images first, together: the question then sees both images (one
    window); `group_images=False`, or a processor saved before the option, renders the turn as written."""
    from PIL import Image

    image = Image.new("RGB", (56, 56))
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "the first"},
                {"type": "image", "image": image},
                {"type": "text", "text": "and the second"},
                {"type": "image", "image": image},
                {"type": "text", "text": "what changed ?"},
            ],
        }
    ]
    processor = tiny_processor()
    pair = "<|vision_start|><|image_pad|><|vision_end|>" * 2
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text == f"<|im_start|>user\n{pair}the firstand the secondwhat changed ?<|im_end|>\n<|im_start|>assistant\n"
    image = "<|vision_start|><|image_pad|><|vision_end|>"
    as_written = processor.apply_chat_template(messages, add_generation_prompt=True, group_images=False)
    assert as_written.startswith(f"<|im_start|>user\nthe first{image}and the second{image}what changed ?")

    # the question's tokens sit in one window with both images
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    model = tiny_model(attn="sdpa")
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    both = int(inputs["image_grid_thw"].prod(-1).sum()) // 4
    assert out.cache.get_casa_state(0).image_tokens.tolist() == [both]


def test_saved_processors_without_the_option_render_turns_as_written(tmp_path):
    processor = tiny_processor()
    processor.save_pretrained(tmp_path)
    assert type(processor).from_pretrained(tmp_path).group_images is True
    config = tmp_path / "processor_config.json"
    config.write_text(config.read_text().replace('"group_images": true', '"unrelated": 0'))
    assert type(processor).from_pretrained(tmp_path).group_images is False


def test_streaming_keeps_one_frame_per_window():
    """Streamed frames are separated by text (at least the last answer token), so each still opens its window."""
    from PIL import Image

    model, processor = tiny_model(attn="sdpa"), tiny_processor()
    stream = CasaStream(model, processor, chat_template=False, max_new_tokens=1)
    frame = Image.new("RGB", (56, 56))
    for _ in range(3):
        stream.feed(frame)
        assert stream.cache.get_casa_state(0).image_tokens.tolist() == [4]


def test_compiled_static_decode_steps_track_an_open_run():
    """`torch.compile(fullgraph=True)` decode steps after a prompt ending inside a run: markers keep it open, a text
    token closes it, as in eager steps (same logits)."""
    model = tiny_model(attn="sdpa")
    row = random_text(3, 1) + [VS, IMAGE_TOKEN, VE]
    pixel_values, grid = random_images([(4, 4)])
    results, opens = [], []
    for forward in (model.forward, torch.compile(model.forward, fullgraph=True)):
        cache = CasaStaticCache(model.config, max_cache_len=32, max_image_tokens=8)
        logits = []
        with torch.no_grad():
            model(input_ids=torch.tensor([row]), pixel_values=pixel_values, image_grid_thw=grid, cache=cache)
            for step, token in enumerate([VS, VE, 7, VS]):
                position = torch.tensor([[len(row) + step]])
                out = forward(input_ids=torch.tensor([[token]]), position_ids=position, cache=cache, use_cache=True)
                logits.append(out.logits.clone())
                opens.append(cache.open_runs())
        results.append(torch.cat(logits, dim=1))
    assert opens == [[True], [True], [False], [False]] * 2
    assert (results[0] - results[1]).abs().max() <= 1e-5


def test_a_run_never_crosses_packed_conversations():
    """A packed row whose first conversation ends with an image and a marker and whose second opens with an image:
    two windows, each conversation's logits as when run alone."""
    first = random_text(3, 1) + [VS, IMAGE_TOKEN, VE]
    second = [IMAGE_TOKEN, VE] + random_text(3, 2)
    pixel_values, grid = random_images([(4, 4), (2, 4)])
    model = tiny_model(attn="sdpa")
    positions = torch.tensor([list(range(len(first))) + list(range(len(second)))])
    with torch.no_grad():
        packed = model(
            input_ids=torch.tensor([first + second]),
            position_ids=positions,
            pixel_values=pixel_values,
            image_grid_thw=grid,
        ).logits[0]
        alone = [
            model(
                input_ids=torch.tensor([row]),
                pixel_values=pixel_values[index * 16 :][:16],
                image_grid_thw=grid[[index]],
            ).logits[0]
            for index, row in enumerate((first, second))
        ]
    assert (packed - torch.cat(alone)).abs().max() <= TOLERANCE


def test_inputs_embeds_find_the_markers_by_their_embedding():
    """From `inputs_embeds`, placeholders and markers are found by their embedding rows: the same runs, the same
    logits as from `input_ids`."""
    inputs = batch_inputs(rows_with_runs())
    model = tiny_model(attn="sdpa")
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    with torch.no_grad():
        from_ids = model(**inputs).logits
        from_embeds = model(**{k: v for k, v in inputs.items() if k != "input_ids"}, inputs_embeds=embeds).logits
    assert (from_ids - from_embeds).abs().max() <= 1e-6


def test_sliding_window_layers_static_cache_holds_runs():
    """A backbone with sliding-window self-attention layers (window of 6 text tokens, shorter than the runs'
    windows): `generate()` with the static cache, sized for the runs, gives the dynamic cache's tokens and logits."""
    text = tiny_config().text_config.to_dict()
    text.pop("layer_types", None)
    text.update(use_sliding_window=True, sliding_window=6, max_window_layers=1)
    torch.manual_seed(0)
    model = CasaForConditionalGeneration(tiny_config(text_config=text)).eval()
    assert "sliding_attention" in model.config.text_config.layer_types
    model.generation_config.eos_token_id = None
    options = dict(batch_inputs(rows_with_runs()), max_new_tokens=5, do_sample=False)
    options.update(return_dict_in_generate=True, output_logits=True)
    dynamic = model.generate(**options)
    static = model.generate(**options, cache_implementation="static")
    assert static.sequences.tolist() == dynamic.sequences.tolist()
    assert (torch.stack(static.logits) - torch.stack(dynamic.logits)).abs().max() <= 1e-5
    # sized for the largest window, sample 1's run of three (counted from the ids: not all 31 image tokens)
    assert static.cache.get_casa_state(0).max_image_tokens == 6 + 1 + 4
