"""``launch.slurm --dry-run``: the rendered sbatch script (resources, env mapping, preemption)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from launch import read_env_file
from launch.slurm import main
from megatron_uni.parallel.env import detect_env

REPO = Path(__file__).resolve().parents[3]
DEMO = REPO / "configs" / "runs" / "demo.yaml"


def _dry_run(capsys: pytest.CaptureFixture, *args: str) -> str:
    assert main(["--config", str(DEMO), "--dry-run", *args]) == 0
    return capsys.readouterr().out


def _sbatch(script: str) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)$", script, flags=re.M))


def test_dry_run_64_nodes_x_8_gpus(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    env_file = tmp_path / "cluster.env"
    env_file.write_text("# NCCL settings\nNCCL_DEBUG=WARN\nexport NCCL_IB_HCA=\"mlx5_0,mlx5_1\"\n"
                        "\nNCCL_SOCKET_IFNAME='ib0'\n")
    script = _dry_run(capsys, "--nodes", "64", "--gpus-per-node", "8", "--partition", "gpu",
                      "--account", "proj", "--time", "24:00:00", "--cpus-per-task", "12",
                      "--env-file", str(env_file), "--run-dir", str(tmp_path / "run"),
                      "--signal-seconds", "600", "parallel.tp=2", "parallel.ep=2")
    opts = _sbatch(script)
    assert opts["nodes"] == "64" and opts["ntasks-per-node"] == "8"
    assert opts["gpus-per-node"] == "8" and opts["cpus-per-task"] == "12"
    assert (opts["partition"], opts["account"], opts["time"]) == ("gpu", "proj", "24:00:00")
    assert opts["signal"] == "B:USR1@600" and "#SBATCH --requeue" in script
    assert opts["output"] == f"{tmp_path}/run/launch/slurm-%j.out"
    assert "export NCCL_DEBUG=WARN" in script
    assert "export NCCL_IB_HCA=mlx5_0,mlx5_1" in script and "export NCCL_SOCKET_IFNAME=ib0" in script
    # Master from the allocation's first node (its address), port from the job id.
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST"' in script
    assert "export MASTER_ADDR=" in script and "export MASTER_PORT=" in script
    # One task per GPU, the training command with the overrides and the run dir.
    launch = next(line for line in script.splitlines() if "megatron_uni.train" in line)
    assert launch.startswith("srun --kill-on-bad-exit=1 ")
    assert f"--config {DEMO}" in launch and f"train.run_dir={tmp_path}/run" in launch
    assert "parallel.tp=2 parallel.ep=2" in launch
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script and "trap on_preempt USR1" in script
    assert not (tmp_path / "run").exists()  # a dry run writes nothing


def test_torchrun_per_node_and_container(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    script = _dry_run(capsys, "--nodes", "64", "--gpus-per-node", "8", "--launcher", "torchrun",
                      "--container-image", "nvcr.io/x/y:1", "--run-dir", str(tmp_path))
    assert _sbatch(script)["ntasks-per-node"] == "1"
    launch = next(line for line in script.splitlines() if "megatron_uni.train" in line)
    assert "--container-image=nvcr.io/x/y:1" in launch
    assert "--signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in launch
    assert ("--nproc-per-node 8 --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 "
            "--shutdown-timeout 300 --node-rank $SLURM_NODEID --master-addr $MASTER_ADDR"
            in launch)


def test_cpu_cluster_uses_tasks_per_node(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    opts = _sbatch(_dry_run(capsys, "--nodes", "2", "--tasks-per-node", "2",
                            "--run-dir", str(tmp_path)))
    assert opts["ntasks-per-node"] == "2" and "gpus-per-node" not in opts
    assert main(["--config", str(DEMO), "--nodes", "2", "--dry-run"]) == 2  # neither given


def test_bad_override_fails_before_submitting(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "launch.slurm", "--config", str(DEMO),
                          "--nodes", "1", "--tasks-per-node", "1", "--dry-run", "optim.lrr=1"],
                         cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 2 and "optim.lr" in out.stderr and "Traceback" not in out.stderr


def test_env_file_rejects_garbage(tmp_path: Path) -> None:
    path = tmp_path / "bad.env"
    path.write_text("OK=1\nnot a line\n")
    with pytest.raises(ValueError, match="bad.env:2"):
        read_env_file(path)


def test_batch_step_is_not_a_slurm_task() -> None:
    """Inside the sbatch script Slurm sets SLURM_PROCID=0 and SLURM_NTASKS=4 but no step
    variables: a process started there is alone (not rank 0 of 4 waiting for the others)."""
    batch = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0",
             "SLURM_NODEID": "0", "SLURM_TASKS_PER_NODE": "2(x2)", "SLURM_JOB_NODELIST": "n[1-2]"}
    assert detect_env(batch).launcher == "single"
    step = {**batch, "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
            "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_TASKS_PER_NODE": "2(x2)"}
    env = detect_env(step)
    assert (env.launcher, env.rank, env.world_size, env.local_rank, env.local_world_size) == (
        "slurm", 3, 4, 1, 2)
