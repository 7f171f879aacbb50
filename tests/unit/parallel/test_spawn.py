"""The rank runner (megatron_uni.parallel.spawn): a rendezvous port taken between picking it and
binding it is retried; other failures are not."""

from __future__ import annotations

import socket

import pytest

from megatron_uni.parallel import spawn


def _all_reduce(rank: int, world: int) -> float:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    value = torch.tensor([float(rank + 1)])
    dist.all_reduce(value)
    return float(value)


def _fails(rank: int, world: int) -> None:
    raise ValueError("not a port problem")


def test_a_taken_port_is_retried_on_another(monkeypatch: pytest.MonkeyPatch) -> None:
    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    ports = [taken.getsockname()[1]]
    real = spawn.free_port

    def pick() -> int:
        port = ports.pop(0) if ports else real()
        picked.append(port)
        return port

    picked: list[int] = []
    monkeypatch.setattr(spawn, "free_port", pick)
    try:
        assert spawn.run_ranks(_all_reduce, 2, timeout=60) == [3.0, 3.0]
    finally:
        taken.close()
    assert len(picked) == 2 and picked[0] != picked[1]


def test_other_failures_are_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    picked: list[int] = []
    real = spawn.free_port
    monkeypatch.setattr(spawn, "free_port", lambda: picked.append(real()) or picked[-1])
    with pytest.raises(spawn.RankFailure, match="not a port problem"):
        spawn.run_ranks(_fails, 1, timeout=60)
    assert len(picked) == 1
