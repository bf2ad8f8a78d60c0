"""bfloat16 autocast (what `--bf16` / `TrainingArguments(bf16=True)` run): training steps, forward and cached
generation agree with float32 on the same weights, within bfloat16's precision (~0.4% per rounding)."""

import pytest
import torch
from tiny import tiny_model, two_left_padded_samples  # tiny also registers the flash_varlen_reference stand-in

LOSS_TOLERANCE = 1e-3  # relative
GRADIENT_TOLERANCE = 0.05  # relative, per parameter tensor
LOGIT_TOLERANCE = 0.015  # absolute; the tiny model's logits are within +-0.6, bfloat16 moves them by ~0.003


def loss_and_gradients(model, inputs: dict, autocast: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(**inputs, labels=labels).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "mode,attn", [("casa", "eager"), ("casa", "sdpa"), ("casa", "flash_varlen_reference"), ("cross_attention", "sdpa")]
)
def test_bf16_autocast_training_step_matches_fp32(mode, attn):
    model = tiny_model(attn=attn, casa_attention=mode).train()
    inputs = two_left_padded_samples()
    reference_loss, reference = loss_and_gradients(model, inputs, autocast=False)
    loss, gradients = loss_and_gradients(model, inputs, autocast=True)
    assert abs(loss - reference_loss) <= LOSS_TOLERANCE * reference_loss
    assert gradients.keys() == reference.keys() and any(".casa_attn." in name for name in gradients)
    # Gradients that are zero in exact arithmetic (a key bias under plain cross-attention) are compared absolutely.
    floor = 1e-4 * torch.cat([g.flatten() for g in reference.values()]).norm()
    for name, gradient in gradients.items():
        error = (gradient - reference[name]).norm()
        assert error <= GRADIENT_TOLERANCE * reference[name].norm() + floor, name


def test_bf16_autocast_generation_matches_fp32_forward():
    """Cached greedy decoding under autocast (prefill with images, then one token at a time): the logits of every
    step equal, within bfloat16 precision, those of one float32 forward over the whole generated sequence."""
    model = tiny_model(attn="sdpa")
    inputs = two_left_padded_samples()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.generate(
            **inputs, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
        forward_autocast = model(**inputs).logits
    prompt = inputs["input_ids"].shape[1]
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(out.sequences[:, prompt:])], dim=1)
    with torch.no_grad():
        reference = model(**{**inputs, "input_ids": out.sequences, "attention_mask": mask}).logits
    assert forward_autocast.dtype == torch.bfloat16  # autocast was in effect (the LM head ran in bfloat16)
    valid = inputs["attention_mask"].bool()
    assert (forward_autocast.float()[valid] - reference[:, :prompt][valid]).abs().max() <= LOGIT_TOLERANCE
    steps = torch.stack(out.logits, dim=1).float()  # [batch, new tokens, vocab]
    assert (steps - reference[:, prompt - 1 : -1]).abs().max() <= LOGIT_TOLERANCE
