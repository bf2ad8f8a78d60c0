"""Training CASA-SmolLM2's added weights: the cached frozen prefix gives the loss and gradients of a full forward."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny import IMAGE_TOKEN, random_images, random_text, tiny_config

from casa_hf import CasaForConditionalGeneration
from casa_hf.casa_smollm2 import freeze_smollm2
from casa_hf.training.collator import IGNORE_INDEX
from casa_hf.training.train_smollm2 import _AnswerOnlyLossTrainer, frozen_prefix


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


def loss_and_grads(model, inputs, trainer=None) -> tuple[torch.Tensor, dict]:
    loss = _AnswerOnlyLossTrainer.compute_loss(trainer, model, dict(inputs))
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return loss.detach(), grads


def model_with_casa_on_top() -> CasaForConditionalGeneration:
    """Four blocks, CASA in the top two (trained CASA outputs, not the zero start), SmolLM2's part frozen."""
    torch.manual_seed(0)
    text = {**tiny_config("llama").text_config.to_dict(), "num_hidden_layers": 4}
    model = CasaForConditionalGeneration(tiny_config("llama", text_config=text, casa_layers=[2, 3]))
    for layer in model.model.language_model.layers[2:]:
        torch.nn.init.normal_(layer.casa_attn.o_proj.weight, std=0.1)
    freeze_smollm2(model)
    return model


@pytest.mark.parametrize("lora", [False, True])
def test_frozen_prefix_matches_the_full_forward(lora):
    model = base = model_with_casa_on_top()
    if lora:  # adapters on the CASA layers, as examples/finetune_lora.py trains them (random B: A gets gradients)
        config = LoraConfig(r=4, target_modules=r".*casa_attn\.(q|v)_proj", init_lora_weights=False)
        model = get_peft_model(base, config)
    first, second = batch(0), batch(1)
    expected = [loss_and_grads(model, inputs) for inputs in (first, second, first)]

    class Trainer:
        prefix = None

    trainer = Trainer()
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
