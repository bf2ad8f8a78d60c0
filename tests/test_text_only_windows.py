"""`casa_text_only_windows="skip"`: text before a conversation's first image is computed exactly as the text LLM does,
in the full forward, cached chunks, generate() (dynamic and static caches) and mixed batches."""

import pytest
import torch
from tiny import IMAGE_TOKEN, random_images, random_text, tiny_model

from casa_hf import CasaCache

TOLERANCE = 1e-5


def skipping_model_and_llm(attn: str = "sdpa"):
    model = tiny_model(attn=attn, casa_text_only_windows="skip")
    return model, model.backbone_llm()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_text_only_input_is_the_text_llm(attn):
    model, llm = skipping_model_and_llm(attn)
    ids = torch.tensor([random_text(12, seed=1)])
    with torch.no_grad():
        expected = llm(input_ids=ids).logits
        torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=TOLERANCE, rtol=0)
        cache, chunks = CasaCache(config=model.config.text_config), []
        for start in range(0, ids.shape[1], 5):
            chunks.append(model(input_ids=ids[:, start : start + 5], cache=cache, use_cache=True).logits)
        torch.testing.assert_close(torch.cat(chunks, dim=1), expected, atol=TOLERANCE, rtol=0)
        # the paper's pattern ("attend") moves the same text: the check above can fail
        attending = tiny_model(attn=attn)
        assert (attending(input_ids=ids).logits - expected).abs().max() > 1e-3


def test_text_before_the_first_image_is_the_text_llm_and_the_image_still_counts():
    model, llm = skipping_model_and_llm()
    prefix = random_text(6, seed=2)
    ids = torch.tensor([prefix + [IMAGE_TOKEN] + random_text(4, seed=3)])
    pixel_values, grid = random_images([(4, 4)])
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pixel_values, image_grid_thw=grid).logits
        text_only = llm(input_ids=torch.tensor([prefix])).logits
        other_image = model(input_ids=ids, pixel_values=pixel_values + 1, image_grid_thw=grid).logits
    torch.testing.assert_close(logits[:, : len(prefix)], text_only, atol=TOLERANCE, rtol=0)
    assert (logits[:, len(prefix) :] - other_image[:, len(prefix) :]).abs().min() > 0


@pytest.mark.parametrize("cache_implementation", ["dynamic", "static"])
def test_generate_a_mixed_batch(cache_implementation):
    """A left-padded batch: a text-only sample generates the text LLM's tokens next to a sample with an image, whose
    tokens equal its own unbatched generation."""
    model, llm = skipping_model_and_llm()
    text_row = random_text(7, seed=4)
    image_row = random_text(2, seed=5) + [IMAGE_TOKEN] + random_text(3, seed=6)
    width = max(len(text_row), len(image_row))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in (text_row, image_row)])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(text_row), width - len(image_row)])[:, None]).long()
    pixel_values, grid = random_images([(4, 4)])
    kwargs = dict(max_new_tokens=8, do_sample=False, cache_implementation=cache_implementation)
    images = dict(pixel_values=pixel_values, image_grid_thw=grid)
    batch = model.generate(input_ids=ids, attention_mask=mask, **images, **kwargs)
    alone = llm.generate(input_ids=torch.tensor([text_row]), **kwargs)
    with_image = model.generate(input_ids=torch.tensor([image_row]), **images, **kwargs)
    assert batch[0, width:].tolist() == alone[0, len(text_row) :].tolist()
    assert batch[1, width:].tolist() == with_image[0, len(image_row) :].tolist()
