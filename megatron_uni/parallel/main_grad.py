"""Row gradients added straight into megatron DDP's ``main_grad`` buffer.

A lookup or merge that reads a few rows of a large parameter (a word embedding's looked-up
words, an expert stack's chosen experts) has, through autograd, a dense gradient the size of
the whole parameter: zero-filled every backward, the rows added in, then added into
``main_grad`` by megatron's gradient hook (two passes over the parameter and, on the CPU, a
fresh large allocation each step). :func:`add_rows` adds only the rows into ``main_grad`` and
returns no gradient for the parameter.

This is correct because our DDP runs without overlapped gradient reduction (no bucket waits on
the parameter's hook) and the hook's only other work is that addition; any other gradient the
parameter gets still goes through autograd and the hook. A parameter without ``main_grad`` (a
bare model, outside DDP) gets the dense gradient.
"""

from __future__ import annotations

from typing import Optional

import torch


def gradient_target(param: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Where row gradients of ``param`` go: (``param.main_grad``, None) under DDP, else (a new
    zero gradient, the same tensor: the caller returns it to autograd)."""
    main_grad = getattr(param, "main_grad", None)
    if main_grad is not None:
        return main_grad, None
    dense = torch.zeros_like(param)
    return dense, dense


def add_rows(param: torch.Tensor, index: torch.Tensor, rows: torch.Tensor
             ) -> Optional[torch.Tensor]:
    """``grad[index[j]] += rows[j]`` for param [N, ...], index [m], rows [m, ...]: into
    ``param.main_grad`` (returns None), else into a new dense gradient (returned)."""
    target, returned = gradient_target(param)
    target.index_add_(0, index, rows.to(target.dtype))
    return returned


class _Lookup(torch.autograd.Function):
    """``F.embedding(ids, weight)`` whose weight gradient goes through :func:`add_rows`."""

    @staticmethod
    def forward(ctx, ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(ids, weight)
        return torch.nn.functional.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN205
        ids, weight = ctx.saved_tensors
        if not ctx.needs_input_grad[1]:
            return None, None
        return None, add_rows(weight, ids.reshape(-1), grad.reshape(-1, weight.shape[-1]))


def lookup(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Rows ``weight[ids]`` ([..., h]); see :class:`_Lookup`."""
    return _Lookup.apply(ids, weight)
