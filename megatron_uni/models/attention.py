"""Core attention through ``torch.nn.functional.scaled_dot_product_attention`` with any mask.

Shape legend: s sequence (full: attention runs after the QKV projection has gathered the
sequence-parallel shards), b rows, np heads on this tensor-parallel rank, hn head size.

It plugs into megatron-core's ``SelfAttention`` as the ``core_attention`` submodule (the slot of
megatron's ``DotProductAttention``). Packed rows need arbitrary masks (block-diagonal sequences,
captioning's prefix/causal/slot rule), which SDPA takes as a boolean mask; on GPU it picks the
fastest kernel that supports one.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class SDPAttention(MegatronModule):
    """softmax(q k^T / sqrt(hn) + mask) v per head, masks in megatron's convention.

    ``attention_mask``: bool ``[b, 1, s, s]`` (or broadcastable), True where a query may NOT see
    a key; None means full attention. Every query must see at least itself (the batch's mask
    guarantees it), so no row is all -inf.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Any = None,
    ) -> None:
        super().__init__(config=config)
        if config.context_parallel_size > 1:
            raise ValueError("SDPAttention does not support context parallelism (parallel.cp=1)")
        self.softmax_scale = softmax_scale
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,  # [s, b, np, hn]
        key: torch.Tensor,  # [s, b, np, hn]
        value: torch.Tensor,  # [s, b, np, hn]
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params: Any = None,
    ) -> torch.Tensor:  # [s, b, np * hn]
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("SDPAttention takes a boolean mask; attention_bias/packed_seq_params "
                             "are not supported")
        s, b, heads, head_dim = query.shape
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, np, s, hn]
        allowed = None if attention_mask is None else ~attention_mask
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=allowed,
            dropout_p=self.dropout if self.training else 0.0,
            scale=self.softmax_scale,
        )
        return out.permute(2, 0, 1, 3).reshape(s, b, heads * head_dim)
