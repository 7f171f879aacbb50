"""Bad data ends the entry points with ``error: ...`` and exit 2, no traceback: more bad shards
than data.max_bad_samples (here: shards cut at a tar header boundary), a class-name file that
is not UTF-8 (named in the message)."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "runs" / "demo.yaml"


@pytest.fixture
def cut_root(demo_root: Path, tmp_path: Path) -> Path:
    """The demo dataset with every training and evaluation shard cut at a header boundary."""
    root = tmp_path / "data"
    for item in demo_root.rglob("*"):
        target = root / item.relative_to(demo_root)
        if item.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif item.suffix != ".tar":
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(item)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            with tarfile.open(item) as tar:
                cut = tar.getmembers()[len(tar.getmembers()) // 2].offset
            target.write_bytes(item.read_bytes()[:cut])
    return root


def _run(entry: str, root: Path, run_dir: Path, *extra: str, options: tuple[str, ...] = ()
         ) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", entry, "--config", str(DEMO), *options, f"data.root={root}",
            f"train.run_dir={run_dir}", "parallel.tp=1", "parallel.ep=1",
            "logging.tensorboard=false", *extra]
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_train_past_max_bad_samples_is_a_message(cut_root: Path, tmp_path: Path) -> None:
    out = _run("megatron_uni.train", cut_root, tmp_path / "run", "train.steps=2",
               "data.max_bad_samples=0")
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    error = next(line for line in out.stderr.splitlines() if line.startswith("error: "))
    assert "more than data.max_bad_samples=0" in error and "raise data.max_bad_samples" in error
    assert "task " in error and "1 bad samples or shards" in error and str(cut_root) in error
    assert "truncated tar" in error


def test_evaluate_past_max_bad_samples_is_a_message(cut_root: Path, tmp_path: Path) -> None:
    out = _run("megatron_uni.evaluate", cut_root, tmp_path / "run", "data.max_bad_samples=0",
               options=("--tasks", "image_cls", "--allow-random-weights"))
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert "error: task image_cls: 1 bad samples or shards" in out.stderr


def test_non_utf8_class_names_name_the_file(demo_root: Path, tmp_path: Path) -> None:
    classes = tmp_path / "classes.txt"
    classes.write_bytes("circle\ncarr\xe9\ntriangle\n".encode("latin-1"))
    out = _run("megatron_uni.train", demo_root, tmp_path / "run", "train.steps=1",
               f"data.tasks.image_cls.target_set={classes}")
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert f"target set file {classes} is not UTF-8 text (byte 11" in out.stderr
    assert "data.tasks.image_cls.target_set" in out.stderr and "iconv" in out.stderr
