"""``launch.local`` as a user runs it: SIGTERM mid-run, the workers save, the launch exits 0."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from tests.e2e.entry import DEMO, start_and_wait_for_steps


def test_sigterm_to_launch_local_saves_and_exits_zero(demo_root: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "launch.local", "--nproc", "2", "--config", str(DEMO),
           f"data.root={demo_root}", f"train.run_dir={run}", "parallel.tp=1", "parallel.ep=2",
           "train.steps=10000", "logging.log_interval=1", "logging.tensorboard=false",
           "checkpoint.save_interval=0"]
    metrics = run / "metrics.jsonl"
    proc = start_and_wait_for_steps(cmd, metrics)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]
    assert "the workers saved step" in err
    steps_done = len(metrics.read_text().splitlines())
    assert (run / "checkpoints" / "latest").read_text().strip() == f"iter_{steps_done:07d}"
