"""The CPU backend maps megatron-core's CUDA assumptions to the CPU, and only when asked.

Enabling it patches the process, so each check runs in a child process (tests.multirank).
"""

from __future__ import annotations

import pytest
import torch

from megatron_uni.parallel import cpu_backend
from tests.multirank import run_ranks


def _enabled_behaviour(rank: int, world_size: int) -> dict:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    from megatron_uni.parallel import cpu_backend

    assert not cpu_backend.is_enabled()
    cpu_backend.enable()
    cpu_backend.enable()  # idempotent
    out: dict = {"enabled": cpu_backend.is_enabled()}
    out["literal"] = str(torch.zeros(2, device="cuda").device)
    out["indexed"] = str(torch.empty(2, device=torch.device("cuda", 0)).device)
    out["current"] = str(torch.ones(1, device=torch.cuda.current_device()).device)
    t = torch.arange(3.0)
    out["dot_cuda_is_noop"] = t.cuda() is t
    out["to_cuda"] = str(t.to("cuda").device)
    out["type"] = t.type()
    out["type_cast_still_works"] = t.type(torch.int64).dtype == torch.int64
    # Streams and synchronisation are no-ops.
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.cuda.synchronize()
    # The CUDA RNG API acts on the CPU generator, so megatron's tracker forks real streams.
    torch.cuda.manual_seed(3)
    a = torch.rand(2)
    torch.manual_seed(3)
    out["cuda_seed_is_cpu_seed"] = torch.equal(a, torch.rand(2))
    tracker = get_cuda_rng_tracker()
    tracker.reset()
    tracker.add("model-parallel-rng", 123)
    torch.manual_seed(0)
    with tracker.fork():
        first = torch.rand(3)
    outside = torch.rand(3)
    torch.manual_seed(0)
    out["fork_restores_default_stream"] = torch.equal(outside, torch.rand(3))
    tracker.reset()
    tracker.add("model-parallel-rng", 123)
    with tracker.fork():
        out["fork_is_reproducible"] = torch.equal(first, torch.rand(3))
    return out


def test_enable_maps_cuda_to_cpu() -> None:
    (out,) = run_ranks(_enabled_behaviour, 1, timeout=60)
    assert out.pop("enabled")
    assert out.pop("type") == "torch.cuda.FloatTensor"
    assert out == {
        "literal": "cpu",
        "indexed": "cpu",
        "current": "cpu",
        "dot_cuda_is_noop": True,
        "to_cuda": "cpu",
        "type_cast_still_works": True,
        "cuda_seed_is_cpu_seed": True,
        "fork_restores_default_stream": True,
        "fork_is_reproducible": True,
    }


def _refuses_with_cuda(rank: int, world_size: int) -> str:
    from megatron_uni.parallel import cpu_backend

    torch.cuda.is_available = lambda: True
    try:
        cpu_backend.enable()
    except RuntimeError as err:
        return str(err)
    return "enabled"


def test_enable_refuses_when_cuda_is_present() -> None:
    (msg,) = run_ranks(_refuses_with_cuda, 1, timeout=60)
    assert "must not be enabled" in msg


def test_device_choice_does_not_enable_anything() -> None:
    assert cpu_backend.should_use_cpu("cpu")
    assert cpu_backend.should_use_cpu("auto") == (not torch.cuda.is_available())
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="parallel.device=cuda"):
            cpu_backend.should_use_cpu("cuda")
    assert not cpu_backend.is_enabled()


def _single_rank_collectives(rank: int, world_size: int) -> dict:
    import megatron.core.distributed.param_and_grad_buffer as buffers
    import torch.distributed as dist

    from megatron_uni.parallel import cpu_backend

    cpu_backend.enable()
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    group = dist.new_group(list(range(world_size)))
    alone = dist.new_group([rank]) if world_size == 1 else None
    buf = torch.arange(8.0) + rank
    out: dict = {}
    if world_size == 1:
        from torch.profiler import ProfilerActivity, profile

        # nothing may reach gloo over a group of one rank (its ops show as c10d::* events)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            view = buf.view(-1)  # megatron: the output is a view of the input (one shard)
            out["rs"] = buffers.dist_reduce_scatter_func(view, buf, group=alone, async_op=False)
            separate = torch.zeros(8)
            work = buffers.dist_all_gather_func(separate, buf, group=alone, async_op=True)
            out["ag_waits"] = work.wait()
            out["ag_copied"] = torch.equal(separate, buf)
            out["ar"] = dist.all_reduce(buf, group=alone)
        out["unchanged"] = torch.equal(buf, torch.arange(8.0))
        out["gloo_calls"] = sorted({e.key for e in prof.key_averages() if "c10d" in e.key})
        with profile(activities=[ProfilerActivity.CPU]) as prof:  # the detector sees gloo
            dist.barrier(group=alone)
        out["detector"] = any("c10d" in e.key for e in prof.key_averages())
    else:  # more ranks: the real collectives still run
        dist.all_reduce(buf, group=group)
        out["summed"] = buf.tolist()
        shard = torch.zeros(4)
        buffers.dist_reduce_scatter_func(shard, torch.arange(8.0) + rank, group=group)
        out["scattered"] = shard.tolist()
    return out


def test_collectives_over_one_rank_are_skipped() -> None:
    (one,) = run_ranks(_single_rank_collectives, 1, timeout=60)
    assert one == {"rs": None, "ag_waits": True, "ag_copied": True, "ar": None,
                   "unchanged": True, "gloo_calls": [], "detector": True}
    two = run_ranks(_single_rank_collectives, 2, timeout=60)
    assert two[0]["summed"] == [float(2 * v + 1) for v in range(8)]
    assert two[0]["scattered"] == [1.0, 3.0, 5.0, 7.0]
    assert two[1]["scattered"] == [9.0, 11.0, 13.0, 15.0]
