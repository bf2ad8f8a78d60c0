"""How what a CASA model adds to its text LLM starts, so that it first computes exactly the LLM on text: CASA
sub-layers that change nothing (norms copied from the block's input norm, q/k/v copied from its self-attention or
random, output projection zero) and embedding rows for the added tokens (the mean row).

One rule for a model built in memory (`init_casa`, CASA-SmolLM2) and for a conversion's streamed tensors
(`convert.py`, which plans each tensor from `casa_starts` without loading the model).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch

CASA_INIT_CHOICES = ("copy", "random")
CASA_TENSOR = re.compile(r"^(model\.language_model\.layers\.\d+)\.(casa_\w+)\.(.+)$")  # block, sub-module, rest


@dataclass(frozen=True)
class CasaStart:
    """How one CASA tensor starts: a copy of `source` (a tensor of the same block), zeros, or a normal(0,
    initializer_range) draw; `why` is said in conversion reports."""

    how: Literal["copy", "zeros", "normal"]
    source: str | None = None
    why: str = ""


def casa_starts(names, casa_init: str) -> dict[str, CasaStart]:
    """How each CASA tensor among a CASA model's state-dict `names` starts; `casa_init` "copy" copies q/k/v from the
    block's self-attention, "random" draws them (biases zero). Either way the output projection is zero, so the
    CASA sub-layer adds nothing until trained."""
    if casa_init not in CASA_INIT_CHOICES:
        raise ValueError(f"casa_init={casa_init!r} must be one of {CASA_INIT_CHOICES}")
    starts = {}
    for name in names:
        match = CASA_TENSOR.match(name)
        if not match:
            continue
        block, part, rest = match.groups()
        if part in ("casa_input_layernorm", "casa_image_layernorm"):
            starts[name] = CasaStart("copy", f"{block}.input_layernorm.{rest}")
        elif rest.startswith("o_proj."):
            starts[name] = CasaStart("zeros", why="CASA output starts silent")
        elif casa_init == "copy":
            starts[name] = CasaStart("copy", f"{block}.self_attn.{rest}")
        else:
            starts[name] = CasaStart("zeros" if rest.endswith("bias") else "normal")
    return starts


@torch.no_grad()
def init_casa(model, casa_init: str) -> None:
    """Start the CASA sub-layers of `model` (a `CasaForConditionalGeneration` holding its LLM's weights) as
    `casa_starts` says; random tensors keep the model's own normal(0, initializer_range) initialisation."""
    state = model.state_dict()
    for name, start in casa_starts(state, casa_init).items():
        if start.how == "copy":
            state[name].copy_(state[start.source])
        elif start.how == "zeros":
            state[name].zero_()


def grow_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """An embedding or LM-head `tensor` grown to `rows` rows for added tokens, each new row the mean of the existing
    ones (a neutral start)."""
    extra = tensor.float().mean(0, keepdim=True).to(tensor.dtype).expand(rows - tensor.shape[0], -1)
    return torch.cat([tensor, extra])


def llm_weights_for_vocab(llm, vocab_size: int) -> dict[str, torch.Tensor]:
    """The state dict of `llm`'s base model with its embedding grown to `vocab_size` rows (`grow_rows`): a VLM's
    image tokens appended to the LLM's tokenizer."""
    weights = llm.model.state_dict()
    weights["embed_tokens.weight"] = grow_rows(weights["embed_tokens.weight"], vocab_size)
    return weights
