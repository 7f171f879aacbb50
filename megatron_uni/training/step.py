"""One step's forward and backward through megatron-core's pipeline schedules.

Every micro-batch is a :class:`PackedBatch` of one task ``[R, S]``; megatron's schedule moves
``[S(/tp), R, h]`` activations between stages, so all micro-batches of one call share R and S
(one task per step). Losses are per-query sums with counts (``calculate_per_token_loss``): the
gradients are those of the sum divided by the step's global query count. megatron's
``finalize_model_grads`` divides the finished gradient buffers by that count, a pass over every
gradient (100 M expert gradients at E=32 in the CPU benchmark: 54 ms of a 665 ms step); a model
whose ``finalize_model_grads_func`` is :func:`finalize_prescaled` (the trainer's) instead counts
the step's queries before the schedule runs (every stage holds the batches; one all-reduce of a
scalar over data-parallel ranks) and scales the loss and the MoE router losses by the inverse
through megatron's ``grad_scale_func``: the same gradients, with no pass over the buffers.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Iterator, Optional, Sequence

import torch

from megatron_uni.batch import PackedBatch


def unwrap(model: Any) -> Any:
    """The UniPerceiver inside DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def _loss_func(model: Any, batch: PackedBatch, hidden: torch.Tensor):
    return model.loss(batch, hidden)


def forward_step(batches: Iterator[PackedBatch], model: Any) -> tuple[torch.Tensor, Any]:
    """megatron's ``forward_step_func``: run this stage, hand the last stage's output to the head."""
    batch = next(batches)
    hidden = model(batch)
    return hidden, partial(_loss_func, unwrap(model), batch)


def finalize_prescaled(model: list[Any], num_tokens: Optional[torch.Tensor] = None,
                       **kwargs: Any) -> None:
    """megatron's ``finalize_model_grads`` (gradient reductions across ranks) without its
    division by the step's query count: :func:`forward_backward` scaled the loss instead."""
    from megatron.core.distributed import finalize_model_grads  # noqa: PLC0415

    finalize_model_grads(model, None, **kwargs)


def step_query_scale(batches: Sequence[PackedBatch]) -> torch.Tensor:
    """[] float: 1 / the step's queries over this rank's micro-batches and every data-parallel
    rank (the count megatron's finalize divides by; at least 1), on the batches' device."""
    import torch.distributed as dist  # noqa: PLC0415
    from megatron.core import parallel_state  # noqa: PLC0415

    from megatron_uni.models.heads import query_count  # noqa: PLC0415

    count = torch.stack([query_count(b.loss) for b in batches]).sum().float()
    if dist.is_initialized():
        group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        if dist.get_world_size(group=group) > 1:
            dist.all_reduce(count, group=group)
    return 1.0 / count.clamp(min=1.0)


def forward_backward(
    model: Sequence[Any], batches: Sequence[PackedBatch], forward_only: bool = False
) -> list[dict[str, torch.Tensor]]:
    """Run megatron's schedule over this rank's micro-batches of one step.

    Returns, on the last pipeline stage, one dict of metric sums per micro-batch
    (``{"loss": [sum, count], "accuracy": [correct, count]}``); elsewhere an empty list.
    Gradients are left in the DDP buffers, already reduced and scaled when the model's config
    has ``finalize_model_grads_func`` set (scaled through the loss under
    :func:`finalize_prescaled`, see the module docstring).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: PLC0415
    from megatron.core.utils import get_model_config  # noqa: PLC0415

    shapes = {(b.num_rows, b.seq_len) for b in batches}
    if len(shapes) != 1:
        raise ValueError(f"micro-batches of one step must share [rows, seq_len]; got {shapes}")
    ((rows, seq_len),) = shapes
    config = get_model_config(model[0])
    prescale = not forward_only and config.finalize_model_grads_func is finalize_prescaled
    previous = config.grad_scale_func
    if prescale:
        # megatron applies grad_scale_func to the last stage's loss before its backward and
        # to the MoE auxiliary-loss scale (MoEAuxLossAutoScaler) of every micro-batch
        scale = step_query_scale(batches)
        config.grad_scale_func = ((lambda t: t * scale) if previous is None
                                  else (lambda t: previous(t) * scale))
    try:
        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(batches),
            model=list(model),
            num_microbatches=len(batches),
            seq_length=seq_len,
            micro_batch_size=rows,
            forward_only=forward_only,
        )
    finally:
        config.grad_scale_func = previous


def reduce_metrics(per_microbatch: Sequence[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Sum [value, count] pairs over micro-batches -> value / count per metric."""
    totals: dict[str, torch.Tensor] = {}
    for item in per_microbatch:  # summed on the values' device, copied to the host once
        for key, pair in item.items():
            pair = pair.detach().double()
            totals[key] = totals[key] + pair if key in totals else pair
    host = {k: v.cpu() for k, v in totals.items()}
    return {k: float(v[0] / v[1]) if v[1] > 0 else float("nan") for k, v in host.items()}
