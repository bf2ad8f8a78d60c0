"""Cropping the CASA cache, and the decoding that needs it: assisted (draft model) and prompt-lookup generation."""

import pytest
import torch
from tiny import IMAGE_TOKEN, conversation, incremental_logits, random_images, random_text, tiny_model

from casa_hf import CasaDynamicLayer

TOLERANCE = 1e-4


@pytest.mark.parametrize("mode", ["casa", "cross_attention"])
def test_crop_then_feeding_again_equals_the_full_forward(mode):
    model = tiny_model(attn="sdpa", casa_attention=mode)
    input_ids, pixel_values, grid_thw = conversation(4)
    length, crop = input_ids.shape[1], 2
    text_after_last_image = length - max(t for t, tok in enumerate(input_ids[0].tolist()) if tok == IMAGE_TOKEN)
    assert text_after_last_image > crop + 1
    with torch.no_grad():
        full = model(input_ids=input_ids, pixel_values=pixel_values, image_grid_thw=grid_thw).logits
        _, cache = incremental_logits(model, input_ids, pixel_values, grid_thw, [length - 1])
        slots = cache.casa_state_lengths(0).tolist()
        cache.crop(-crop)
        assert cache.get_seq_length() == length - 1 - crop
        removed_slots = crop if mode == "casa" else 0  # cross-attention windows hold the image only
        assert cache.casa_state_lengths(0).tolist() == [slots[0] - removed_slots]
        again = model(input_ids=input_ids[:, length - 1 - crop :], cache=cache, use_cache=True).logits
    assert (again - full[:, length - 1 - crop :]).abs().max() <= TOLERANCE


def test_crop_back_past_the_latest_image_is_refused_and_changes_nothing():
    model = tiny_model(attn="sdpa")
    ids = torch.tensor([random_text(5) + [IMAGE_TOKEN] + random_text(3, 1)])
    pixel_values, grid_thw = random_images([(4, 4)])
    with torch.no_grad():
        cache = model(input_ids=ids, pixel_values=pixel_values, image_grid_thw=grid_thw, use_cache=True).cache
    lengths = cache.casa_state_lengths(0).tolist()
    with pytest.raises(ValueError, match=r"Cannot crop 4 tokens .* would lose its latest image .* \[3\] tokens"):
        cache.crop(-4)  # the 3 tokens after the image can go, its placeholder cannot
    assert cache.get_seq_length() == ids.shape[1] and cache.casa_state_lengths(0).tolist() == lengths
    cache.crop(-3)
    assert cache.get_seq_length() == ids.shape[1] - 3


def test_backbone_llm_shares_the_weights():
    model = tiny_model(attn="sdpa")
    llm = model.backbone_llm()
    assert type(llm).__name__ == "Qwen2ForCausalLM"
    assert (
        llm.model.layers[1].mlp.up_proj.weight.data_ptr()
        == model.model.language_model.layers[1].mlp.up_proj.weight.data_ptr()
    )
    assert not any("casa" in name for name in llm.state_dict())


@pytest.mark.parametrize("mode", ["casa", "cross_attention"])
def test_assisted_and_prompt_lookup_decoding_give_the_greedy_tokens(mode, monkeypatch):
    model = tiny_model(attn="sdpa", casa_attention=mode)
    ids = torch.tensor([random_text(6) + [IMAGE_TOKEN] + random_text(4, 1) + random_text(6)])
    pixel_values, grid_thw = random_images([(4, 6)])
    inputs = dict(
        input_ids=ids, pixel_values=pixel_values, image_grid_thw=grid_thw, max_new_tokens=16, do_sample=False
    )
    crops = []
    crop = CasaDynamicLayer.crop
    monkeypatch.setattr(CasaDynamicLayer, "crop", lambda self, n: crops.append(n) or crop(self, n))

    greedy = model.generate(**inputs)
    assert model.generate(**inputs, assistant_model=model.backbone_llm()).tolist() == greedy.tolist()
    assert model.generate(**inputs, prompt_lookup_num_tokens=3).tolist() == greedy.tolist()
    assert any(n < 0 for n in crops)  # drafts were rejected, so the windows were cropped
