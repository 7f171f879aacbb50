"""``launch.local`` and ``launch.mpi`` build the commands a user would type."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from launch import local, mpi

DEMO = str(Path(__file__).resolve().parents[3] / "configs" / "runs" / "demo.yaml")


def test_local_is_torchrun_standalone(capsys: pytest.CaptureFixture) -> None:
    assert local.main(["--nproc", "4", "--config", DEMO, "--dry-run", "parallel.tp=2"]) == 0
    out = capsys.readouterr().out.split()
    assert out[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--standalone" in out and out[out.index("--nproc-per-node") + 1] == "4"
    assert out[-5:] == ["-m", "megatron_uni.train", "--config", DEMO, "parallel.tp=2"]
    # Stop signals reach the workers, and they get time to save (launch.local's default 300 s).
    assert "SIGUSR1" in out[out.index("--signals-to-handle") + 1].split(",")
    assert out[out.index("--shutdown-timeout") + 1] == "300"


def test_mpi_command(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    fake = tmp_path / "mpiexec"
    fake.write_text("#!/bin/sh\necho 'HYDRA build details'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}")
    cmd = mpi.command(4, "c.yaml", ["train.steps=2"], hostfile="hosts", extra=["-ppn", "2"])
    assert cmd[:5] == [str(fake), "-n", "4", "-f", "hosts"]
    assert cmd[5:7] == ["-ppn", "2"]
    assert cmd[7:] == [sys.executable, "-m", "megatron_uni.train", "--config", "c.yaml",
                       "train.steps=2"]


def test_mpi_without_mpiexec_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda *a, **k: None)
    with pytest.raises(SystemExit, match="pip install mpi4py mpich"):
        mpi.find_mpiexec()
