"""Run a function on N gloo ranks on loopback, the way the tests of parallel layouts need it.

    results = run_ranks(my_check, world_size=8, args=(tmp_path,), timeout=240)

``my_check(rank, world_size, *args)`` runs in N fresh processes that see a torchrun-like
environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR=127.0.0.1, MASTER_PORT
of a free port). Its return values (picklable) come back in rank order. When a rank raises, the
other ranks are stopped and the pytest failure shows that rank's traceback; a rank that dies
without raising (signal, os._exit) is reported with its exit code; past ``timeout`` seconds every
rank is killed and the failure says which ranks had not finished.

The processes come from a forkserver that has already imported torch and megatron-core, so
each rank starts in well under a second instead of paying the ~5 s import again.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import time
import traceback
from typing import Any, Callable, Sequence

from megatron_uni.parallel.env import free_port

_PRELOAD = ["megatron_uni", "torch", "megatron.core", "megatron_uni.parallel.initialize"]
_ctx = None


def _context() -> mp.context.BaseContext:
    global _ctx
    if _ctx is None:
        _ctx = mp.get_context("forkserver")
        _ctx.set_forkserver_preload(_PRELOAD)
    return _ctx


def _rank_main(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    port: int,
    args: Sequence[Any],
    extra_env: dict[str, str],
    results: Any,
) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
        **extra_env,
    )
    import torch  # noqa: PLC0415

    torch.set_num_threads(1)  # N ranks share 2 cores: oversubscription makes gloo crawl
    try:
        # Plain pickle bytes: through the queue, torch would share tensors by file descriptor,
        # which dies with this process before the parent reads it.
        value = pickle.dumps(fn(rank, world_size, *args))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        results.put((rank, False, traceback.format_exc()))
    else:
        results.put((rank, True, value))
    finally:
        try:
            import torch.distributed as dist  # noqa: PLC0415

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - teardown must not mask the result
            pass


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    timeout: float = 180.0,
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes; return values by rank.

    ``fn`` must be importable by name (a module-level function in a test module).
    """
    ctx = _context()
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(fn, rank, world_size, port, tuple(args), dict(env or {}), results),
            name=f"rank{rank}",
            daemon=False,  # ranks may start processes of their own (dist_checkpointing does)
        )
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    values: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(values) < world_size:
            try:
                rank, ok, value = results.get(timeout=0.2)
            except queue.Empty:
                dead = [
                    (i, p.exitcode)
                    for i, p in enumerate(procs)
                    if i not in values and p.exitcode is not None
                ]
                if dead:
                    # Give the queue a moment: a rank may have put its result and exited.
                    try:
                        rank, ok, value = results.get(timeout=1.0)
                    except queue.Empty:
                        raise AssertionError(
                            "rank(s) died without a result: "
                            + ", ".join(f"rank {i} exit code {c}" for i, c in dead)
                        ) from None
                elif time.monotonic() > deadline:
                    missing = [i for i in range(world_size) if i not in values]
                    raise AssertionError(
                        f"timed out after {timeout:.0f} s; ranks still running: {missing}"
                    ) from None
                else:
                    continue
            if not ok:
                raise AssertionError(f"rank {rank} of {world_size} failed:\n{value}")
            values[rank] = pickle.loads(value)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.join(timeout=5 if len(values) == world_size else 0.1)
            if proc.is_alive():
                proc.kill()
                proc.join()
        results.close()
    return [values[r] for r in range(world_size)]
