"""Webdataset tar shards: shard lists, grouping members into samples, resumable sample streams.

A shard is a tar file whose members are named ``<key>.<ext>`` (webdataset's convention: the key
is the path up to the first dot of the file name); consecutive members with the same key form
one sample. Shards are named by brace patterns (``train-{000000..000007}.tar``, several joined
with ``::``), relative to ``data.root`` unless they are URLs (``https://``, ``pipe:...``), which
webdataset's ``gopen`` opens.

:class:`SampleStream` is one reader's endless, deterministic walk over its share of a task's
shards. Per epoch, the shard list is permuted by ``(seed, task, epoch)``; reader ``u`` of ``U``
(``U`` = global micro-batch slots x streams per slot, see
:mod:`megatron_uni.data.loader`) takes shards ``u, u + U, ...`` of that order, or,
when there are fewer shards than readers, reads every shard and keeps samples ``u, u + U, ...``.
Inside a shard, blocks of ``shuffle_buffer`` samples are permuted. Its :attr:`position`
``(epoch, shard cursor, samples emitted from that shard)`` is all it takes to resume exactly.

Bad input never stops the stream silently: an unreadable shard or a truncated tar (cut at any
offset, a header boundary included: :class:`_CheckedTarInfo`) ends that shard, an undecodable sample is skipped by the caller (:meth:`SampleStream.skip`); each is a
warning naming task, shard and key, and counted; past ``max_bad_samples`` it is an error.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

logger = logging.getLogger(__name__)

_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's base_plus_ext
_URL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # http:, pipe:, file:, s3:, ...


class DataError(RuntimeError):
    """The data cannot be read as configured (an empty task, nothing readable)."""


class BadDataError(DataError):
    """More bad samples than ``data.max_bad_samples``."""


@dataclass
class RawSample:
    """One sample as stored: its key, the shard it came from and its members' bytes."""

    key: str
    shard: str
    members: dict[str, bytes] = field(default_factory=dict)


class Position(NamedTuple):
    """Where a :class:`SampleStream` stands: epoch, index into its epoch's shard list, and the
    number of samples already emitted from that shard (in shuffled order)."""

    epoch: int = 0
    cursor: int = 0
    offset: int = 0


def is_url(name: str) -> bool:
    return bool(_URL.match(name)) and not re.match(r"^[a-zA-Z]:[\\/]", name)  # not C:\


def expand_shards(pattern: str, root: str | Path = ".") -> list[str]:
    """Shard names of ``pattern``: ``::``-separated brace patterns (or globs), local names joined
    to ``root``. Order is the pattern's order; globs are sorted."""
    import braceexpand

    shards: list[str] = []
    for part in pattern.split("::"):
        part = part.strip()
        if not part:
            continue
        for name in braceexpand.braceexpand(part):
            if is_url(name):
                shards.append(name)
                continue
            path = Path(name) if Path(name).is_absolute() else Path(root) / name
            if any(c in name for c in "*?["):
                shards.extend(sorted(glob.glob(str(path))))
            else:
                shards.append(str(path))
    return shards


def missing_shards(shards: list[str]) -> list[str]:
    """Local shards that do not exist (URLs are not checked)."""
    return [s for s in shards if not is_url(s) and not Path(s).is_file()]


def split_name(name: str) -> tuple[str, str] | None:
    """``dir/abc.0001.jpg`` -> (``dir/abc``, ``0001.jpg``); None for names without extension."""
    match = _KEY_EXT.match(name)
    return (match.group(1), match.group(2)) if match else None


class ShardReadError(Exception):
    """A shard could not be opened or ended early (truncated); ``key`` = last sample started."""

    def __init__(self, shard: str, key: str, cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.shard, self.key, self.cause = shard, key, cause


class TruncatedTarError(tarfile.ReadError):
    """The archive ends before its end-of-archive marker: cut inside a header, at a header
    boundary, or between the two zero blocks; or a corrupt header mid-archive."""


_ZERO_BLOCK = tarfile.NUL * tarfile.BLOCKSIZE


class _CheckedTarInfo(tarfile.TarInfo):
    """Reads headers like :class:`tarfile.TarInfo` but refuses a premature end.

    In stream mode (``"r|*"``) tarfile takes a missing, short or corrupt header after the first
    member for the end of the archive, so a shard cut at a header boundary loses the rest of
    its samples without a word. A tar ends with two zero blocks (POSIX; tarfile, GNU tar and
    webdataset write them): here the end is accepted only when both are there, which works on
    streams (URLs, pipes, compressed shards) where comparing with a file size would not.
    A truncated member's data is caught by tarfile itself ("unexpected end of data").
    """

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        start = tarfile_.fileobj.tell()
        buf = tarfile_.fileobj.read(tarfile.BLOCKSIZE)
        if len(buf) == 0:
            raise TruncatedTarError(
                f"truncated tar: ends at byte {start} without the end-of-archive blocks "
                "(cut at a header boundary?)")
        if len(buf) < tarfile.BLOCKSIZE:
            raise TruncatedTarError(f"truncated tar: ends inside the header at byte {start}")
        if buf == _ZERO_BLOCK:
            if tarfile_.fileobj.read(tarfile.BLOCKSIZE) != _ZERO_BLOCK:
                raise TruncatedTarError(
                    f"truncated tar: one zero block at byte {start}, not the two that end an "
                    "archive")
            raise tarfile.EOFHeaderError("end of file header")  # tarfile's normal end
        try:
            obj = cls.frombuf(buf, tarfile_.encoding, tarfile_.errors)
        except tarfile.HeaderError as err:
            raise TruncatedTarError(f"corrupt tar header at byte {start}: {err}") from None
        obj.offset = tarfile_.fileobj.tell() - tarfile.BLOCKSIZE
        return obj._proc_member(tarfile_)


def _open(shard: str):  # noqa: ANN202 - a binary file object
    if is_url(shard):
        import webdataset

        return webdataset.gopen(shard, "rb")
    return open(shard, "rb")


def iter_shard(shard: str) -> Iterator[RawSample]:
    """Samples of one tar shard in file order; raises :class:`ShardReadError` where it fails
    (after yielding every complete sample before that point)."""
    current: RawSample | None = None
    key = ""
    try:
        with _open(shard) as stream, tarfile.open(
            fileobj=stream, mode="r|*", tarinfo=_CheckedTarInfo
        ) as tar:
            for member in tar:
                if not member.isfile() or member.name.split("/")[-1].startswith("__"):
                    continue
                parts = split_name(member.name)
                if parts is None:
                    continue
                key, ext = parts
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                if current is not None and current.key != key:
                    yield current
                    current = None
                if current is None:
                    current = RawSample(key, shard)
                current.members[ext] = data
    except (OSError, tarfile.TarError, EOFError, ValueError) as err:
        # The sample being assembled may miss members: drop it with the shard.
        raise ShardReadError(shard, key, err) from err
    if current is not None:
        yield current


def stable_hash(*parts: object) -> int:
    """A 32-bit hash of ``parts`` that is the same in every process (unlike ``hash``)."""
    return zlib.crc32("\x1f".join(str(p) for p in parts).encode())


class BadSampleCounter:
    """Counts skipped samples and shard failures of one task; warns on each, raises past the
    limit. ``count`` is part of the loader's saved position."""

    def __init__(self, task: str, limit: int, count: int = 0) -> None:
        self.task, self.limit, self.count = task, limit, count

    def record(self, shard: str, key: str, reason: str) -> None:
        self.count += 1
        where = f"shard {shard}" + (f", key {key!r}" if key else "")
        logger.warning(
            "task %s: skipped %s: %s (%d bad so far, limit data.max_bad_samples=%d)",
            self.task, where, reason, self.count, self.limit,
        )
        if self.count > self.limit:
            raise BadDataError(
                f"task {self.task}: {self.count} bad samples or shards, more than "
                f"data.max_bad_samples={self.limit}; the last: {where}: {reason}. Fix the data "
                f"or raise data.max_bad_samples"
            )


class SampleStream:
    """Endless deterministic samples of reader ``unit`` of ``num_units`` over ``shards``.

    ``position`` resumes a stream exactly; samples before it are read but not decoded, and
    failures met while skipping are not counted again (they were counted before the save).
    """

    def __init__(
        self,
        shards: list[str],
        *,
        task: str,
        seed: int,
        unit: int,
        num_units: int,
        shuffle_buffer: int,
        counter: BadSampleCounter,
        position: Position = Position(),
        shuffle: bool = True,
    ) -> None:
        if not shards:
            raise DataError(f"task {task}: no shards to read")
        self.shards, self.task, self.seed = list(shards), task, seed
        # A shard's shuffle seed comes from its path below the task's shard directory, so a
        # dataset copied or cloned elsewhere reads in the same order.
        root = (os.path.commonpath(self.shards) if len(self.shards) > 1
                else os.path.dirname(self.shards[0]))
        self._names = {s: os.path.relpath(s, root) for s in self.shards}
        self.unit, self.num_units = unit, num_units
        self.shuffle_buffer = max(1, shuffle_buffer) if shuffle else 1
        self.shuffle = shuffle
        self.counter = counter
        self.position = Position(*position)
        self._samples = self._generate()
        if len(self.shards) < num_units:
            logger.info(
                "task %s: %d shards for %d readers; every reader reads all shards and keeps "
                "every %d-th sample (write more shards to read less)",
                task, len(self.shards), num_units, num_units,
            )

    def __iter__(self) -> SampleStream:
        return self

    def __next__(self) -> RawSample:
        return next(self._samples)

    def skip(self, sample: RawSample, reason: str) -> None:
        """Report a sample the caller could not decode (counted, warned, maybe raises)."""
        self.counter.record(sample.shard, sample.key, reason)

    def epoch_shards(self, epoch: int) -> list[str]:
        """This reader's shards in epoch ``epoch``, in reading order."""
        order = list(range(len(self.shards)))
        if self.shuffle:
            rng = np.random.default_rng([self.seed, stable_hash("shards", self.task), epoch])
            order = [int(i) for i in rng.permutation(len(self.shards))]
        if len(self.shards) >= self.num_units:
            order = order[self.unit :: self.num_units]
        return [self.shards[i] for i in order]

    def _generate(self) -> Iterator[RawSample]:
        epoch, cursor, start = self.position
        while True:
            shards = self.epoch_shards(epoch)
            whole_epoch, emitted = cursor == 0 and start == 0, 0
            for cursor in range(cursor, len(shards)):
                for offset, sample in self._shard_samples(shards[cursor], epoch, start):
                    self.position = Position(epoch, cursor, offset + 1)
                    emitted += 1
                    yield sample
                start = 0
                self.position = Position(epoch, cursor + 1, 0)
            if whole_epoch and emitted == 0:
                raise DataError(
                    f"task {self.task}: reader {self.unit} of {self.num_units} found no readable "
                    f"sample in a whole epoch of its {len(shards)} shards (first: "
                    f"{shards[0] if shards else 'none'}); check the shards"
                )
            epoch, cursor = epoch + 1, 0
            self.position = Position(epoch, 0, 0)

    def _shard_samples(self, shard: str, epoch: int, start: int) -> Iterator[tuple[int, RawSample]]:
        """(offset, sample) of one shard in block-shuffled order, from offset ``start`` on;
        samples not kept by this reader (more readers than shards) advance the offset only."""
        name = self._names[shard]
        rng = np.random.default_rng([self.seed, stable_hash("samples", self.task, name), epoch])
        keep_every = self.num_units if len(self.shards) < self.num_units else 1
        samples = iter_shard(shard)
        offset, done = 0, False
        while not done:
            block: list[RawSample] = []
            try:
                while len(block) < self.shuffle_buffer:
                    block.append(next(samples))
            except StopIteration:
                done = True
            except ShardReadError as err:
                done = True
                if offset >= start:
                    # Met for the first time (a resumed stream skipping past it met it before).
                    self.counter.record(err.shard, err.key, f"unreadable shard ({err})")
            order = rng.permutation(len(block)) if self.shuffle_buffer > 1 else range(len(block))
            for j in order:
                if offset >= start and offset % keep_every == self.unit % keep_every:
                    yield offset, block[j]
                offset += 1


def read_in_order(shards: list[str], counter: BadSampleCounter) -> Iterator[RawSample]:
    """Every sample of ``shards`` once, in file order (evaluation); failures are counted."""
    for shard in shards:
        try:
            yield from iter_shard(shard)
        except ShardReadError as err:
            counter.record(err.shard, err.key, f"unreadable shard ({err})")
