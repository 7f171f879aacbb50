"""Launchers refuse jobs that cannot run before submitting or starting anything: counts,
Slurm time formats, the config layout against the process count, exclusive options, files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from launch import local, mpi, slurm
from launch.validate import LaunchError, slurm_time

REPO = Path(__file__).resolve().parents[3]
DEMO = str(REPO / "configs" / "runs" / "demo.yaml")  # tp=2 x ep=2: multiples of 4 ranks


@pytest.fixture(autouse=True)
def _rank0(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANK", raising=False)  # report_error prints on rank 0 only


def _error(capsys: pytest.CaptureFixture, main, *args: str) -> str:
    assert main(list(args)) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing rendered, nothing run
    assert captured.err.startswith(("error: ", "config error: ")), captured.err
    return captured.err


def _slurm(capsys: pytest.CaptureFixture, tmp_path: Path, *args: str) -> str:
    return _error(capsys, slurm.main, "--config", DEMO, "--dry-run",
                  "--run-dir", str(tmp_path / "run"), *args)


@pytest.mark.parametrize("nodes", ["0", "-2"])
def test_slurm_nodes_must_be_positive(capsys, tmp_path: Path, nodes: str) -> None:
    err = _slurm(capsys, tmp_path, "--nodes", nodes, "--tasks-per-node", "4")
    assert f"--nodes {nodes}: must be a positive count" in err


@pytest.mark.parametrize("option", ["--tasks-per-node", "--gpus-per-node", "--cpus-per-task",
                                    "--signal-seconds"])
def test_slurm_other_counts_must_be_positive(capsys, tmp_path: Path, option: str) -> None:
    per_node = [] if option in ("--tasks-per-node", "--gpus-per-node") else ["--gpus-per-node",
                                                                             "4"]
    err = _slurm(capsys, tmp_path, "--nodes", "1", *per_node, option, "0")
    assert f"{option} 0: must be a positive count" in err


def test_slurm_time_formats() -> None:
    for good in ("30", "30:00", "24:00:00", "2-12", "2-12:30", "2-12:30:00", "0", "UNLIMITED",
                 "infinite", "90:00"):
        slurm_time(good)
    for bad in ("abc", "1h", "24:00:00:00", "-1-2", "1-", ":30", "1:2:3-4", "", "1.5"):
        with pytest.raises(LaunchError, match="--time"):
            slurm_time(bad)


def test_slurm_bad_time(capsys, tmp_path: Path) -> None:
    err = _slurm(capsys, tmp_path, "--nodes", "1", "--tasks-per-node", "4", "--time", "abc")
    assert "--time 'abc': not a Slurm time limit" in err and "D-HH:MM:SS" in err


def test_slurm_good_time_is_rendered(capsys, tmp_path: Path) -> None:
    assert slurm.main(["--config", DEMO, "--dry-run", "--run-dir", str(tmp_path), "--nodes", "1",
                       "--tasks-per-node", "4", "--time", "1-12:00"]) == 0
    assert "#SBATCH --time=1-12:00" in capsys.readouterr().out


def test_slurm_layout_must_fit_nodes_x_tasks(capsys, tmp_path: Path) -> None:
    err = _slurm(capsys, tmp_path, "--nodes", "1", "--tasks-per-node", "3")
    assert "--nodes 1 x --tasks-per-node 3 = 3 processes do not fit the config's layout" in err
    assert "tp * pp * cp = 2" in err or "etp * ep * pp" in err
    err = _slurm(capsys, tmp_path, "--nodes", "3", "--gpus-per-node", "2", "parallel.tp=1",
                 "parallel.ep=4")
    assert "--nodes 3 x --gpus-per-node 2 = 6 processes" in err and "etp * ep * pp = 4" in err
    # The global batch must split over the data-parallel ranks too.
    err = _slurm(capsys, tmp_path, "--nodes", "2", "--tasks-per-node", "4",
                 "train.global_batch_size=6")
    assert "train.global_batch_size=6" in err


def test_slurm_gpus_and_tasks_per_node_exclude_each_other(capsys, tmp_path: Path) -> None:
    err = _slurm(capsys, tmp_path, "--nodes", "1", "--gpus-per-node", "4", "--tasks-per-node",
                 "4")
    assert "--gpus-per-node and --tasks-per-node exclude each other" in err
    err = _slurm(capsys, tmp_path, "--nodes", "1")
    assert "give --gpus-per-node N" in err


def test_slurm_env_file_problems_are_messages(capsys, tmp_path: Path) -> None:
    err = _slurm(capsys, tmp_path, "--nodes", "1", "--tasks-per-node", "4", "--env-file",
                 str(tmp_path / "missing.env"))
    assert f"--env-file {tmp_path / 'missing.env'}: no such file" in err
    bad = tmp_path / "bad.env"
    bad.write_text("OK=1\nnot a line\n")
    err = _slurm(capsys, tmp_path, "--nodes", "1", "--tasks-per-node", "4", "--env-file",
                 str(bad))
    assert f"{bad}:2: expected KEY=VALUE" in err


def test_slurm_missing_env_file_from_the_shell(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "launch.slurm", "--config", DEMO, "--nodes", "1",
                          "--tasks-per-node", "4", "--env-file", str(tmp_path / "x.env")],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "error: --env-file" in out.stderr and not (tmp_path / "run").exists()


def test_slurm_missing_config(capsys, tmp_path: Path) -> None:
    err = _error(capsys, slurm.main, "--config", str(tmp_path / "no.yaml"), "--nodes", "1",
                 "--tasks-per-node", "4", "--dry-run")
    assert "--config" in err and "no such file" in err


def test_local_nproc(capsys) -> None:
    assert "--nproc 0: must be a positive count" in _error(
        capsys, local.main, "--nproc", "0", "--config", DEMO, "--dry-run")
    assert "--nproc 3 = 3 processes do not fit" in _error(
        capsys, local.main, "--nproc", "3", "--config", DEMO, "--dry-run")


def test_mpi_n(capsys, tmp_path: Path) -> None:
    assert "-n 0: must be a positive count" in _error(
        capsys, mpi.main, "-n", "0", "--config", DEMO, "--dry-run")
    assert "-n 2 = 2 processes do not fit" in _error(
        capsys, mpi.main, "-n", "2", "--config", DEMO, "--dry-run", "parallel.ep=4",
        "parallel.tp=1")
    assert "--hostfile" in _error(capsys, mpi.main, "-n", "4", "--config", DEMO, "--dry-run",
                                  "--hostfile", str(tmp_path / "hosts"))
