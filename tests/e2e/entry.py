"""Entry points run as a user runs them, on one gloo rank forked from the test harness (fast:
torch and megatron-core are imported once), with their stderr and log lines captured.

    code, text = run_entry("megatron_uni.train", demo_args(root, run_dir, "train.steps=2"))

``patch`` names a fault to inject in that process first (``"enospc"``: every checkpoint shard
write fails with ENOSPC, as on a full disk).
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from tests.multirank import run_ranks

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "runs" / "demo.yaml"
FAST = ["parallel.tp=1", "parallel.ep=1", "logging.log_interval=1", "logging.tensorboard=false",
        "logging.progress_bar=false", "data.num_workers=0", "data.reader_streams=1",
        "optim.warmup_steps=2", "checkpoint.keep_last=0"]


def demo_args(root: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["--config", str(DEMO), f"data.root={root}", f"train.run_dir={run_dir}", *FAST,
            *extra]


def _entry(rank: int, world: int, module: str, argv: list[str], patch: str | None
           ) -> tuple[int, str]:
    import errno
    import importlib
    import io
    import sys

    if patch == "enospc":
        from megatron.core.dist_checkpointing.strategies import filesystem_async

        def full(*args: object, **kwargs: object) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        filesystem_async._write_item = full
    buffer = io.StringIO()
    sys.stdout = sys.stderr = buffer  # the entry point's logging handler writes here too
    try:
        code = importlib.import_module(module).main(argv)
    finally:
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    return code, buffer.getvalue()


def run_entry(module: str, argv: list[str], patch: str | None = None,
              timeout: float = 240) -> tuple[int, str]:
    """(exit code, stdout + stderr + log) of ``module.main(argv)`` on one rank."""
    (result,) = run_ranks(_entry, 1, args=(module, argv, patch), timeout=timeout)
    return result


def start_and_wait_for_steps(cmd: list[str], metrics: Path, steps: int = 2,
                             timeout: float = 180) -> subprocess.Popen:
    """Start ``cmd`` in the repo (one thread per process) and return it once ``metrics`` holds
    ``steps`` rows, or once it exited or ``timeout`` passed (the caller checks which)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= steps:
            break
        time.sleep(0.5)
    return proc
