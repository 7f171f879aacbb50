"""Collectives that carry gradients, for losses that look across data-parallel ranks.

Retrieval takes its negatives from every data-parallel rank, and large target sets are encoded
in shards and gathered; both need an all-gather whose backward returns to each rank the gradient
of its own shard summed over every rank's loss.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        ctx.rank = dist.get_rank(group=group)
        ctx.rows = tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group=group))]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        # Every rank's loss touched every shard: sum the gradients, keep this rank's rows.
        # (all-reduce instead of reduce-scatter: gloo has no reduce-scatter.)
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows], None


def all_gather_with_grad(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    """Concatenate ``tensor`` ([n, ...], same shape on every rank) over ``group`` in rank order.

    The backward pass gives each rank the gradient of its rows summed over all ranks. A group of
    one (or no initialised process group) returns ``tensor`` itself.
    """
    if group is None or not dist.is_initialized() or dist.get_world_size(group=group) == 1:
        return tensor
    return _AllGatherWithGrad.apply(tensor, group)
