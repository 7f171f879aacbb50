"""Grouped matrix products for the expert paths, without host synchronisation.

Shape legend: n tokens, i/o in/out features, A groups (conditions), G groups (local experts),
m routed token copies.

``torch._grouped_mm`` multiplies consecutive row blocks of one matrix by one weight each, the
block ends given as a device tensor, in one kernel: it needs no per-group host loop and no
host-side sizes. It runs on CPU (torch >= 2.14 seen here, fp32 and bf16) and on Hopper GPUs
(bf16). Where the device or dtype refuses it, the functions below fall back to a loop that is
still free of host synchronisation (:func:`grouped_matmul`: one dense product per group, selected
with ``torch.where``, A times the FLOPs) or to a per-group loop over host sizes
(:func:`expert_matmul`, whose token counts megatron's dispatcher has on the host anyway).
"""

from __future__ import annotations

from typing import Optional

import torch


class _MergeChosen(torch.autograd.Function):
    """``merged[a] = sum_j gates[a, j] * experts[index[a, j]]``: experts [E, ...], index / gates
    [A, k] -> [A, ...], touching only the A x k chosen experts in both directions.

    Autograd's own gather (``experts[index]``) would materialise a zero gradient of all E
    experts and add it into the parameter's gradient every backward (work and memory growing
    with E), and would save the gathered copies for the backward. Here the backward re-gathers
    the chosen experts for the gates' gradient and, when ``experts`` is a parameter with
    megatron DDP's ``main_grad`` buffer, adds the chosen slices into it directly and returns no
    gradient for it (our DDP runs without overlapped gradient reduction, so no bucket waits on
    a hook; any other gradient the parameter gets still goes through autograd and the hook).
    Without ``main_grad`` (a bare model) it returns the dense gradient.
    """

    @staticmethod
    def forward(ctx, experts: torch.Tensor, index: torch.Tensor, gates: torch.Tensor
                ) -> torch.Tensor:
        ctx.save_for_backward(experts, index, gates)
        gates = gates.to(experts.dtype)
        extra = (None,) * (experts.dim() - 1)
        merged = gates[(slice(None), 0, *extra)] * experts.index_select(0, index[:, 0])
        for j in range(1, index.shape[1]):
            merged = merged + gates[(slice(None), j, *extra)] * experts.index_select(0, index[:, j])
        return merged

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN205
        experts, index, gates = ctx.saved_tensors
        flat = index.reshape(-1)
        chosen = experts.index_select(0, flat).view(*index.shape, *experts.shape[1:])  # [A, k, ...]
        trailing = tuple(range(2, chosen.dim()))
        grad_gates = (chosen * grad.unsqueeze(1)).sum(dim=trailing).to(gates.dtype)
        extra = (None,) * (experts.dim() - 1)
        parts = (gates.to(grad.dtype)[(slice(None), slice(None), *extra)] * grad.unsqueeze(1))
        parts = parts.reshape(-1, *experts.shape[1:])  # [A * k, ...]
        main_grad = getattr(experts, "main_grad", None)
        if ctx.needs_input_grad[0] and main_grad is not None:
            main_grad.index_add_(0, flat, parts.to(main_grad.dtype))
            grad_experts = None
        elif ctx.needs_input_grad[0]:
            grad_experts = torch.zeros_like(experts).index_add_(0, flat, parts.to(experts.dtype))
        else:
            grad_experts = None
        return grad_experts, None, grad_gates


def merge_chosen(experts: torch.Tensor, index: torch.Tensor, gates: torch.Tensor
                 ) -> torch.Tensor:
    """experts [E, ...], index / gates [A, k] -> [A, ...]: each row's gate-weighted sum of its
    k chosen experts (see :class:`_MergeChosen`)."""
    return _MergeChosen.apply(experts, index, gates)

_REFUSED: set[tuple[str, torch.dtype]] = set()  # (device type, dtype) _grouped_mm refused


def _try_grouped_mm(x: torch.Tensor, weight_t: torch.Tensor, ends: torch.Tensor
                    ) -> Optional[torch.Tensor]:
    """x [m, i] @ weight_t[g] [i, o] per row block (block g ends at ends[g]); None if refused."""
    key = (x.device.type, x.dtype)
    if key in _REFUSED or not hasattr(torch, "_grouped_mm"):
        return None
    try:
        return torch._grouped_mm(x, weight_t, offs=ends.to(torch.int32))
    except (RuntimeError, NotImplementedError, TypeError):
        _REFUSED.add(key)
        return None


def grouped_matmul(tokens: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor,
                   bias: Optional[torch.Tensor]) -> torch.Tensor:
    """tokens [n, i], rows [n] in [0, A), weight [A, o, i], bias [A, o] -> [n, o] with
    ``out[t] = weight[rows[t]] @ tokens[t] + bias[rows[t]]``."""
    num_groups = weight.shape[0]
    if num_groups == 1:
        out = tokens @ weight[0].t()
        return out if bias is None else out + bias[0]
    # index_select, not advanced indexing: on CPU it is ~5x faster for these row gathers
    order = torch.argsort(rows, stable=True)
    sorted_rows = rows.index_select(0, order)
    ends = torch.searchsorted(sorted_rows, torch.arange(num_groups, device=rows.device),
                              right=True)
    out_sorted = _try_grouped_mm(tokens.index_select(0, order), weight.transpose(1, 2), ends)
    if out_sorted is not None:
        if bias is not None:
            out_sorted = out_sorted + bias.index_select(0, sorted_rows)
        inverse = torch.empty_like(order).scatter_(
            0, order, torch.arange(order.shape[0], device=order.device))
        return out_sorted.index_select(0, inverse)
    out = tokens.new_zeros(tokens.shape[0], weight.shape[1])
    for group in range(num_groups):
        y = tokens @ weight[group].t()
        if bias is not None:
            y = y + bias[group]
        out = torch.where((rows == group)[:, None], y, out)
    return out


def expert_matmul(tokens: torch.Tensor, tokens_per_expert: torch.Tensor, weight: torch.Tensor
                  ) -> torch.Tensor:
    """tokens [m, i] grouped by expert (counts [G]), weight [G, o, i] -> [m, o]."""
    ends = torch.cumsum(tokens_per_expert.to(tokens.device), 0)
    out = _try_grouped_mm(tokens, weight.transpose(1, 2), ends)
    if out is not None:
        return out
    chunks = torch.split(tokens, tokens_per_expert.tolist())
    outputs = [chunk @ weight[e].t() for e, chunk in enumerate(chunks)]
    return torch.cat(outputs) if outputs else tokens.new_zeros(0, weight.shape[1])
