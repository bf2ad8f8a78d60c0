"""Stage 1 of CASA-SmolLM2's recipe: the vision tower learns to see before the CASA layers learn to read it.

No pretrained vision weights are reachable offline, so the tower starts from scratch. Trained only through the frozen
LLM's answer loss, it learns slowly and unevenly (colours and shapes lag behind positions). Here it first learns the
scenes' attributes directly: an `AttributeProbe` reads the tower's image tokens the way a CASA layer does (a
normalisation, then attention of one query per attribute over the image's tokens) and classifies each attribute.
The probe is thrown away; the tower keeps what it learnt.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..training.collator import IGNORE_INDEX
from ..training.synthetic_vqa import COLOURS, COUNTS, DIGITS, SHAPES, random_scene, render, render_digit

# What the tower must tell apart. Positions too: the CASA layers' raster key positions tell rows apart (4 positions
# apart) but hardly columns (neighbours, seen from a question a varying distance away), so the answer loss alone left
# left/right at chance. The tower's rotary positions are relative, yet it learns where a shape is from the image's
# edges (the probe read left/right 0.80, top/bottom 1.00 over the last batches of the shipped 1,500-batch stage; 0.997
# and 0.98 in a 400-batch trial).
ATTRIBUTES = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "count": COUNTS,
    "digit": DIGITS,
    "horizontal": ("left", "right"),
    "vertical": ("top", "bottom"),
}
POSITIONS = ("horizontal", "vertical")  # labelled on one-shape scenes only ("the shape" is ambiguous otherwise)
DIGIT_SHARE = 0.5  # digits are the slowest attribute to learn


def labelled_image(rng: np.random.Generator, size: int):
    """A scene or a digit image and its attribute labels (`IGNORE_INDEX` where one does not apply)."""
    labels = dict.fromkeys(ATTRIBUTES, IGNORE_INDEX)
    if rng.random() < DIGIT_SHARE:
        digit = str(rng.choice(DIGITS))
        labels["digit"] = DIGITS.index(digit)
        return render_digit(digit, size, rng), labels
    scene = random_scene(rng)
    answers = scene.answers()
    for name in ("colour", "shape", "count", *(POSITIONS if scene.count == 1 else ())):
        labels[name] = ATTRIBUTES[name].index(answers[name])
    return render(scene, size, rng), labels


class AttributeProbe(nn.Module):
    """One learnt query per attribute attends over an image's (normalised) tokens; a linear layer classifies."""

    def __init__(self, hidden_size: int, key_size: int = 128):
        super().__init__()
        self.norm = nn.RMSNorm(hidden_size)
        self.key = nn.Linear(hidden_size, key_size, bias=False)
        self.queries = nn.Parameter(torch.randn(len(ATTRIBUTES), key_size) / key_size**0.5)
        self.heads = nn.ModuleList(nn.Linear(hidden_size, len(classes)) for classes in ATTRIBUTES.values())

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """`images`: `[num_images, tokens, hidden]` -> one `[num_images, classes]` logits tensor per attribute."""
        tokens = self.norm(images)
        weights = (self.key(tokens) @ self.queries.T).softmax(dim=1)  # [num_images, tokens, attributes]
        pooled = torch.einsum("nta,nth->nah", weights, tokens)
        return [head(pooled[:, index]) for index, head in enumerate(self.heads)]


def pretrain_vision_tower(
    model, processor, steps: int, batch_size: int = 32, learning_rate: float = 1e-3, seed: int = 0
) -> dict[str, float]:
    """Train `model`'s vision tower and projector (through `get_image_features`, centring included) to classify
    the attributes of new scenes. Returns the probe's accuracy per attribute over its last 50 batches."""
    rng = np.random.default_rng([seed, 1])
    torch.manual_seed(seed)
    vision = model.model.visual
    probe = AttributeProbe(model.config.text_config.hidden_size)
    trainable = [parameter.requires_grad for parameter in vision.parameters()]
    vision.requires_grad_(True)
    parameters = [*vision.parameters(), *probe.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, learning_rate, total_steps=steps, pct_start=0.05)
    correct = {name: [] for name in ATTRIBUTES}
    vision.train()
    for _ in (bar := tqdm(range(steps), desc="Vision tower", unit="step")):
        images, labels = zip(*(labelled_image(rng, processor.image_size) for _ in range(batch_size)), strict=True)
        inputs = processor.image_processor(list(images), return_tensors="pt")
        features = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
        logits = probe(torch.stack(features))
        loss = 0.0
        for name, scores in zip(ATTRIBUTES, logits, strict=True):
            targets = torch.tensor([label[name] for label in labels])
            kept = targets != IGNORE_INDEX
            if kept.any():  # a small batch may hold no image this attribute applies to
                loss = loss + F.cross_entropy(scores[kept], targets[kept])
                hits = (scores[kept].argmax(-1) == targets[kept]).float().mean().item()
                correct[name] = [*correct[name][-49:], hits]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(
            loss=f"{loss.item():.3f}", **{name: f"{np.mean(values):.2f}" for name, values in correct.items() if values}
        )
    vision.eval()
    for parameter, was_trainable in zip(vision.parameters(), trainable, strict=True):
        parameter.requires_grad_(was_trainable)
    return {name: float(np.mean(values)) for name, values in correct.items() if values}


__all__ = ["ATTRIBUTES", "AttributeProbe", "labelled_image", "pretrain_vision_tower"]
