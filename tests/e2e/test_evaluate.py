"""``python -m megatron_uni.evaluate`` as a user runs it: on a tiny demo dataset, from a saved
checkpoint of random weights, single-process and under torchrun; every layout must report the
same metrics (and decode the same captions) for the same weights.

The checkpoint is written once (a one-rank child process), then loaded by every run, so the
comparison does not depend on how each layout initialises. Random weights start at std 0.2 with
LayerScale 1 so that features differ enough for rankings to mean something.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.multirank import run_ranks

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "runs" / "demo_data.yaml"
TASKS = {"image_cls", "video_cls", "mlm", "image_caption", "image_text_retrieval",
         "video_text_retrieval"}


def _overrides(root: Path, *extra: str) -> list[str]:
    return [
        f"data.root={root}", "parallel.device=cpu", "logging.level=WARNING",
        "model.init_method_std=0.2", "model.layer_scale_init=1.0",
        # Several micro-batches (and schedule calls) per task, shorter captions: quick.
        "data.tasks.image_cls.micro_batch_size=4", "data.tasks.image_caption.micro_batch_size=4",
        "data.tasks.image_caption.max_text_len=8", "data.tasks.mlm.micro_batch_size=4",
        *extra,
    ]


def _save(rank: int, world: int, root: str, out: str, extra: tuple[str, ...]) -> None:
    import torch

    from megatron_uni.config import load_config
    from megatron_uni.models.generalist import build_model
    from megatron_uni.parallel.initialize import initialize
    from megatron_uni.training.checkpoint import save_checkpoint

    cfg = load_config(CONFIG, _overrides(Path(root), *extra))
    initialize(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, use_cpu=True)
    save_checkpoint(Path(out), 0, [model], None, None, None, cfg, keep_last=0)


def _evaluate(tmp: Path, root: Path, ckpt: Path, name: str, nproc: int, *extra: str) -> dict:
    run_dir = tmp / name
    args = ["--config", str(CONFIG), "--microbatches-per-call", "2",
            *_overrides(root, f"checkpoint.load={ckpt}", f"train.run_dir={run_dir}", *extra)]
    if nproc == 1:
        cmd = [sys.executable, "-m", "megatron_uni.evaluate", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "megatron_uni.evaluate", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert "image_text_retrieval" in proc.stdout  # the table
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["layout"]["world"] == nproc
    return report


def _check(report: dict) -> None:
    metrics = report["metrics"]
    assert set(metrics) == TASKS
    expected = {"classification": {"top1", "top5"}, "mlm": {"accuracy"},
                "captioning": {"bleu4", "cider"},
                "retrieval": {f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}}
    for task, values in metrics.items():
        kind = report["tasks"][task]["type"]
        family = "classification" if kind.endswith("classification") else kind
        assert set(values) == expected[family], task
        top = {"cider": 10.0}  # CIDEr-D lies in [0, 10]; every other metric is a fraction
        assert all(v is not None and 0.0 <= v <= top.get(k, 1.0) for k, v in values.items()), (
            task, values)
        assert report["tasks"][task]["num_samples"] == 10
    assert report["tasks"]["video_text_retrieval"]["held_out"] is True
    assert report["step"] == 0 and report["checkpoint"].endswith("iter_0000000")
    examples = report["tasks"]["image_caption"]["examples"]
    assert examples and all(len(e["caption"].split()) <= 8 for e in examples)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from megatron_uni.data.demo import make_demo_data

    root = tmp_path_factory.mktemp("demo")
    make_demo_data(root, seed=0, num_train=8, num_eval=10, num_train_shards=1)
    return root


@pytest.fixture(scope="module")
def dense(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The saved dense checkpoint and its single-process report."""
    tmp = tmp_path_factory.mktemp("dense")
    ckpt = tmp / "checkpoints"
    run_ranks(_save, 1, args=(str(demo), str(ckpt), ()), timeout=120)
    report = _evaluate(tmp, demo, ckpt, "single", 1)
    _check(report)
    return ckpt, report


def _same(a: dict, b: dict) -> None:
    assert b["metrics"] == a["metrics"]


def test_single_process_report(dense: tuple[Path, dict]) -> None:
    _, report = dense
    assert report["layout"]["dp"] == 1 and report["layout"]["pp"] == 1


def test_pipeline_parallel_gives_the_same_metrics(demo: Path, dense: tuple[Path, dict],
                                                  tmp_path: Path) -> None:
    ckpt, single = dense
    report = _evaluate(tmp_path, demo, ckpt, "pp2", 2, "parallel.pp=2")
    _check(report)
    _same(single, report)
    assert (report["tasks"]["image_caption"]["examples"]
            == single["tasks"]["image_caption"]["examples"])


@pytest.mark.slow
@pytest.mark.parametrize("layout", [["parallel.tp=2"], []], ids=["tp2", "dp2"])
def test_tensor_and_data_parallel_give_the_same_metrics(
    demo: Path, dense: tuple[Path, dict], tmp_path: Path, layout: list[str]
) -> None:
    ckpt, single = dense
    report = _evaluate(tmp_path, demo, ckpt, "layout", 2, *layout)
    _check(report)
    _same(single, report)


@pytest.mark.slow
def test_moe_under_expert_and_pipeline_parallel(demo: Path, tmp_path: Path) -> None:
    moe = ("moe.num_experts=4", "moe.layers=all")
    ckpt = tmp_path / "checkpoints"
    run_ranks(_save, 1, args=(str(demo), str(ckpt), moe), timeout=120)
    single = _evaluate(tmp_path, demo, ckpt, "single", 1, *moe)
    _check(single)
    report = _evaluate(tmp_path, demo, ckpt, "ep2-pp2", 4, *moe, "parallel.ep=2",
                       "parallel.pp=2")
    _check(report)
    _same(single, report)


def test_unknown_task_is_a_clear_error(demo: Path, capsys: pytest.CaptureFixture) -> None:
    from megatron_uni.evaluate import main

    assert main(["--config", str(CONFIG), "--tasks", "image_cls,nope", *_overrides(demo)]) == 2
    assert "nope" in capsys.readouterr().err


@pytest.mark.slow
def test_random_weights_with_a_warning(demo: Path, tmp_path: Path) -> None:
    """No checkpoint and --allow-random-weights: evaluates the random initial weights and says
    so."""
    cmd = [sys.executable, "-m", "megatron_uni.evaluate", "--config", str(CONFIG),
           "--tasks", "image_cls,mlm", "--allow-random-weights", *_overrides(demo, f"train.run_dir={tmp_path}")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RANDOM" in proc.stderr + proc.stdout
    report = json.loads((tmp_path / "eval.json").read_text())
    assert set(report["metrics"]) == {"image_cls", "mlm"} and report["checkpoint"] is None
