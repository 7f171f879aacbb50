"""Preemption: SIGTERM / SIGUSR1 become a "stop requested" flag that every rank agrees on
before the (collective) save."""

from __future__ import annotations

import logging
import signal
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def install_signal_handlers(signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGUSR1)
                            ) -> Callable[[], bool]:
    """Turn SIGTERM/SIGUSR1 into a "stop requested" flag; returns the function that reads it.

    The process keeps running so that the loop can finish the step, save and exit 0; a requeued
    job then resumes there. Slurm sends SIGTERM at the time limit and SIGKILL KillWait (default
    30 s) later; ``#SBATCH --signal=USR1@120`` adds SIGUSR1 to every task two minutes before
    (``B:USR1@120`` would reach only the batch shell). torchrun forwards SIGTERM to its workers.
    A signal may reach only some ranks: agree with :func:`any_rank` before the (collective) save.
    Call from the main thread (Python's rule for signal handlers).
    """
    requested: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        if not requested:
            log.warning("received %s: will save after this step and stop",
                        signal.Signals(signum).name)
        requested.append(signum)

    for sig in signals:
        signal.signal(sig, handler)
    return lambda: bool(requested)


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank (collective)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    from megatron_uni.parallel import cpu_backend  # noqa: PLC0415

    device = "cpu" if cpu_backend.is_enabled() else torch.cuda.current_device()
    value = torch.tensor([int(flag)], dtype=torch.int32, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
