"""Full activation recompute under pipeline schedules reproduces the plain run exactly.

Under 1F1B with PP = 2 and two micro-batches, stage 0 runs micro-batch 1's forward before
micro-batch 0's backward, which recomputes micro-batch 0's forward. The routing conditions must
be micro-batch 0's then: they travel as an argument (moe/conditions.py), not as model state
(which made the grad norm of such a run differ by up to 14 %). The two micro-batches here differ
in their token layout (caption lengths 5 vs 2-3, so attribute rows, padding and query counts
move), and the router losses are on, so every condition a router reads matters.

Per layout (PP = 2; TP = 2 x PP = 2 x EP = 2 on 8 ranks) and router / execution path, each rank
builds the same model twice from the same seed, without and with ``train.recompute``, runs one
step's two micro-batches through megatron's schedule, and compares: the loss, every local
gradient (the layout tests' tolerances) and the routing statistics (identical counts: counted
once per micro-batch, not again in the recomputed forward).
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed.test_model_layouts import GRAD_RTOL, LOSS_RTOL, VOCAB, _cfg, _setup, _total
from tests.multirank import run_ranks

PAIRS = 4
ROWS = 6
LENGTHS = ([5, 5, 5, 5], [2, 3, 3, 2])  # caption lengths of micro-batch 0 and 1 (all ranks)
LOSSES = ["moe.aux_loss_coeff=0.01", "moe.z_loss_coeff=0.001"]


def _batches(dp_rank: int, dp: int) -> list:
    from megatron_uni.data import tasks

    out = []
    per = PAIRS // dp
    mine = slice(dp_rank * per, (dp_rank + 1) * per)
    for mb, lengths in enumerate(LENGTHS):
        gen = torch.Generator().manual_seed(200 + mb)
        images = torch.randn(PAIRS, 1, 3, 32, 32, generator=gen)
        captions = [torch.randint(100, 124, (n,), generator=gen).tolist() for n in lengths]
        shard = tasks.target_shard(len(VOCAB), dp_rank, dp) if dp > 1 else None
        out.append(tasks.captioning_batch(
            images[mine], captions[mine], VOCAB, patch_size=16, seq_len=32, max_caption_len=5,
            shard=shard, num_rows=ROWS,
        ))
    return out


def _step(variant: str, layout: tuple, recompute: bool) -> dict:
    from megatron.core import parallel_state

    from megatron_uni.config import apply_overrides
    from megatron_uni.training.metrics import gather_routing_stats
    from megatron_uni.training.step import forward_backward

    cfg = apply_overrides(_cfg(variant, *layout), [*LOSSES, f"train.recompute={recompute}"])
    torch.manual_seed(1234)
    model, ddp = _setup(cfg)
    assert (model.config.recompute_granularity == "full") == recompute
    model.routing_tracker.reset(collect_stats=True)
    ddp.zero_grad_buffer()
    batches = _batches(parallel_state.get_data_parallel_rank(),
                       parallel_state.get_data_parallel_world_size())
    total = _total(forward_backward([ddp], batches))
    grads = {n: p.main_grad.detach().clone() for n, p in model.named_parameters()}
    stats = gather_routing_stats(model.routing_tracker.stats())
    losses = model.routing_tracker.losses()
    return {"total": total, "grads": grads, "stats": stats, "router_losses": losses}


def _compare(rank: int, world: int, variant: str, layout: tuple) -> dict:
    from megatron.core import parallel_state

    from megatron_uni.parallel.initialize import initialize

    initialize(_cfg(variant, *layout))
    plain, again = _step(variant, layout, False), _step(variant, layout, True)
    last = parallel_state.is_pipeline_last_stage()
    loss = (float(plain["total"][0] / plain["total"][1]),
            float(again["total"][0] / again["total"][1])) if last else None
    worst = 0.0
    for name, g in plain["grads"].items():
        scale = max(float(g.abs().max()), 1e-12)
        worst = max(worst, float((again["grads"][name] - g).abs().max()) / scale)
    return {
        "loss": loss,
        "worst": worst,
        "num_grads": len(plain["grads"]),
        "stats_equal": (plain["stats"].keys() == again["stats"].keys()
                        and all(torch.equal(plain["stats"][k], again["stats"][k])
                                for k in plain["stats"])),
        "num_stats": len(plain["stats"]),
        "router_losses": (plain["router_losses"], again["router_losses"]),
    }


VARIANTS = ["attribute-grouped", "attribute-dispatch", "token-dispatch"]
LAYOUTS = {"pp2": (2, 1, 2, 1, None), "tp2-pp2-ep2": (8, 2, 2, 2, None)}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("variant", VARIANTS)
def test_recompute_under_pipeline_matches_plain_run(variant: str, layout: str) -> None:
    world, *sizes = LAYOUTS[layout]
    results = run_ranks(_compare, world, args=(variant, tuple(sizes)), timeout=300)
    losses = [r["loss"] for r in results if r["loss"] is not None]
    assert losses
    for plain, again in losses:
        assert again == pytest.approx(plain, rel=LOSS_RTOL, abs=0.0)
    assert all(r["num_grads"] > 0 for r in results)
    assert max(r["worst"] for r in results) <= GRAD_RTOL, [r["worst"] for r in results]
    # routing statistics: every MoE layer of both stages counted, identical counts
    assert all(r["stats_equal"] for r in results)
    assert all(r["num_stats"] >= 4 for r in results)
    for r in results:
        plain, again = r["router_losses"]
        assert plain.keys() == again.keys() and plain
        for name in plain:
            assert again[name] == pytest.approx(plain[name], rel=1e-5), name
