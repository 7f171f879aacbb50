"""Shared fixtures: configs that read the small demo dataset (``demo_root``, tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_uni.config import Config, load_config
from megatron_uni.batch import PackedBatch

REPO = Path(__file__).resolve().parents[3]
DEMO_RUN = REPO / "configs" / "runs" / "demo_data.yaml"


def demo_config(root: Path, *overrides: str) -> Config:
    # One task per step: these tests check the data order that does not depend on the
    # data-parallel size (per-rank mixing ties it to slots_per_draw; tests of that pass
    # data.task_sampling=per_rank).
    return load_config(DEMO_RUN, [f"data.root={root}", "data.task_sampling=per_step", *overrides])


@pytest.fixture
def demo_cfg(demo_root: Path) -> Config:
    return demo_config(demo_root)


def assert_batches_equal(a: PackedBatch, b: PackedBatch) -> None:
    """Every tensor (and the loss spec) of two packed batches is identical."""
    assert (a.task_name, a.task_id) == (b.task_name, b.task_id)
    for name in ("text_ids", "patch_index", "seq_id", "position", "modality", "side", "segment",
                 "attribute", "attributes", "images", "spe_index"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for name in ("query_index", "target_index", "labels"):
        assert torch.equal(getattr(a.loss, name), getattr(b.loss, name)), name
    assert (a.loss.soft_labels is None) == (b.loss.soft_labels is None)
    if a.loss.soft_labels is not None:
        assert torch.equal(a.loss.soft_labels, b.loss.soft_labels)


def assert_steps_equal(a: list, b: list) -> None:
    assert [task for task, _ in a] == [task for task, _ in b]
    for (_, xs), (_, ys) in zip(a, b):
        assert len(xs) == len(ys)
        for x, y in zip(xs, ys):
            assert_batches_equal(x, y)
