"""megatron-core on our CPU backend: every layout reproduces the single-process numbers.

One process builds megatron's MoE GPT, saves it with ``dist_checkpointing`` and records the loss
of each micro-batch of a fixed global batch and the gradient of every parameter. Then 8 gloo
ranks (TP=2 x PP=2 x EP=2, so DP=2; and smaller layouts) build the model with other random weights, load the save,
run the same global batch through megatron's pipeline schedule and DDP, and compare.

Tolerance (fp32): losses within 1e-5 relative; gradients within 1e-4 relative to the largest
entry of each tensor (TP/EP reductions reorder sums; fp32 round-off is ~1e-7 per add).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.distributed.compare import check_grads, save_full_grads
from tests.multirank import run_ranks

NUM_MICROBATCHES = 4  # global batch, split over DP ranks
MICRO_BATCH = 2
SEQ_LEN = 16
LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-4


def _cfg(tp: int, pp: int, ep: int, etp: int | None = None):
    from megatron_uni.config import Config, apply_overrides

    return apply_overrides(
        Config(),
        [
            "model.num_layers=4",
            "model.hidden_size=32",
            "model.num_attention_heads=4",
            "model.ffn_hidden_size=64",
            "model.vocab_size=64",
            "model.max_text_positions=32",
            "moe.num_experts=4",
            "moe.topk=2",
            "moe.layers=all",
            "moe.aux_loss_coeff=0.01",
            f"parallel.tp={tp}",
            f"parallel.pp={pp}",
            f"parallel.ep={ep}",
            f"parallel.etp={'null' if etp is None else etp}",
            "parallel.device=cpu",
            "parallel.distributed_optimizer=false",
        ],
    )


def _run_global_batch(cfg, runtime):
    from megatron.core import parallel_state

    from tools.mcore_smoke import wrap_ddp, build_gpt_moe, synthetic_batches

    model = build_gpt_moe(cfg, runtime)
    return model, wrap_ddp(model, cfg), synthetic_batches(
        NUM_MICROBATCHES, MICRO_BATCH, SEQ_LEN, cfg.model.vocab_size, seed=7
    ), parallel_state.get_data_parallel_rank()


def _single(rank: int, world_size: int, out: str) -> list[float]:
    from megatron.core import dist_checkpointing

    from megatron_uni.parallel.initialize import initialize
    from tools.mcore_smoke import forward_backward

    cfg = _cfg(1, 1, 1)
    runtime = initialize(cfg)
    model, ddp, batches, _ = _run_global_batch(cfg, runtime)
    (Path(out) / "ckpt").mkdir()
    dist_checkpointing.save(model.sharded_state_dict(), str(Path(out) / "ckpt"))
    ddp.zero_grad_buffer()
    losses = forward_backward([ddp], batches)
    save_full_grads(model, Path(out) / "grads.pt")
    return losses


def _layout(
    rank: int, world_size: int, out: str, tp: int, pp: int, ep: int, etp: int | None
) -> dict:
    from megatron.core import dist_checkpointing, parallel_state

    from megatron_uni.parallel.initialize import initialize
    from tools.mcore_smoke import forward_backward

    cfg = _cfg(tp, pp, ep, etp)
    runtime = initialize(cfg)
    torch.manual_seed(1000 + rank)  # other random weights: only the load can make them agree
    model, ddp, batches, dp_rank = _run_global_batch(cfg, runtime)
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), str(Path(out) / "ckpt")))
    per_rank = NUM_MICROBATCHES // runtime.dp
    mine = batches[dp_rank * per_rank : (dp_rank + 1) * per_rank]
    ddp.zero_grad_buffer()
    losses = forward_backward([ddp], mine)

    checked, worst = check_grads(model, Path(out) / "grads.pt", GRAD_RTOL, rank)
    return {
        "dp_rank": dp_rank,
        "last_stage": parallel_state.is_pipeline_last_stage(),
        "losses": losses,
        "checked": checked,
        "worst": worst,
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[str, list[float]]:
    out = tmp_path_factory.mktemp("mcore_ref")
    (losses,) = run_ranks(_single, 1, args=(str(out),), timeout=120)
    assert len(losses) == NUM_MICROBATCHES and all(torch.isfinite(torch.tensor(losses)))
    return str(out), losses


@pytest.mark.parametrize(
    "world,tp,pp,ep,etp",
    [
        (8, 2, 2, 2, None),  # TP=2 x PP=2 x EP=2 (expert-TP 2), DP=2
        (2, 1, 1, 2, None),  # pure EP over the data-parallel ranks
        (4, 2, 1, 2, 1),  # TP=2 with experts whole (expert-TP 1) over EP=2
    ],
    ids=["tp2-pp2-ep2", "ep2-dp2", "tp2-ep2-etp1"],
)
def test_layout_reproduces_single_process(
    reference, world: int, tp: int, pp: int, ep: int, etp: int | None
) -> None:
    out, ref_losses = reference
    results = run_ranks(_layout, world, args=(out, tp, pp, ep, etp), timeout=300)
    dp = world // (tp * pp)
    per_rank = NUM_MICROBATCHES // dp
    for res in results:
        if res["last_stage"]:
            expected = ref_losses[res["dp_rank"] * per_rank : (res["dp_rank"] + 1) * per_rank]
            torch.testing.assert_close(
                torch.tensor(res["losses"]), torch.tensor(expected), rtol=LOSS_RTOL, atol=0.0
            )
        else:
            assert res["losses"] == []
    checked = set().union(*(r["checked"] for r in results))
    # Every parameter of the model was compared on some rank, including the TP-sharded
    # attention projections and the EP-sharded experts of every layer.
    ref_keys = set(torch.load(Path(out) / "grads.pt"))
    assert checked == ref_keys
    assert any("linear_qkv.weight" in k for k in checked)
    assert sum("local_experts" in k or "experts" in k for k in checked) >= 4 * 2
