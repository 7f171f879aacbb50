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
