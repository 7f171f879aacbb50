"""The generalist model reproduces the single-process loss and gradients under TP, PP and DP.

One process builds the dense model, saves it with ``dist_checkpointing`` and runs one step's
global batch (2 micro-batches) of a task, recording the loss and every parameter's gradient.
Each layout then builds the model with other random weights, loads the save, runs the same
global batch (each data-parallel rank its share: retrieval pairs split across ranks, whose
negatives come back through the cross-rank gather; captioning's vocabulary target set split
across ranks and gathered) through megatron's pipeline schedule and DDP, and compares.

Tolerance (fp32): loss within 1e-5 relative; gradients within 1e-4 relative to each tensor's
largest entry (floored at 1e-5 of the model's largest gradient, see compare.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.distributed.compare import check_grads, save_full_grads
from tests.multirank import run_ranks

MICROBATCHES = 2
PAIRS = 4  # retrieval pairs / captioned images per micro-batch over the whole global batch
VOCAB = list(range(100, 124))
LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-4


def _cfg(tp: int, pp: int):
    from megatron_uni.config import Config, apply_overrides

    return apply_overrides(
        Config(),
        [
            "parallel.device=cpu",
            f"parallel.tp={tp}",
            f"parallel.pp={pp}",
            "parallel.distributed_optimizer=false",
            "model.num_layers=2",
            "model.drop_path_rate=0.0",  # random per step: not comparable across processes
            "model.max_frames=1",  # no random temporal offset for 1-frame clips
            # The reference's 1e-3 LayerScale leaves most gradients at 1e-10..1e-12 at init,
            # where a comparison would only see rounding: start from 1 to test real signal.
            "model.layer_scale_init=1.0",
            # At std 0.02 every sequence's SPE feature starts at cosine 0.9999 to every other:
            # the retrieval loss is then a difference of near-equal numbers and its gradients
            # amplify fp32 rounding 1e4-fold. std 0.2 gives cosines 0.72..0.96.
            "model.init_method_std=0.2",
        ],
    )


def _global_data(task: str, mb: int):
    gen = torch.Generator().manual_seed(100 + mb)
    images = torch.randn(PAIRS, 1, 3, 32, 32, generator=gen)
    captions = [torch.randint(100, 124, (5,), generator=gen).tolist() for _ in range(PAIRS)]
    return images, captions


def _batches(task: str, dp_rank: int, dp: int) -> list:
    """This data-parallel rank's micro-batches (dp=1: the whole global batch)."""
    from megatron_uni.data import tasks

    out = []
    per = PAIRS // dp
    mine = slice(dp_rank * per, (dp_rank + 1) * per)
    for mb in range(MICROBATCHES):
        images, captions = _global_data(task, mb)
        if task == "retrieval":
            out.append(tasks.retrieval_batch(images[mine], captions[mine], patch_size=16, seq_len=32))
        else:
            shard = tasks.target_shard(len(VOCAB), dp_rank, dp) if dp > 1 else None
            out.append(tasks.captioning_batch(
                images[mine], captions[mine], VOCAB, patch_size=16, seq_len=32,
                max_caption_len=5, shard=shard,
            ))
    return out


def _setup(cfg):
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    from megatron_uni.models.generalist import build_model

    model = build_model(cfg, use_cpu=True)
    ddp = DistributedDataParallel(
        model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model
    )
    model.config.finalize_model_grads_func = finalize_model_grads
    return model, ddp


def _total(per_microbatch: list[dict]) -> torch.Tensor:
    total = torch.zeros(2, dtype=torch.float64)
    for item in per_microbatch:
        total += item["loss"].double()
    return total


def _single(rank: int, world: int, out: str, task: str) -> list[float]:
    from megatron.core import dist_checkpointing

    from megatron_uni.parallel.initialize import initialize
    from megatron_uni.training.step import forward_backward

    cfg = _cfg(1, 1)
    initialize(cfg)
    torch.manual_seed(0)
    model, ddp = _setup(cfg)
    ckpt = Path(out) / "ckpt"
    ckpt.mkdir()
    dist_checkpointing.save(model.sharded_state_dict(), str(ckpt))
    ddp.zero_grad_buffer()
    total = _total(forward_backward([ddp], _batches(task, 0, 1)))
    save_full_grads(model, Path(out) / "grads.pt")
    return total.tolist()


def _layout(rank: int, world: int, out: str, task: str, tp: int, pp: int) -> dict:
    from megatron.core import dist_checkpointing, parallel_state

    from megatron_uni.parallel.initialize import initialize
    from megatron_uni.training.step import forward_backward

    cfg = _cfg(tp, pp)
    runtime = initialize(cfg)
    torch.manual_seed(1000 + rank)  # other weights: only the load can make them agree
    model, ddp = _setup(cfg)
    model.load_state_dict(
        dist_checkpointing.load(model.sharded_state_dict(), str(Path(out) / "ckpt"))
    )
    ddp.zero_grad_buffer()
    total = _total(
        forward_backward([ddp], _batches(task, parallel_state.get_data_parallel_rank(), runtime.dp))
    )
    checked, worst = check_grads(model, Path(out) / "grads.pt", GRAD_RTOL, rank)
    reports = (
        parallel_state.is_pipeline_last_stage()
        and parallel_state.get_tensor_model_parallel_rank() == 0
    )
    return {"total": total.tolist() if reports else None, "checked": checked, "worst": worst}


@pytest.fixture(scope="module", params=["captioning", "retrieval"])
def reference(request, tmp_path_factory) -> tuple[str, str, list[float]]:
    out = tmp_path_factory.mktemp(f"model_ref_{request.param}")
    (total,) = run_ranks(_single, 1, args=(str(out), request.param), timeout=120)
    assert total[1] > 0 and torch.isfinite(torch.tensor(total)).all()
    return request.param, str(out), total


@pytest.mark.parametrize(
    "world,tp,pp",
    [(2, 2, 1), (2, 1, 2), (2, 1, 1), (4, 2, 2)],
    ids=["tp2", "pp2", "dp2", "tp2-pp2"],
)
def test_layout_reproduces_single_process(reference, world: int, tp: int, pp: int) -> None:
    task, out, (ref_sum, ref_count) = reference
    results = run_ranks(_layout, world, args=(out, task, tp, pp), timeout=240)
    # One reporter per data-parallel replica: their loss sums and counts add up to the
    # single process's.
    totals = torch.tensor([r["total"] for r in results if r["total"] is not None]).sum(0)
    assert int(totals[1]) == int(ref_count)
    torch.testing.assert_close(
        float(totals[0] / totals[1]), ref_sum / ref_count, rtol=LOSS_RTOL, atol=0.0
    )
    # Every parameter of the model was compared on some rank.
    checked = set().union(*(r["checked"] for r in results))
    assert checked == set(torch.load(Path(out) / "grads.pt"))
    assert max(r["worst"] for r in results) <= GRAD_RTOL
