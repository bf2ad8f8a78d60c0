"""Training CASA-SmolLM2's added weights: the cached frozen prefix gives the loss and gradients of a full forward."""

import torch
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


def test_frozen_prefix_matches_the_full_forward():
    torch.manual_seed(0)
    text = {**tiny_config("llama").text_config.to_dict(), "num_hidden_layers": 4}
    config = tiny_config("llama", text_config=text, casa_layers=[2, 3])
    model = CasaForConditionalGeneration(config)
    for layer in model.model.language_model.layers[2:]:
        torch.nn.init.normal_(layer.casa_attn.o_proj.weight, std=0.1)  # a trained CASA output, not the zero start
    freeze_smollm2(model)
    first, second = batch(0), batch(1)
    expected = [loss_and_grads(model, inputs) for inputs in (first, second, first)]

    class Trainer:
        prefix = None

    trainer = Trainer()
    with frozen_prefix(model) as trainer.prefix:
        assert [type(layer).__name__ for layer in model.model.language_model.layers[:2]] == ["FrozenPrefix", "_Skip"]
        actual = [loss_and_grads(model, inputs, trainer) for inputs in (first, second, first)]  # the 3rd: from store
        assert len(trainer.prefix.store) == 6
    assert [type(layer).__name__ for layer in model.model.language_model.layers] == ["CasaDecoderLayer"] * 4
    for (loss, grads), (ref_loss, ref_grads) in zip(actual, expected, strict=True):
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        assert grads.keys() == ref_grads.keys() and any(".casa_attn." in name for name in grads)
        for name in grads:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6)
