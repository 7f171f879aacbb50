"""The demo training submitted through ``launch.slurm`` to a real two-node Slurm cluster.

Debian's slurmctld + two slurmd on loopback (tests/e2e/slurm_cluster.py). Without the packages
the tests skip locally but fail in CI (``CI`` set): .ci/run installs them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.slurm_cluster import SlurmCluster, SlurmUnavailable

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "runs" / "demo.yaml"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    try:
        slurm = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    except SlurmUnavailable as err:
        if os.environ.get("CI"):
            pytest.fail(f"Slurm is required in CI: {err}")
        pytest.skip(f"no Slurm here: {err}")
    yield slurm
    slurm.stop()


def _submit(cluster: SlurmCluster, run_dir: Path, root: Path, *overrides: str) -> str:
    args = [sys.executable, "-m", "launch.slurm", "--config", str(DEMO), "--nodes", "2",
            "--tasks-per-node", "2", "--time", "10", "--run-dir", str(run_dir),
            f"data.root={root}", "parallel.tp=2", "parallel.ep=2", "logging.log_interval=1",
            "logging.tensorboard=false", *overrides]
    env = {**cluster.env, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    match = re.search(r"submitted job (\d+)", out.stdout)
    assert match, out.stdout
    return match.group(1)


def _job_log(run_dir: Path, job_id: str) -> str:
    path = run_dir / "launch" / f"slurm-{job_id}.out"
    return path.read_text(errors="replace") if path.exists() else "(no job log)"


def _steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines]


def test_demo_on_two_nodes(cluster: SlurmCluster, demo_root: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    job = _submit(cluster, run, demo_root, "train.steps=6")
    state = cluster.wait_job(job, timeout=150)
    log = _job_log(run, job)
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", log[-4000:]
    # Every rank found its place from Slurm's variables: 2 nodes x 2 tasks.
    seen = sorted(re.findall(r"topology: rank=(\d) world_size=(\d) local_rank=(\d) "
                             r"local_world_size=(\d) master=([\d.]+):\d+ launcher=(\w+)", log))
    assert seen == [(str(r), "4", str(r % 2), "2", "127.0.0.1", "slurm") for r in range(4)], log
    assert "distributed: slurm launcher, world 4 (tp 2, pp 1, cp 1, ep 2" in log
    assert (run / "checkpoints" / "latest").read_text().strip() == "iter_0000006"
    assert _steps(run) == list(range(1, 7))
    record = run / "launch"
    assert (record / "sbatch.sh").read_text().startswith("#!/bin/bash")
    assert "parallel:" in (record / "config.yaml").read_text()
    assert (record / "git_revision.txt").read_text().strip()


def test_preempted_job_checkpoints_requeues_and_resumes(cluster: SlurmCluster, demo_root: Path,
                                                        tmp_path: Path) -> None:
    run, steps = tmp_path / "run", 6
    job = _submit(cluster, run, demo_root, f"train.steps={steps}", "--no-probe")
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.3)
    else:
        pytest.fail(f"no training progress: {_job_log(run, job)[-4000:]}")
    # What Slurm does before the time limit (--signal=B:USR1@...): USR1 to the batch script.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=cluster.env, check=True)
    state = cluster.wait_job(job, timeout=200)
    log = _job_log(run, job)
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", log[-4000:]
    assert int(state["Restarts"]) == 1, log[-4000:]
    assert "USR1 received" in log and "requeueing" in log
    resumed = re.search(r"resuming from .*iter_(\d+)", log)
    assert resumed, log[-4000:]
    at = int(resumed.group(1))
    # Steps before the signal, then the rest from the checkpoint: none repeated from zero.
    assert 0 < at < steps
    assert _steps(run) == list(range(1, steps + 1)), log[-4000:]
    assert (run / "checkpoints" / "latest").read_text().strip() == f"iter_{steps:07d}"
