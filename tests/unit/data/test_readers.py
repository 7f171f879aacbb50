"""Shard lists, grouping tar members into samples, and resumable deterministic streams."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_uni.data.readers import (
    BadSampleCounter,
    DataError,
    Position,
    SampleStream,
    expand_shards,
    iter_shard,
    split_name,
)
from megatron_uni.data.shards import ShardSink


def write_shards(out: Path, num_shards: int, per_shard: int) -> list[str]:
    with ShardSink(out, "s", max_count=per_shard) as sink:
        for i in range(num_shards * per_shard):
            sink.write(f"k{i:04d}", {"txt": f"sample {i}", "cls": str(i % 3)})
    return sink.summary.shards


def stream(shards: list[str], unit: int = 0, units: int = 1, buffer: int = 4,
           position: Position = Position()) -> SampleStream:
    return SampleStream(shards, task="t", seed=5, unit=unit, num_units=units,
                        shuffle_buffer=buffer, counter=BadSampleCounter("t", 0),
                        position=position)


def keys(s: SampleStream, n: int) -> list[str]:
    return [next(s).key for _ in range(n)]


def test_expand_shards(tmp_path: Path) -> None:
    assert expand_shards("a-{000..002}.tar::b.tar", "/r") == [
        "/r/a-000.tar", "/r/a-001.tar", "/r/a-002.tar", "/r/b.tar"]
    assert expand_shards("https://host/x-{0..1}.tar", "/r") == [
        "https://host/x-0.tar", "https://host/x-1.tar"]
    assert expand_shards("pipe:cat /d/x.tar", "/r") == ["pipe:cat /d/x.tar"]
    for name in ("b.tar", "a.tar"):
        (tmp_path / name).write_bytes(b"")
    assert expand_shards("*.tar", tmp_path) == [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]
    assert expand_shards(str(tmp_path / "a.tar"), "/elsewhere") == [str(tmp_path / "a.tar")]


def test_split_name_is_webdatasets_rule() -> None:
    assert split_name("dir/abc.0001.jpg") == ("dir/abc", "0001.jpg")
    assert split_name("abc.txt") == ("abc", "txt")
    assert split_name("noext") is None


def test_members_group_into_samples(tmp_path: Path) -> None:
    shards = write_shards(tmp_path, 2, 5)
    samples = list(iter_shard(shards[1]))
    assert [s.key for s in samples] == [f"k{i:04d}" for i in range(5, 10)]
    assert samples[0].members == {"txt": b"sample 5", "cls": b"2"}
    assert samples[0].shard == shards[1]


def test_one_epoch_of_all_readers_covers_every_sample_once(tmp_path: Path) -> None:
    shards = write_shards(tmp_path, 6, 5)
    for units in (1, 3, 4, 6, 8, 12):  # 8 and 12: more readers than shards
        seen: list[str] = []
        for unit in range(units):
            s = stream(shards, unit, units)
            per_epoch = sum(len(list(iter_shard(sh))) for sh in s.epoch_shards(0))
            if len(shards) < units:
                per_epoch = len(range(unit % units, 5, units)) * len(shards)
            seen += keys(s, per_epoch)
            assert s.position.epoch == 0
        assert sorted(seen) == [f"k{i:04d}" for i in range(30)], units


def test_order_is_seeded_and_reshuffled_per_epoch(tmp_path: Path) -> None:
    shards = write_shards(tmp_path, 4, 5)
    first, again = keys(stream(shards), 40), keys(stream(shards), 40)
    assert first == again
    assert first[:20] != first[20:] and sorted(first[:20]) == sorted(first[20:])
    assert first[:20] != [f"k{i:04d}" for i in range(20)]


@pytest.mark.parametrize("num_shards", [1, 4])
def test_order_does_not_depend_on_where_the_dataset_lies(tmp_path: Path, num_shards: int) -> None:
    """A copy of the shards elsewhere (another clone, another mount) reads in the same order."""
    here = write_shards(tmp_path / "a", num_shards, 9)
    there = write_shards(tmp_path / "deeper" / "b", num_shards, 9)
    assert keys(stream(here, buffer=9), 18) == keys(stream(there, buffer=9), 18)


@pytest.mark.parametrize("units", [1, 8])
def test_resume_from_any_position_continues_exactly(tmp_path: Path, units: int) -> None:
    shards = write_shards(tmp_path, 4, 6)
    full = stream(shards, unit=1 % units, units=units)
    reference, positions = [], []
    for _ in range(30):
        reference.append(next(full).key)
        positions.append(full.position)
    for cut in (0, 1, 5, 6, 13, 22, 29):
        resumed = stream(shards, unit=1 % units, units=units, position=positions[cut])
        assert keys(resumed, 29 - cut) == reference[cut + 1 :], cut


def test_no_readable_sample_is_an_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"not a tar file" * 100)
    s = SampleStream([str(bad)], task="t", seed=0, unit=0, num_units=1, shuffle_buffer=4,
                     counter=BadSampleCounter("t", 10))
    with pytest.raises(DataError, match="task t: .* no readable sample"):
        next(s)
    assert s.counter.count == 1


def test_urls_are_opened_by_webdataset(tmp_path: Path) -> None:
    shards = write_shards(tmp_path, 1, 3)
    local = [s.key for s in iter_shard(shards[0])]
    assert [s.key for s in iter_shard(f"pipe:cat {shards[0]}")] == local
    assert [s.key for s in iter_shard(f"file:{shards[0]}")] == local
