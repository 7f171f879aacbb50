"""Resume semantics, the run-directory lock, evaluate's default checkpoint, and checkpoint
problems that must end in ``error: ...`` with exit 2 (the entry points, one rank each).

A module fixture trains the demo model 2 of 4 steps (lr 3e-3, warmup 2, cosine to 1e-4) and
saves; each test copies that run dir and goes on from it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest

from checkpoints_utils import inspect
from checkpoints_utils.common import run_cli
from tests.e2e.entry import DEMO, FAST, demo_args, run_entry

FIRST = ["train.steps=4", "train.stop_at_step=2"]


@pytest.fixture(scope="module")
def first(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("resume") / "first"
    code, text = run_entry("megatron_uni.train", demo_args(demo_root, run, *FIRST))
    assert code == 0, text[-3000:]
    assert (run / "checkpoints" / "latest").read_text().strip() == "iter_0000002"
    return run


def _copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


def _records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _expected_lrs(root: Path, *overrides: str, steps: int = 4) -> dict[int, float]:
    """The lr after each step, from the schedule the config describes."""
    from megatron_uni.config import load_config
    from megatron_uni.training.optimizer import build_scheduler

    cfg = load_config(DEMO, [f"data.root={root}", *FAST, f"train.steps={steps}", *overrides])
    opt = SimpleNamespace(param_groups=[{}])
    scheduler = build_scheduler(cfg, opt)
    out = {}
    for step in range(1, steps + 1):
        scheduler.step(1)
        out[step] = opt.param_groups[0]["lr"]
    return out


# --------------------------------------------------------------------------- resume semantics
def test_changed_lr_on_resume_takes_effect_and_is_logged(first: Path, demo_root: Path,
                                                         tmp_path: Path) -> None:
    """Also: rows of steps after the checkpoint (written by a run killed before its next save)
    are dropped, so metrics.jsonl keeps one row per step, numbered as the console numbers."""
    run = _copy(first, tmp_path / "run")
    with open(run / "metrics.jsonl", "a") as f:  # what a kill after step 3 leaves behind
        f.write(json.dumps({"step": 3, "task": "killed", "loss": 0.0}) + "\n" + '{"step": 4, "ta')
    code, text = run_entry("megatron_uni.train",
                           demo_args(demo_root, run, "train.steps=4", "optim.lr=1e-3"))
    assert code == 0, text[-3000:]
    assert "this run's config wins" in text and "optim.lr 0.003 -> 0.001" in text, text[-3000:]
    records = _records(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert "killed" not in {r["task"] for r in records}
    assert "step     3/4" in text
    new, old = _expected_lrs(demo_root, "optim.lr=1e-3"), _expected_lrs(demo_root)
    for r in records:
        assert r["lr"] == pytest.approx((old if r["step"] <= 2 else new)[r["step"]], rel=1e-9)
    assert new[3] != pytest.approx(old[3])


def test_keep_saved_schedule_keeps_the_checkpoints_lr(first: Path, demo_root: Path,
                                                      tmp_path: Path) -> None:
    run = _copy(first, tmp_path / "run")
    code, text = run_entry("megatron_uni.train", demo_args(
        demo_root, run, "train.steps=4", "optim.lr=1e-3", "checkpoint.keep_saved_schedule=true"))
    assert code == 0, text[-3000:]
    assert "keep_saved_schedule=true" in text and "optim.lr 0.003 -> 0.001" in text
    old = _expected_lrs(demo_root)
    assert {r["step"]: r["lr"] for r in _records(run)} == pytest.approx(old, rel=1e-9)


def test_requeue_after_start_from_checkpoint_load_keeps_its_progress(
        first: Path, demo_root: Path, tmp_path: Path) -> None:
    run = tmp_path / "second"
    args = demo_args(demo_root, run, "train.steps=4",
                     f"checkpoint.load={first / 'checkpoints'}")
    code, text = run_entry("megatron_uni.train", [*args, "train.stop_at_step=3"])
    assert code == 0, text[-3000:]
    assert "initialising from checkpoint.load" in text
    code, text = run_entry("megatron_uni.train", args)  # the requeue: same command line
    assert code == 0, text[-3000:]
    assert f"resuming from {run / 'checkpoints' / 'iter_0000003'}" in text, text[-3000:]
    assert "only initialises a fresh run" in text
    assert [r["step"] for r in _records(run)] == [3, 4]


def test_finetune_takes_the_weights_and_starts_at_step_zero(first: Path, demo_root: Path,
                                                            tmp_path: Path) -> None:
    """checkpoint.finetune (pre-training stage 2 from stage 1): the weights come from
    checkpoint.load, the step, schedule and data order start afresh."""
    from checkpoints_utils.common import read_tensors

    run = tmp_path / "tuned"
    args = demo_args(demo_root, run, "train.steps=1", "optim.lr=1e-12", "optim.min_lr=0", "optim.warmup_steps=0",
                     f"checkpoint.load={first / 'checkpoints'}", "checkpoint.finetune=true")
    code, text = run_entry("megatron_uni.train", args)
    assert code == 0, text[-3000:]
    assert "starting at step 0 (checkpoint.finetune)" in text
    assert [r["step"] for r in _records(run)] == [1]
    assert _records(run)[0]["lr"] == pytest.approx(1e-12)
    # one step at lr 1e-12 leaves the loaded weights where they were (not a fresh init)
    name = "tokenizer.norm.weight"
    (before,) = read_tensors(first / "checkpoints" / "iter_0000002", [name]).values()
    (after,) = read_tensors(run / "checkpoints" / "iter_0000001", [name]).values()
    assert float((after - before).abs().max()) < 1e-6


# --------------------------------------------------------------------------- run-dir lock
def test_second_run_on_a_locked_run_dir_stops_and_touches_nothing(
        first: Path, demo_root: Path, tmp_path: Path) -> None:
    run = _copy(first, tmp_path / "run")
    host, pid = socket.gethostname(), os.getpid()  # a live process: pytest itself
    (run / "run.lock").write_text(json.dumps({"host": host, "pid": pid, "started": "now"}))
    in_progress = run / "checkpoints" / "iter_0000003.tmp"
    in_progress.mkdir()
    before = {name: (run / name).read_bytes() for name in
              ("config.yaml", "command.txt", "metrics.jsonl")}
    code, text = run_entry("megatron_uni.train", demo_args(demo_root, run, "train.steps=4"))
    assert code == 2, text[-3000:]
    assert f"in use by another run (host {host}, pid {pid}" in text and "error: " in text
    assert "Traceback" not in text
    assert in_progress.is_dir()  # the other run's save in progress survives
    assert {name: (run / name).read_bytes() for name in before} == before


# --------------------------------------------------------------------------- evaluate
def test_evaluate_uses_the_run_dirs_newest_checkpoint(first: Path, demo_root: Path,
                                                      tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    code, text = run_entry("megatron_uni.evaluate", [
        *demo_args(demo_root, first), "--tasks", "image_cls", "--out", str(out)])
    assert code == 0, text[-3000:]
    assert "evaluating the run dir's newest checkpoint" in text
    report = json.loads(out.read_text())
    assert report["checkpoint"].endswith("iter_0000002") and report["step"] == 2


def test_evaluate_refuses_random_weights_unless_asked(demo_root: Path, tmp_path: Path) -> None:
    code, text = run_entry("megatron_uni.evaluate", [
        *demo_args(demo_root, tmp_path / "empty"), "--tasks", "image_cls"])
    assert code == 2 and "no checkpoint to evaluate" in text and "--allow-random-weights" in text
    assert "Traceback" not in text


# --------------------------------------------------------------------------- bad input
def test_read_only_run_dir_is_a_message(demo_root: Path, tmp_path: Path) -> None:
    if os.geteuid() == 0:  # root writes anywhere chmod forbids: /sys refuses even root
        run = Path("/sys/megatron-uni-test/run")
    else:
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o555)
        run = tmp_path / "ro" / "run"
    code, text = run_entry("megatron_uni.train", demo_args(demo_root, run, "train.steps=1"))
    assert code == 2 and f"error: run directory {run} cannot be written" in text, text[-3000:]
    assert "Traceback" not in text


def test_disk_full_during_save_is_a_message_and_leaves_no_tmp(demo_root: Path, tmp_path: Path
                                                               ) -> None:
    run = tmp_path / "run"
    code, text = run_entry("megatron_uni.train", demo_args(demo_root, run, "train.steps=1"),
                           patch="enospc")
    assert code == 2, text[-3000:]
    assert "error: checkpoint" in text and "No space left on device" in text, text[-3000:]
    assert "free disk space" in text and "Traceback" not in text
    assert list((run / "checkpoints").iterdir()) == []  # no iter_*.tmp filling the disk


@pytest.mark.parametrize("damage", ["delete common.pt", "truncate .metadata"])
def test_damaged_checkpoint_is_a_message(first: Path, demo_root: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture, damage: str) -> None:
    run = _copy(first, tmp_path / "run")
    ckpt = run / "checkpoints" / "iter_0000002"
    if damage == "delete common.pt":
        (ckpt / "common.pt").unlink()
        expected = "common.pt (step, optimizer and schedule scalars) is missing"
    else:
        data = (ckpt / ".metadata").read_bytes()
        (ckpt / ".metadata").write_bytes(data[: len(data) // 2])
        expected = ".metadata cannot be read"
    code, text = run_entry("megatron_uni.train", demo_args(demo_root, run, "train.steps=4"))
    assert code == 2 and "error: checkpoint" in text and expected in text, text[-3000:]
    assert "Traceback" not in text and "iterdir" not in text
    capsys.readouterr()
    assert run_cli(inspect.main, [str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and ("common.pt" in err or ".metadata" in err), err
