"""Start-up resolution: fixed shapes (worst-case rows), target sets, errors naming the task."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_uni.config import ConfigError
from megatron_uni.data import tasks
from megatron_uni.batch import IGNORE_INDEX
from megatron_uni.data.task_plan import (
    first_fit_rows,
    plan_task,
    plan_training_tasks,
    worst_case_rows,
)
from megatron_uni.data.text_tokenizer import get_tokenizer
from tests.unit.data.conftest import demo_config


def test_first_fit_rows_matches_pack() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        lengths = rng.integers(1, 30, size=int(rng.integers(1, 40))).tolist()
        texts = [[5] * (n - 1) for n in lengths if n >= 2]  # "[SPE] text": n tokens
        batch = tasks.mlm_batch(texts, [[IGNORE_INDEX] * len(t) for t in texts], [], seq_len=32)
        assert batch.num_rows == first_fit_rows([n for n in lengths if n >= 2], 32)


@pytest.mark.parametrize("family", ["mlm", "captioning", "retrieval"])
def test_worst_case_rows_bounds_every_batch(family: str) -> None:
    """Variable-length inputs: no batch of texts up to max_text_len needs more rows."""
    rng = np.random.default_rng(1)
    seq_len, clip, max_text, batch, vocab = 64, 4, 13, 16, list(range(100, 137))
    bound = worst_case_rows(family, batch, seq_len, clip, max_text,
                            [2] * len(vocab) if family != "retrieval" else [])
    images = torch.zeros(batch, 1, 3, 32, 32)
    for _ in range(100):
        texts = [[7] * int(rng.integers(1, max_text + 1)) for _ in range(batch)]
        if family == "mlm":
            built = tasks.mlm_batch(texts, [[IGNORE_INDEX] * len(t) for t in texts], vocab,
                                    seq_len=seq_len)
        elif family == "captioning":
            built = tasks.captioning_batch(images, texts, vocab, patch_size=16, seq_len=seq_len,
                                           max_caption_len=max_text)
        else:
            built = tasks.retrieval_batch(images, texts, patch_size=16, seq_len=seq_len)
        assert built.num_rows <= bound


def test_demo_plans(demo_cfg) -> None:  # noqa: ANN001
    plans = plan_training_tasks(demo_cfg, 0, 1, get_tokenizer())
    assert list(plans) == ["image_cls", "video_cls", "mlm", "image_caption",
                           "image_text_retrieval"]
    cls = plans["image_cls"]
    assert (cls.family, cls.video, cls.clip_tokens, cls.num_targets) == (
        "classification", False, 4, 16)
    # Exact for classification: 32 clips of 5 tokens and 16 names of 3 tokens in rows of 64.
    assert cls.num_rows == first_fit_rows([5] * 32 + [3] * 16, 64) == 4
    video = plans["video_cls"]
    assert (video.video, video.clip_tokens, video.num_targets) == (True, 16, 4)
    mlm = plans["mlm"]
    assert mlm.max_text_len == 31 and mlm.vocab == tuple(sorted(mlm.vocab))
    held_out = plan_task(demo_cfg, "video_text_retrieval", 0, 1, get_tokenizer(),
                         need_train=False, need_eval=True)
    assert held_out.video and held_out.clip_tokens == 16 and held_out.task_id == 5


def test_split_target_set_rows_cover_every_rank(demo_root: Path) -> None:
    cfg = demo_config(demo_root, "data.tasks.mlm.split_target_set=true")
    sizes = set()
    for rank in range(3):
        plan = plan_training_tasks(cfg, rank, 3, get_tokenizer())["mlm"]
        assert plan.target_shard == tasks.target_shard(len(plan.vocab), rank, 3)
        sizes.add(plan.num_rows)
    assert len(sizes) == 1  # the same shape on every rank


@pytest.mark.parametrize(
    "overrides,field,message",
    [
        (["data.tasks.image_cls.target_set=''"], "data.tasks.image_cls.target_set", "names none"),
        (["data.tasks.mlm.target_set=nope.json"], "data.tasks.mlm.target_set", "does not exist"),
        (["data.tasks.image_cls.target_set=vocab.json"], "data.tasks.image_cls.target_set",
         None),
        (["data.tasks.mlm.shards=''"], "data.tasks.mlm.shards", "has no shards"),
        (["data.tasks.mlm.shards=text/nothing-*.tar"], "data.tasks.mlm.shards", "matches no file"),
        (["data.tasks.mlm.shards=text/train-{000000..000009}.tar"], "data.tasks.mlm.shards",
         "6 missing files"),
        (["data.tasks.video_text_retrieval.eval_shards=''"],
         "data.tasks.video_text_retrieval.weight", "never used"),
        (["data.tasks.video_cls.seq_len=16"], "data.tasks.video_cls.seq_len", "clip needs 17"),
        (["data.tasks.image_caption.max_text_len=40"], "data.tasks.image_caption.max_text_len",
         "at most 29"),
        (["data.tasks.image_cls.num_rows=2"], "data.tasks.image_cls.num_rows", "needs 4 rows"),
    ],
)
def test_misconfigured_task_fails_at_start_up_naming_it(
    demo_root: Path, overrides: list[str], field: str, message: str | None
) -> None:
    cfg = demo_config(demo_root, *overrides)
    with pytest.raises(ConfigError) as info:
        plan_training_tasks(cfg, 0, 1, get_tokenizer())
    assert info.value.field == field, str(info.value)
    task = field.split(".")[2]
    assert f"task {task}" in str(info.value)
    if message:
        assert message in str(info.value)


def test_bad_augmentation_spec_fails_at_start_up(demo_root: Path) -> None:
    from megatron_uni.data.loader import MultiTaskLoader

    cfg = demo_config(demo_root, "data.tasks.image_cls.rand_augment=rand-zz5")
    with pytest.raises(ConfigError, match="task image_cls: timm cannot build") as info:
        MultiTaskLoader(cfg, 0, 1, 1)
    assert info.value.field == "data.tasks.image_cls.rand_augment"


@pytest.mark.parametrize("task,name", [("image_cls", "classes.txt"), ("mlm", "vocab.json")])
def test_target_set_not_utf8_names_the_file(demo_root: Path, tmp_path: Path, task: str,
                                            name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"circle\ncarr\xe9\n" if task == "image_cls" else b"[1, 2]\xff")
    cfg = demo_config(demo_root, f"data.tasks.{task}.target_set={path}")
    with pytest.raises(ConfigError, match=f"task {task}: target set file {path} is not UTF-8"
                       ) as info:
        plan_training_tasks(cfg, 0, 1, get_tokenizer())
    assert info.value.field == f"data.tasks.{task}.target_set"
