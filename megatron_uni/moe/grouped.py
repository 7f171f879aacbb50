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

On the CPU, where reading a tensor's values synchronises nothing, two steps use host values
instead of their device formulations, at the dense model's memory traffic: the per-group bias
(:func:`add_group_bias`, over host block ends, instead of a one-hot product) and the merge's
backward (:func:`_merge_backward_on_host`, one pass per chosen expert, instead of an [A, k, D]
copy of the gate-weighted gradients and an ``index_add_``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_uni.parallel.main_grad import add_rows, gradient_target


def host_values_free(x: torch.Tensor) -> bool:
    """Whether reading ``x``'s values on the host costs no device synchronisation (a CPU
    tensor). The tests turn it off to run the device formulations on the CPU."""
    return x.device.type == "cpu"


def _bag_offsets(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """index [A, k] -> (flat indices [A k], bag offsets [A], bag of each index [A k]): the
    ``embedding_bag`` description of "row a sums the k experts index[a]"."""
    rows, k = index.shape
    bags = torch.arange(rows, device=index.device)
    return index.reshape(-1), bags * k, bags.repeat_interleave(k)


def _gate_grad(grad: torch.Tensor, experts: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """grad [A, D], experts [E, D], index [A, k] -> [A, k]: ``<grad[a], experts[index[a, j]]>``
    (``embedding_bag``'s per-sample-weight gradient: reads the A x k chosen rows once, makes no
    copy of them; a per-j gather and batched dot where that operator is missing)."""
    flat, offsets, bag_of = _bag_offsets(index)
    try:
        return torch.ops.aten._embedding_bag_per_sample_weights_backward(
            grad, experts, flat, offsets, bag_of, 0, -1).view(index.shape)
    except (RuntimeError, NotImplementedError, AttributeError):
        rows, width = grad.shape
        return torch.stack([torch.bmm(experts.index_select(0, index[:, j]).view(rows, 1, width),
                                      grad.view(rows, width, 1)).view(rows)
                            for j in range(index.shape[1])], dim=1)


class _MergeChosen(torch.autograd.Function):
    """``merged[a] = sum_j gates[a, j] * experts[index[a, j]]``: experts [E, ...], index / gates
    [A, k] -> [A, ...], touching only the A x k chosen experts in both directions.

    The forward is one ``embedding_bag`` (weighted sum of the chosen rows, read once, no
    gathered copy). Autograd's own gather (``experts[index]``) would materialise a zero
    gradient of all E experts and add it into the parameter's gradient every backward (work and
    memory growing with E). Here the backward computes the gates' gradient from the chosen
    rows (:func:`_gate_grad`) and adds ``gates[a, j] * grad[a]`` into the chosen experts of
    megatron DDP's ``main_grad`` directly (``parallel.main_grad.add_rows``; a bare model gets
    the dense gradient).
    """

    @staticmethod
    def forward(ctx, experts: torch.Tensor, index: torch.Tensor, gates: torch.Tensor
                ) -> torch.Tensor:
        ctx.save_for_backward(experts, index, gates)
        rows = experts.reshape(experts.shape[0], -1)
        weights = gates.to(experts.dtype)
        try:
            merged = torch.nn.functional.embedding_bag(index, rows, per_sample_weights=weights,
                                                       mode="sum")
        except (RuntimeError, NotImplementedError):  # a device / dtype without the kernel
            merged = weights[:, 0, None] * rows.index_select(0, index[:, 0])
            for j in range(1, index.shape[1]):
                merged = merged + weights[:, j, None] * rows.index_select(0, index[:, j])
        return merged.view(index.shape[0], *experts.shape[1:])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN205
        experts, index, gates = ctx.saved_tensors
        num, k = index.shape
        grad = grad.reshape(num, -1).contiguous()
        rows = experts.reshape(experts.shape[0], -1)
        if host_values_free(grad):
            return _merge_backward_on_host(ctx, experts, rows, index, gates, grad)
        grad_gates = None
        if ctx.needs_input_grad[2]:
            grad_gates = _gate_grad(grad.to(experts.dtype), rows, index).to(gates.dtype)
        grad_experts = None
        if ctx.needs_input_grad[0]:
            # every (condition, choice) pair's gate-weighted gradient, added into its expert
            parts = gates.to(grad.dtype)[:, :, None] * grad[:, None]  # [A, k, D]
            grad_experts = add_rows(experts, index.reshape(-1),
                                    parts.view(num * k, *experts.shape[1:]))
        return grad_experts, None, grad_gates


def _merge_backward_on_host(ctx, experts: torch.Tensor, rows: torch.Tensor,  # noqa: ANN001
                            index: torch.Tensor, gates: torch.Tensor,
                            grad: torch.Tensor):  # noqa: ANN202
    """:class:`_MergeChosen`'s backward on the CPU, where reading the decision's A x k indices
    and gates is no device synchronisation: one pass per (condition, choice) pair that reads
    its chosen expert once for the gate's gradient and adds ``gate x grad[a]`` into that
    expert's gradient in place (``main_grad`` under DDP, see ``parallel.main_grad``), with no
    [A, k, D] copy of the gate-weighted gradients (the device path's ``parts``)."""
    num, k = index.shape
    pairs = index.tolist()
    weights = gates.detach().to(torch.float64).tolist()
    target = grad_experts = None
    if ctx.needs_input_grad[0]:
        target, grad_experts = gradient_target(experts)
        target = target.view(experts.shape[0], -1)
    dots = []
    for a in range(num):
        g_rows = grad[a].to(rows.dtype)  # each condition's gradient converted once, not k times
        g_target = None if target is None else grad[a].to(target.dtype)
        for j in range(k):
            e = pairs[a][j]
            if ctx.needs_input_grad[2]:
                dots.append(torch.dot(g_rows, rows[e]))
            if g_target is not None:
                target[e].add_(g_target, alpha=weights[a][j])
    grad_gates = (torch.stack(dots).view(num, k).to(gates.dtype) if ctx.needs_input_grad[2]
                  else None)
    return grad_experts, None, grad_gates


def merge_chosen(experts: torch.Tensor, index: torch.Tensor, gates: torch.Tensor
                 ) -> torch.Tensor:
    """experts [E, ...], index / gates [A, k] -> [A, ...]: each row's gate-weighted sum of its
    k chosen experts (see :class:`_MergeChosen`)."""
    return _MergeChosen.apply(experts, index, gates)


@dataclass(frozen=True)
class Grouping:
    """Tokens sorted by group, computed once per routing decision and shared by the linears that
    use it: ``order`` [n] (sorted position -> token), ``inverse`` [n] (token -> sorted
    position), ``ends`` [A] (end of each group's block in sorted order), ``rows`` [n] (the
    group of each token) and ``sorted_rows`` [n]; on the CPU also ``spans``, the block ends as
    host integers (``(0, end_0, ..., end_A-1)``: reading a CPU tensor synchronises nothing), for
    the per-block bias (:func:`add_group_bias`)."""

    rows: torch.Tensor
    order: torch.Tensor
    inverse: torch.Tensor
    ends: torch.Tensor
    sorted_rows: torch.Tensor
    spans: Optional[tuple[int, ...]] = None

    def to_group_order(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., h] in token order (leading dims flattening to n) -> the same shape, sorted."""
        return permute(x.reshape(-1, x.shape[-1]), self.order, self.inverse).view(x.shape)

    def to_token_order(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`to_group_order`."""
        return permute(x.reshape(-1, x.shape[-1]), self.inverse, self.order).view(x.shape)

    def one_hot(self, dtype: torch.dtype) -> torch.Tensor:
        """[n, A] in sorted order: 1 where the token is in the group."""
        groups = torch.arange(self.ends.shape[0], device=self.rows.device)
        return (self.sorted_rows[:, None] == groups[None]).to(dtype)

    @classmethod
    def of(cls, rows: torch.Tensor, num_groups: int) -> "Grouping":
        order = torch.argsort(rows, stable=True)
        sorted_rows = rows.index_select(0, order)
        ends = torch.searchsorted(sorted_rows, torch.arange(num_groups, device=rows.device),
                                  right=True).to(torch.int32)
        inverse = torch.empty_like(order).scatter_(
            0, order, torch.arange(order.shape[0], device=order.device))
        spans = (0, *ends.tolist()) if host_values_free(rows) else None
        return cls(rows, order, inverse, ends, sorted_rows, spans)


class _AddGroupBias(torch.autograd.Function):
    """out [n, o] in group order += bias[group] per block, in place, over host block ends; the
    bias gradient is each block's sum of the output gradient."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, bias: torch.Tensor, spans: tuple[int, ...]
                ) -> torch.Tensor:
        ctx.mark_dirty(out)
        ctx.spans = spans
        for group in range(bias.shape[0]):
            out[spans[group]:spans[group + 1]].add_(bias[group])
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN205
        spans = ctx.spans
        grad_bias = None
        if ctx.needs_input_grad[1]:
            grad_bias = torch.stack([grad[spans[g]:spans[g + 1]].sum(0)
                                     for g in range(len(spans) - 1)])
        return grad, grad_bias, None


def add_group_bias(out: torch.Tensor, bias: torch.Tensor, grouping: Grouping) -> torch.Tensor:
    """out [n, o] in the grouping's sorted order, bias [A, o] -> ``out + bias[group]``, in place:
    per block over the host ends where the grouping has them (CPU: the dense model's cost of a
    bias add), else as a rank-A product, one-hot [n, A] @ bias [A, o] (no host sizes, no
    gathered [n, o] copy of the biases, no second [n, o] output)."""
    if grouping.spans is not None:
        return _AddGroupBias.apply(out, bias, grouping.spans)
    return out.addmm_(grouping.one_hot(out.dtype), bias)


class _Permute(torch.autograd.Function):
    """x [n, ...] -> x[order]; the backward gathers with the inverse permutation (autograd's
    ``index_select`` backward would zero-fill and scatter-add)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor
                ) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, order)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN205
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def permute(x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """``x[order]`` along dim 0 (``inverse`` the inverse permutation), gather both ways."""
    return _Permute.apply(x, order, inverse)


_REFUSED: set[tuple[str, torch.dtype]] = set()  # (device type, dtype) _grouped_mm refused


def _aligned(x: torch.Tensor, weight_t: torch.Tensor) -> bool:
    """``_grouped_mm`` wants the row strides of its operands and output in multiples of 16
    bytes (i and o features times the element size); other shapes take the fallback without
    marking the device / dtype refused."""
    size = x.element_size()
    return (x.shape[-1] * size) % 16 == 0 and (weight_t.shape[-1] * size) % 16 == 0


def _try_grouped_mm(x: torch.Tensor, weight_t: torch.Tensor, ends: torch.Tensor
                    ) -> Optional[torch.Tensor]:
    """x [m, i] @ weight_t[g] [i, o] per row block (block g ends at ends[g]); None if refused
    (the device / dtype, remembered for the process) or unaligned (this shape only)."""
    key = (x.device.type, x.dtype)
    if key in _REFUSED or not hasattr(torch, "_grouped_mm") or not _aligned(x, weight_t):
        return None
    try:
        return torch._grouped_mm(x, weight_t, offs=ends.to(torch.int32))
    except (RuntimeError, NotImplementedError, TypeError):
        _REFUSED.add(key)
        return None


def grouped_matmul(tokens: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor,
                   bias: Optional[torch.Tensor], grouping: Optional[Grouping] = None,
                   *, sorted_in: bool = False, sorted_out: bool = False) -> torch.Tensor:
    """tokens [n, i], rows [n] in [0, A), weight [A, o, i], bias [A, o] -> [n, o] with
    ``out[t] = weight[rows[t]] @ tokens[t] + bias[rows[t]]``.

    ``grouping`` (:class:`Grouping` of ``rows``) is computed when not given. ``sorted_in``: the
    tokens already are in the grouping's sorted order; ``sorted_out``: return the output in that
    order (a pair of linears sharing one decision, with only per-token work between them,
    skips the un-permute and re-permute; where ``grouped_mm`` is refused the loop below
    works in token order and permutes at its ends, see :func:`keeps_sorted_order`)."""
    num_groups = weight.shape[0]
    if num_groups == 1:
        out = tokens @ weight[0].t()
        return out if bias is None else out + bias[0]
    if grouping is None:
        grouping = Grouping.of(rows, num_groups)
    sorted_tokens = tokens if sorted_in else permute(tokens, grouping.order, grouping.inverse)
    out_sorted = _try_grouped_mm(sorted_tokens, weight.transpose(1, 2), grouping.ends)
    if out_sorted is not None:
        if bias is not None:
            out_sorted = add_group_bias(out_sorted, bias, grouping)
        if sorted_out:
            return out_sorted
        return permute(out_sorted, grouping.inverse, grouping.order)
    if sorted_in:  # the loop below works in token order
        tokens = permute(tokens, grouping.inverse, grouping.order)
    out = tokens.new_zeros(tokens.shape[0], weight.shape[1])
    for group in range(num_groups):
        y = tokens @ weight[group].t()
        if bias is not None:
            y = y + bias[group]
        out = torch.where((rows == group)[:, None], y, out)
    return permute(out, grouping.order, grouping.inverse) if sorted_out else out


def keeps_sorted_order(x: torch.Tensor) -> bool:
    """Whether :func:`grouped_matmul` can take and give sorted tokens on this device / dtype
    (``torch._grouped_mm`` not refused there)."""
    return hasattr(torch, "_grouped_mm") and (x.device.type, x.dtype) not in _REFUSED


def add_expert_bias(out: torch.Tensor, bias: torch.Tensor, tokens_per_expert: torch.Tensor
                    ) -> torch.Tensor:
    """out [m, o] grouped by expert (counts [G]), bias [G, o] -> ``out + bias[expert of row]``:
    in place per block where the counts are free to read on the host (CPU: a dense bias add's
    cost; gathering a [m, o] copy of the biases and scattering its gradient back with
    ``index_put_`` cost the token-routed CPU benchmark step about 65 ms of 1.4 s), else the
    gather."""
    if host_values_free(tokens_per_expert):
        return _AddGroupBias.apply(out, bias, (0, *tokens_per_expert.cumsum(0).tolist()))
    expert_of = torch.repeat_interleave(
        torch.arange(bias.shape[0], device=out.device), tokens_per_expert.to(out.device),
        output_size=out.shape[0])
    return out + bias[expert_of]


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
