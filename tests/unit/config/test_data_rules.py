"""Validation of the data fields added for the multi-task pipeline (issue 5)."""

from __future__ import annotations

import pytest

from megatron_uni.config import Config, ConfigError, apply_overrides, validate

CAP = ["data.tasks.c.type=captioning"]
RET = ["data.tasks.r.type=retrieval"]
CLS = ["data.tasks.i.type=image_classification"]


@pytest.mark.parametrize(
    "overrides,field",
    [
        (["data.reader_streams=0"], "data.reader_streams"),
        (["data.shuffle_buffer=0"], "data.shuffle_buffer"),
        (["data.num_workers=3"], "data.num_workers"),  # does not divide reader_streams=4
        ([*CAP, "data.tasks.c.num_rows=0"], "data.tasks.c.num_rows"),
        ([*CAP, "data.tasks.c.max_text_len=0"], "data.tasks.c.max_text_len"),
        ([*CAP, "data.tasks.c.mask_prob=0"], "data.tasks.c.mask_prob"),
        ([*CAP, "data.tasks.c.mask_prob=1.5"], "data.tasks.c.mask_prob"),
        ([*CAP, "data.tasks.c.hflip=2"], "data.tasks.c.hflip"),
        ([*CAP, "data.tasks.c.crop_pct=0"], "data.tasks.c.crop_pct"),
        ([*CAP, "data.tasks.c.crop_scale=[0.9,0.5]"], "data.tasks.c.crop_scale"),
        ([*CAP, "data.tasks.c.crop_scale=[0,1]"], "data.tasks.c.crop_scale"),
        ([*CAP, "data.tasks.c.mixup=0.8"], "data.tasks.c.mixup"),
        ([*RET, "data.tasks.r.cutmix=1"], "data.tasks.r.cutmix"),
        ([*CLS, "data.tasks.i.video=true"], "data.tasks.i.video"),
        ([*CLS, "data.tasks.i.num_frames=4"], "data.tasks.i.num_frames"),
        (["data.tasks.v.type=video_classification", "data.tasks.v.video=false"],
         "data.tasks.v.video"),
        ([*RET, "data.tasks.r.num_frames=4", "data.tasks.r.video=false"], "data.tasks.r.video"),
        ([*RET, "data.tasks.r.target_set=vocab.json"], "data.tasks.r.target_set"),
        ([*RET, "data.tasks.r.split_target_set=true"], "data.tasks.r.split_target_set"),
        ([*CAP, "data.tasks.c.rand_augment=autoaug"], "data.tasks.c.rand_augment"),
    ],
)
def test_rule_violations(overrides: list[str], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate(apply_overrides(Config(), overrides))
    assert info.value.field == field, str(info.value)
    assert info.value.fix


@pytest.mark.parametrize(
    "overrides",
    [
        ["data.num_workers=2"],
        ["data.num_workers=4", "data.reader_streams=8"],
        [*CLS, "data.tasks.i.mixup=0.8", "data.tasks.i.cutmix=1.0", "data.tasks.i.hflip=0.5",
         "data.tasks.i.rand_augment=rand-m9-mstd0.5-inc1", "data.tasks.i.crop_scale=[0.08,1]"],
        [*RET, "data.tasks.r.num_frames=4"],  # video retrieval, video resolved from frames
        [*CAP, "data.tasks.c.video=true", "data.tasks.c.num_rows=12", "data.tasks.c.mask_prob=1"],
    ],
)
def test_valid(overrides: list[str]) -> None:
    validate(apply_overrides(Config(), overrides))
