"""The run's "saved and exiting after a signal" marker: ``<train.run_dir>/exit_status.json``.

torchrun answers SIGTERM (or SIGUSR1 with ``--signals-to-handle``) by passing it to its workers,
waiting for them, and then exiting 1 whatever they did; the workers save a checkpoint and exit 0
(``training/loop.py``). A launcher that wraps torchrun (``launch.local``, the sbatch script with
``--launcher torchrun``) reads this marker to tell that clean stop from a failure and exits 0.

The trainer's main rank writes it after the collective save that a stop signal triggers
(:func:`record_saved_after_signal`); a launcher accepts it only when written after the launch
began (:func:`saved_after_signal`), so a marker left by an earlier run never hides a failure.
``python -m megatron_uni.training.exit_status RUN_DIR --since EPOCH_SECONDS`` is the same check
for shell scripts: exit 0 when the marker is there and recent, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Sequence

MARKER = "exit_status.json"
SAVED_AFTER_SIGNAL = "saved_after_signal"


def record_saved_after_signal(run_dir: Path | str, step: int) -> Path:
    """Write the marker (main rank, after the stop signal's save completed); atomic."""
    path = Path(run_dir) / MARKER
    record = {"outcome": SAVED_AFTER_SIGNAL, "step": int(step), "time": time.time(),
              "host": socket.gethostname(), "pid": os.getpid()}
    tmp = path.with_name(f".{MARKER}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record) + "\n")
    os.replace(tmp, path)
    return path


def saved_after_signal(run_dir: Path | str, since: float) -> dict[str, Any] | None:
    """The marker's record when it says "saved after a signal" and was written at or after
    ``since`` (seconds since the epoch, the launch's start); else None."""
    try:
        record = json.loads((Path(run_dir) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("outcome") != SAVED_AFTER_SIGNAL:
        return None
    written = record.get("time")
    if not isinstance(written, (int, float)) or written < since:
        return None
    return record


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="exit 0 when RUN_DIR's workers saved after a stop "
                                            "signal at or after --since, else 1")
    p.add_argument("run_dir")
    p.add_argument("--since", type=float, required=True, help="seconds since the epoch")
    args = p.parse_args(argv)
    record = saved_after_signal(args.run_dir, args.since)
    if record is None:
        return 1
    print(f"the workers saved step {record['step']} after a stop signal", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
