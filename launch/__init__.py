"""Launchers: one machine (``launch.local``, torchrun), Slurm (``launch.slurm``, sbatch), MPI
(``launch.mpi``, mpiexec). Thin wrappers around ``python -m megatron_uni.train``: inside the job
``megatron_uni.parallel.env`` reads rank, world size and master from the launcher's variables."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Sequence

ENTRY = {"train": "megatron_uni.train", "evaluate": "megatron_uni.evaluate"}


def run_or_print(cmd: Sequence[str], dry_run: bool) -> int:
    """Print ``cmd`` (``--dry-run``) or run it with one OpenMP thread per process unless the
    environment says otherwise; returns its exit code."""
    if dry_run:
        print(shlex.join(cmd))
        return 0
    env = {**os.environ}
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.call(list(cmd), env=env)


# What launch.local passes on to torchrun; torchrun passes each on to its workers
# (``--signals-to-handle``). SIGTERM / SIGUSR1 make the workers save and exit 0.
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)


def run_forwarding_signals(cmd: Sequence[str], run_dir: Path | str) -> int:
    """Run ``cmd`` (torchrun) in its own session, pass it every signal in
    :data:`FORWARDED_SIGNALS` once, and return its exit code, or 0 when it failed only because
    it was stopped by a signal after the workers saved (:func:`exit_code`).

    Its own session: a Ctrl-C at the terminal reaches torchrun once (from here), not twice.
    On Linux torchrun also gets SIGTERM should this process die, so it never runs orphaned.
    """
    import time  # noqa: PLC0415

    env = {**os.environ}
    env.setdefault("OMP_NUM_THREADS", "1")
    started = time.time()
    proc = subprocess.Popen(list(cmd), env=env, start_new_session=True,
                            preexec_fn=_die_with_parent if sys.platform == "linux" else None)

    def forward(signum: int, frame: object) -> None:
        if proc.poll() is None:
            proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    try:
        rc = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return exit_code(rc, run_dir, started)


def exit_code(rc: int, run_dir: Path | str, started: float) -> int:
    """torchrun's exit code ``rc``, except 0 when the workers recorded a clean save after a stop
    signal since ``started`` (torchrun exits 1 after any signal, whatever its workers did)."""
    from megatron_uni.training.exit_status import saved_after_signal  # noqa: PLC0415

    if rc == 0:
        return 0
    record = saved_after_signal(run_dir, started)
    if record is None:
        return rc
    print(f"launch: torchrun exited {rc} after a stop signal; the workers saved step "
          f"{record['step']} and exited cleanly: exit 0", file=sys.stderr, flush=True)
    return 0


def _die_with_parent() -> None:
    import ctypes  # noqa: PLC0415

    PR_SET_PDEATHSIG = 1  # noqa: N806 - <sys/prctl.h>
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))


def git_revision(cwd: Path | str = ".") -> str:
    """``git describe``-like revision of ``cwd`` (with ``-dirty``), or ``unknown``."""
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=cwd, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("-dirty" if dirty.strip() else "")


def read_env_file(path: Path | str) -> dict[str, str]:
    """``KEY=VALUE`` lines (``export`` prefix, blank lines and ``#`` comments allowed)."""
    env: dict[str, str] = {}
    for num, raw in enumerate(Path(path).read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("export ").strip()
        key, sep, value = line.partition("=")
        if not sep or not key.replace("_", "a").isalnum():
            raise ValueError(f"{path}:{num}: expected KEY=VALUE, got {raw!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key.strip()] = value
    return env
