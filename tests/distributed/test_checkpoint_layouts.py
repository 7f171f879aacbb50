"""A checkpoint saved under one parallel layout resumes under another: weights and the
distributed optimizer's state (fp32 master weights, Adam moments, step) bit for bit.

Each save runs one optimizer step on 2 ranks and records every rank's pieces of every weight and
optimizer tensor by checkpoint key; the test merges them into full tensors (replicas must
agree). Each load builds the model with other random weights under another layout, loads, and
compares its pieces with those full tensors, so every tensor is checked on some rank.
The data position (saved per global micro-batch slot) comes back under any data-parallel size
that keeps the number of slots per step; RNG states only when the whole layout is.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.multirank import run_ranks
from tests.unit.training.test_checkpoint import (
    adam_steps,
    build,
    check_view,
    global_view,
    loader_state,
    make_cfg,
    merge_views,
    rng_draws,
    train_step,
)

SLOTS = 4  # global micro-batch slots per step (as for train.global_batch_size = 4 micro-batches)

MOE = ["moe.num_experts=4", "moe.layers=all"]
LOCAL = "parallel.distributed_optimizer=false"


def _layout(tp: int = 1, pp: int = 1, ep: int = 1) -> list[str]:
    return [f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.ep={ep}",
            "parallel.distributed_optimizer=true"]


def _save(rank: int, world: int, root: str, overrides: list[str]) -> dict:
    from megatron.core import parallel_state

    from megatron_uni.parallel.initialize import initialize
    from megatron_uni.training.checkpoint import save_checkpoint

    cfg = make_cfg(*overrides)
    initialize(cfg)
    chunks, optimizer, scheduler = build(cfg)
    train_step(chunks, optimizer, scheduler, 1)
    nmb = SLOTS // parallel_state.get_data_parallel_world_size()
    mine = range(parallel_state.get_data_parallel_rank() * nmb,
                 (parallel_state.get_data_parallel_rank() + 1) * nmb)
    save_checkpoint(Path(root), 1, chunks, optimizer, scheduler, loader_state(1, mine, SLOTS),
                    cfg, keep_last=1)
    return {"view": global_view(chunks, optimizer), "draws": rng_draws()}


def _load(rank: int, world: int, root: str, overrides: list[str], reference: str,
          slots: int = SLOTS) -> dict:
    from megatron.core import parallel_state

    from megatron_uni.parallel.initialize import initialize
    from megatron_uni.training.checkpoint import DataSlots, find_latest, load_checkpoint

    cfg = make_cfg(*overrides)
    initialize(cfg)
    torch.manual_seed(1000 + rank)  # other initial weights: only the load can make them agree
    chunks, optimizer, scheduler = build(cfg)
    dp_rank, nmb = parallel_state.get_data_parallel_rank(), max(
        slots // parallel_state.get_data_parallel_world_size(), 1)
    mine = range(dp_rank * nmb, (dp_rank + 1) * nmb)
    step, position = load_checkpoint(find_latest(Path(root)), chunks, optimizer, scheduler, cfg,
                                     data_slots=DataSlots(slots, mine))
    checked = check_view(global_view(chunks, optimizer), torch.load(reference))
    return {"step": step, "loader": position, "slots": (mine.start, mine.stop),
            "checked": checked, "draws": rng_draws(),
            "adam_steps": adam_steps(optimizer), "lr_steps": scheduler.num_steps}


def _saved(tmp_path_factory: pytest.TempPathFactory, name: str, world: int,
           overrides: list[str]) -> tuple[str, str, set[str], list]:
    root = tmp_path_factory.mktemp(name) / "checkpoints"
    saves = run_ranks(_save, world, args=(str(root), overrides), timeout=120)
    full = merge_views([s["view"] for s in saves])
    reference = root.parent / "reference.pt"
    torch.save(full, reference)
    assert any(k.startswith("optimizer.state.exp_avg_sq.") for k in full)
    return str(root), str(reference), set(full), [s["draws"] for s in saves]


@pytest.fixture(scope="module")
def dense_tp2(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    return _saved(tmp_path_factory, "dense_tp2", 2, _layout(tp=2))


@pytest.fixture(scope="module")
def local_tp2(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    return _saved(tmp_path_factory, "local_tp2", 2, [*_layout(tp=2), LOCAL])


@pytest.fixture(scope="module")
def moe_ep2(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    return _saved(tmp_path_factory, "moe_ep2", 2, [*MOE, *_layout(ep=2)])


def _check_loads(saved: tuple, world: int, overrides: list[str], dp: int) -> None:
    root, reference, keys, saved_draws = saved
    results = run_ranks(_load, world, args=(root, overrides, reference), timeout=120)
    assert set().union(*(r["checked"] for r in results)) == keys  # every tensor compared
    for r in results:
        assert (r["step"], r["adam_steps"], r["lr_steps"]) == (1, {1.0}, 1)
        # Saved with dp=1 (4 slots on one rank): every data-parallel size gets its slots back.
        assert r["loader"] == loader_state(1, range(*r["slots"]), SLOTS), dp
    same_layout = world == 2 and "parallel.tp=2" in overrides
    for draws, expected in zip([r["draws"] for r in results], saved_draws):
        restored = draws[:2] == expected[:2] and all(map(torch.equal, draws[2:], expected[2:]))
        assert restored == same_layout  # RNG states come back only under the saved layout


# name: (world, layout overrides, data-parallel size)
DENSE_LOADS = {"tp2-same": (2, _layout(tp=2), 1), "dp2": (2, _layout(), 2),
               "pp2": (2, _layout(pp=2), 1), "single": (1, _layout(), 1)}


@pytest.mark.parametrize("layout", list(DENSE_LOADS))
def test_dense_tp2_checkpoint_loads_under(dense_tp2: tuple, layout: str) -> None:
    _check_loads(dense_tp2, *DENSE_LOADS[layout])


def test_local_optimizer_tp2_checkpoint_loads_under_pp2(local_tp2: tuple) -> None:
    """The non-distributed optimizer's state reshards too."""
    _check_loads(local_tp2, 2, [*_layout(pp=2), LOCAL], 1)


def test_moe_ep2_checkpoint_loads_on_one_rank(moe_ep2: tuple) -> None:
    root, reference, keys, _ = moe_ep2
    (result,) = run_ranks(_load, 1, args=(root, MOE, reference), timeout=120)
    assert set(result["checked"]) == keys
    assert any(".experts." in k for k in keys)
    assert (result["step"], result["adam_steps"]) == (1, {1.0})
    # Saved by 2 data-parallel ranks (EP lives inside DP), 2 slots each: one rank gets all 4.
    assert result["loader"] == loader_state(1, range(SLOTS), SLOTS)


def test_data_position_needs_the_same_slot_count(moe_ep2: tuple) -> None:
    """Another global batch (8 slots per step instead of 4): no data position, no error."""
    root, reference, _, _ = moe_ep2
    (result,) = run_ranks(_load, 1, args=(root, MOE, reference, 2 * SLOTS), timeout=120)
    assert (result["step"], result["loader"]) == (1, None)
