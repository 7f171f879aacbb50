"""A tar shard cut at any offset (inside a member, exactly at a header boundary, inside a header,
without its end-of-archive blocks) is a bad shard, warned and counted; an intact one reads whole."""

from __future__ import annotations

import gzip
import logging
import tarfile
from pathlib import Path

import pytest

from megatron_uni.data.readers import (
    BadDataError,
    BadSampleCounter,
    ShardReadError,
    iter_shard,
    read_in_order,
)
from megatron_uni.data.shards import ShardSink

NUM_SAMPLES = 25  # two members each


@pytest.fixture(scope="module")
def shard(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shard")
    with ShardSink(out, "s", max_count=1000) as sink:
        for i in range(NUM_SAMPLES):
            sink.write(f"k{i:03d}", {"txt": f"sample {i} " * 50, "cls": str(i % 3)})
    return Path(sink.summary.shards[0])


def members(shard: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(shard) as tar:
        return tar.getmembers()


def end_of_members(shard: Path) -> int:
    last = members(shard)[-1]
    return last.offset_data + -(-last.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def cut_offsets(shard: Path) -> dict[str, int]:
    m = members(shard)
    end = end_of_members(shard)
    return {
        "inside a member": m[20].offset_data + 7,
        "at a header boundary": m[20].offset,  # sample 10's first header: 10 samples whole
        "inside a header": m[20].offset + 100,
        "in a member's padding": m[19].offset_data + m[19].size + 3,
        "without end blocks": end,
        "after one zero block": end + tarfile.BLOCKSIZE,
        "inside the second zero block": end + tarfile.BLOCKSIZE + 200,
    }


CUTS = ["inside a member", "at a header boundary", "inside a header", "in a member's padding",
        "without end blocks", "after one zero block", "inside the second zero block"]


def test_intact_shard_reads_every_sample(shard: Path) -> None:
    samples = list(iter_shard(str(shard)))
    assert [s.key for s in samples] == [f"k{i:03d}" for i in range(NUM_SAMPLES)]
    assert all(set(s.members) == {"txt", "cls"} for s in samples)
    # Record padding beyond the two end blocks is not needed.
    cut = shard.with_name("exact-end.tar")
    cut.write_bytes(shard.read_bytes()[: end_of_members(shard) + 2 * tarfile.BLOCKSIZE])
    assert len(list(iter_shard(str(cut)))) == NUM_SAMPLES


@pytest.mark.parametrize("where", CUTS)
def test_cut_anywhere_is_a_counted_bad_shard(shard: Path, where: str, tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    cut = tmp_path / "cut-000000.tar"
    cut.write_bytes(shard.read_bytes()[: cut_offsets(shard)[where]])
    caplog.set_level(logging.WARNING, logger="megatron_uni.data.readers")
    counter = BadSampleCounter("cls", limit=5)
    samples = list(read_in_order([str(cut)], counter))
    assert counter.count == 1
    assert f"task cls: skipped shard {cut}" in caplog.text
    assert "unreadable shard" in caplog.text
    # Complete samples before the cut are kept; the one being assembled is dropped.
    expected = {"inside a member": 10, "at a header boundary": 9, "inside a header": 9,
                "in a member's padding": 9}.get(where, NUM_SAMPLES - 1)
    assert len(samples) == expected
    with pytest.raises(BadDataError, match="more than data.max_bad_samples=0"):
        list(read_in_order([str(cut)], BadSampleCounter("cls", limit=0)))


def test_header_boundary_cut_names_the_offset(shard: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.tar"
    offset = cut_offsets(shard)["at a header boundary"]
    cut.write_bytes(shard.read_bytes()[:offset])
    with pytest.raises(ShardReadError, match=f"ends at byte {offset} without the end-of-archive"):
        list(iter_shard(str(cut)))


def test_streams_and_compressed_shards_are_checked_too(shard: Path, tmp_path: Path) -> None:
    data = shard.read_bytes()
    offset = cut_offsets(shard)["at a header boundary"]
    whole, cut = tmp_path / "whole.tar.gz", tmp_path / "cut.tar.gz"
    whole.write_bytes(gzip.compress(data))
    cut.write_bytes(gzip.compress(data[:offset]))  # a complete gzip of a cut tar
    assert len(list(iter_shard(str(whole)))) == NUM_SAMPLES
    assert len(list(iter_shard(f"pipe:cat {whole}"))) == NUM_SAMPLES
    for name in (str(cut), f"pipe:cat {cut}", f"pipe:cat {tmp_path / 'raw.tar'}"):
        (tmp_path / "raw.tar").write_bytes(data[:offset])
        with pytest.raises(ShardReadError, match="truncated tar"):
            list(iter_shard(name))
