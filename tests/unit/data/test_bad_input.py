"""Corrupt image, missing member, truncated tar, unreadable shard: skipped, warned, counted;
past data.max_bad_samples an error."""

from __future__ import annotations

import io
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from megatron_uni.config import Config, apply_overrides
from megatron_uni.data.loader import EvalLoader, MultiTaskLoader
from megatron_uni.data.readers import BadDataError
from megatron_uni.data.shards import ShardSink


def png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def bad_root(tmp_path: Path) -> Path:
    (tmp_path / "classes.txt").write_text("dark\nbright\n")
    with ShardSink(tmp_path, "good", max_count=100) as sink:
        for i in range(6):
            sink.write(f"good{i}", {"png": png(40 * i), "cls": str(i % 2)})
        sink.write("corrupt", {"png": b"\x89PNG\r\n\x1a\n this is no image", "cls": "0"})
        sink.write("nolabel", {"png": png(10)})
    with ShardSink(tmp_path, "cut", max_count=100) as sink:
        for i in range(6):
            sink.write(f"cut{i}", {"png": png(40 * i), "cls": str(i % 2)})
    shard = Path(sink.summary.shards[0])
    with tarfile.open(shard) as tar:
        cut = tar.getmembers()[7].offset_data + 20  # inside cut3's png: cut0..cut2 stay whole
    shard.write_bytes(shard.read_bytes()[:cut])
    (tmp_path / "junk-000000.tar").write_bytes(b"\x00\x01 not a tar " * 200)
    return tmp_path


def config(root: Path, limit: int) -> Config:
    return apply_overrides(Config(), [
        f"data.root={root}", f"data.max_bad_samples={limit}", "data.reader_streams=1",
        "data.tasks.cls.type=image_classification",
        "data.tasks.cls.shards=good-000000.tar::cut-000000.tar::junk-000000.tar",
        "data.tasks.cls.eval_shards=good-000000.tar::cut-000000.tar::junk-000000.tar",
        "data.tasks.cls.target_set=classes.txt", "data.tasks.cls.micro_batch_size=4",
        "data.tasks.cls.seq_len=32",
    ])


def test_bad_samples_are_skipped_counted_and_named(bad_root: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="megatron_uni.data.readers")
    loader = MultiTaskLoader(config(bad_root, limit=100), 0, 1, num_microbatches=1)
    # One epoch: 6 good + 2 bad samples, a truncated shard (some good samples, then the cut)
    # and a shard that is no tar. Four problems per epoch, whatever the shard order.
    batches = [loader.next_step()[1][0] for _ in range(6)]
    assert all(b.images.shape == (4, 1, 3, 32, 32) for b in batches)
    assert 4 <= loader.bad_samples <= 12
    (slot,) = loader.state_dict()["slots"]  # one slot, one stream (reader_streams=1)
    assert slot["bad_samples"]["cls"] == [loader.bad_samples]
    text = caplog.text
    assert "key 'corrupt': corrupt image png" in text
    assert "key 'nolabel': missing member: cls" in text
    assert f"shard {bad_root / 'cut-000000.tar'}" in text and "unexpected end of data" in text
    assert f"shard {bad_root / 'junk-000000.tar'}" in text and "unreadable shard" in text
    assert "task cls: skipped" in text and "limit data.max_bad_samples=100" in text


def test_past_the_limit_is_an_error(bad_root: Path) -> None:
    loader = MultiTaskLoader(config(bad_root, limit=2), 0, 1, num_microbatches=1)
    with pytest.raises(BadDataError, match="more than data.max_bad_samples=2"):
        for _ in range(6):
            loader.next_step()


def test_past_the_limit_in_a_worker_is_an_error(bad_root: Path) -> None:
    loader = MultiTaskLoader(config(bad_root, limit=2), 0, 1, num_microbatches=1, num_workers=1)
    with pytest.raises(BadDataError, match="data.max_bad_samples=2"):
        for _ in range(6):
            loader.next_step()
    loader.close()


def test_evaluation_skips_and_counts_the_same(bad_root: Path) -> None:
    loader = EvalLoader(config(bad_root, limit=100), "cls")
    batches = list(loader)
    assert loader.counter.count == 4
    assert [b.images.shape[0] for b in batches] == [4, 4, 1]  # 6 + 3 good samples
    with pytest.raises(BadDataError):
        list(EvalLoader(config(bad_root, limit=3), "cls"))
