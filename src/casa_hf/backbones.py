"""The text backbones a CASA model can be built on, and the functions of theirs that CASA layers reuse."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from transformers.models.helium import modeling_helium
from transformers.models.llama import modeling_llama
from transformers.models.qwen2 import modeling_qwen2


@dataclass(frozen=True)
class Backbone:
    """How a backbone applies RoPE (Helium interleaves, the others rotate halves) and runs eager attention."""

    apply_rotary_pos_emb: Callable
    eager_attention_forward: Callable


# Backbones whose decoder layer is `input_layernorm -> self_attn -> post_attention_layernorm -> mlp`, the layout the
# CASA sub-layer is slotted into. Others need their own wiring before they can be listed here.
BACKBONES: dict[str, Backbone] = {
    "qwen2": Backbone(modeling_qwen2.apply_rotary_pos_emb, modeling_qwen2.eager_attention_forward),
    "llama": Backbone(modeling_llama.apply_rotary_pos_emb, modeling_llama.eager_attention_forward),
    "helium": Backbone(modeling_helium.apply_rotary_pos_emb, modeling_helium.eager_attention_forward),
}
SUPPORTED_TEXT_MODEL_TYPES = tuple(BACKBONES)

__all__ = ["BACKBONES", "SUPPORTED_TEXT_MODEL_TYPES", "Backbone"]
