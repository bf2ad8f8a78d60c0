"""Streaming frames through one persistent cache: same text as a full forward and as `generate()`, bounded memory."""

import sys

import numpy as np
import pytest
import torch
from eviction import casa_before_eviction, feed_evicting_frame, positions_before_eviction
from PIL import Image
from tiny import tiny_model, tiny_processor

from casa_hf import CasaCache
from casa_hf.casa_cache import WINDOW_HEADROOM
from casa_hf.processing_casa import DEFAULT_CHAT_TEMPLATE
from casa_hf.streaming import CasaStream, TextBudget
from casa_hf.video import read_video_frames


def frames(count: int, size: int = 56):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


@pytest.fixture(scope="module")
def model_and_processor():
    return tiny_model(attn="sdpa"), tiny_processor()


def test_stream_equals_full_forward_and_generate(model_and_processor):
    model, processor = model_and_processor
    video = frames(6)
    stream = CasaStream(model, processor, system="describe the video .", frame_text="what changed ?", max_new_tokens=3)
    steps = list(stream.run(video))

    # plain generate() with a passed-back cache and the growing history
    cache, history = CasaCache(), torch.empty(1, 0, dtype=torch.long)
    turn_ids = []
    for index, frame in enumerate(video):
        text = ("describe the video ." if index == 0 else "") + stream.image_text + "what changed ?"
        inputs = processor(images=[frame], text=text, add_special_tokens=False, return_tensors="pt")
        history = torch.cat([history, inputs["input_ids"]], dim=1)
        turn_ids.append((history.shape[1], inputs))
        out = model.generate(
            input_ids=history,
            pixel_values=inputs["pixel_values"],
            image_grid_thw=inputs["image_grid_thw"],
            cache=cache,
            max_new_tokens=3,
            do_sample=False,
        )
        assert out[0, history.shape[1] :].tolist() == steps[index].token_ids
        history = out

    # one full forward over the whole interleaved sequence: every streamed token is its greedy choice
    pixel_values = torch.cat([inputs["pixel_values"] for _, inputs in turn_ids])
    grid = torch.cat([inputs["image_grid_thw"] for _, inputs in turn_ids])
    with torch.no_grad():
        logits = model(input_ids=history, pixel_values=pixel_values, image_grid_thw=grid).logits[0]
    logits[:, model.config.image_token_id] = float("-inf")
    for (end, _), step in zip(turn_ids, steps, strict=True):
        predicted = logits[end - 1 : end - 1 + len(step.token_ids)].argmax(-1).tolist()
        assert predicted == step.token_ids
    assert "".join(s.text for s in steps)  # the tiny vocabulary decodes every id


def test_chat_stream_is_generate_over_the_rendered_conversation():
    """By default the turns are the chat template's: each turn's answer is `generate()`'s over the whole conversation
    so far as `apply_chat_template` tokenizes it (with the answers given, a cut one closed by the template), whose
    start is what the stream already holds. The shipped tiny model gets each colour right."""
    from transformers import AutoModel, AutoProcessor

    from casa_hf.builtin_models import TINY_MODEL
    from casa_hf.training.synthetic_vqa import QUESTIONS, SYSTEM_TEXT, random_scene, render

    model, processor = AutoModel.from_pretrained(TINY_MODEL).eval(), AutoProcessor.from_pretrained(TINY_MODEL)
    rng = np.random.default_rng(25)
    scenes = [random_scene(rng, count=1) for _ in range(4)]
    images = [render(scene, processor.image_size, rng) for scene in scenes]
    stream = CasaStream(model, processor, system=SYSTEM_TEXT, prompt=QUESTIONS["colour"], max_new_tokens=3)
    assert stream.chat_template
    steps = [stream.feed(image) for image in images[:3]]
    steps.append(stream.feed(text="what colour is the shape ?", max_new_tokens=1))  # cut before its end of turn
    steps.append(stream.feed(images[3], QUESTIONS["shape"]))
    assert [step.text.rstrip(".") for step in steps[:3]] == [scene.colour for scene in scenes[:3]]
    assert steps[-1].text.rstrip(".") == scenes[3].shape

    turns = [(image, QUESTIONS["colour"], 3) for image in images[:3]]
    turns += [(None, "what colour is the shape ?", 1), (images[3], QUESTIONS["shape"], 3)]
    messages = [{"role": "system", "content": SYSTEM_TEXT}]
    cache, history = CasaCache(), torch.empty(1, 0, dtype=torch.long)
    for (image, question, max_new_tokens), step in zip(turns, steps, strict=True):
        content = [{"type": "text", "text": question}]
        messages.append({"role": "user", "content": ([{"type": "image", "image": image}] if image else []) + content})
        conversation = processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )["input_ids"]
        assert conversation[:, : history.shape[1]].equal(history)  # the previous turns' tokens, answers included
        pixels = {} if image is None else processor(images=[image], text=stream.image_text, return_tensors="pt")
        out = model.generate(
            input_ids=conversation,
            pixel_values=pixels.get("pixel_values"),
            image_grid_thw=pixels.get("image_grid_thw"),
            cache=cache,
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
        assert out[0, conversation.shape[1] :].tolist() == step.token_ids
        assert step.cache_tokens == out.shape[1] - 1  # all of it but the last answer token, fed with the next turn
        messages.append({"role": "assistant", "content": step.text})
        history = out


def test_chat_templates_that_rewrite_the_past_are_refused(model_and_processor):
    model, _ = model_and_processor
    counting = tiny_processor(chat_template="{{ messages | length }}" + DEFAULT_CHAT_TEMPLATE)
    stream = CasaStream(model, counting, prompt="what ?", max_new_tokens=2)
    stream.feed(frames(1)[0])
    with pytest.raises(ValueError, match="does not render the conversation as an extension"):
        stream.feed(frames(1)[0])
    assert not CasaStream(model, counting, frame_text="what ?").chat_template  # markup written by hand: raw
    with pytest.raises(ValueError, match="chat_template=True needs"):
        CasaStream(model, counting, frame_text="what ?", chat_template=True)


class FedIds:
    """A streamer that keeps what `feed()` puts first: the ids it feeds."""

    def put(self, ids: torch.Tensor) -> None:
        self.__dict__.setdefault("ids", ids[0].tolist())

    def end(self) -> None:
        pass


@pytest.mark.parametrize("raw", [False, True])
def test_next_turn_ids_are_what_feed_feeds_and_peeking_changes_nothing(model_and_processor, raw):
    """A server checks that a turn fits before queueing it: `next_turn_ids` is exactly what `feed()` then feeds (in
    chat mode the end of the last answer's turn, the user message and the generation prompt, after the pending token),
    and peeking, twice or at another turn, leaves the stream as it was."""
    model, processor = model_and_processor
    markup = {"frame_text": " what ?"} if raw else {"prompt": "what ?"}
    turns = [(frames(1)[0], None), (None, "what colour ?"), (frames(2)[1], "what shape ?")]
    peeked = CasaStream(model, processor, system="describe .", max_new_tokens=2, **markup)
    plain = CasaStream(model, processor, system="describe .", max_new_tokens=2, **markup)
    assert peeked.chat_template is not raw
    for frame, text in turns:
        ids = peeked.next_turn_ids(frame is not None, text)
        peeked.next_turn_ids(frame is None, "something else")
        assert peeked.next_turn_ids(frame is not None, text) == ids
        fed = FedIds()
        step = peeked.feed(frame, text, streamer=fed)
        assert fed.ids == ids
        assert step.token_ids == plain.feed(frame, text).token_ids


def test_hundred_frames_keep_text_and_one_image(model_and_processor):
    model, processor = model_and_processor
    stream = CasaStream(model, processor, frame_text="what ?", max_new_tokens=2)
    steps = list(stream.run(frames(100)))
    per_turn = len(processor.tokenizer(stream.image_text + "what ?", add_special_tokens=False)["input_ids"])
    generated = sum(len(step.token_ids) for step in steps)
    # every fed token is text (placeholders included); the last generated token is pending, not yet fed
    assert stream.cache.get_seq_length() == 100 * per_turn + generated - 1
    image_tokens = 4  # a 56 x 56 frame: a 4 x 4 patch grid merged 2 x 2
    since_last_image = per_turn - 1 + len(steps[-1].token_ids) - 1  # placeholder onwards: end, text, decoded
    for layer_idx in range(model.config.text_config.num_hidden_layers):
        state = stream.cache.get_casa_state(layer_idx)
        assert state.image_tokens.tolist() == [image_tokens]
        assert state.keys.shape[2] == image_tokens + since_last_image
    bytes_per_slot = 2 * 2 * 16 * 4  # keys + values, 2 kv heads, head_dim 16, fp32; per layer
    layers = model.config.text_config.num_hidden_layers
    text_bytes = layers * bytes_per_slot * stream.cache.get_seq_length()
    window_bytes = steps[-1].cache_bytes - text_bytes  # the window plus the free slots decode steps write into
    used = layers * bytes_per_slot * (image_tokens + since_last_image)
    assert used <= window_bytes <= used + layers * bytes_per_slot * WINDOW_HEADROOM


def test_text_budget_keeps_the_cache_bounded(model_and_processor):
    model, processor = model_and_processor
    budget = TextBudget(sink_tokens=4, window_tokens=24)
    stream = CasaStream(
        model, processor, system="describe the video .", frame_text="what ?", max_new_tokens=3, text_budget=budget
    )
    steps = list(stream.run(frames(30)))
    per_turn_max = (
        1 + len(processor.tokenizer(stream.image_text + "what ?", add_special_tokens=False)["input_ids"]) + 2
    )
    assert stream.evicted_tokens > 0
    assert all(step.cache_tokens <= 4 + 24 + per_turn_max for step in steps)
    assert len({step.cache_bytes for step in steps[-10:]}) <= 3  # flat once the budget is reached
    assert all(step.token_ids for step in steps)
    # without eviction the same stream is the unbudgeted one
    roomy = CasaStream(
        model,
        processor,
        system="describe the video .",
        frame_text="what ?",
        max_new_tokens=3,
        text_budget=TextBudget(4, 10_000),
    )
    plain = CasaStream(model, processor, system="describe the video .", frame_text="what ?", max_new_tokens=3)
    assert [s.token_ids for s in roomy.run(frames(5))] == [s.token_ids for s in plain.run(frames(5))]


def test_key_shift_moves_rope_positions(model_and_processor):
    model, _ = model_and_processor
    language_model = model.model.language_model
    apply_rotary = sys.modules[type(language_model.layers[0].self_attn).__module__].apply_rotary_pos_emb
    keys = torch.randn(1, 2, 6, 16)
    positions = torch.arange(6)[None] + 40

    def rope(at):
        cos, sin = language_model.rotary_emb(keys, position_ids=at)
        return apply_rotary(keys, keys, cos, sin)[1]

    assert (language_model.shift_key_positions(rope(positions), -25) - rope(positions - 25)).abs().max() < 1e-5


def test_reset_starts_over(model_and_processor):
    model, processor = model_and_processor
    stream = CasaStream(model, processor, frame_text="what ?", max_new_tokens=2)
    first = [s.token_ids for s in stream.run(frames(3))]
    stream.reset()
    assert stream.cache.get_seq_length() == 0
    assert [s.token_ids for s in stream.run(frames(3))] == first


def test_bad_frames_and_videos(model_and_processor, tmp_path):
    model, processor = model_and_processor
    stream = CasaStream(model, processor)
    with pytest.raises(TypeError, match="Unsupported image type int"):
        stream.feed(42)
    with pytest.raises(ValueError, match="shape"):
        stream.feed(np.zeros((5, 5)))
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"this is not a video")
    with pytest.raises(ValueError, match="Cannot read video file .*broken.mp4"):
        list(read_video_frames(broken))
    with pytest.raises(FileNotFoundError, match="nowhere.mp4"):
        list(read_video_frames(tmp_path / "nowhere.mp4"))


def test_video_file_frames_at_fps(tmp_path):
    import av

    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as container:
        video = container.add_stream("mpeg4", rate=8)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        for i in range(16):
            pixels = np.full((48, 64, 3), i * 15, dtype=np.uint8)
            for packet in video.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
    assert len(list(read_video_frames(path))) == 16
    sampled = list(read_video_frames(path, fps=2))
    assert len(sampled) == 4 and sampled[0].size == (64, 48)


def test_eviction_keeps_casa_attention_unchanged(model_and_processor, monkeypatch):
    """RoPE is relative: after dropping text and moving every position back, each CASA layer must compute exactly
    what it computes at the original positions from the unmoved state."""
    model, processor = model_and_processor
    stream = CasaStream(model, processor, frame_text="what ?", max_new_tokens=2, text_budget=TextBudget(2, 12))
    list(stream.run(frames(4)))
    call = feed_evicting_frame(stream, frames(1)[0], monkeypatch)
    images, windows = call.kwargs["image_states"], call.kwargs["casa_inputs"].windows
    positions = positions_before_eviction(stream, call)
    image_positions = positions[0][windows.image_mask[0]].repeat_interleave(4)[None]
    expected = casa_before_eviction(stream, call, model.model.language_model.rotary_emb(images[None], image_positions))
    assert (call.output - expected).abs().max() < 1e-5


def test_eviction_leaves_the_image_keys_of_cross_attention_without_rope():
    """Plain cross-attention without RoPE stores its image keys unrotated: a text budget moves the text keys back
    and leaves every CASA window as it was."""
    model = tiny_model(attn="sdpa", casa_attention="cross_attention")
    stream = CasaStream(model, tiny_processor(), frame_text="what ?", max_new_tokens=2, text_budget=TextBudget(2, 12))
    list(stream.run(frames(4)))
    evicted = stream.evicted_tokens
    before = [layer.window.keys.clone() for layer in stream.cache.layers]
    stream.feed(None, "what ?", max_new_tokens=1)
    assert stream.evicted_tokens > evicted
    for layer, keys in zip(stream.cache.layers, before, strict=True):
        assert torch.equal(layer.window.keys, keys)
