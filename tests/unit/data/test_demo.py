"""The built-in demo dataset: deterministic, every task family, a held-out zero-shot task."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest

from megatron_uni.config import load_config
from megatron_uni.batch import FAMILY_OF_TASK_TYPE, Modality
from megatron_uni.data.demo import make_demo_data
from megatron_uni.data.loader import EvalLoader, MultiTaskLoader
from tests.unit.data.conftest import REPO
from tools import make_demo_data as cli


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    kwargs = dict(num_train=12, num_eval=3, num_train_shards=2)
    make_demo_data(tmp_path / "a", seed=3, **kwargs)
    make_demo_data(tmp_path / "b", seed=3, **kwargs)
    make_demo_data(tmp_path / "c", seed=4, **kwargs)
    a = digest(tmp_path / "a")
    assert "images/train-000001.tar" in a and "vocab.json" in a
    assert a == digest(tmp_path / "b")
    c = digest(tmp_path / "c")
    assert a["images/train-000000.tar"] != c["images/train-000000.tar"]


def test_cli_prints_a_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--out", str(tmp_path), "--num-train", "8", "--num-eval", "2",
                     "--shards", "2", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "images/train  8 samples in 2 shards" in out
    assert "total: 26 samples in 12 shards" in out
    meta = json.loads((tmp_path / "demo.json").read_text())
    assert meta["shards"]["videos/train"]["samples"] == 4 and meta["vocab_size"] > 20


def test_demo_config_covers_every_family_and_holds_out_video_text_retrieval(
    demo_root: Path,
) -> None:
    cfg = load_config(REPO / "configs" / "runs" / "demo_data.yaml", [f"data.root={demo_root}"])
    tasks = cfg.data.tasks
    assert {FAMILY_OF_TASK_TYPE[t.type] for t in tasks.values()} == {
        "classification", "mlm", "captioning", "retrieval"}
    assert {t.type for t in tasks.values()} >= {"image_classification", "video_classification"}
    held = tasks["video_text_retrieval"]
    assert held.weight == 0 and not held.shards and held.eval_shards
    trained = [n for n, t in tasks.items() if t.weight > 0]
    assert trained == ["image_cls", "video_cls", "mlm", "image_caption", "image_text_retrieval"]
    assert not any(t.type == "retrieval" and t.num_frames > 1 for t in tasks.values()
                   if t.weight > 0), "no video-text pair is ever trained"
    loader = MultiTaskLoader(cfg, 0, 1, 1)
    drawn = {loader.next_step()[0] for _ in range(40)}
    assert "video_text_retrieval" not in drawn and len(drawn) == 5
    for name in tasks:  # every task evaluates
        batch = next(iter(EvalLoader(cfg, name)))
        assert batch.task_name == name
    zero_shot = next(iter(EvalLoader(cfg, "video_text_retrieval")))
    assert (zero_shot.modality == Modality.VIDEO).any() and zero_shot.loss.family == "retrieval"


@pytest.mark.slow
def test_default_size_is_fast(tmp_path: Path) -> None:
    start = time.perf_counter()
    make_demo_data(tmp_path)
    assert time.perf_counter() - start < 60


def test_held_out_captions_use_only_seen_words_and_chance_is_stated(tmp_path: Path) -> None:
    from megatron_uni.data.demo import (COLOURS, IMAGE_CLASSES, SHAPES, VIDEO_CLASSES,
                                        chance_levels, held_out_words_unseen)

    assert held_out_words_unseen() == set()
    # Videos and images share the shapes and colours (one renderer, one attribute list).
    assert {c.split()[1] for c in IMAGE_CLASSES} == set(SHAPES)
    assert {c.split()[0] for c in IMAGE_CLASSES} == set(COLOURS)
    chance = chance_levels(200)
    assert chance["retrieval_r10"] == pytest.approx(0.05)
    assert chance["image_cls_top1"] == 1 / 16 and chance["video_cls_top1"] == 1 / len(VIDEO_CLASSES)
    make_demo_data(tmp_path, num_train=4, num_eval=4, num_train_shards=1)
    assert json.loads((tmp_path / "demo.json").read_text())["chance"] == chance_levels(4)
