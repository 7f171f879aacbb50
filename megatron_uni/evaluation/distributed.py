"""The few collectives evaluation needs, over megatron-core's groups (none are created here).

Who holds what. Features exist on the last pipeline stage only; every tensor-parallel rank of
that stage computes the same ones. Each data-parallel rank evaluates its share of the samples,
so a metric is complete after a gather (features) or a sum (counts) over the data-parallel
group; :func:`share_from_last_stage` then hands the result to every stage of the pipeline, so
that every rank (rank 0 in particular, a first stage) ends with the same metrics.

Every function here is a collective: all ranks of the group named must call it, in the same
order. Tensors travel on ``device`` (the CPU under gloo, the GPU under nccl) and come back there.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def is_last_stage() -> bool:
    from megatron.core import parallel_state  # noqa: PLC0415

    return parallel_state.is_pipeline_last_stage()


def dp_group() -> Any:
    """The data-parallel group of the dense parameters: ranks that read different samples."""
    from megatron.core import parallel_state  # noqa: PLC0415

    return parallel_state.get_data_parallel_group()


def world_max(value: int, device: torch.device) -> int:
    """The largest ``value`` over all ranks."""
    t = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_sum(values: torch.Tensor, group: Any, device: torch.device) -> torch.Tensor:
    """Sum of ``values`` over ``group`` (float64 on the way, returned on the CPU)."""
    t = values.detach().to(device=device, dtype=torch.float64).clone()
    dist.all_reduce(t, group=group)
    return t.cpu()


def all_gather_rows(rows: torch.Tensor, group: Any, device: torch.device) -> torch.Tensor:
    """Concatenate each rank's ``rows`` ``[n_r, ...]`` in group-rank order (n_r may differ;
    trailing dims and dtype must agree). Returned on the CPU."""
    world = dist.get_world_size(group=group)
    if world == 1:
        return rows.detach().cpu()
    count = torch.tensor([rows.shape[0]], dtype=torch.long, device=device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    sizes = [int(c.item()) for c in counts]
    longest = max(sizes)
    if longest == 0:
        return rows.detach().cpu()
    padded = torch.zeros((longest, *rows.shape[1:]), dtype=rows.dtype, device=device)
    padded[: rows.shape[0]] = rows.detach().to(device)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)]).cpu()


def broadcast_from_last_stage(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` as the last pipeline stage holds it, on every stage of this rank's pipeline (every
    stage passes a tensor of the same shape and dtype). Returned on the CPU."""
    from megatron.core import parallel_state  # noqa: PLC0415

    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return t.cpu()
    t = t.to(device).contiguous()
    dist.broadcast(t, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                   group=parallel_state.get_pipeline_model_parallel_group())
    return t.cpu()


def share_from_last_stage(obj: Any, device: torch.device) -> Any:
    """A picklable ``obj`` of the last pipeline stage, on every stage of this rank's pipeline."""
    from megatron.core import parallel_state  # noqa: PLC0415

    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return obj
    box = [obj if is_last_stage() else None]
    dist.broadcast_object_list(box, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                               group=parallel_state.get_pipeline_model_parallel_group(),
                               device=device)
    return box[0]
