"""Flash-style (varlen) attention stand-ins behind Transformers' attention interface, for tests and GPU checks.

A "flash" name is what sends CASA's windows to its packed path; the text self-attention layers (no `cu_seq_lens`)
of such a stand-in run on sdpa.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

# (query, key, value, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k, scaling, is_causal) -> output, with
# packed `[tokens, heads, head_dim]` tensors, keys and values already repeated to the query heads
VarlenKernel = Callable[..., torch.Tensor]
STAND_INS: set[str] = set()  # the names registered here


def register_varlen_stand_in(name: str, kernel: VarlenKernel) -> None:
    """Register `kernel` as attention implementation `name` (which must hold "flash")."""
    assert "flash" in name, "CASA takes the packed-window path for flash (varlen) implementations only"

    def attention(
        module,
        query,
        key,
        value,
        attention_mask,
        scaling=None,
        is_causal=None,
        dropout=0.0,
        cu_seq_lens_q=None,
        cu_seq_lens_k=None,
        max_length_q=None,
        max_length_k=None,
        **kwargs,
    ):
        if cu_seq_lens_q is None:
            return ALL_ATTENTION_FUNCTIONS["sdpa"](
                module, query, key, value, attention_mask, scaling=scaling, **kwargs
            )
        assert attention_mask is None and query.shape[0] == 1
        groups = query.shape[1] // key.shape[1]
        q = query[0].transpose(0, 1).contiguous()
        k = key[0].transpose(0, 1).repeat_interleave(groups, 1).contiguous()
        v = value[0].transpose(0, 1).repeat_interleave(groups, 1).contiguous()
        out = kernel(q, k, v, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k, scaling, bool(is_causal))
        return out[None], None

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, sdpa_mask)
    STAND_INS.add(name)


def reference_varlen_kernel(q, k, v, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k, scaling, is_causal):
    """A loop over the packed sequences with sdpa: causal attention aligned bottom-right, as flash-attn >= 2.1."""
    out = torch.zeros_like(q)
    for i in range(len(cu_seq_lens_q) - 1):
        qs, qe = int(cu_seq_lens_q[i]), int(cu_seq_lens_q[i + 1])
        ks, ke = int(cu_seq_lens_k[i]), int(cu_seq_lens_k[i + 1])
        mask = None
        if is_causal:
            mask = torch.ones(qe - qs, ke - ks, dtype=torch.bool, device=q.device).tril(diagonal=(ke - ks) - (qe - qs))
        out[qs:qe] = torch.nn.functional.scaled_dot_product_attention(
            q[qs:qe].transpose(0, 1), k[ks:ke].transpose(0, 1), v[ks:ke].transpose(0, 1), attn_mask=mask, scale=scaling
        ).transpose(0, 1)
    return out


register_varlen_stand_in("flash_varlen_reference", reference_varlen_kernel)
