"""Offline resharding (checkpoints_utils.reshard) of a TP=2 x PP=2 x EP=2 MoE checkpoint saved by
8 gloo ranks: to TP=1 x PP=1 x EP=1 and to TP=1 x PP=2 x EP=4. The resharded checkpoints hold
bit-identical weights and optimizer state (``inspect --compare`` finds no difference, step
included), and one more optimizer step after resuming from each gives the same state as the
original layout's next step.

The step's gradients are a function of each weight's value (sin(7 w)), so they are the same
under every layout without a data pipeline; training with real data resumed from these reshards
is tests/distributed/test_resume_layouts.py. Gradient clipping is off: the clipped
norm came out ~3% different between layouts (a global-norm question, not a checkpoint one).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from checkpoints_utils.inspect import compare
from checkpoints_utils.reshard import reshard
from tests.multirank import run_ranks
from tests.unit.training.test_checkpoint import build, global_view, make_cfg, merge_views

MOE = ["moe.num_experts=4", "moe.layers=all", "parallel.etp=1", "optim.clip_grad=0",
       "parallel.distributed_optimizer=true"]


def _layout(tp: int, pp: int, ep: int) -> list[str]:
    return [*MOE, f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.ep={ep}"]


def value_step(chunks: list, optimizer, scheduler) -> None:
    """One optimizer step with gradients sin(7 w): layout-independent."""
    for chunk in chunks:
        chunk.zero_grad_buffer()
        for param in chunk.module.parameters():
            param.main_grad.copy_(torch.sin(7.0 * param.detach().float()))
    optimizer.zero_grad()
    ok, _, _ = optimizer.step()
    assert ok
    scheduler.step(1)


def _save(rank: int, world: int, root: str) -> dict:
    from megatron_uni.parallel.initialize import initialize
    from megatron_uni.training.checkpoint import save_checkpoint

    cfg = make_cfg(*_layout(2, 2, 2))
    initialize(cfg)
    chunks, optimizer, scheduler = build(cfg)
    value_step(chunks, optimizer, scheduler)
    save_checkpoint(Path(root), 1, chunks, optimizer, scheduler, None, cfg, keep_last=0)
    value_step(chunks, optimizer, scheduler)
    return global_view(chunks, optimizer)


def _resume(rank: int, world: int, root: str, layout: list[str]) -> dict:
    from megatron_uni.parallel.initialize import initialize
    from megatron_uni.training.checkpoint import load_checkpoint

    cfg = make_cfg(*layout)
    initialize(cfg)
    torch.manual_seed(500 + rank)
    chunks, optimizer, scheduler = build(cfg)
    step, _ = load_checkpoint(Path(root), chunks, optimizer, scheduler, cfg)
    assert step == 1
    value_step(chunks, optimizer, scheduler)
    return global_view(chunks, optimizer)


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("reshard") / "tp2pp2ep2"
    views = run_ranks(_save, 8, args=(str(root),), timeout=240)
    return root, merge_views(views)


TARGETS = {"tp1pp1ep1": ((1, 1, 1), 1), "tp1pp2ep4": ((1, 2, 4), 8)}


@pytest.mark.parametrize("name", list(TARGETS))
def test_reshard_is_bit_identical_and_resumes(original: tuple, tmp_path: Path, name: str) -> None:
    root, after = original
    (tp, pp, ep), world = TARGETS[name]
    out = reshard(root, tmp_path / name, tp=tp, pp=pp, ep=ep, verbose=False)
    assert out == tmp_path / name / "iter_0000001"
    import json

    layout = json.loads((out / "meta.json").read_text())["layout"]
    assert (layout["tp"], layout["pp"], layout["ep"]) == (tp, pp, ep)
    result = compare(root, out)
    assert not (result["only_a"] or result["only_b"] or result["shape"] or result["scalars"])
    assert any(k.startswith("optimizer.state.exp_avg_sq.") and ".experts." in k
               for k in result["diff"])
    assert max(result["diff"].values()) == 0.0, {k: d for k, d in result["diff"].items() if d}

    resumed = merge_views(run_ranks(_resume, world, args=(str(out), _layout(tp, pp, ep)),
                                    timeout=240))
    assert set(resumed) == set(after)
    for key, tensor in after.items():
        torch.testing.assert_close(resumed[key], tensor, rtol=1e-5, atol=1e-6)
