"""Launchers: one machine (``launch.local``, torchrun), Slurm (``launch.slurm``, sbatch), MPI
(``launch.mpi``, mpiexec). Thin wrappers around ``python -m megatron_uni.train``: inside the job
``megatron_uni.parallel.env`` reads rank, world size and master from the launcher's variables."""

from __future__ import annotations

import os
import shlex
import subprocess
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
