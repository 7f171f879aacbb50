"""A stop signal to a launch whose workers save and exit cleanly ends the launch with 0, though
torchrun exits 1 after any signal: launch.local forwards the signal and reads the workers'
marker; the sbatch script (--launcher torchrun) reads it too."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from launch import exit_code
from launch.slurm import main as slurm_main
from megatron_uni.training.exit_status import record_saved_after_signal

REPO = Path(__file__).resolve().parents[3]

# Stands in for torchrun: waits; on a signal it does what torchrun's workers and torchrun do
# together (the workers save and write the marker, torchrun exits 1), unless told to fail.
FAKE_TORCHRUN = textwrap.dedent("""
    import signal, sys, time
    from pathlib import Path
    from megatron_uni.training.exit_status import record_saved_after_signal
    run_dir, mode = Path(sys.argv[1]), sys.argv[2]
    def stop(signum, frame):
        (run_dir / "got").write_text(signal.Signals(signum).name)
        if mode == "save":
            record_saved_after_signal(run_dir, 5)
        sys.exit(1)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGUSR1, stop)
    (run_dir / "ready").write_text("")
    time.sleep(60)
    sys.exit(3)
""")


def test_exit_code_logic(tmp_path: Path) -> None:
    started = time.time()
    assert exit_code(0, tmp_path, started) == 0
    assert exit_code(1, tmp_path, started) == 1  # no marker: a failure stays one
    record_saved_after_signal(tmp_path, 4)
    assert exit_code(1, tmp_path, started) == 0
    assert exit_code(1, tmp_path, time.time() + 60) == 1  # marker of an earlier launch


def _launch(tmp_path: Path, mode: str) -> subprocess.Popen:
    fake = tmp_path / "fake_torchrun.py"
    fake.write_text(FAKE_TORCHRUN)
    code = ("import sys; from launch import run_forwarding_signals; "
            f"sys.exit(run_forwarding_signals([sys.executable, {str(fake)!r}, {str(tmp_path)!r}, "
            f"{mode!r}], {str(tmp_path)!r}))")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.time() + 60
    while not (tmp_path / "ready").exists():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    return proc


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_local_forwards_the_signal_and_exits_zero_after_a_clean_save(tmp_path: Path, sig) -> None:
    proc = _launch(tmp_path, "save")
    proc.send_signal(sig)
    assert proc.wait(timeout=60) == 0
    assert (tmp_path / "got").read_text() == sig.name


def test_local_keeps_the_failure_without_a_save(tmp_path: Path) -> None:
    proc = _launch(tmp_path, "fail")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 1


def test_sbatch_torchrun_script_reads_the_marker(capsys, tmp_path: Path) -> None:
    assert slurm_main(["--config", str(REPO / "configs/runs/demo.yaml"), "--dry-run", "--nodes",
                       "1", "--gpus-per-node", "4", "--launcher", "torchrun",
                       "--run-dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith('if [ "$rc" != 0 ]'))
    check = "\n".join(lines[start:start + 4])
    assert lines[start + 3] == "fi" and "megatron_uni.training.exit_status" in check

    def run(since: float) -> int:
        script = f"rc=1\nstep_started={int(since)}\n{check}\nexit $rc\n"
        return subprocess.run(["bash", "-c", script], cwd=REPO, capture_output=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60).returncode

    assert run(time.time()) == 1  # no marker: torchrun's 1 stands
    record_saved_after_signal(tmp_path, 2)
    assert run(time.time() - 5) == 0
    assert run(time.time() + 60) == 1  # a marker older than the step does not count


def test_srun_script_has_no_exit_override(capsys, tmp_path: Path) -> None:
    assert slurm_main(["--config", str(REPO / "configs/runs/demo.yaml"), "--dry-run", "--nodes",
                       "1", "--gpus-per-node", "4", "--run-dir", str(tmp_path)]) == 0
    assert "exit_status" not in capsys.readouterr().out
