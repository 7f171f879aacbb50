"""Run a function on N gloo CPU processes on loopback (the offline tools' "world")."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import time
import traceback
from typing import Any, Callable, Sequence

from checkpoints_utils.common import ToolError

_PRELOAD = ["torch", "megatron.core", "megatron_uni.parallel.initialize"]


def _free_port() -> int:
    from megatron_uni.parallel.env import free_port  # noqa: PLC0415

    return free_port()


def _rank_main(fn: Callable[..., Any], rank: int, world: int, port: int, args: Sequence[Any],
               results: Any) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    import torch  # noqa: PLC0415

    torch.set_num_threads(1)
    try:
        value = pickle.dumps(fn(rank, world, *args))
    except BaseException as err:  # noqa: BLE001 - everything goes back to the parent
        results.put((rank, False, (type(err).__name__, str(err), traceback.format_exc())))
    else:
        results.put((rank, True, value))
    finally:
        try:
            import torch.distributed as dist  # noqa: PLC0415

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass


def run_world(fn: Callable[..., Any], world: int, args: Sequence[Any] = (),
              timeout: float = 3600.0) -> list[Any]:
    """``fn(rank, world, *args)`` on ``world`` CPU processes; return values in rank order.
    A failing rank raises :class:`ToolError` with its error (a ToolError/CheckpointError/
    ConfigError message as is; anything else with its traceback)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(fn, r, world, port, tuple(args), results),
                         name=f"rank{r}") for r in range(world)]
    for p in procs:
        p.start()
    values: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(values) < world:
            try:
                rank, ok, value = results.get(timeout=0.2)
            except queue.Empty:
                dead = [(i, p.exitcode) for i, p in enumerate(procs)
                        if i not in values and p.exitcode is not None]
                if dead:
                    try:
                        rank, ok, value = results.get(timeout=1.0)
                    except queue.Empty:
                        raise ToolError("worker process(es) died: " + ", ".join(
                            f"rank {i} exit code {c}" for i, c in dead)) from None
                elif time.monotonic() > deadline:
                    raise ToolError(f"timed out after {timeout:.0f} s") from None
                else:
                    continue
            if not ok:
                name, message, tb = value
                if name in ("ToolError", "CheckpointError", "ConfigError"):
                    raise ToolError(message)
                raise ToolError(f"rank {rank} of {world} failed: {name}: {message}\n{tb}")
            values[rank] = pickle.loads(value)
    finally:
        for p in procs:
            if p.is_alive():
                p.join(timeout=10 if len(values) == world else 0.1)
            if p.is_alive():
                p.kill()
                p.join()
        results.close()
    return [values[r] for r in range(world)]
