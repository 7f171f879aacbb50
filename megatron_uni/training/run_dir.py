"""The run directory: one run at a time (a lock held for the run's life) and its records.

    lock = RunLock.acquire(run_dir)        # global rank 0, before anything writes there
    write_run_record(cfg, run_dir)         # config.yaml, git_revision.txt, command.txt
    ...
    lock.release()

The lock is ``<run_dir>/run.lock``, created with ``O_EXCL`` and holding ``{"host", "pid",
"started", "command", "job", "restart"}``; its holder touches it every :data:`HEARTBEAT_S`
seconds. A second run on the same ``train.run_dir`` stops with an error naming the first one's
host and pid before it writes, deletes or appends anything (config.yaml, command.txt,
metrics.jsonl, an unfinished save it would take for stale). A lock left by a run that died is
taken over with a warning: same host and that pid no longer running; or the same Slurm job in
another incarnation (a requeue: Slurm starts it only after the old one ended, maybe on another
node); or no heartbeat for :data:`STALE_S` seconds. A live lock of another host is reported with
the way to remove it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from megatron_uni.config import Config, dump_yaml

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
HEARTBEAT_S = 60.0
STALE_S = 600.0


class RunDirError(RuntimeError):
    """The run directory cannot be used (taken by another run, not writable): what and why."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """``<run_dir>/run.lock`` held by this process (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name="run-lock", daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    @classmethod
    def acquire(cls, run_dir: Path) -> RunLock:
        run_dir = Path(run_dir)
        path = run_dir / LOCK_FILE
        mine = {"host": socket.gethostname(), "pid": os.getpid(),
                "started": time.strftime("%FT%T%z"), "command": " ".join(sys.argv)[:500],
                "job": os.environ.get("SLURM_JOB_ID"),
                "restart": os.environ.get("SLURM_RESTART_COUNT", "0")}
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            for _ in range(2):
                try:
                    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    cls._check_holder(path, mine)  # raises unless it is stale (then removed)
                    continue
                with os.fdopen(fd, "w") as f:
                    json.dump(mine, f)
                return cls(path)
        except OSError as err:
            raise unwritable(run_dir, err) from err
        raise RunDirError(f"run directory {run_dir}: another run took {path} just now")

    @staticmethod
    def _check_holder(path: Path, mine: dict) -> None:
        """Raise RunDirError when the lock's holder may be running; remove a stale lock."""
        try:
            holder = json.loads(path.read_text())
            other_host, pid = str(holder["host"]), int(holder["pid"])
            quiet = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return  # released meanwhile
        except (OSError, ValueError, KeyError, TypeError):
            holder, other_host, pid, quiet = {}, "unknown", -1, STALE_S  # garbled: a crash
        requeued = (holder.get("job") is not None and holder.get("job") == mine["job"]
                    and holder.get("restart") != mine["restart"])
        same_host = other_host == mine["host"]
        if not requeued and quiet < STALE_S and (not same_host or _alive(pid)):
            who = (f"host {other_host}, pid {pid}, started {holder.get('started', '?')}")
            fix = ("set another train.run_dir, or wait for that run to end" if same_host else
                   f"set another train.run_dir; if that run is no longer running, delete {path}")
            raise RunDirError(
                f"run directory {path.parent} is in use by another run ({who}): two runs would "
                f"overwrite each other's checkpoints and logs. Fix: {fix}")
        why = ("its Slurm job was requeued" if requeued else "it is no longer running"
               if same_host and quiet < STALE_S else f"no heartbeat for {quiet:.0f} s")
        log.warning("taking over %s from host %s, pid %s: %s", path, other_host, pid, why)
        path.unlink(missing_ok=True)

    def release(self) -> None:
        """Remove the lock (only if it is still ours)."""
        self._stop.set()
        try:
            holder = json.loads(self.path.read_text())
            if int(holder.get("pid", -1)) == os.getpid():
                self.path.unlink()
        except (OSError, ValueError):
            pass


def unwritable(run_dir: Path, err: OSError) -> RunDirError:
    return RunDirError(f"run directory {run_dir} cannot be written ({type(err).__name__}: "
                       f"{err.strerror or err}). Fix: make it writable, or set train.run_dir "
                       "to a writable directory")


def git_revision() -> str:
    """The source revision (with '+dirty' for uncommitted changes), or 'unknown'."""
    root = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "")


def write_run_record(cfg: Config, run_dir: Path) -> None:
    """Resolved config, git revision and command line: what it takes to rerun this."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_yaml(cfg, run_dir / "config.yaml")
        (run_dir / "git_revision.txt").write_text(git_revision() + "\n")
        (run_dir / "command.txt").write_text(" ".join([sys.executable, *sys.argv]) + "\n")
    except OSError as err:
        raise unwritable(run_dir, err) from err
