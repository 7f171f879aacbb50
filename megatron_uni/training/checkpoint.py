"""Checkpoints that survive crashes and move between parallel layouts (megatron dist_checkpointing).

    stop_requested = install_signal_handlers()                      # once, main thread
    if (latest := find_latest(root)) is not None:                   # resume
        step, loader_state = load_checkpoint(latest, chunks, optimizer, scheduler, cfg,
                                             data_slots=DataSlots(loader.num_slots, loader.slots))
    ...
    save_checkpoint(root, step, chunks, optimizer, scheduler, loader.state_dict(), cfg,
                    keep_last=cfg.checkpoint.keep_last)             # every rank

A checkpoint is ``root/iter_{step:07d}/``: megatron's ``torch_dist`` files (weights and optimizer
state as sharded tensors keyed by global parameter names, so TP/PP/EP/DP may differ at load) and
``meta.json`` (step, layout, optimizer kind, resolved config). ``root/latest`` names the newest.
``root`` must be on a file system every rank sees.

Atomic, because a job killed mid-save (preemption, time limit) must resume from the previous
checkpoint, not from half a directory: every rank writes into ``iter_XXXXXXX.tmp``; after all
have finished, rank 0 renames it and swaps ``latest`` with ``os.replace``. A ``.tmp`` directory is
never named by ``latest`` and the next save deletes it.

Loading never executes code from the checkpoint: every read goes through
:mod:`megatron_uni.training.safe_load` (allow-listed unpickling of ``.metadata``,
``torch.load(weights_only=True)`` for ``common.pt`` and saved objects); what we save besides tensors
is plain data. A refused file is a :class:`CheckpointError` naming it and the global it refers to.
A save that fails (disk full, not writable) on any rank removes its ``.tmp`` and raises a
CheckpointError on every rank.

Restored on load: weights always; optimizer and scheduler state when asked (also under another
layout; this run's schedule and optimizer settings win unless ``checkpoint.keep_saved_schedule``,
and the changes are logged); RNG states (per global rank) only under the same layout; the data position whenever the
number of global micro-batch slots per step (``train.global_batch_size /
train.micro_batch_size``) is the same, whatever the data-parallel size (one object per slot:
:mod:`megatron_uni.training.data_position`); otherwise the data order restarts at the saved step.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from megatron_uni.config import Config, to_dict
from megatron_uni.training.adam_state import ensure_adam_state, loadable_adam
from megatron_uni.training.data_position import (
    DataSlots,
    data_position_usable,
    join_slots,
    slot_objects,
)
from megatron_uni.training.optimizer import (
    group_settings,
    keep_saved_schedule,
    log_schedule_changes,
    restore_group_settings,
)
from megatron_uni.training.rng_state import rng_state, set_rng_state
from megatron_uni.training.safe_load import (
    UnsafeCheckpoint,
    find_cause,
    load_strategies,
    unsafe_cause,
)
from megatron_uni.training.signals import any_rank, install_signal_handlers  # noqa: F401
from megatron_uni.training.step import unwrap

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
META_FILE = "meta.json"
LATEST_FILE = "latest"
_DIST_METADATA = "metadata.json"  # megatron writes it after every shard: a finished save
_NAME = re.compile(r"^iter_(\d{7,})$")
# Distributed-optimizer state laid out like the model's parameters, so it loads under another
# TP/PP/EP/DP: "fully_reshardable" (gathered over DP at save; each rank slices at load).
# "fully_sharded_model_space" skips the gather but is broken in megatron-core 0.16.1 (it makes
# ShardedTensors with flattened_range, which 0.16.1 rejects). Without the chained prefix, keys do
# not depend on how megatron splits dense and expert optimizers (megatron-LM's choice too).
OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable",
                  "chained_optim_avoid_prefix": True}
_SHOWN = 5  # keys or fields named in an error
_NO_OPTIM_FIX = ("load the weights only: load_checkpoint(..., load_optimizer=False) (proposed "
                 "config field checkpoint.load_optimizer=false)")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with its path and what to do about it."""

    def __init__(self, path: Path | str, problem: str, fix: str) -> None:
        self.path, self.problem, self.fix = Path(path), problem, fix
        super().__init__(f"checkpoint {path}: {problem}. Fix: {fix}")


# --------------------------------------------------------------------------- naming
def checkpoint_name(step: int) -> str:
    """Directory name of the checkpoint after ``step`` optimizer steps."""
    return f"iter_{step:07d}"


def is_complete(path: Path) -> bool:
    """Both markers of a finished save: megatron's metadata.json and our meta.json (last)."""
    return (path / META_FILE).is_file() and (path / _DIST_METADATA).is_file()


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` as (step, path), oldest first."""
    if not Path(root).is_dir():
        return []
    found = [(int(m.group(1)), p) for p in Path(root).iterdir()
             if (m := _NAME.match(p.name)) and p.is_dir() and is_complete(p)]
    return sorted(found)


def find_latest(root: Path) -> Path | None:
    """The checkpoint ``root/latest`` names; if that file is missing, garbled or names no complete
    checkpoint, the newest complete ``iter_*`` (with a warning); None when there is none."""
    root = Path(root)
    pointer = root / LATEST_FILE
    found = list_checkpoints(root)
    if pointer.is_file():
        name = pointer.read_text(errors="replace").strip()
        if _NAME.match(name) and is_complete(root / name):
            return root / name
        reason = f"names {name[:80]!r}, which is not a complete checkpoint"
    elif not found:
        return None
    else:
        reason = "is missing"
    newest = found[-1][1] if found else None
    if not dist.is_initialized() or dist.get_rank() == 0:  # every rank may ask: say it once
        log.warning("%s %s; using the newest complete checkpoint: %s", pointer, reason, newest)
    return newest


# --------------------------------------------------------------------------- state
def current_layout() -> dict[str, int]:
    """This run's parallel layout, as ``meta.json`` records it."""
    from megatron.core import parallel_state as ps  # noqa: PLC0415

    return {"world": dist.get_world_size(), "tp": ps.get_tensor_model_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_world_size(),
            "cp": ps.get_context_parallel_world_size(),
            "ep": ps.get_expert_model_parallel_world_size(),
            "etp": ps.get_expert_tensor_parallel_world_size(),
            "dp": ps.get_data_parallel_world_size()}


def optimizer_kind(optimizer: Any) -> str | None:
    """"distributed" or "local" (their formats differ); None for no optimizer."""
    if optimizer is None:
        return None
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer  # noqa: PLC0415

    opts = getattr(optimizer, "chained_optimizers", [optimizer])
    return "distributed" if any(isinstance(o, DistributedOptimizer) for o in opts) else "local"


def _sharded_state(model_chunks: Sequence[Any], optimizer: Any, *, is_loading: bool,
                   rng: dict | bool | None, loader: dict | DataSlots | None) -> dict[str, Any]:
    """The sharded state dict that save writes and load requests (``rng``/``loader``: the data
    to save, True / the slots to request it, None/False to leave it out)."""
    from megatron.core.dist_checkpointing import ShardedObject  # noqa: PLC0415

    models = [unwrap(chunk) for chunk in model_chunks]
    # megatron-LM's names; the tensor keys inside are global (layer numbers, expert offsets).
    names = ["model"] if len(models) == 1 else [f"model{i}" for i in range(len(models))]
    state: dict[str, Any] = {n: m.sharded_state_dict() for n, m in zip(names, models)}
    if optimizer is not None:
        ensure_adam_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(
            dict(state), is_loading=is_loading, metadata=dict(OPTIM_METADATA))
    if rng:  # keyed by global rank: meaningful only when every rank keeps its role
        state["rng_state"] = ShardedObject("rng_state", None if rng is True else rng,
                                           (dist.get_world_size(),), (dist.get_rank(),),
                                           replica_id=0)
    if loader:
        state["loader_slots"] = slot_objects(loader)
    return state


# --------------------------------------------------------------------------- save
def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    """Write ``path`` so that readers see the old or the new content, never a part."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _remove_stale(root: Path) -> None:
    for child in root.glob("iter_*.tmp"):
        log.warning("removing %s: a save that did not finish", child)
        shutil.rmtree(child, ignore_errors=True)


def _prune(root: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` complete checkpoints (0 = all) and the one ``latest`` names."""
    if keep_last <= 0:
        return
    pointer = root / LATEST_FILE
    keep = pointer.read_text().strip() if pointer.is_file() else None
    for _, path in list_checkpoints(root)[:-keep_last]:
        if path.name != keep:
            shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(root: Path, step: int, model_chunks: list, optimizer: Any, scheduler: Any,
                    loader_state: dict | None, cfg: Config, keep_last: int) -> Path:
    """Write ``root/iter_{step:07d}`` and point ``root/latest`` at it; returns its path.

    Collective: every rank calls it, with its own ``loader_state`` (``MultiTaskLoader.
    state_dict()``: the slots this rank reads; None: not saved). ``optimizer``/``scheduler``
    None: weights only. Removes
    unfinished saves and all but the newest ``keep_last`` checkpoints (0 = keep all).
    """
    from megatron.core import dist_checkpointing  # noqa: PLC0415

    start = time.perf_counter()
    root = Path(root)
    final = root / checkpoint_name(step)
    tmp = root / f"{final.name}.tmp"
    rank0 = dist.get_rank() == 0

    def prepare() -> None:
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale(root)
        tmp.mkdir()

    _agree(_attempt(prepare) if rank0 else None, final, None)  # also the barrier before writing

    def write() -> None:
        tmp.mkdir(parents=True, exist_ok=True)  # a shared file system may show it late
        state = _sharded_state(model_chunks, optimizer, is_loading=False, rng=rng_state(),
                               loader=loader_state)
        state["step"] = int(step)
        if scheduler is not None:
            state["scheduler"] = scheduler.state_dict()
        # Returns after a barrier: every shard is written; a failed write raises on every rank.
        dist_checkpointing.save(state, str(tmp))

    _agree(_attempt(write), final, tmp)

    def finish() -> None:
        meta = {"format": FORMAT_VERSION, "step": int(step), "layout": current_layout(),
                "optimizer": optimizer_kind(optimizer), "scheduler": scheduler is not None,
                "loader_state": bool(loader_state),
                "loader_slots": int(loader_state["num_slots"]) if loader_state else None,
                "saved_at": time.strftime("%FT%T%z"),
                "config": to_dict(cfg)}
        _write_atomic(tmp / META_FILE, json.dumps(meta, indent=1, default=str))
        if final.exists():  # the same step saved again (after a resume): set the old one aside
            os.rename(final, root / f"{final.name}.old.tmp")
        os.rename(tmp, final)
        _fsync_dir(root)
        _write_atomic(root / LATEST_FILE, final.name + "\n")
        _remove_stale(root)
        _prune(root, keep_last)
        log.info("saved checkpoint %s in %.1f s", final, time.perf_counter() - start)

    # Nobody moves on (or exits) before the checkpoint is named, or all raise.
    _agree(_attempt(finish) if rank0 else None, final, tmp)
    return final


def _attempt(action: Callable[[], None]) -> BaseException | None:
    """Run ``action``; the error it raised (torch's CheckpointException too), or None."""
    from torch.distributed.checkpoint.api import CheckpointException  # noqa: PLC0415

    try:
        action()
    except (Exception, CheckpointException) as err:  # noqa: BLE001 - reported by _agree
        return err
    return None


def _agree(error: BaseException | None, final: Path, tmp: Path | None) -> None:
    """Collective: when any rank failed, remove the unfinished ``tmp`` (rank 0) and raise a
    :class:`CheckpointError` on every rank, so that no rank waits for the others forever."""
    if not any_rank(error is not None):
        return
    if tmp is not None and dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    if error is None:
        raise CheckpointError(final, "saving failed on another rank (see rank 0's message)",
                              "see the first error")
    cause, text = find_cause(error, OSError), describe_error(error)
    # megatron's writer processes report an OSError as text ("Worker failure: [Errno 28] ...")
    space = (cause is not None and cause.errno == errno.ENOSPC) or os.strerror(
        errno.ENOSPC) in text
    raise CheckpointError(
        final, f"saving failed ({text}); the unfinished save was removed, earlier checkpoints "
        "are untouched",
        f"free disk space on {final.parent}" if space else
        f"make {final.parent} writable (or set checkpoint.save to a writable directory)"
    ) from error


# --------------------------------------------------------------------------- load
def resolve(path: Path) -> Path:
    """``path`` when it is a complete checkpoint, the latest one when it is a save root, else
    a :class:`CheckpointError` that says what is wrong."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(path, "does not exist", "check checkpoint.load: a save root "
                              "(checkpoint.save, default <train.run_dir>/checkpoints) or one of "
                              "its iter_XXXXXXX directories")
    if path.is_dir() and not (path / META_FILE).exists() and (latest := find_latest(path)):
        return latest
    if not (path / META_FILE).is_file():
        raise CheckpointError(path, "is not a megatron-uni checkpoint (no meta.json, no complete "
                              "iter_* inside)", "give a directory written by save_checkpoint "
                              "(convert other checkpoints with checkpoints_utils first)")
    if not (path / _DIST_METADATA).is_file():
        raise CheckpointError(path, "has no megatron metadata.json: the save did not finish",
                              "resume from an earlier checkpoint (find_latest picks one)")
    for name, what in ((".metadata", "torch's tensor index"),
                       ("common.pt", "step, optimizer and schedule scalars")):
        if not (path / name).is_file():
            raise CheckpointError(path, f"its {name} ({what}) is missing: a file was deleted "
                                  "or never copied", "copy the whole directory again, or use "
                                  "an earlier checkpoint")
    return path


def refused(path: Path, cause: UnsafeCheckpoint) -> CheckpointError:
    """The error for a checkpoint file that refers to a global outside the allow-list."""
    return CheckpointError(
        path, f"refused to load {cause.file}: it refers to {cause.name}, which is not on the "
        "allow-list of what a checkpoint may hold (tensors, plain data, torch's checkpoint "
        "index); loading it could run code", "do not use this checkpoint: get it again from a "
        "source you trust, as written by megatron-uni")


def read_meta(path: Path) -> dict[str, Any]:
    """A checkpoint's ``meta.json``: step, layout, optimizer kind, resolved config."""
    try:
        meta = json.loads((Path(path) / META_FILE).read_text())
        int(meta["step"]), dict(meta["layout"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(path, f"meta.json is unreadable ({err})",
                              "resume from an earlier checkpoint") from err
    return meta


def _first(items: list[str], sep: str = ", ") -> str:
    items = sorted(set(items))
    more = f" (+{len(items) - _SHOWN} more)" if len(items) > _SHOWN else ""
    return sep.join(items[:_SHOWN]) + more


def _check_tensors(path: Path, state: dict[str, Any], meta: dict, cfg: Config) -> None:
    """Requested tensors against the checkpoint's index: missing keys and other shapes named."""
    from megatron.core import dist_checkpointing  # noqa: PLC0415
    from megatron.core.dist_checkpointing import ShardedTensor  # noqa: PLC0415
    from megatron.core.dist_checkpointing.dict_utils import nested_values  # noqa: PLC0415

    try:
        saved = dist_checkpointing.load_tensors_metadata(
            str(path), sharded_strategy=load_strategies()[0])
    except Exception as err:  # noqa: BLE001 - any failure here: an unreadable index
        if cause := unsafe_cause(err):
            raise refused(path, cause) from None
        raise CheckpointError(path, "its tensor index .metadata cannot be read "
                              f"({describe_error(err)})",
                              "it is truncated or corrupt: resume from an earlier one") from err
    missing: dict[bool, list[str]] = {True: [], False: []}  # is optimizer state -> keys
    shapes: list[str] = []
    for sh in (v for v in nested_values(state) if isinstance(v, ShardedTensor)):
        if sh.key not in saved:
            missing[sh.key.startswith("optimizer.")].append(sh.key)
        elif tuple(saved[sh.key].global_shape) != tuple(sh.global_shape):
            shapes.append(f"{sh.key} {tuple(saved[sh.key].global_shape)} in the checkpoint, "
                          f"{tuple(sh.global_shape)} here")
    if missing[False] or shapes:
        problems = ([f"lacks weights this model has: {_first(missing[False])}"] * bool(
            missing[False]) + [f"has other shapes: {_first(shapes, '; ')}"] * bool(
            shapes))
        now = to_dict(cfg)
        diff = [f"{sec}.{k}={v!r} (here {now[sec].get(k)!r})" for sec in ("model", "moe")
                for k, v in meta.get("config", {}).get(sec, {}).items() if now[sec].get(k) != v]
        raise CheckpointError(
            path, "is a checkpoint of another model: it " + " and ".join(problems),
            f"use the model settings it was saved with ({_first(diff) or 'see its meta.json'})")
    if missing[True]:
        raise CheckpointError(path, f"has no optimizer state for {_first(missing[True])}",
                              _NO_OPTIM_FIX)


def describe_error(err: BaseException) -> str:
    """One line for an exception; for torch's CheckpointException, the first rank's cause."""
    if failures := getattr(err, "failures", None):
        rank, cause = next(iter(failures.items()))
        cause = cause[0] if isinstance(cause, tuple) else cause
        return f"rank {rank}: {type(cause).__name__}: {str(cause)[:300]}"
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:300]}"


def load_checkpoint(path: Path, model_chunks: list, optimizer: Any, scheduler: Any, cfg: Config,
                    *, load_optimizer: bool = True, data_slots: DataSlots | None = None
                    ) -> tuple[int, dict | None]:
    """Load a checkpoint (an ``iter_*`` directory, or a save root: its latest) into the built
    model chunks, optimizer and scheduler; collective.

    Returns (step, the loader state of the slots ``data_slots.mine``, for
    ``MultiTaskLoader.load_state_dict``; None when ``data_slots`` is None, none was saved, or it
    was saved with another number of slots per step or in the older format -- then the run
    restarts the data order at the step). ``load_optimizer=False`` or ``optimizer=None``: weights
    (and RNG) only; optimizer and scheduler start afresh. Raises :class:`CheckpointError`.
    """
    start = time.perf_counter()
    path = resolve(Path(path))
    meta = read_meta(path)
    from megatron.core import dist_checkpointing  # noqa: PLC0415 - after the cheap checks
    from torch.distributed.checkpoint.api import CheckpointException  # noqa: PLC0415

    layout = current_layout()
    same_layout = meta["layout"] == layout
    with_optimizer = load_optimizer and optimizer is not None
    saved_kind, kind = meta.get("optimizer"), optimizer_kind(optimizer)
    if with_optimizer and saved_kind != kind:
        raise CheckpointError(
            path, f"holds {saved_kind or 'no'} optimizer state; this run's optimizer is {kind}",
            f"set parallel.distributed_optimizer={str(saved_kind == 'distributed').lower()}, "
            f"or {_NO_OPTIM_FIX}")
    want_loader = data_position_usable(meta, data_slots, int(meta["step"]))
    state = _sharded_state(model_chunks, optimizer if with_optimizer else None, is_loading=True,
                           rng=same_layout, loader=data_slots if want_loader else None)
    _check_tensors(path, state, meta, cfg)
    try:
        sharded, common = load_strategies()
        loaded = dist_checkpointing.load(state, str(path), sharded_strategy=sharded,
                                         common_strategy=common)
    except (Exception, CheckpointException) as err:  # noqa: BLE001 - torch's is a BaseException
        if cause := unsafe_cause(err):
            raise refused(path, cause) from None
        raise CheckpointError(path, f"reading failed ({describe_error(err)})",
                              "a file is truncated or corrupt: resume from an earlier one") from err

    models = [unwrap(chunk) for chunk in model_chunks]
    for i, model in enumerate(models):
        model.load_state_dict(loaded["model" if len(models) == 1 else f"model{i}"], strict=True)
    if with_optimizer:
        keep = cfg.checkpoint.keep_saved_schedule
        settings = group_settings(optimizer)
        try:
            with loadable_adam(optimizer):
                optimizer.load_state_dict(loaded["optimizer"])
            if not keep:  # this run's lr, min_lr, betas, eps, not the saved param groups'
                restore_group_settings(optimizer, settings)
            if scheduler is not None and "scheduler" in loaded:
                if keep:
                    keep_saved_schedule(scheduler)
                scheduler.load_state_dict(loaded["scheduler"])
            log_schedule_changes(meta.get("config", {}), cfg, keep)
        except Exception as err:  # noqa: BLE001 - megatron asserts / KeyErrors on mismatches
            raise CheckpointError(
                path, "its optimizer or schedule state does not fit this run "
                f"({describe_error(err)})",
                f"keep optim.* and train.steps as saved, or {_NO_OPTIM_FIX}") from err
    elif optimizer is not None:
        # Mixed precision keeps fp32 main copies made at build time: refresh them, else the
        # first step would write the old random weights back.
        optimizer.reload_model_params()
    if same_layout:
        set_rng_state(loaded["rng_state"])
    if dist.get_rank() == 0:
        if not same_layout:
            log.warning("checkpoint layout %s, this run %s: RNG states start afresh; the data "
                        "order %s", meta["layout"], layout,
                        "continues" if want_loader else "restarts at the step (fast-forward)")
        log.info("loaded checkpoint %s (step %d%s) in %.1f s", path, int(meta["step"]),
                 "" if with_optimizer else ", weights only", time.perf_counter() - start)
    return int(loaded["step"]), (join_slots(loaded["loader_slots"]) if want_loader else None)
