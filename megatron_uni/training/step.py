"""One step's forward and backward through megatron-core's pipeline schedules.

Every micro-batch is a :class:`PackedBatch` of one task ``[R, S]``; megatron's schedule moves
``[S(/tp), R, h]`` activations between stages, so all micro-batches of one call share R and S
(one task per step). Losses are per-query sums with counts (``calculate_per_token_loss``): the
schedule and ``finalize_model_grads`` divide by the global count.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Iterator, Sequence

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


def forward_backward(
    model: Sequence[Any], batches: Sequence[PackedBatch], forward_only: bool = False
) -> list[dict[str, torch.Tensor]]:
    """Run megatron's schedule over this rank's micro-batches of one step.

    Returns, on the last pipeline stage, one dict of metric sums per micro-batch
    (``{"loss": [sum, count], "accuracy": [correct, count]}``); elsewhere an empty list.
    Gradients are left in the DDP buffers, already reduced and scaled when the model's config
    has ``finalize_model_grads_func`` set.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: PLC0415

    shapes = {(b.num_rows, b.seq_len) for b in batches}
    if len(shapes) != 1:
        raise ValueError(f"micro-batches of one step must share [rows, seq_len]; got {shapes}")
    ((rows, seq_len),) = shapes
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(batches),
        model=list(model),
        num_microbatches=len(batches),
        seq_length=seq_len,
        micro_batch_size=rows,
        forward_only=forward_only,
    )


def reduce_metrics(per_microbatch: Sequence[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Sum [value, count] pairs over micro-batches -> value / count per metric."""
    totals: dict[str, torch.Tensor] = {}
    for item in per_microbatch:  # summed on the values' device, copied to the host once
        for key, pair in item.items():
            pair = pair.detach().double()
            totals[key] = totals[key] + pair if key in totals else pair
    host = {k: v.cpu() for k, v in totals.items()}
    return {k: float(v[0] / v[1]) if v[1] > 0 else float("nan") for k, v in host.items()}
