"""Which parameters train, selected by name (the recipes of the CASA paper)."""

from __future__ import annotations

import re

from torch import nn

from ..errors import OptionsError

RECIPES = ("qwen", "full", "casa_only")


def default_trainable_vision_blocks(depth: int) -> int:
    """The last eighth of the vision tower, at least one block: 4 of Qwen2.5-VL's 32, as in the released models."""
    return max(1, depth // 8)


def apply_freezing_recipe(model: nn.Module, recipe: str, trainable_vision_blocks: int | None = None) -> dict[str, int]:
    """Set `requires_grad` by recipe and return the trainable / frozen parameter counts.

    - `"qwen"` (adapting an insertion VLM): LLM and vision tower frozen; CASA sub-layers, the last
      `trainable_vision_blocks` vision blocks and the projector (merger) train.
    - `"full"` (the Helium recipe, from a text LLM): LLM + CASA + the last vision blocks + the projector train.
    - `"casa_only"`: only the CASA sub-layers train.

    `trainable_vision_blocks=None` takes `default_trainable_vision_blocks` of the model's vision depth.
    """
    if recipe not in RECIPES:
        raise OptionsError(f"Unknown freezing recipe {recipe!r}; choose one of {RECIPES}")
    depth = len(model.get_submodule("model.visual.blocks"))
    if trainable_vision_blocks is None:
        trainable_vision_blocks = default_trainable_vision_blocks(depth)
    if not 0 <= trainable_vision_blocks <= depth:
        raise OptionsError(f"trainable_vision_blocks={trainable_vision_blocks} must be within [0, {depth}]")
    last_blocks = {str(i) for i in range(depth - trainable_vision_blocks, depth)}

    def trainable(name: str) -> bool:
        if ".casa_" in name:
            return True
        if recipe == "casa_only":
            return False
        block = re.match(r"model\.visual\.blocks\.(\d+)\.", name)
        if (block and block.group(1) in last_blocks) or name.startswith("model.visual.merger."):
            return True
        return recipe == "full" and (name.startswith("model.language_model.") or name.startswith("lm_head."))

    counts = {"trainable": 0, "frozen": 0}
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(trainable(name))
        counts["trainable" if parameter.requires_grad else "frozen"] += parameter.numel()
    if counts["trainable"] == 0:
        raise OptionsError(
            f"Freezing recipe {recipe!r} leaves nothing to train in {type(model).__name__}: it trains only CASA "
            "sub-layers (`.casa_*` parameters) and this model has none; use the `qwen` or `full` recipe"
        )
    return counts


__all__ = ["RECIPES", "apply_freezing_recipe", "default_trainable_vision_blocks"]
