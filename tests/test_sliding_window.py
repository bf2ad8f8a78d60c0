"""Backbones with sliding-window layers: with its CASA layers closed, a CASA model is its backbone, in every path."""

import pytest
import torch
from tiny import random_text, tiny_config

from casa_hf import CasaCache, CasaForConditionalGeneration
from casa_hf.backbones import SUPPORTED_TEXT_MODEL_TYPES

TOLERANCE = 1e-5
WINDOW = 6
# Supported backbones that have sliding-window layers, and the text-config fields that switch them on.
SLIDING_BACKBONES = {"qwen2": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)}


def test_every_supported_backbone_with_sliding_layers_is_covered():
    for backbone in SUPPORTED_TEXT_MODEL_TYPES:
        text_fields = tiny_config(backbone).text_config.to_dict()
        assert backbone in SLIDING_BACKBONES or "sliding_window" not in text_fields, backbone


def closed_casa_and_backbone(backbone: str, attn: str):
    """A CASA model whose CASA output projections are zero, and its backbone LLM carrying the same weights."""
    text = tiny_config(backbone).text_config.to_dict()
    text.pop("layer_types", None)  # recomputed from the sliding-window fields
    text.update(SLIDING_BACKBONES[backbone])
    config = tiny_config(backbone, text_config=text)
    assert "sliding_attention" in config.text_config.layer_types
    torch.manual_seed(0)
    model = CasaForConditionalGeneration(config).eval()
    for layer in model.model.language_model.layers:
        if layer.has_casa:
            torch.nn.init.zeros_(layer.casa_attn.o_proj.weight)
    model.set_attn_implementation({"text_config": attn, "vision_config": "sdpa"})
    return model, model.backbone_llm()


@pytest.mark.parametrize("backbone", sorted(SLIDING_BACKBONES))
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_closed_casa_equals_backbone_beyond_the_window(backbone, attn):
    model, llm = closed_casa_and_backbone(backbone, attn)
    ids = torch.tensor([random_text(5 * WINDOW)])
    with torch.no_grad():
        expected = llm(input_ids=ids).logits
        torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=TOLERANCE, rtol=0)

        cache, chunks = CasaCache(config=model.config.text_config), []
        for start in range(0, ids.shape[1], 7):  # chunks that straddle the window edge
            out = model(input_ids=ids[:, start : start + 7], cache=cache, use_cache=True)
            chunks.append(out.logits)
        torch.testing.assert_close(torch.cat(chunks, dim=1), expected, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("backbone", sorted(SLIDING_BACKBONES))
def test_closed_casa_generates_as_backbone_beyond_the_window(backbone):
    model, llm = closed_casa_and_backbone(backbone, "sdpa")
    ids = torch.tensor([random_text(2 * WINDOW, seed=1)])
    kwargs = dict(max_new_tokens=3 * WINDOW, do_sample=False)
    assert model.generate(input_ids=ids, **kwargs).tolist() == llm.generate(input_ids=ids, **kwargs).tolist()

    # a left-padded batch, rows shorter and longer than the window
    rows = [random_text(3, seed=2), random_text(2 * WINDOW + 1, seed=3)]
    width = max(map(len, rows))
    input_ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    assert model.generate(**batch).tolist() == llm.generate(**batch).tolist()
