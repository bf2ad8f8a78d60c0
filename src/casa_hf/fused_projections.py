"""The projections of a parallel CASA block fused for inference: both attentions' q/k/v in one matmul, both output
projections in another.

In a parallel block self-attention and CASA read the same block input through RMSNorms that differ only by their
weights, so `norm(h) @ W.T = rms(h) @ (W * norm.weight).T`: with each norm's weight folded into its projections, one
normalisation and one matmul give the six q/k/v, one RoPE call rotates both attentions' queries and keys, and one
matmul over the two attention outputs side by side applies both `o_proj`. At SmolLM2's width a decode step costs more
in op dispatch than in arithmetic, which is what this saves. The fused weights are a second copy of the block's
attention weights, so fusing is asked for (`CasaForConditionalGeneration.fuse_attention_projections`), as Diffusers'
`fuse_qkv_projections` is; they are rebuilt when a weight they fold has changed, and used only without autograd.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


class FusedParallelProjections:
    """The fused q/k/v and o weights of one parallel block, built from its modules and refreshed when they change."""

    def __init__(self, layer: nn.Module):
        self.layer = layer
        attentions = {"self_attn": layer.self_attn, "casa_attn": layer.casa_attn}
        for owner, attention in attentions.items():
            for name in PROJECTIONS:
                if type(getattr(attention, name)) is not nn.Linear:
                    raise ValueError(
                        f"Block {layer.layer_idx}'s {owner}.{name} is a {type(getattr(attention, name)).__name__}, "
                        "not a plain nn.Linear (an adapter or a quantized layer): its weights cannot be fused; "
                        "merge or remove it first"
                    )
        for norm in (layer.input_layernorm, layer.casa_input_layernorm):
            if not hasattr(norm, "variance_epsilon"):
                raise ValueError(f"Block {layer.layer_idx}'s {type(norm).__name__} is not an RMSNorm to fold")
        self.epsilon = layer.input_layernorm.variance_epsilon
        self.head_dim = layer.self_attn.head_dim
        q = layer.self_attn.q_proj.out_features // self.head_dim
        k = layer.self_attn.k_proj.out_features // self.head_dim
        # heads of the fused output: [SA q | SA k | CASA q | CASA k | SA v | CASA v], so that one RoPE call rotates
        # the first four (the first two where CASA has no positions)
        self.head_counts = [q, k, q, k, k, k]
        self.versions = None
        self.refresh()

    def _sources(self) -> list[torch.Tensor]:
        layer = self.layer
        tensors = [layer.input_layernorm.weight, layer.casa_input_layernorm.weight]
        for attention in (layer.self_attn, layer.casa_attn):
            for name in PROJECTIONS:
                projection = getattr(attention, name)
                tensors += [projection.weight] + ([projection.bias] if projection.bias is not None else [])
        return tensors

    @torch.no_grad()
    def refresh(self) -> None:
        """(Re)build the fused weights if a weight they fold changed (in place, or replaced) since the last build."""
        versions = [(tensor.data_ptr(), tensor._version) for tensor in self._sources()]
        if versions == self.versions:
            return
        layer, sa, casa = self.layer, self.layer.self_attn, self.layer.casa_attn
        sides = ((sa, layer.input_layernorm.weight), (casa, layer.casa_input_layernorm.weight))
        weights, biases = [], []
        for side, name in ((0, "q_proj"), (0, "k_proj"), (1, "q_proj"), (1, "k_proj"), (0, "v_proj"), (1, "v_proj")):
            attention, norm_weight = sides[side]
            projection = getattr(attention, name)
            weights.append(projection.weight * norm_weight.to(projection.weight.dtype)[None, :])
            bias = projection.bias
            biases.append(bias if bias is not None else projection.weight.new_zeros(projection.out_features))
        self.qkv_weight, self.qkv_bias = torch.cat(weights), torch.cat(biases)
        self.o_weight = torch.cat([sa.o_proj.weight, casa.o_proj.weight], dim=1)
        o_biases = [p.bias for p in (sa.o_proj, casa.o_proj) if p.bias is not None]
        self.o_bias = sum(o_biases) if o_biases else None
        self.versions = versions

    def project(self, hidden_states: torch.Tensor, position_embeddings, rotate) -> tuple[tuple, tuple]:
        """Both attentions' `[B, heads, T, head_dim]` q/k/v of `hidden_states`; `rotate(states, cos, sin)` is the
        backbone's RoPE, applied in one call to SA's q/k and, where CASA has positions, CASA's."""
        self.refresh()
        dtype = hidden_states.dtype
        states = hidden_states.to(torch.float32)
        states = states * torch.rsqrt(states.pow(2).mean(-1, keepdim=True) + self.epsilon)
        fused = F.linear(states.to(dtype), self.qkv_weight, self.qkv_bias)
        batch, seq_len = hidden_states.shape[:2]
        heads = fused.view(batch, seq_len, -1, self.head_dim).transpose(1, 2)
        rotated_groups = 4 if self.layer.casa_attn.rotary else 2
        rotated_heads = sum(self.head_counts[:rotated_groups])
        rotated = rotate(heads[:, :rotated_heads], *position_embeddings)
        groups = rotated.split(self.head_counts[:rotated_groups], dim=1)
        groups += heads[:, rotated_heads:].split(self.head_counts[rotated_groups:], dim=1)
        sa_q, sa_k, casa_q, casa_k, sa_v, casa_v = groups
        return (sa_q, sa_k, sa_v), (casa_q, casa_k, casa_v)

    def output(self, sa_output: torch.Tensor, casa_output: torch.Tensor) -> torch.Tensor:
        """Both output projections in one matmul over the two attention outputs side by side."""
        return F.linear(torch.cat([sa_output, casa_output], dim=-1), self.o_weight, self.o_bias)
