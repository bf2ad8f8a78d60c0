"""CASA-SmolLM2's training step on tiny models, shared by the frozen-prefix and SA-LoRA tests."""

import torch
from tiny import tiny_config

from casa_hf import CasaForConditionalGeneration
from casa_hf.smollm2.model import freeze_smollm2
from casa_hf.smollm2.train import AnswerOnlyLossTrainer


class NoPrefix:
    """Stands in for the trainer: what `compute_loss` reads of it."""

    prefix = None
    distillation_loss = AnswerOnlyLossTrainer.distillation_loss


def loss_and_grads(model, inputs, trainer=None) -> tuple[torch.Tensor, dict]:
    loss = AnswerOnlyLossTrainer.compute_loss(trainer or NoPrefix(), model, dict(inputs))
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
