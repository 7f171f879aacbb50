"""The demo training under ``mpiexec -n 4`` (mpi4py + MPICH wheels) through ``launch.mpi``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "runs" / "demo.yaml"


def test_demo_under_mpiexec(demo_root: Path, tmp_path: Path) -> None:
    try:
        import mpi4py.MPI  # noqa: F401
    except ImportError as err:  # requirements.txt pins mpi4py + mpich: CI must have them
        if os.environ.get("CI"):
            pytest.fail(f"mpi4py/MPICH are required in CI: {err}")
        pytest.skip(f"no MPI here: {err}")
    root, run = demo_root, tmp_path / "run"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "MASTER_", "RANK", "WORLD_SIZE", "PMI_"))}
    env["OMP_NUM_THREADS"] = "1"
    out = subprocess.run(
        [sys.executable, "-m", "launch.mpi", "-n", "4", "--config", str(DEMO),
         f"data.root={root}", f"train.run_dir={run}", "train.steps=4", "parallel.tp=2",
         "parallel.ep=2", "logging.log_interval=1", "logging.tensorboard=false"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert "distributed: mpi launcher, world 4 (tp 2, pp 1, cp 1, ep 2" in out.stdout + out.stderr
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert (run / "checkpoints" / "latest").read_text().strip() == "iter_0000004"
