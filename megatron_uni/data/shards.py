"""Writing webdataset shards: numbered tar files with a summary (samples, shards, bytes).

Members are written as given (bytes, or str as UTF-8), named ``<key>.<ext>``; keys lose their
dots (webdataset splits a name at its first dot). Tar headers carry a fixed mtime and owner, so
the same samples always give byte-identical shards.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import webdataset


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover


@dataclass
class ShardSummary:
    """What a :class:`ShardSink` wrote."""

    samples: int = 0
    shards: list[str] = field(default_factory=list)
    bytes: int = 0
    pattern: str = ""  # brace pattern of the shards, relative to the output directory

    def __str__(self) -> str:
        shards = "1 shard" if len(self.shards) == 1 else f"{len(self.shards)} shards"
        return (f"{self.samples} samples in {shards}, "
                f"{human_bytes(self.bytes)}: {self.pattern}")


def brace_pattern(prefix: str, count: int) -> str:
    """``prefix-{000000..000007}.tar`` for 8 shards (a plain name for one)."""
    if count <= 1:
        return f"{prefix}-000000.tar"
    return f"{prefix}-{{000000..{count - 1:06d}}}.tar"


class ShardSink:
    """Writes samples to ``out_dir/prefix-000000.tar``, ... ``max_count`` samples (or about
    ``max_bytes``) per shard. Use as a context manager or call :meth:`close`."""

    def __init__(self, out_dir: str | Path, prefix: str, *, max_count: int = 1000,
                 max_bytes: float = 1e9) -> None:
        self.out_dir, self.prefix = Path(out_dir), prefix
        (self.out_dir / prefix).parent.mkdir(parents=True, exist_ok=True)
        self.max_count, self.max_bytes = max_count, max_bytes
        self._writer: webdataset.ShardWriter | None = None
        self._shards: list[str] = []
        self.summary = ShardSummary()

    def write(self, key: str, members: Mapping[str, bytes | str]) -> None:
        if self._writer is None:  # opened on first use: no empty shard for no samples
            self._writer = webdataset.ShardWriter(
                str(self.out_dir / f"{self.prefix}-%06d.tar"), maxcount=self.max_count,
                maxsize=self.max_bytes, verbose=0, post=self._shards.append, encoder=False,
                mtime=0,
            )
        sample: dict[str, bytes | str] = {"__key__": re.sub(r"[.\s]", "_", key)}
        for ext, value in members.items():
            sample[ext] = value.encode("utf-8") if isinstance(value, str) else bytes(value)
        self._writer.write(sample)
        self.summary.samples += 1

    def close(self) -> ShardSummary:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self.summary.shards = list(self._shards)
        self.summary.bytes = sum(Path(s).stat().st_size for s in self._shards)
        self.summary.pattern = brace_pattern(self.prefix, len(self._shards))
        return self.summary

    def __enter__(self) -> ShardSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
