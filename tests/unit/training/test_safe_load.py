"""The restricted readers (training/safe_load.py), plain-data RNG states and the run-dir lock."""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_uni.training.run_dir import LOCK_FILE, STALE_S, RunDirError, RunLock
from megatron_uni.training.safe_load import (
    RestrictedUnpickler,
    UnsafeCheckpoint,
    safe_torch_load,
    unsafe_cause,
)
from tests.multirank import run_ranks


class _Plant:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_globals_off_the_list(tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    data = pickle.dumps({"x": _Plant(marker)})
    with pytest.raises(UnsafeCheckpoint) as info:
        RestrictedUnpickler(io.BytesIO(data), "some/.metadata").load()
    assert info.value.name == "posix.system" and info.value.file == "some/.metadata"
    assert not marker.exists()
    # DCP's own metadata classes and dtypes pass
    from torch.distributed.checkpoint.metadata import TensorProperties

    props = RestrictedUnpickler(io.BytesIO(pickle.dumps(TensorProperties(torch.bfloat16))),
                                "x").load()
    assert props.dtype == torch.bfloat16


def test_safe_torch_load_takes_plain_data_and_refuses_objects(tmp_path: Path) -> None:
    buf = io.BytesIO()
    torch.save({"a": [1, "b", (2.0, None)], "t": torch.arange(3)}, buf)
    buf.seek(0)
    out = safe_torch_load(buf, "obj")
    assert out["a"] == [1, "b", (2.0, None)] and torch.equal(out["t"], torch.arange(3))
    marker = tmp_path / "MARKER"
    buf = io.BytesIO()
    torch.save([_Plant(marker)], buf)
    buf.seek(0)
    with pytest.raises(UnsafeCheckpoint) as info:
        safe_torch_load(buf, "saved object 'rng_state'")
    assert info.value.name == "posix.system" and not marker.exists()
    # survives the pickling torch uses to copy errors between ranks, and is found in a chain
    again = pickle.loads(pickle.dumps(info.value))
    wrapped = RuntimeError("outer")
    wrapped.__cause__ = again
    assert unsafe_cause(wrapped) is again


def _rng_round_trip(rank: int, world: int) -> bool:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    from megatron_uni.parallel import cpu_backend
    from megatron_uni.training.rng_state import rng_state, set_rng_state

    cpu_backend.enable()
    get_cuda_rng_tracker().add("test-rng", 7)
    state = rng_state()
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)  # plain data: no extra globals needed
    draws = [random.random(), float(np.random.rand()), torch.rand(2)]
    set_rng_state(loaded)
    assert [random.random(), float(np.random.rand())] == draws[:2]
    assert torch.equal(torch.rand(2), draws[2])
    # the older tuple format (a numpy array inside) still restores
    old = {**state, "python": random.getstate(), "numpy": np.random.get_state()}
    expected = [random.random(), float(np.random.rand())]
    set_rng_state(old)
    assert [random.random(), float(np.random.rand())] == expected
    return True


def test_rng_state_is_plain_data_and_round_trips() -> None:
    assert run_ranks(_rng_round_trip, 1) == [True]


def test_run_lock_held_stale_and_foreign(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    lock = RunLock.acquire(tmp_path)
    holder = json.loads((tmp_path / LOCK_FILE).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(RunDirError, match=f"host {socket.gethostname()}, pid {os.getpid()}"):
        RunLock.acquire(tmp_path)
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()
    # a dead process's lock is taken over with a warning
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid}))
    caplog.set_level("WARNING")
    RunLock.acquire(tmp_path).release()
    assert "no longer running" in caplog.text and str(dead.pid) in caplog.text
    # another host's lock cannot be checked: an error that names it and says how to clear it
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": "node-b", "pid": 4242}))
    with pytest.raises(RunDirError, match=r"host node-b, pid 4242.*delete"):
        RunLock.acquire(tmp_path)
    # ... unless its heartbeat stopped long ago
    old = time.time() - STALE_S - 1
    os.utime(tmp_path / LOCK_FILE, (old, old))
    RunLock.acquire(tmp_path).release()
    assert "no heartbeat" in caplog.text
    # a requeued Slurm job (same job id, next restart count) takes over its own lock
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": "node-b", "pid": 4242, "job": "77",
                                                  "restart": "0"}))
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    RunLock.acquire(tmp_path).release()
    assert "requeued" in caplog.text
