"""Run a function on N gloo CPU processes on loopback: the test suite's and the offline tools'
small "world".

    values = run_ranks(fn, world_size=8, args=(path,), timeout=240)

``fn(rank, world_size, *args)`` runs in N fresh processes with a torchrun-like environment
(RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR=127.0.0.1, MASTER_PORT of a free port,
one intra-op thread) plus ``env``. Return values (picklable) come back in rank order. A rank that
raises stops the others and surfaces as :class:`RankFailure` carrying its error type, message and
traceback; a rank that dies without a result and a timeout are RankFailures too.

The processes fork from a server that has imported torch and megatron-core once, so each rank
starts in well under a second instead of paying the ~5 s import again. ``fn`` must be importable
by name (a module-level function).
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


class RankFailure(RuntimeError):
    """A rank raised (``error_type`` / ``message`` / ``traceback_text`` are its own), died, or
    the run timed out (then ``rank`` is None)."""

    def __init__(self, text: str, rank: int | None = None, error_type: str = "",
                 message: str = "", traceback_text: str = "") -> None:
        super().__init__(text)
        self.rank, self.error_type, self.message = rank, error_type, message
        self.traceback_text = traceback_text


def _context() -> mp.context.BaseContext:
    global _ctx
    if _ctx is None:
        _ctx = mp.get_context("forkserver")
        _ctx.set_forkserver_preload(_PRELOAD)
    return _ctx


def _rank_main(fn: Callable[..., Any], rank: int, world_size: int, port: int,
               args: Sequence[Any], extra_env: dict[str, str], results: Any) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        OMP_NUM_THREADS="1", **extra_env,
    )
    import torch  # noqa: PLC0415

    torch.set_num_threads(1)  # N ranks share few cores: oversubscription makes gloo crawl
    try:
        # Plain pickle bytes: through the queue, torch would share tensors by file descriptor,
        # which dies with this process before the parent reads it.
        value = pickle.dumps(fn(rank, world_size, *args))
    except BaseException as err:  # noqa: BLE001 - everything goes back to the parent
        results.put((rank, False, (type(err).__name__, str(err), traceback.format_exc())))
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

    The rendezvous port is free when picked but may be taken before rank 0's store binds it
    (an outgoing connection of another process gets it as its ephemeral port): a start that
    fails with EADDRINUSE is retried on a new port, up to ``_PORT_ATTEMPTS`` times."""
    for attempt in range(1, _PORT_ATTEMPTS + 1):
        try:
            return _run_once(fn, world_size, args, timeout, env, free_port())
        except RankFailure as err:
            if attempt == _PORT_ATTEMPTS or not _port_taken(err):
                raise
    raise AssertionError("unreachable")


_PORT_ATTEMPTS = 3


def _port_taken(err: RankFailure) -> bool:
    return "EADDRINUSE" in str(err) or "address already in use" in str(err).lower()


def _run_once(fn: Callable[..., Any], world_size: int, args: Sequence[Any], timeout: float,
              env: dict[str, str] | None, port: int) -> list[Any]:
    ctx = _context()
    results = ctx.Queue()
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
                dead = [(i, p.exitcode) for i, p in enumerate(procs)
                        if i not in values and p.exitcode is not None]
                if dead:
                    # Give the queue a moment: a rank may have put its result and exited.
                    try:
                        rank, ok, value = results.get(timeout=1.0)
                    except queue.Empty:
                        raise RankFailure("rank(s) died without a result: " + ", ".join(
                            f"rank {i} exit code {c}" for i, c in dead)) from None
                elif time.monotonic() > deadline:
                    missing = [i for i in range(world_size) if i not in values]
                    raise RankFailure(
                        f"timed out after {timeout:.0f} s; ranks still running: {missing}"
                    ) from None
                else:
                    continue
            if not ok:
                name, message, tb = value
                raise RankFailure(f"rank {rank} of {world_size} failed:\n{tb}", rank, name,
                                  message, tb)
            values[rank] = pickle.loads(value)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.join(timeout=10 if len(values) == world_size else 0.1)
            if proc.is_alive():
                proc.kill()
                proc.join()
        results.close()
    return [values[r] for r in range(world_size)]
