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
    order = torch.argsort(rows, stable=True)
    sorted_rows = rows[order]
    ends = torch.searchsorted(sorted_rows, torch.arange(num_groups, device=rows.device),
                              right=True)
    out_sorted = _try_grouped_mm(tokens[order], weight.transpose(1, 2), ends)
    if out_sorted is not None:
        if bias is not None:
            out_sorted = out_sorted + bias[sorted_rows]
        return torch.empty_like(out_sorted).index_copy(0, order, out_sorted)
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
