"""Every CASA attention backend against the slow reference, on the same weights."""

import pytest
import torch
import varlen  # noqa: F401  (registers the flash_varlen_reference stand-in)
from reference import fast_and_reference_logits, reference_casa_window_attention
from tiny import IMAGE_TOKEN, PLACEMENTS, random_images, random_text, tiny_model, two_left_padded_samples
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import casa_hf.casa_attention as casa_attention

TOLERANCE = 1e-4


# The CASA options of each mode the reference checks: plain cross-attention without positions (the paper's, new
# configs) and with RoPE (checkpoints saved before `casa_cross_attention_rope`)
MODES = {
    "casa": dict(casa_attention="casa"),
    "cross_attention": dict(casa_attention="cross_attention"),
    "cross_attention_with_rope": dict(casa_attention="cross_attention", casa_cross_attention_rope=True),
    "casa_skipping_text_only_windows": dict(casa_attention="casa", casa_text_only_windows="skip"),
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize(
    "attn", ["eager", "sdpa", pytest.param("flex_attention", marks=pytest.mark.slow), "flash_varlen_reference"]
)
@pytest.mark.parametrize("placement", list(PLACEMENTS))
@pytest.mark.parametrize("backbone", ["qwen2", "llama"])
def test_backend_matches_reference(monkeypatch, mode, attn, placement, backbone):
    """Fast path on `attn` against eager text attention + the loop reference for the CASA sub-layer (projections,
    RoPE only where it has positions, loop attention) inside the block written term by term for its placement, on
    the same weights. The llama backbone has attention biases, o_proj's included: a shared parallel block, which maps
    both attentions through one `o_proj`, must add its bias twice as the two projections do."""
    inputs = two_left_padded_samples()
    options = dict(MODES[mode], **PLACEMENTS[placement])
    if backbone == "llama":
        options["text_overrides"] = dict(attention_bias=True)
    model = tiny_model(backbone, attn=attn, **options)
    with torch.no_grad():  # biases start at zero: give them values that count
        for name, parameter in model.model.language_model.named_parameters():
            if name.endswith("proj.bias"):
                parameter.normal_(std=0.5)
    casa_layers = [layer for layer in model.model.language_model.layers if layer.has_casa]
    assert {layer.casa_attn.rotary for layer in casa_layers} == {mode != "cross_attention"}
    fast, slow = fast_and_reference_logits(monkeypatch, model, tiny_model(backbone, attn="eager", **options), inputs)
    valid = inputs["attention_mask"].bool()
    assert (fast[valid] - slow[valid]).abs().max() <= TOLERANCE


def test_reference_sees_only_latest_image(monkeypatch):
    """Changing an earlier image must not move logits after a later image (the window boundary holds)."""
    model = tiny_model()
    ids = torch.tensor([random_text(3) + [IMAGE_TOKEN] + random_text(3, 1) + [IMAGE_TOKEN] + random_text(3, 2)])
    pixel_values, grid = random_images([(4, 4), (4, 4)])
    altered = pixel_values.clone()
    altered[:16] += 1.0  # first image only
    with torch.no_grad():
        base = model(input_ids=ids, pixel_values=pixel_values, image_grid_thw=grid).logits
        moved = model(input_ids=ids, pixel_values=altered, image_grid_thw=grid).logits
    first_image, second_image = [t for t, token in enumerate(ids[0].tolist()) if token == IMAGE_TOKEN]
    assert (base[0, :first_image] - moved[0, :first_image]).abs().max() == 0  # text before any image
    assert (base[0, first_image:second_image] - moved[0, first_image:second_image]).abs().min() > 0  # sees image 1
    # after the second image only SA carries (text-only) information from the first window
    monkeypatch.setattr(casa_attention, "casa_window_attention", reference_casa_window_attention)
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=altered, image_grid_thw=grid).logits
    assert (ref - moved).abs().max() <= TOLERANCE


def test_prefill_cost_follows_window_sizes(monkeypatch):
    """A long prompt then a long video: CASA scores cost about the sum of per-window sizes, never text x all images,
    and the long prompt window does not make every short frame window pay its size."""
    frames, text_per_frame, prompt = 24, 4, 120
    row = random_text(prompt)
    for i in range(frames):
        row += [IMAGE_TOKEN] + random_text(text_per_frame - 1, i)
    pixel_values, grid = random_images([(4, 4)] * frames)
    tokens_per_image = 4

    scored = []
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def spy(module, query, key, *args, **kwargs):
        if isinstance(module, casa_attention.CasaAttention):
            scored.append(query.shape[0] * query.shape[2] * key.shape[2])
        return sdpa(module, query, key, *args, **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "sdpa", spy)
    model = tiny_model(attn="sdpa", casa_layers=[0])
    with torch.no_grad():
        model(input_ids=torch.tensor([row]), pixel_values=pixel_values, image_grid_thw=grid)
    windows = [prompt * prompt] + [text_per_frame * (tokens_per_image + text_per_frame)] * frames
    dense = len(row) * (len(row) + frames * tokens_per_image)
    assert sum(scored) <= 4 * sum(windows)
    assert sum(scored) * 4 < dense


@pytest.mark.parametrize("mode", ["casa", "cross_attention"])
def test_attention_weights_against_the_reference(monkeypatch, mode):
    """`output_attentions=True` (eager): the backbone's self-attention weights per block, and CASA's weights on the
    image each token sees (`cross_attentions`), against the loop reference; cached decoding reports the same."""
    inputs = two_left_padded_samples()
    model = tiny_model(attn="eager", casa_attention=mode)
    with torch.no_grad():
        fast = model(**inputs, output_attentions=True)
    layers = model.config.text_config.num_hidden_layers
    batch, width = inputs["input_ids"].shape
    assert len(fast.attentions) == len(fast.cross_attentions) == layers
    assert fast.attentions[0].shape == (batch, 4, width, width)
    assert fast.cross_attentions[0].shape == (batch, 4, width, 6)  # the largest image: a 4 x 6 grid, merged 2 x 2

    valid = inputs["attention_mask"].bool()
    monkeypatch.setattr(casa_attention, "casa_window_attention", reference_casa_window_attention)
    with torch.no_grad():
        slow = model(**inputs, output_attentions=True)
    for fast_weights, slow_weights in zip(fast.cross_attentions, slow.cross_attentions, strict=True):
        assert slow_weights.abs().sum() > 0
        assert (fast_weights.transpose(1, 2)[valid] - slow_weights.transpose(1, 2)[valid]).abs().max() <= TOLERANCE
    monkeypatch.undo()

    # a decode step reads its image from the cache: same weights as the full forward's last token
    row = inputs["input_ids"][1:, valid[1]]
    pixel_values, grid = random_images([(4, 4), (4, 6), (2, 4)])
    pixel_values, grid = pixel_values[int(grid[:2].prod(-1).sum()) :], grid[2:]
    with torch.no_grad():
        full = model(input_ids=row, pixel_values=pixel_values, image_grid_thw=grid, output_attentions=True)
        prefill = model(input_ids=row[:, :-1], pixel_values=pixel_values, image_grid_thw=grid, use_cache=True)
        step = model(input_ids=row[:, -1:], cache=prefill.cache, use_cache=True, output_attentions=True)
    for layer in range(layers):
        torch.testing.assert_close(step.cross_attentions[layer][..., -1, :], full.cross_attentions[layer][..., -1, :])
        torch.testing.assert_close(step.attentions[layer][..., -1, :], full.attentions[layer][..., -1, :])


def test_self_attention_weights_are_the_backbones():
    """With its CASA layers closed, a CASA model's self-attention weights on text are its backbone LLM's."""
    model = tiny_model(attn="eager")
    for layer in model.model.language_model.layers:
        torch.nn.init.zeros_(layer.casa_attn.o_proj.weight)
    ids = torch.tensor([random_text(9)])
    with torch.no_grad():
        ours = model(input_ids=ids, output_attentions=True).attentions
        backbone = model.backbone_llm()(input_ids=ids, output_attentions=True).attentions
    for mine, theirs in zip(ours, backbone, strict=True):
        torch.testing.assert_close(mine, theirs)
