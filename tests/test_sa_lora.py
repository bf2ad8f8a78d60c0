"""CASA-SmolLM2's optional LoRA on SmolLM2's self-attention (`CasaSmolLM2Recipe.sa_lora_rank`): its factors are
shipped with the added weights, merged at assembly, continued by a later run, and its text is distilled from the
LLM without it."""

import torch
from safetensors.torch import save_file
from smollm2_training import NoPrefix, loss_and_grads, model_with_casa_on_top
from tiny import IMAGE_TOKEN, random_images, random_text

from casa_hf import CasaForConditionalGeneration
from casa_hf.smollm2.model import (
    CasaSmolLM2Recipe,
    added_state_dict,
    freeze_smollm2,
    load_added_weights,
    with_sa_lora,
)
from casa_hf.smollm2.train import frozen_prefix
from casa_hf.training.collator import IGNORE_INDEX

RECIPE = CasaSmolLM2Recipe(casa_layers=(2, 3), sa_lora_rank=4)  # LoRA on block 3's SA (above the lowest CASA)


def adapted(seed: int = 0):
    """The 4-block model with trained-looking CASA outputs and SA LoRA (random B, so the adapters do something)."""
    model = with_sa_lora(model_with_casa_on_top(), RECIPE)
    torch.manual_seed(seed)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.2)
    freeze_smollm2(model)
    return model


def inputs(seed: int = 0) -> dict:
    """Two conversations: the first with an image, the second text only."""
    rows = [[5, 6, IMAGE_TOKEN, *random_text(6, seed)], [5, 6, *random_text(7, seed + 1)]]
    pixel_values, grid = random_images([(4, 4)], seed)
    return dict(input_ids=torch.tensor(rows), pixel_values=pixel_values, image_grid_thw=grid)


def logits(model, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def test_sa_lora_adapts_only_the_blocks_above_the_lowest_casa_layer():
    model = adapted()
    adapted_names = {name.split(".lora_")[0] for name, _ in model.named_parameters() if "lora_" in name}
    block = "base_model.model.model.language_model.layers.3.self_attn"
    assert adapted_names == {f"{block}.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name or ".casa_" in name or ".visual." in name for name in trainable)


def test_factors_ship_merge_and_continue(tmp_path):
    """Saved with the added weights, the factors give the same model merged into a plain one (assembly) or loaded
    into new adapters (a continued run); a run with one more CASA layer starts as the saved model."""
    model = adapted()
    batch = inputs()
    expected = logits(model, batch)
    path = tmp_path / "added.safetensors"
    save_file(added_state_dict(model, torch.float32), str(path))

    plain = model_with_casa_on_top()  # same SmolLM2 part, other added weights
    assert (logits(plain, batch) - expected).abs().max() > 1e-3
    load_added_weights(plain, path)
    torch.testing.assert_close(logits(plain, batch), expected, atol=1e-5, rtol=0)

    continued = adapted(seed=1)
    load_added_weights(continued, path)
    torch.testing.assert_close(logits(continued, batch), expected, atol=1e-5, rtol=0)

    torch.manual_seed(0)
    text = {**model.get_base_model().config.text_config.to_dict()}
    config = model.get_base_model().config.to_dict() | {"text_config": text, "casa_layers": [1, 2, 3]}
    larger = CasaForConditionalGeneration(type(model.get_base_model().config)(**config))
    larger.load_state_dict(model_with_casa_on_top().state_dict(), strict=False)  # the same SmolLM2 part
    torch.nn.init.zeros_(larger.model.language_model.layers[1].casa_attn.o_proj.weight)
    larger = with_sa_lora(larger, CasaSmolLM2Recipe(casa_layers=(1, 2, 3), sa_lora_rank=4))
    fresh = load_added_weights(larger, path, partial=True)
    assert any("layers.1.casa_attn" in name for name in fresh) and any("layers.2.self_attn" in name for name in fresh)
    torch.testing.assert_close(logits(larger, batch), expected, atol=1e-5, rtol=0)


def test_text_rows_are_distilled_from_the_llm_without_its_lora():
    """A distilled row without an image is scored at every position, against the LLM as it was before the LoRA (the
    teacher runs with the adapters off and CASA off); rows with labels by their labels."""
    model = adapted()
    teacher_llm = model_with_casa_on_top().backbone_llm()
    batch = inputs()
    ids = batch["input_ids"]
    labels = ids.clone()
    labels[:, :5] = IGNORE_INDEX
    labels[1] = IGNORE_INDEX
    batch = {**batch, "attention_mask": torch.ones_like(ids), "labels": labels, "distill": torch.tensor([False, True])}
    with torch.no_grad():
        student = model(**{k: batch[k] for k in ("input_ids", "pixel_values", "image_grid_thw")}).logits[:, :-1]
        teacher = teacher_llm(input_ids=ids[1:]).logits[:, :-1].log_softmax(-1)
    targets = labels[0, 1:]
    kept = targets != IGNORE_INDEX
    ce = torch.nn.functional.cross_entropy(student[0][kept], targets[kept], reduction="sum")
    divergence = (teacher.exp() * (teacher - student[1:].log_softmax(-1))).sum()
    assert divergence > 1e-3  # the LoRA moves text without an image: something to distil
    expected = (ce + divergence) / (kept.sum() + ids.shape[1] - 1)
    trainer = NoPrefix()
    with frozen_prefix(model.get_base_model()) as trainer.prefix:
        loss, grads = loss_and_grads(model, batch, trainer)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert any("lora_" in name and grad.abs().max() > 0 for name, grad in grads.items())
