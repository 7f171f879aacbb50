"""The "saved and exiting after a signal" marker the launchers read."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from megatron_uni.training.exit_status import (
    MARKER,
    record_saved_after_signal,
    saved_after_signal,
)


def test_marker_counts_only_when_written_since_the_launch(tmp_path: Path) -> None:
    assert saved_after_signal(tmp_path, 0.0) is None  # no marker
    before = time.time()
    record_saved_after_signal(tmp_path, 7)
    record = saved_after_signal(tmp_path, before)
    assert record is not None and record["step"] == 7
    assert saved_after_signal(tmp_path, time.time() + 60) is None  # left by an earlier run
    assert not list(tmp_path.glob("*.tmp"))


def test_other_or_broken_markers_do_not_count(tmp_path: Path) -> None:
    (tmp_path / MARKER).write_text(json.dumps({"outcome": "crashed", "time": time.time()}))
    assert saved_after_signal(tmp_path, 0.0) is None
    (tmp_path / MARKER).write_text("{not json")
    assert saved_after_signal(tmp_path, 0.0) is None
    (tmp_path / MARKER).write_text(json.dumps(["saved_after_signal"]))
    assert saved_after_signal(tmp_path, 0.0) is None


def test_command_line_check_for_shell_scripts(tmp_path: Path) -> None:
    def check(since: float) -> int:
        return subprocess.run([sys.executable, "-m", "megatron_uni.training.exit_status",
                               str(tmp_path), "--since", str(since)],
                              capture_output=True, timeout=60).returncode

    assert check(0) == 1
    record_saved_after_signal(tmp_path, 3)
    assert check(int(time.time()) - 1) == 0 and check(time.time() + 60) == 1
