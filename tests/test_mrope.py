"""`casa_image_positions="mrope"`: Qwen2.5-VL's multimodal RoPE on CASA image keys, against Qwen2.5-VL's own rope index
and rotary embedding, the slow loop reference, cached and chunked computation, and the conversion default."""

import json

import pytest
import torch
import varlen  # noqa: F401  (registers the flash_varlen_reference stand-in)
from eviction import casa_before_eviction, feed_evicting_frame, positions_before_eviction
from reference import (
    reference_casa_window_attention,
    reference_decoder_block,
    reference_mrope_image_positions,
    reference_mrope_position_embeddings,
)
from tiny import (
    IMAGE_TOKEN,
    PLACEMENTS,
    TINY_VISION,
    conversation,
    incremental_logits,
    left_pad,
    random_text,
    samples,
    save_tiny_qwen2_5_vl,
    tiny_config,
    tiny_model,
    tiny_qwen2_5_vl_config,
    two_left_padded_samples,
)
from transformers import AutoModel
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel, Qwen2_5_VLRotaryEmbedding

import casa_hf.casa_attention as casa_attention
from casa_hf import CasaConfig
from casa_hf.casa_positions import CasaPositions
from casa_hf.modeling_casa import CasaDecoderLayer

TOLERANCE = 1e-4
MROPE_SECTION = [2, 3, 3]  # head_dim 16: 8 rotary frequencies, split (temporal, height, width)


def mrope_text_config(section=MROPE_SECTION) -> dict:
    text = tiny_config().text_config.to_dict()
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": list(section)}
    return text


def mrope_model(attn: str = "sdpa", positions: str = "mrope", **overrides):
    """A tiny model whose CASA attention is sharpened (q, k and o projections x 5), so that where its image keys sit
    moves the logits by far more than the tolerances (x 1 moves them by ~1e-4 between mRoPE and insertion)."""
    model = tiny_model(attn=attn, text_config=mrope_text_config(), casa_image_positions=positions, **overrides)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            if layer.has_casa:  # shared and replaced blocks sharpen self-attention's projections, which CASA uses
                for name in ("q_proj", "k_proj", "o_proj"):
                    getattr(layer.casa_attn.projections(layer.self_attn), name).weight.mul_(5)
    return model


def images_with_frames(grids: list[tuple[int, int, int]], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Patches of images whose grids are (frames, height, width) in patches, as the Qwen2-VL processor gives them."""
    g = torch.Generator().manual_seed(seed)
    grid_thw = torch.tensor(grids)
    return torch.randn(int(grid_thw.prod(-1).sum()), 3 * 2 * 14 * 14, generator=g), grid_thw


def qwen2_5_vl_model() -> Qwen2_5_VLModel:
    return Qwen2_5_VLModel(tiny_qwen2_5_vl_config(layers=1, mrope_section=MROPE_SECTION)).eval()


LAYOUTS = {
    "1x4x4": [(1, 4, 4)],
    "1x6x4": [(1, 6, 4)],
    "1x4x6": [(1, 4, 6)],
    "2x4x6": [(2, 4, 6)],  # two temporal patches: the temporal component steps once
    "two_images_text_between": [(1, 6, 4), (1, 4, 8)],
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_image_positions_are_qwen2_5_vls_rope_index(layout, monkeypatch):
    """The (t, h, w) ids our image keys get against `Qwen2_5_VLModel.get_rope_index` on the same grids, and their
    cos/sin against Qwen2.5-VL's own rotary embedding (its `mrope_section` composition) at those ids.

    What is compared, and why: Qwen2.5-VL inserts an image's merged tokens into the sequence, starting at the text
    position s its first token gets, and lays token (frame f, row r, column c) at (s + f, s + r, s + c); the text after
    the image continues from max + 1. CASA keeps text-only positions (the image is one placeholder at text position
    p), so text after an image, hence the start s of any later image, differs from Qwen's by design. For every image
    we therefore compare its tokens' ids relative to its start: Qwen's ids - s must equal ours - p, token by token in
    the merger's (raster) order. For the first image s == p (the same text precedes it), so there the ids are
    compared as they are."""
    grids = LAYOUTS[layout]
    merge = TINY_VISION["spatial_merge_size"]
    tokens = [t * (h // merge) * (w // merge) for t, h, w in grids]
    texts = [random_text(3, 1), random_text(2, 2), random_text(2, 3)][: len(grids) + 1]
    ours, theirs = list(texts[0]), list(texts[0])
    for image_tokens, text in zip(tokens, texts[1:], strict=True):
        ours += [IMAGE_TOKEN] + text
        theirs += [IMAGE_TOKEN] * image_tokens + text
    pixel_values, grid_thw = images_with_frames(grids)

    # Qwen2.5-VL's own layout of the expanded sequence
    qwen = qwen2_5_vl_model()
    theirs = torch.tensor([theirs])
    qwen_ids, _ = qwen.get_rope_index(theirs, (theirs == IMAGE_TOKEN).int(), image_grid_thw=grid_thw)
    qwen_image_ids = qwen_ids[:, 0, theirs[0] == IMAGE_TOKEN]  # [3, image tokens]
    starts = qwen_image_ids[0].split(tokens)
    placeholders = [t for t, token in enumerate(ours) if token == IMAGE_TOKEN]  # text positions (no padding)
    expected = torch.cat(
        [
            ids - start[0] + p
            for ids, start, p in zip(qwen_image_ids.split(tokens, 1), starts, placeholders, strict=True)
        ],
        dim=1,
    )
    assert torch.equal(expected[:, : tokens[0]], qwen_image_ids[:, : tokens[0]])  # the first image: as Qwen has it

    # ours: the ids the forward computes, and the cos/sin its CASA layers receive
    model = mrope_model()
    used, seen = [], []
    compute = CasaPositions.image_positions
    monkeypatch.setattr(
        CasaPositions, "image_positions", lambda self, *args: used.append(compute(self, *args)) or used[-1]
    )
    hook = model.model.language_model.layers[0].casa_attn.register_forward_hook(
        lambda module, args, kwargs, output: seen.append(kwargs["casa_inputs"].image_position_embeddings),
        with_kwargs=True,
    )
    with torch.no_grad():
        model(input_ids=torch.tensor([ours]), pixel_values=pixel_values, image_grid_thw=grid_thw)
    hook.remove()
    assert torch.equal(used[0], expected)
    rotary = Qwen2_5_VLRotaryEmbedding(qwen.config.text_config)
    cos, sin = rotary(torch.zeros(1, 1, 64), position_ids=expected[:, None])
    torch.testing.assert_close(seen[0][0], cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(seen[0][1], sin, rtol=0, atol=1e-6)


@pytest.mark.parametrize("placement", list(PLACEMENTS))
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_mrope_model_matches_the_loop_reference(monkeypatch, attn, placement):
    """The fast path with mRoPE image keys against a reference written apart from it: image positions laid out by
    loops over each image's frames, rows and columns, their cos/sin from Qwen2.5-VL's own rotary embedding, eager
    text attention and the loop CASA reference (projections, RoPE, loop attention), on a left-padded batch of three
    non-square images (4x4, 4x6 and 2x4 patches)."""
    inputs = two_left_padded_samples()
    model = mrope_model(attn, **PLACEMENTS[placement])
    reference = mrope_model("eager", **PLACEMENTS[placement])
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        fast = model(**inputs).logits
    monkeypatch.setattr(casa_attention, "casa_window_attention", reference_casa_window_attention)
    monkeypatch.setattr(CasaDecoderLayer, "forward", reference_decoder_block)
    monkeypatch.setattr(CasaPositions, "image_positions", reference_mrope_image_positions)
    monkeypatch.setattr(CasaPositions, "embeddings", reference_mrope_position_embeddings)
    with torch.no_grad():
        slow = reference(**inputs).logits
    monkeypatch.undo()
    valid = inputs["attention_mask"].bool()
    assert (fast[valid] - slow[valid]).abs().max() <= TOLERANCE
    # the positions matter: the same weights with images at their insertion point compute something else
    insertion = mrope_model(attn, positions="insertion", **PLACEMENTS[placement])
    insertion.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert (insertion(**inputs).logits[valid] - fast[valid]).abs().max() > 10 * TOLERANCE


@pytest.mark.parametrize("placement", list(PLACEMENTS))
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_chunked_and_cached_mrope_equal_the_full_forward(attn, placement):
    """Token-by-token decoding after a prefill and uneven chunks (images arriving in later chunks) through one
    `CasaCache` give one full forward's logits."""
    model = mrope_model(attn, **PLACEMENTS[placement])
    input_ids, pixel_values, grid_thw = conversation(4)
    with torch.no_grad():
        full = model(input_ids=input_ids, pixel_values=pixel_values, image_grid_thw=grid_thw).logits
        length = input_ids.shape[1]
        steps, _ = incremental_logits(model, input_ids, pixel_values, grid_thw, [6] + [1] * (length - 6))
        uneven, _ = incremental_logits(model, input_ids, pixel_values, grid_thw, [3, 5, length - 8])
    assert (full - steps).abs().max() <= TOLERANCE
    assert (full - uneven).abs().max() <= TOLERANCE


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_generate_with_mrope_equals_the_full_forward(attn):
    """Cached greedy `generate()` scores every step as a full forward over the prompt and the tokens so far; a prefill
    in chunks (each chunk gets its images with their grids), also into a static cache, and beams over a batch (each
    image's grid follows it to its sample's beams) give one prefill's tokens."""
    model = mrope_model(attn)
    rows, images = samples()
    ids, mask = left_pad(rows)
    pixel_values = torch.cat([pv for pv, _ in images if pv is not None])
    grid_thw = torch.cat([g for _, g in images if g is not None])
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, image_grid_thw=grid_thw)
    options = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True)
    out = model.generate(**inputs, **options)
    steps = out.sequences.shape[1] - ids.shape[1]
    full_mask = torch.cat([mask, torch.ones(len(rows), steps, dtype=mask.dtype)], 1)
    with torch.no_grad():
        full = model(
            input_ids=out.sequences, attention_mask=full_mask, pixel_values=pixel_values, image_grid_thw=grid_thw
        ).logits
    generated = torch.stack(out.logits, 1)
    assert (generated - full[:, ids.shape[1] - 1 : -1]).abs().max() <= TOLERANCE

    for extra in (dict(prefill_chunk_size=3), dict(cache_implementation="static", prefill_chunk_size=3)):
        chunked = model.generate(**inputs, **options, **extra)
        assert chunked.sequences.tolist() == out.sequences.tolist()
        assert (torch.stack(chunked.logits, 1) - generated).abs().max() <= TOLERANCE

    beams = dict(num_beams=2, num_return_sequences=2, min_new_tokens=3, max_new_tokens=3, do_sample=False)
    batched = model.generate(**inputs, **beams)
    for i, row in enumerate(rows):
        pv, grid = images[i]
        single = model.generate(input_ids=torch.tensor([row]), pixel_values=pv, image_grid_thw=grid, **beams)
        assert batched[2 * i : 2 * i + 2, ids.shape[1] :].tolist() == single[:, len(row) :].tolist()


def test_key_shift_moves_mrope_image_keys():
    """A text budget moves cached keys back by `delta` with `shift_key_positions` (plain RoPE by delta). For an mRoPE
    key, whose three components all move by delta, that is the same rotation in every section: the shifted keys equal
    keys rotated at the moved (t, h, w) positions."""
    language_model = mrope_model().model.language_model
    keys = torch.randn(1, 2, 6, 16)
    positions = torch.tensor([[40] * 6, [40, 40, 41, 41, 42, 42], [40, 41, 40, 41, 40, 41]])
    apply_rotary = language_model.layers[0].casa_attn.backbone.apply_rotary_pos_emb
    text_positions = torch.zeros(1, 1, dtype=torch.long)

    def rope(at):
        _, (cos, sin) = language_model.casa_positions.embeddings(keys, text_positions, at)
        return apply_rotary(keys, keys, cos, sin)[1]

    assert (language_model.shift_key_positions(rope(positions), -25) - rope(positions - 25)).abs().max() < 1e-5
    assert (rope(positions) - rope(positions[:1].expand(3, -1))).abs().max() > 1e-2  # the layout is not 1-D


def test_mrope_needs_the_sections_and_keeps_them():
    """Refused, naming the field, without `mrope_section` in the text config or with sections that do not split the
    rotary frequencies; kept through save/load, without the rope validation's unknown-key warning."""
    with pytest.raises(ValueError, match=r"casa_image_positions='mrope' needs .*rope_parameters\['mrope_section'\]"):
        tiny_config(casa_image_positions="mrope")
    with pytest.raises(ValueError, match=r"mrope_section'\]=\[2, 3, 4\] must be 3 positive integers summing to .* 8"):
        tiny_config(text_config=mrope_text_config([2, 3, 4]), casa_image_positions="mrope")
    config = tiny_config(text_config=mrope_text_config(), casa_image_positions="mrope")
    reloaded = CasaConfig.from_dict(config.to_dict())
    assert reloaded.casa_image_positions == "mrope"
    assert reloaded.text_config.rope_parameters["mrope_section"] == MROPE_SECTION
    assert "ignore_keys_at_rope_validation" not in json.dumps(config.to_dict(), default=str)


def test_pre_encoded_images_without_grids_are_refused():
    """mRoPE lays image keys out by their grids: features from `get_image_features` carry them; bare ones cannot."""
    model = mrope_model()
    pixel_values, grid_thw = images_with_frames([(1, 4, 6)])
    ids = torch.tensor([random_text(3) + [IMAGE_TOKEN] + random_text(2, 1)])
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values, grid_thw)
        assert torch.equal(features.image_grid_thw, grid_thw)
        expected = model(input_ids=ids, pixel_values=pixel_values, image_grid_thw=grid_thw).logits
        torch.testing.assert_close(model(input_ids=ids, mm_encoder_outputs={"image": features}).logits, expected)
        bare = BaseModelOutputWithPooling(pooler_output=features.pooler_output)
        with pytest.raises(ValueError, match="casa_image_positions='mrope' lays image keys out by each image's grid"):
            model(input_ids=ids, mm_encoder_outputs={"image": bare})


def test_qwen2_5_vl_conversion_defaults_to_mrope(tmp_path):
    """`casa-hf convert qwen2_5_vl` keeps the source's `mrope_section` and writes `casa_image_positions="mrope"`, exact
    on text (`--verify`); `--image-positions` overrides it."""
    from casa_hf.cli import main

    source = tmp_path / "qwen"
    source_model = save_tiny_qwen2_5_vl(source)
    main(["convert", "qwen2_5_vl", str(source), str(tmp_path / "mrope"), "--verify"])
    config = json.loads((tmp_path / "mrope" / "config.json").read_text())
    report = json.loads((tmp_path / "mrope" / "conversion_report.json").read_text())
    assert config["casa_image_positions"] == "mrope" and report["options"]["image_positions"] == "mrope"
    assert config["text_config"]["rope_parameters"]["mrope_section"] == MROPE_SECTION
    assert report["verification"]["text_max_abs_logit_diff"] <= 1e-5
    model = AutoModel.from_pretrained(tmp_path / "mrope").eval()
    ids = torch.tensor([random_text(12, 7), random_text(12, 8)])
    with torch.no_grad():
        assert (source_model(input_ids=ids).logits - model(input_ids=ids).logits).abs().max() <= 1e-5

    main(["convert", "qwen2_5_vl", str(source), str(tmp_path / "insertion"), "--image-positions", "insertion"])
    config = json.loads((tmp_path / "insertion" / "config.json").read_text())
    assert config["casa_image_positions"] == "insertion"


def test_text_budget_eviction_keeps_mrope_casa_attention_unchanged(monkeypatch):
    """A stream of non-square frames (4 x 6 patches: a 2 x 3 merged grid) under a text budget: after dropping text
    and moving every cached key back by the dropped count (the stored mRoPE image keys included), each CASA layer
    computes exactly what it computes at the original positions, image keys laid out from there, from the unmoved
    state."""

    import numpy as np
    from PIL import Image
    from tiny import tiny_processor

    from casa_hf.streaming import CasaStream, TextBudget

    model = mrope_model()
    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 255, (56, 84, 3), dtype=np.uint8)) for _ in range(5)]
    stream = CasaStream(model, tiny_processor(), frame_text="what ?", max_new_tokens=2, text_budget=TextBudget(2, 12))
    list(stream.run(frames[:4]))
    call = feed_evicting_frame(stream, frames[4], monkeypatch)
    images, windows = call.kwargs["image_states"], call.kwargs["casa_inputs"].windows
    assert images.shape[0] == 6

    language_model = model.model.language_model
    positions = positions_before_eviction(stream, call)
    insertion = positions[0][windows.image_mask[0]]
    image_positions = language_model.casa_positions.image_positions(insertion, [6], torch.tensor([[1, 4, 6]]))
    _, moved = language_model.casa_positions.embeddings(images[None], positions, image_positions)
    expected = casa_before_eviction(stream, call, moved)
    assert (call.output - expected).abs().max() < 1e-5
