"""LayerScale + DropPath + residual add, in the bias-dropout-add slot of megatron's layer.

Uni-Perceiver's block is ``x = x + drop_path(gamma_1 * attn(LN1(x)))`` and the same with the MLP;
``gamma`` is LayerScale (per channel, init 1e-3, kept in fp32). megatron-core's
``TransformerLayer`` calls ``self_attn_bda(training, fused)(output_with_bias, residual, p)``, so
this module answers that call with a function that applies its own parameters. Shapes:
``[s, b, h]`` (s may be a sequence-parallel shard).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


def drop_path(x: torch.Tensor, rate: float, training: bool,
              order: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Drop whole rows (dim 1 of ``[s, b, h]``) with probability ``rate``, rescale the rest.

    The keep mask comes from the default RNG, which megatron seeds alike on every
    tensor-parallel rank, so all shards of one row make the same choice. ``order`` [s b]: the
    tokens are in this order of megatron's flattened ``[s, b]`` (the encoder block's stream in
    group order); token ``t`` belongs to row ``t % b``, and the same draw drops the same rows.
    """
    if not training or rate == 0.0:
        return x
    rows = x.shape[1]
    keep = torch.empty(1, rows, 1, device=x.device, dtype=x.dtype).bernoulli_(1.0 - rate)
    if order is not None:
        keep = keep.view(rows).index_select(0, order % rows).view(x.shape[0], rows, 1)
    return x * keep / (1.0 - rate)


class ScaledResidualAdd(MegatronModule):
    """``residual + drop_path(gamma * (out + bias))`` with a learnable fp32 ``gamma`` of [h]."""

    def __init__(
        self,
        config: TransformerConfig,
        hidden_size: int,
        layer_scale_init: float,
        drop_path_rate: float,
    ) -> None:
        super().__init__(config=config)
        self.drop_path_rate = drop_path_rate
        # fp32 regardless of the model dtype (the reference keeps LayerScale in fp32).
        self.gamma = torch.nn.Parameter(torch.full((hidden_size,), layer_scale_init))
        # Under sequence parallelism each TP rank sees a slice of the sequence: the gradient is
        # partial, and megatron all-reduces flagged parameters over the TP group.
        self.gamma.sequence_parallel = config.sequence_parallel

    def forward(self, training: bool, fused: bool = False) -> Callable:
        def apply(
            out_with_bias: tuple[torch.Tensor, Optional[torch.Tensor]],
            residual: torch.Tensor,
            prob: float = 0.0,
            order: Optional[torch.Tensor] = None,
        ) -> torch.Tensor:
            out, bias = out_with_bias
            if bias is not None:
                out = out + bias
            scaled = (self.gamma * out.float()).to(residual.dtype)
            return residual + drop_path(scaled, self.drop_path_rate, training, order)

        return apply
