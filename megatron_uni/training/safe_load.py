"""Reading checkpoints without executing code: every unpickling of a checkpoint file goes here.

Checkpoints come from colleagues and hubs, and a pickle can run any code when it is loaded. torch's
DCP unpickles its ``.metadata`` with plain :mod:`pickle` and loads saved objects with
``torch.load(weights_only=False)``; megatron-core's common strategy calls ``torch.load`` without
``weights_only``. What this module puts in their place:

- ``.metadata``: :class:`RestrictedUnpickler`, which resolves only the classes listed in
  :data:`DCP_METADATA_GLOBALS` (torch's DCP metadata dataclasses, and megatron's saved plans);
- saved objects (RNG states, data positions) and ``common.pt``: ``torch.load(weights_only=True)``
  with the explicit extra globals of :data:`OBJECT_GLOBALS`; our own objects are plain data
  (tensors, numbers, strings, lists, tuples, dicts), which needs none of them;
- :class:`SafeLoadStrategy` / :class:`SafeCommonStrategy`: megatron's torch_dist load strategies
  with those readers, passed to every ``dist_checkpointing.load`` of ours.

A refused file raises :class:`UnsafeCheckpoint` naming the file and the global it refused.
"""

from __future__ import annotations

import io
import os
import pickle
import re
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import torch

E = TypeVar("E", bound=BaseException)

# Every global a torch 2.11-2.14 DCP ``.metadata`` written by megatron-core 0.16.1 refers to.
# Each is a dataclass or enum of DCP's own (constructing one runs no code of the file's choice),
# torch.Size, a dtype, or torch.serialization._get_layout (looks a layout up by name).
DCP_METADATA_GLOBALS: frozenset[tuple[str, str]] = frozenset({
    # the index itself: per key its tensor/bytes metadata, per chunk where it is stored
    *(("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),  # file, offset, length
    # megatron-core stores every rank's save plan in the metadata (``all_local_plans``)
    *(("torch.distributed.checkpoint.planner", name) for name in (
        "SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "BytesIOWriteData")),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # TensorProperties.layout, by name
})
_DTYPES = frozenset(name for name in dir(torch) if isinstance(getattr(torch, name), torch.dtype))


def _numpy_array_globals() -> list[Any]:
    """numpy's array reconstruction, for RNG states saved by older megatron-uni versions (numpy's
    MT19937 state tuple held an ndarray). Rebuilding an array from bytes runs no code; torch's
    serialization docs name these as safe to allow."""
    import numpy as np  # noqa: PLC0415

    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype,
            type(np.dtype(np.uint32))]


OBJECT_GLOBALS = _numpy_array_globals()


class UnsafeCheckpoint(pickle.UnpicklingError):
    """A checkpoint file refers to a global outside the allow-list (it may be crafted to run
    code); ``file`` and ``name`` say which and what."""

    def __init__(self, file: str | Path, name: str, detail: str = "") -> None:
        self.file, self.name, self.detail = str(file), name, detail
        super().__init__(f"{file} refers to {name}, which megatron-uni does not load (a "
                         f"checkpoint holds tensors and plain data only){detail}")

    def __reduce__(self) -> tuple:  # torch copies exceptions between ranks by pickling them
        return (type(self), (self.file, self.name, self.detail))


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only ``allowed`` globals (and torch dtypes)."""

    def __init__(self, file: BinaryIO, name: str | Path,
                 allowed: frozenset[tuple[str, str]] = DCP_METADATA_GLOBALS) -> None:
        super().__init__(file)
        self._name, self._allowed = name, allowed

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._allowed or (module == "torch" and name in _DTYPES):
            return super().find_class(module, name)
        raise UnsafeCheckpoint(self._name, f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpoint(self._name, f"persistent id {str(pid)[:60]!r}")


def read_dcp_metadata(path: str | Path) -> Any:
    """The DCP ``Metadata`` of checkpoint directory ``path`` (its ``.metadata``), read with
    :class:`RestrictedUnpickler`. Raises UnsafeCheckpoint, OSError, or an unpickling error."""
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta  # noqa: PLC0415

    file = Path(path) / ".metadata"
    with open(file, "rb") as f:
        metadata = RestrictedUnpickler(f, file).load()
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpoint(file, type(metadata).__name__, " in place of DCP Metadata")
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    return metadata


def safe_torch_load(source: str | Path | BinaryIO, name: str | Path) -> Any:
    """``torch.load(weights_only=True)`` with exactly :data:`OBJECT_GLOBALS` added; a refused
    global raises :class:`UnsafeCheckpoint` naming ``name``."""
    try:
        with torch.serialization.safe_globals(OBJECT_GLOBALS):
            return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        if found := re.search(r"GLOBAL ([\w.]+)", text):
            raise UnsafeCheckpoint(name, found.group(1)) from None
        lines = [line for line in text.splitlines()[1:] if line.strip()] or [text]
        raise UnsafeCheckpoint(name, "an object outside the allow-list",
                               f" ({lines[0][:200]})") from None


def find_cause(err: BaseException, kind: type[E]) -> E | None:
    """The first exception of ``kind`` behind ``err``: itself, its causes and contexts, and the
    per-rank failures inside torch's CheckpointException."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [err]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, kind):
            return e
        todo += [e.__cause__, e.__context__, *e.args]  # megatron wraps some errors in args
        for cause in (getattr(e, "failures", None) or {}).values():
            todo.append(cause[0] if isinstance(cause, tuple) else cause)
        todo = [t for t in todo if t is None or isinstance(t, BaseException)]
    return None


def unsafe_cause(err: BaseException) -> UnsafeCheckpoint | None:
    """The UnsafeCheckpoint behind ``err`` (also inside torch's per-rank CheckpointException)."""
    return find_cause(err, UnsafeCheckpoint)


# --------------------------------------------------------------------------- torch DCP pieces
def _reader_class() -> type:
    from torch.distributed.checkpoint import FileSystemReader  # noqa: PLC0415

    class SafeFileSystemReader(FileSystemReader):
        """DCP's file reader with :func:`read_dcp_metadata` (read once, then cached)."""

        _cached: Any = None

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            if kwargs.get("rank") is not None:  # per-rank metadata files: not ours
                raise UnsafeCheckpoint(self.path, "a per-rank metadata file")
            if self._cached is None:
                self._cached = read_dcp_metadata(self.path)
            self._cached.storage_meta.load_id = self.load_id
            return self._cached

    return SafeFileSystemReader


def safe_reader(path: str | Path) -> Any:
    """A ``FileSystemReader`` for ``path`` that unpickles nothing outside the allow-lists."""
    return _reader_class()(str(path))


def _load_bytes(planner: Any, read_item: Any, value: io.BytesIO) -> None:
    """``DefaultLoadPlanner.load_bytes`` with :func:`safe_torch_load`."""
    name = f"saved object {read_item.dest_index.fqn!r}"
    obj = safe_torch_load(value, name)
    if planner.flatten_state_dict:
        from torch.distributed.checkpoint._nested_dict import set_element  # noqa: PLC0415

        set_element(planner.original_state_dict, planner.mappings[read_item.dest_index.fqn], obj)
    else:
        planner.state_dict[read_item.dest_index.fqn] = obj


def safe_default_planner() -> Any:
    """torch's DefaultLoadPlanner, loading saved objects with :func:`safe_torch_load`."""
    from torch.distributed.checkpoint import DefaultLoadPlanner  # noqa: PLC0415

    class SafeDefaultLoadPlanner(DefaultLoadPlanner):
        load_bytes = _load_bytes

    return SafeDefaultLoadPlanner()


def load_strategies() -> tuple[Any, Any]:
    """(sharded, common) load strategies for ``dist_checkpointing.load`` that never execute code
    from the checkpoint: megatron's torch_dist ones with the readers above."""
    from megatron.core.dist_checkpointing.core import CheckpointingException  # noqa: PLC0415
    from megatron.core.dist_checkpointing.strategies import torch as mtorch  # noqa: PLC0415
    from megatron.core.dist_checkpointing.strategies.common import (  # noqa: PLC0415
        COMMON_STATE_FNAME,
        TorchCommonLoadStrategy,
    )
    from torch.distributed import checkpoint as dcp  # noqa: PLC0415

    class SafeLoadPlanner(mtorch.MCoreLoadPlanner):
        load_bytes = _load_bytes

    class SafeLoadStrategy(mtorch.TorchDistLoadShardedStrategy):
        """megatron-core 0.16.1's ``TorchDistLoadShardedStrategy.load`` with a safe reader and
        planner (the body is megatron's, minus the FP8/MSC branches this project has not)."""

        def load(self, sharded_state_dict: Any, checkpoint_dir: Any) -> Any:
            flexible = [t for t in mtorch.nested_values(sharded_state_dict)
                        if isinstance(t, mtorch.ShardedTensor) and not t.allow_shape_mismatch]
            mismatch = {t.key: t for t in mtorch.nested_values(sharded_state_dict)
                        if isinstance(t, mtorch.ShardedTensor) and t.allow_shape_mismatch}
            orig = sharded_state_dict
            sharded_state_dict, flat_mapping, rename_mapping = (
                mtorch._replace_state_dict_keys_with_sharded_keys(sharded_state_dict))
            pyt_state_dict = mtorch.mcore_to_pyt_state_dict(sharded_state_dict, True)
            reader = safe_reader(checkpoint_dir)
            dcp.load_state_dict(pyt_state_dict, reader, planner=SafeLoadPlanner(
                shapes_validation_sharded_tensors=flexible,
                allow_shape_mismatch_sharded_tensors=mismatch))
            self.cached_global_metadata = reader.read_metadata()
            state = {k: mtorch._unwrap_pyt_sharded_tensor(v) for k, v in pyt_state_dict.items()}
            state = mtorch._replace_sharded_keys_with_state_dict_keys(state, flat_mapping,
                                                                       rename_mapping)
            mtorch._restore_dict_types(state, orig)
            return state

        def load_tensors_metadata(self, checkpoint_dir: Any, metadata: Any = None) -> Any:
            return super().load_tensors_metadata(
                checkpoint_dir, metadata or read_dcp_metadata(checkpoint_dir))

        def load_sharded_metadata(self, checkpoint_dir: Any) -> Any:
            raise NotImplementedError("not used by megatron-uni (it would read .metadata "
                                      "unguarded)")

    class SafeCommonStrategy(TorchCommonLoadStrategy):
        """``common.pt`` through :func:`safe_torch_load`; a missing file named (megatron-core
        0.16.1 fails with "'str' object has no attribute 'iterdir'" there)."""

        def load_common(self, checkpoint_dir: Any) -> Any:
            file = os.path.join(checkpoint_dir, COMMON_STATE_FNAME)
            if not os.path.isfile(file):
                raise CheckpointingException(f"{file} is missing")
            return safe_torch_load(file, file)

        def load_sharded_objects(self, sharded_objects_state_dict: Any,
                                 checkpoint_dir: Any) -> Any:
            raise NotImplementedError("torch_dist checkpoints keep objects in DCP files")

    return SafeLoadStrategy(), SafeCommonStrategy()
