"""Training CASA-SmolLM2's added weights: the cached frozen prefix gives the loss and gradients of a full forward."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from smollm2_training import NoPrefix, loss_and_grads, model_with_casa_on_top
from tiny import IMAGE_TOKEN, random_images, random_text

from casa_hf.smollm2.train import frozen_prefix
from casa_hf.training.collator import IGNORE_INDEX


def batch(seed: int) -> dict:
    """Three right-padded conversations of different lengths, one image each, labels on their last tokens."""
    rows = [[5, 6, IMAGE_TOKEN, *random_text(length, seed + length)] for length in (9, 6, 4)]
    width = max(map(len, rows))
    input_ids = torch.tensor([row + [0] * (width - len(row)) for row in rows])
    attention_mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
    labels = torch.where(attention_mask.bool(), input_ids, IGNORE_INDEX)
    labels[:, :4] = IGNORE_INDEX
    pixel_values, grid = random_images([(4, 4)] * 3, seed)
    return dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=labels,
        pixel_values=pixel_values,
        image_grid_thw=grid,
    )


@pytest.mark.parametrize("lora", [False, True])
def test_frozen_prefix_matches_the_full_forward(lora):
    model = base = model_with_casa_on_top()
    if lora:  # adapters on the CASA layers, as examples/finetune_lora.py trains them (random B: A gets gradients)
        config = LoraConfig(r=4, target_modules=r".*casa_attn\.(q|v)_proj", init_lora_weights=False)
        model = get_peft_model(base, config)
    first, second = batch(0), batch(1)
    expected = [loss_and_grads(model, inputs) for inputs in (first, second, first)]

    trainer = NoPrefix()
    with frozen_prefix(base) as trainer.prefix:
        assert [type(layer).__name__ for layer in base.model.language_model.layers[:2]] == ["FrozenPrefix", "_Skip"]
        actual = [loss_and_grads(model, inputs, trainer) for inputs in (first, second, first)]  # the 3rd: from store
        assert len(trainer.prefix.store) == 6
    assert [type(layer).__name__ for layer in base.model.language_model.layers] == ["CasaDecoderLayer"] * 4
    for (loss, grads), (ref_loss, ref_grads) in zip(actual, expected, strict=True):
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        assert grads.keys() == ref_grads.keys() and any(".casa_attn." in name for name in grads)
        assert all("lora_" in name for name in grads) == lora
        for name in grads:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6)


def test_frozen_prefix_refuses_a_trainable_block_below_casa():
    """A block below the lowest CASA layer that trains would be served from the cache: refused, named."""
    model = model_with_casa_on_top()
    model.model.language_model.layers[1].mlp.up_proj.weight.requires_grad_(True)
    with pytest.raises(ValueError, match=r"lowest CASA layer \(2\) must be frozen; layers\.1\.mlp\.up_proj\.weight"):
        with frozen_prefix(model):
            pass


@pytest.mark.parametrize("cached", [False, True])
def test_prose_rows_are_distilled_from_the_llm_alone(cached):
    """Rows marked `distill` are scored by the KL divergence from the LLM's own next-token distribution (the model
    without CASA, here its `backbone_llm()`) over their positions from the image on; the others by their labels.
    The same through the cached frozen prefix, whose store then also serves the teacher's rows."""
    model = model_with_casa_on_top()
    inputs = {**batch(0), "distill": torch.tensor([False, True, True])}

    trainer = NoPrefix()
    with torch.no_grad():
        student = model(**{k: v for k, v in inputs.items() if k not in ("labels", "distill")}).logits[:, :-1]
        teacher = model.backbone_llm()(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    teacher = teacher.logits[:, :-1].log_softmax(-1)
    targets = inputs["labels"][:, 1:]
    ce = torch.nn.functional.cross_entropy(student[0][targets[0] != IGNORE_INDEX], targets[0][targets[0] != -100])
    scored = ((inputs["input_ids"] == IMAGE_TOKEN).cumsum(1) > 0)[1:, :-1] & inputs["attention_mask"][1:, 1:].bool()
    divergence = (teacher.exp() * (teacher - student.log_softmax(-1)))[1:][scored].sum()
    count = (targets[0] != IGNORE_INDEX).sum() + scored.sum()
    expected = (ce * (targets[0] != IGNORE_INDEX).sum() + divergence) / count
    assert divergence > 1e-3  # the CASA layers move the prose: something to distil
    if cached:
        with frozen_prefix(model) as trainer.prefix:
            loss, grads = loss_and_grads(model, inputs, trainer)
    else:
        loss, grads = loss_and_grads(model, inputs, trainer)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert all(".casa_" in name or "visual" in name for name in grads) and any(
        g.abs().max() > 0 for g in grads.values()
    )
    assert all(layer.has_casa for layer in model.model.language_model.layers[2:])  # the teacher's switch is undone
