"""Checkpoint save/resume on one process: a resumed run is bit-identical to an uninterrupted one.

A module fixture trains 3 optimizer steps (random gradients: the optimizer, not the model's
maths, is under test here) with a save after each (keep_last=2), records what the state looks
like after step 3 and after a 4th step. Tests then load into freshly built (differently seeded)
model/optimizer/scheduler, crash a save with SIGKILL, corrupt files, and send signals.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from megatron_uni.training.checkpoint import (
    LATEST_FILE,
    CheckpointError,
    DataSlots,
    checkpoint_name,
    find_latest,
    load_checkpoint,
)
from tests.multirank import run_ranks

STEPS = 3
TINY = ["model.num_layers=2", "model.vocab_size=512", "model.drop_path_rate=0.0",
        "train.steps=10", "optim.warmup_steps=2"]


# --------------------------------------------------------------------------- shared helpers
def make_cfg(*overrides: str):
    """A tiny CPU config (also used by tests/distributed/test_checkpoint_layouts.py)."""
    from megatron_uni.config import Config, apply_overrides

    return apply_overrides(Config(), ["parallel.device=cpu", *TINY, *overrides])


def loader_state(step: int, slots: range, num_slots: int) -> dict[str, Any]:
    """A data position shaped like ``MultiTaskLoader.state_dict()`` (format 2) for ``slots``."""
    return {"version": 2, "step": step, "seed": 0, "reader_streams": 2, "num_slots": num_slots,
            "slots": [{"slot": g, "positions": {"cls": [[0, step, g], None]},
                       "bad_samples": {"cls": [g, 0]}} for g in slots]}


def build(cfg) -> tuple[list, Any, Any]:
    """Model in megatron DDP (distributed optimizer as configured), optimizer, scheduler."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    from megatron_uni.models.generalist import build_model
    from megatron_uni.training.optimizer import build_optimizer, build_scheduler

    model = build_model(cfg, use_cpu=True)
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=cfg.parallel.distributed_optimizer,
    ), model)
    model.config.finalize_model_grads_func = finalize_model_grads
    optimizer = build_optimizer(cfg, [ddp], use_cpu=True, precision="fp32")
    return [ddp], optimizer, build_scheduler(cfg, optimizer)


def train_step(chunks: list, optimizer: Any, scheduler: Any, step: int) -> None:
    """One optimizer step on gradients drawn from a generator seeded by ``step`` (the same on
    every rank, so replicated parameters stay replicas)."""
    gen = torch.Generator().manual_seed(step)
    for chunk in chunks:
        chunk.zero_grad_buffer()
        for param in chunk.module.parameters():
            param.main_grad.copy_(torch.randn(param.shape, generator=gen))
    optimizer.zero_grad()
    ok, _, _ = optimizer.step()
    assert ok
    scheduler.step(1)


def global_view(chunks: list, optimizer: Any) -> dict[str, list[tuple[tuple, torch.Tensor]]]:
    """This rank's pieces of every weight and optimizer state tensor, by checkpoint key:
    ``{key: [(global slices, tensor)]}``, layout-agnostic (collective: the distributed
    optimizer gathers its state)."""
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    from megatron_uni.training.checkpoint import OPTIM_METADATA
    from megatron_uni.training.step import unwrap

    model_sd = {"model": unwrap(chunks[0]).sharded_state_dict()}
    optim_sd = optimizer.sharded_state_dict(model_sd, metadata=dict(OPTIM_METADATA))
    view: dict[str, list] = {}
    for sh in nested_values({"m": model_sd, "o": optim_sd}):
        if isinstance(sh, ShardedTensor):
            local = (1,) * sh.prepend_axis_num + tuple(sh.local_shape)
            where = tuple((off, size) for off, size in zip(sh.global_offset, local))
            view.setdefault(sh.key, []).append((where, sh.data.detach().clone().reshape(local)))
    return view


def merge_views(views: list[dict], shapes_from: dict | None = None) -> dict[str, torch.Tensor]:
    """Full tensors from the pieces of all ranks; overlapping pieces (replicas) must agree."""
    full: dict[str, torch.Tensor] = {}
    for view in views:
        for key, pieces in view.items():
            for where, tensor in pieces:
                shape = tuple(off + size for off, size in where)
                if key not in full:
                    full[key] = torch.full(shape, float("nan"), dtype=tensor.dtype)
                elif full[key].shape != shape:
                    grown = torch.full(tuple(map(max, full[key].shape, shape)), float("nan"))
                    grown[tuple(slice(0, n) for n in full[key].shape)] = full[key]
                    full[key] = grown
                region = full[key][tuple(slice(off, off + size) for off, size in where)]
                seen = ~torch.isnan(region)
                assert torch.equal(region[seen], tensor[seen]), f"replicas of {key} differ"
                region.copy_(tensor)
    for key, tensor in full.items():
        assert not torch.isnan(tensor).any(), f"{key} not covered by any rank"
    return full


def check_view(view: dict, full: dict[str, torch.Tensor]) -> list[str]:
    """Every local piece equals (bit for bit) the same region of the reference."""
    for key, pieces in view.items():
        assert key in full, f"{key} is not in the reference"
        for where, tensor in pieces:
            expected = full[key][tuple(slice(off, off + size) for off, size in where)]
            assert torch.equal(tensor, expected), f"{key} at {where} differs after the load"
    return sorted(view)


def rng_draws() -> list:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    with get_cuda_rng_tracker().fork():
        tracked = torch.rand(3)
    return [random.random(), float(np.random.rand()), torch.rand(3), tracked]


def adam_steps(optimizer: Any) -> set[float]:
    return {float(s["step"]) for opt in optimizer.chained_optimizers
            for s in opt.optimizer.state.values()}


# --------------------------------------------------------------------------- rank functions
def _train_and_save(rank: int, world: int, root: str) -> dict:
    from megatron_uni.parallel.initialize import initialize
    from megatron_uni.training.checkpoint import save_checkpoint

    cfg = make_cfg()
    initialize(cfg)
    chunks, optimizer, scheduler = build(cfg)
    for step in range(1, STEPS + 1):
        train_step(chunks, optimizer, scheduler, step)
        save_checkpoint(Path(root), step, chunks, optimizer, scheduler,
                        loader_state(step, range(2), 2), cfg, keep_last=2)
    ref = {"draws": rng_draws(), "view": merge_views([global_view(chunks, optimizer)]),
           "lr": [g["lr"] for g in optimizer.param_groups], "num_steps": scheduler.num_steps}
    train_step(chunks, optimizer, scheduler, STEPS + 1)
    ref["after"] = merge_views([global_view(chunks, optimizer)])
    return ref


def _resume(rank: int, world: int, root: str, ref: dict) -> None:
    from megatron_uni.parallel.initialize import initialize

    cfg = make_cfg()
    initialize(cfg)
    torch.manual_seed(99)  # other initial weights: only the load can make them agree
    chunks, optimizer, scheduler = build(cfg)
    step, position = load_checkpoint(Path(root), chunks, optimizer, scheduler, cfg,
                                     data_slots=DataSlots(2, range(2)))
    assert (step, position) == (STEPS, loader_state(STEPS, range(2), 2))
    draws = rng_draws()
    assert draws[:2] == ref["draws"][:2]
    assert all(torch.equal(a, b) for a, b in zip(draws[2:], ref["draws"][2:]))
    assert scheduler.num_steps == ref["num_steps"]
    assert [g["lr"] for g in optimizer.param_groups] == ref["lr"]
    assert adam_steps(optimizer) == {float(STEPS)}
    keys = check_view(global_view(chunks, optimizer), ref["view"])
    assert any(".exp_avg_sq." in k for k in keys) and any(k.startswith("encoder.") for k in keys)
    train_step(chunks, optimizer, scheduler, STEPS + 1)  # and training continues identically
    assert adam_steps(optimizer) == {float(STEPS + 1)}
    check_view(global_view(chunks, optimizer), ref["after"])


def _crash_during_save(rank: int, world: int, root: str) -> None:
    from megatron.core import dist_checkpointing

    from megatron_uni.parallel.initialize import initialize
    from megatron_uni.training.checkpoint import save_checkpoint

    real_save = dist_checkpointing.save

    def save_then_die(*args: Any, **kwargs: Any) -> None:
        real_save(*args, **kwargs)  # every shard is on disk, the checkpoint is not named yet
        os.kill(os.getpid(), signal.SIGKILL)

    dist_checkpointing.save = save_then_die
    cfg = make_cfg()
    initialize(cfg)
    chunks, optimizer, scheduler = build(cfg)
    save_checkpoint(Path(root), STEPS + 1, chunks, optimizer, scheduler, {}, cfg, keep_last=2)


def _resume_after_crash(rank: int, world: int, root: str) -> int:
    from megatron_uni.parallel.initialize import initialize
    from megatron_uni.training.checkpoint import save_checkpoint

    cfg = make_cfg()
    initialize(cfg)
    chunks, optimizer, scheduler = build(cfg)
    step, _ = load_checkpoint(find_latest(Path(root)), chunks, optimizer, scheduler, cfg)
    train_step(chunks, optimizer, scheduler, step + 1)
    save_checkpoint(Path(root), step + 1, chunks, optimizer, scheduler, None, cfg, keep_last=2)
    return step


def _load_errors(rank: int, world: int, ckpt: str, tmp: str, reference: dict
                 ) -> dict[str, str]:
    from megatron_uni.parallel.initialize import initialize

    cfg = make_cfg()
    initialize(cfg)
    chunks, optimizer, scheduler = build(cfg)
    errors: dict[str, str] = {}
    truncated = Path(tmp) / "truncated"
    shutil.copytree(ckpt, truncated)
    biggest = max(truncated.glob("*.distcp"), key=lambda p: p.stat().st_size)
    os.truncate(biggest, biggest.stat().st_size // 2)
    other = make_cfg("model.hidden_size=32", "model.ffn_hidden_size=64")
    small, small_opt, small_sched = build(other)
    moe = make_cfg("moe.num_experts=4", "moe.layers=all")
    moe_chunks, _, _ = build(moe)
    local = make_cfg("parallel.distributed_optimizer=false")
    local_chunks, local_opt, local_sched = build(local)
    cases = {
        "truncated": lambda: load_checkpoint(truncated, chunks, optimizer, scheduler, cfg),
        "shape": lambda: load_checkpoint(Path(ckpt), small, small_opt, small_sched, other),
        "moe": lambda: load_checkpoint(Path(ckpt), moe_chunks, None, None, moe),
        "kind": lambda: load_checkpoint(Path(ckpt), local_chunks, local_opt, local_sched, local),
    }
    for name, attempt in cases.items():
        try:
            attempt()
        except CheckpointError as err:
            errors[name] = str(err)
    # Weights only: the model gets the saved weights, the scheduler stays at its start.
    step, _ = load_checkpoint(Path(ckpt), chunks, optimizer, scheduler, cfg, load_optimizer=False)
    weights = {k: v for k, v in global_view(chunks, optimizer).items()
               if not k.startswith("optimizer.")}
    check_view(weights, reference)
    errors["weights_only"] = f"step {step}, scheduler at {scheduler.num_steps}"
    # Data positions that cannot continue: the weights load, the position is None, a warning
    # says why (the format before slots; another number of slots per step).
    old = Path(tmp) / "format1"
    shutil.copytree(ckpt, old)
    meta = json.loads((old / "meta.json").read_text())
    del meta["loader_slots"]  # what a checkpoint of the per-data-parallel-rank format lacks
    (old / "meta.json").write_text(json.dumps(meta))
    import logging

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logging.getLogger("megatron_uni.training").addHandler(Keep())
    for name, path, slots in (("format1", old, 2), ("slots", Path(ckpt), 8)):
        messages: list[str] = []
        _, position = load_checkpoint(path, chunks, optimizer, scheduler, cfg,
                                      data_slots=DataSlots(slots, range(slots)))
        errors[name] = f"{position} | {' | '.join(messages)}"
    return errors


def _signal_child(rank: int, world: int) -> list[bool]:
    from megatron_uni.training.checkpoint import install_signal_handlers

    stop_requested = install_signal_handlers()
    seen = [stop_requested()]
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        os.kill(os.getpid(), sig)
        time.sleep(0.05)  # Python runs handlers between bytecodes of the main thread
        seen.append(stop_requested())
    return seen  # still alive: the default SIGTERM action would have killed this process


# --------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("ckpt") / "checkpoints"
    (ref,) = run_ranks(_train_and_save, 1, args=(str(root),), timeout=120)
    return root, ref


def test_keep_last_and_latest(saved: tuple[Path, dict]) -> None:
    root, _ = saved
    assert sorted(p.name for p in root.iterdir()) == sorted([
        LATEST_FILE, checkpoint_name(STEPS - 1), checkpoint_name(STEPS)])
    assert (root / LATEST_FILE).read_text().strip() == checkpoint_name(STEPS)
    meta = json.loads((root / checkpoint_name(STEPS) / "meta.json").read_text())
    assert meta["step"] == STEPS and meta["layout"]["world"] == 1
    assert meta["config"]["model"]["vocab_size"] == 512
    assert find_latest(root) == root / checkpoint_name(STEPS)


def test_resume_is_bit_identical(saved: tuple[Path, dict]) -> None:
    root, ref = saved
    run_ranks(_resume, 1, args=(str(root), ref), timeout=120)


def test_crash_mid_save_keeps_previous_checkpoint(saved: tuple[Path, dict], tmp_path: Path
                                                  ) -> None:
    root = tmp_path / "checkpoints"
    shutil.copytree(saved[0], root)
    with pytest.raises(AssertionError, match="exit code -9"):
        run_ranks(_crash_during_save, 1, args=(str(root),), timeout=120)
    partial = root / f"{checkpoint_name(STEPS + 1)}.tmp"
    assert any(partial.glob("*.distcp"))  # the shards were written ...
    assert find_latest(root) == root / checkpoint_name(STEPS)  # ... but are never used
    (step,) = run_ranks(_resume_after_crash, 1, args=(str(root),), timeout=120)
    assert step == STEPS
    assert sorted(p.name for p in root.iterdir()) == sorted([  # stale .tmp gone, oldest pruned
        LATEST_FILE, checkpoint_name(STEPS), checkpoint_name(STEPS + 1)])
    assert find_latest(root) == root / checkpoint_name(STEPS + 1)


def test_find_latest_falls_back(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert find_latest(tmp_path / "nothing") is None
    assert find_latest(tmp_path) is None
    for step in (5, 10):
        (tmp_path / checkpoint_name(step)).mkdir()
        (tmp_path / checkpoint_name(step) / "meta.json").write_text("{}")
        (tmp_path / checkpoint_name(step) / "metadata.json").write_text("{}")
    (tmp_path / f"{checkpoint_name(20)}.tmp").mkdir()  # an unfinished save is never chosen
    assert find_latest(tmp_path) == tmp_path / checkpoint_name(10)  # no `latest`: newest
    (tmp_path / LATEST_FILE).write_text(checkpoint_name(5))
    assert find_latest(tmp_path) == tmp_path / checkpoint_name(5)
    for garbled in ("\x00\xff garbage", checkpoint_name(7), f"{checkpoint_name(20)}.tmp"):
        (tmp_path / LATEST_FILE).write_text(garbled)
        caplog.clear()
        assert find_latest(tmp_path) == tmp_path / checkpoint_name(10)
        assert "newest complete checkpoint" in caplog.text


def test_clear_errors_without_a_model(tmp_path: Path) -> None:
    cfg = make_cfg()
    with pytest.raises(CheckpointError, match="does not exist.*checkpoint.load"):
        load_checkpoint(tmp_path / "missing", [], None, None, cfg)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a megatron-uni checkpoint"):
        load_checkpoint(tmp_path, [], None, None, cfg)
    (tmp_path / "meta.json").write_text("{}")  # ours, but megatron's part never finished
    with pytest.raises(CheckpointError, match="save did not finish"):
        load_checkpoint(tmp_path, [], None, None, cfg)


def test_clear_errors_for_bad_checkpoints(saved: tuple[Path, dict], tmp_path: Path) -> None:
    ckpt = saved[0] / checkpoint_name(STEPS)
    (errors,) = run_ranks(_load_errors, 1, args=(str(ckpt), str(tmp_path), saved[1]["view"]),
                          timeout=120)
    assert "truncated" in errors["truncated"] and str(tmp_path / "truncated") in errors["truncated"]
    assert "another model" in errors["shape"]
    assert "linear_fc1.bias (2, 256) in the checkpoint, (2, 64) here" in errors["shape"]
    assert "lacks weights this model has:" in errors["moe"] and ".experts.weight" in errors["moe"]
    assert re.search(r"\(\+\d+ more\)", errors["moe"])
    assert "moe.num_experts=0 (here 4)" in errors["moe"]
    assert "model.hidden_size=64 (here 32)" in errors["shape"]
    assert "holds distributed optimizer state; this run's optimizer is local" in errors["kind"]
    assert "parallel.distributed_optimizer=true" in errors["kind"]
    assert errors["weights_only"] == f"step {STEPS}, scheduler at 0"
    assert errors["format1"].startswith("None | ")
    assert "older per-data-parallel-rank format" in errors["format1"]
    assert "restarts at step 3" in errors["format1"]
    assert errors["slots"].startswith("None | ")
    assert "has 2 global micro-batch slots per step, this run 8" in errors["slots"]


def test_signals_set_the_stop_flag() -> None:
    (seen,) = run_ranks(_signal_child, 1, timeout=60)
    assert seen == [False, True, True]
