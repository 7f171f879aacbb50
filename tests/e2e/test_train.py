"""The training entry point as a user runs it: records, exact resume, preemption, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.entry import start_and_wait_for_steps


REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "runs" / "demo.yaml"


def _args(root: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "megatron_uni.train", "--config", str(DEMO),
        f"data.root={root}", f"train.run_dir={run_dir}", "parallel.tp=1", "parallel.ep=1",
        "logging.log_interval=1", "logging.tensorboard=false", *extra,
    ]


def _run(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=env)


def _losses(run_dir: Path) -> dict[int, tuple[str, float]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: (r["task"], r["loss"]) for r in map(json.loads, lines)}


def test_train_writes_records_and_checkpoints(demo_root: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    out = _run(_args(demo_root, run, "train.steps=4", "checkpoint.save_interval=2"))
    assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # as the console counts
    for record in records:
        assert {"step", "task", "loss", "lr", "grad_norm", "tokens_per_s", "tflops"} <= set(record)
    assert (run / "config.yaml").exists() and (run / "git_revision.txt").read_text().strip()
    assert (run / "checkpoints" / "latest").read_text().strip() == "iter_0000004"
    assert "step     4/4" in out.stdout


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_is_exact(demo_root: Path, tmp_path: Path, precision: str) -> None:
    """3 steps, stop, resume to 6 == 6 uninterrupted: same tasks, same losses. bf16 (the GPU
    path, emulated on CPU) also checks that every parameter's fp32 main copy and Adam moments
    are saved and loaded under its own name: megatron-core 0.16.1 mixes them up in a param group
    holding both fp32 (LayerScale) and bf16 parameters (training/optimizer.py)."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    p = f"train.precision={precision}"
    out = _run(_args(demo_root, whole, "train.steps=6", p))
    assert out.returncode == 0, out.stderr[-3000:]
    first = _run(_args(demo_root, split, "train.steps=6", "train.stop_at_step=3", p))
    assert first.returncode == 0, first.stderr[-3000:]
    second = _run(_args(demo_root, split, "train.steps=6", p))
    assert second.returncode == 0, second.stderr[-3000:]
    a, b = _losses(whole), _losses(split)
    assert sorted(b) == list(range(1, 7))
    for step in range(1, 7):
        assert a[step][0] == b[step][0]
        assert a[step][1] == pytest.approx(b[step][1], rel=1e-5, abs=1e-6), step


def test_recompute_changes_nothing_but_memory(demo_root: Path, tmp_path: Path) -> None:
    """Full activation recompute re-runs each layer's forward in the backward, routers and their
    conditions included: losses and gradient norms stay those of a plain run."""
    runs = {}
    for recompute in ("false", "true"):
        run = tmp_path / recompute
        out = _run(_args(demo_root, run, "train.steps=3", f"train.recompute={recompute}",
                         "checkpoint.save_interval=0"))
        assert out.returncode == 0, out.stderr[-3000:]
        runs[recompute] = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for plain, again in zip(runs["false"], runs["true"], strict=True):
        assert plain["task"] == again["task"]
        assert again["loss"] == pytest.approx(plain["loss"], rel=1e-6)
        assert again["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-5)


def test_sigterm_saves_and_exits_zero(demo_root: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    metrics = run / "metrics.jsonl"
    proc = start_and_wait_for_steps(_args(demo_root, run, "train.steps=10000"), metrics)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    latest = (run / "checkpoints" / "latest").read_text().strip()
    steps_done = len(metrics.read_text().splitlines())
    assert latest == f"iter_{steps_done:07d}"


def test_bad_config_and_missing_checkpoint_are_clear_errors(demo_root: Path, tmp_path: Path
                                                            ) -> None:
    out = _run(_args(demo_root, tmp_path / "a", "optim.lrr=1"))
    assert out.returncode == 2 and "did you mean 'optim.lr'" in out.stderr
    assert "Traceback" not in out.stderr
    out = _run(_args(demo_root, tmp_path / "b", f"checkpoint.load={tmp_path / 'nope'}"))
    assert out.returncode == 2 and "nope" in out.stderr and "Traceback" not in out.stderr
