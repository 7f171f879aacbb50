"""Reading our checkpoints without a process group: paths, meta.json, and full (global) tensors.

A checkpoint written by :func:`megatron_uni.training.checkpoint.save_checkpoint` stores every
weight and optimizer tensor under its global key as shards (torch ``distcp`` files indexed by
``metadata.json``), so any process can read full tensors without knowing the saving layout.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any, Iterable

import torch

from megatron_uni.training.checkpoint import (
    CheckpointError,
    describe_error,
    read_meta,
    refused,
    resolve,
)
from megatron_uni.training.safe_load import (
    UnsafeCheckpoint,
    read_dcp_metadata,
    safe_default_planner,
    safe_reader,
    safe_torch_load,
    unsafe_cause,
)


class ToolError(RuntimeError):
    """A problem the user can fix: printed as one line, exit code 2."""


def open_checkpoint(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """(resolved iter_* directory, meta.json) or a :class:`ToolError` naming the problem."""
    try:
        resolved = resolve(Path(path))
        return resolved, read_meta(resolved)
    except CheckpointError as err:
        raise ToolError(str(err)) from err


def tensor_index(path: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{key: (global shape, dtype)} of every tensor in the checkpoint, in saved order."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata  # noqa: PLC0415

    try:
        md = read_dcp_metadata(path)
    except UnsafeCheckpoint as err:
        raise ToolError(str(refused(path, err))) from None
    except Exception as err:  # noqa: BLE001 - any failure: an unreadable index
        raise ToolError(f"checkpoint {path}: its tensor index (.metadata) cannot be read "
                        f"({type(err).__name__}: {str(err)[:200]}); it is truncated or corrupt"
                        ) from err
    _check_files(path, md)
    return {k: (tuple(v.size), v.properties.dtype) for k, v in md.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata)}


def _check_files(path: Path, md: Any) -> None:
    """Every shard file the index names exists and is long enough (a cheap truncation check)."""
    needed: dict[str, int] = {}
    for info in (md.storage_data or {}).values():
        end = int(info.offset) + int(info.length)
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for name, end in sorted(needed.items()):
        file = Path(path) / name
        size = file.stat().st_size if file.is_file() else None
        if size is None or size < end:
            state = "is missing" if size is None else f"has {size} bytes, the index needs {end}"
            raise ToolError(f"checkpoint {path}: shard file {name} {state}: it is truncated or "
                            "corrupt; use an earlier checkpoint")


def read_tensors(path: Path, keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Full global tensors (all shards assembled) for ``keys`` (default: all), on CPU."""
    import torch.distributed.checkpoint as dcp  # noqa: PLC0415

    index = tensor_index(path)
    keys = list(index) if keys is None else list(keys)
    unknown = [k for k in keys if k not in index]
    if unknown:
        raise ToolError(f"checkpoint {path}: no tensors {unknown[:5]}")
    state = {k: torch.empty(index[k][0], dtype=index[k][1]) for k in keys}
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, storage_reader=safe_reader(path), planner=safe_default_planner(),
                     no_dist=True)
    except BaseException as err:  # noqa: BLE001 - torch's CheckpointException is a BaseException
        if isinstance(err, (KeyboardInterrupt, SystemExit)):
            raise
        if cause := unsafe_cause(err):
            raise ToolError(str(refused(path, cause))) from None
        raise ToolError(f"checkpoint {path}: reading its tensors failed ({describe_error(err)}); "
                        "a file is truncated or corrupt") from err
    return state


def read_common(path: Path) -> dict[str, Any]:
    """The checkpoint's ``common.pt`` (step, scheduler, optimizer scalars), read without running
    code (:func:`megatron_uni.training.safe_load.safe_torch_load`)."""
    file = Path(path) / "common.pt"
    try:
        common = safe_torch_load(file, file)
    except UnsafeCheckpoint as err:
        raise ToolError(str(refused(path, err))) from None
    except Exception as err:  # noqa: BLE001
        raise ToolError(f"checkpoint {path}: common.pt cannot be read ({type(err).__name__}: "
                        f"{str(err)[:200]}); it is truncated or corrupt") from err
    if not isinstance(common, dict):
        raise ToolError(f"checkpoint {path}: common.pt holds a {type(common).__name__}, not a "
                        "dict; it is corrupt")
    return common


def is_optimizer_key(key: str) -> bool:
    return key.startswith("optimizer.")


def run_cli(main: Any, argv: list[str] | None = None) -> int:
    """Run ``main(argv)``; a :class:`ToolError` becomes ``error: ...`` on stderr and exit 2."""
    try:
        return int(main(argv) or 0)
    except ToolError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
