"""The generalist model reproduces the single-process loss and gradients under TP, PP, DP and
(with conditional MoE) EP and expert-TP.

One process builds the model (dense, or with 4 experts on qkv/out/fc1/fc2 of every layer), saves it with ``dist_checkpointing`` and runs one step's
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


# MoE variants: router/execution; no gate noise (random per step: not comparable across runs).
VARIANTS = {
    "dense": [],
    "attribute-grouped": ["moe.router=attribute", "moe.execution=grouped"],
    "attribute-dispatch": ["moe.router=attribute", "moe.execution=dispatch"],
    "token-dispatch": ["moe.router=token", "moe.execution=dispatch"],
    "token-alltoall": ["moe.router=token", "moe.execution=dispatch",
                       "moe.token_dispatcher=alltoall"],
    "attribute-alltoall": ["moe.router=attribute", "moe.execution=dispatch",
                           "moe.token_dispatcher=alltoall"],
    # router losses on: their scale (per query of the step) reaches the layouts through
    # megatron's grad_scale_func, the reference's through its finalize division (one
    # data-parallel replica only: a load-balancing loss over each replica's tokens is another
    # loss than over all of them)
    "token-losses": ["moe.router=token", "moe.execution=dispatch", "moe.aux_loss_coeff=0.5",
                     "moe.z_loss_coeff=0.1"],
}
MOE = ["moe.num_experts=4", "moe.topk=2", "moe.layers=all", "moe.noise_std=0"]


def _cfg(variant: str, tp: int, pp: int, ep: int = 1, etp: int | None = None):
    from megatron_uni.config import Config, apply_overrides

    moe = [] if variant == "dense" else MOE + VARIANTS[variant]
    return apply_overrides(
        Config(),
        [
            *moe,
            "parallel.device=cpu",
            f"parallel.tp={tp}",
            f"parallel.pp={pp}",
            f"parallel.ep={ep}",
            f"parallel.etp={'null' if etp is None else etp}",
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


def _setup(cfg, prescaled: bool = False):
    """The model in megatron's DDP. The single-process references finalise as megatron does
    (the buffers divided by the query count); the layouts as the trainer does
    (``prescaled``: the loss divided by the step's global count before the backward)."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    from megatron_uni.models.generalist import build_model
    from megatron_uni.training.step import finalize_prescaled

    model = build_model(cfg, use_cpu=True)
    ddp = DistributedDataParallel(
        model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model
    )
    model.config.finalize_model_grads_func = (finalize_prescaled if prescaled
                                              else finalize_model_grads)
    return model, ddp


def _grad_norm(cfg, ddp) -> float:
    """The global gradient norm megatron's optimizer clips by (every shard counted once)."""
    from megatron_uni.training.optimizer import build_optimizer

    optimizer = build_optimizer(cfg, [ddp], use_cpu=True, precision="fp32")
    optimizer.prepare_grads()
    return float(optimizer.get_grad_norm())


def _total(per_microbatch: list[dict]) -> torch.Tensor:
    total = torch.zeros(2, dtype=torch.float64)
    for item in per_microbatch:
        total += item["loss"].double()
    return total


def _single(rank: int, world: int, out: str, task: str, variant: str) -> list[float]:
    from megatron.core import dist_checkpointing

    from megatron_uni.parallel.initialize import initialize
    from megatron_uni.training.step import forward_backward

    cfg = _cfg(variant, 1, 1)
    initialize(cfg)
    torch.manual_seed(0)
    model, ddp = _setup(cfg)
    ckpt = Path(out) / "ckpt"
    ckpt.mkdir()
    dist_checkpointing.save(model.sharded_state_dict(), str(ckpt))
    ddp.zero_grad_buffer()
    total = _total(forward_backward([ddp], _batches(task, 0, 1)))
    save_full_grads(model, Path(out) / "grads.pt")
    return total.tolist() + [_grad_norm(cfg, ddp)]


def _layout(
    rank: int, world: int, out: str, task: str, variant: str, layout: tuple
) -> dict:
    from megatron.core import dist_checkpointing, parallel_state

    from megatron_uni.parallel.initialize import initialize
    from megatron_uni.training.step import forward_backward

    cfg = _cfg(variant, *layout)
    runtime = initialize(cfg)
    torch.manual_seed(1000 + rank)  # other weights: only the load can make them agree
    model, ddp = _setup(cfg, prescaled=True)
    model.load_state_dict(
        dist_checkpointing.load(model.sharded_state_dict(), str(Path(out) / "ckpt"))
    )
    ddp.zero_grad_buffer()
    total = _total(
        forward_backward([ddp], _batches(task, parallel_state.get_data_parallel_rank(), runtime.dp))
    )
    checked, worst = check_grads(model, Path(out) / "grads.pt", GRAD_RTOL, rank)
    norm = _grad_norm(cfg, ddp)
    reports = (
        parallel_state.is_pipeline_last_stage()
        and parallel_state.get_tensor_model_parallel_rank() == 0
    )
    return {"total": total.tolist() if reports else None, "checked": checked, "worst": worst,
            "grad_norm": norm}


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Single-process runs, made on first use per (task, variant)."""
    made: dict[tuple[str, str], tuple[str, list[float], float]] = {}

    def get(task: str, variant: str) -> tuple[str, list[float], float]:
        if (task, variant) not in made:
            out = tmp_path_factory.mktemp(f"ref_{task}_{variant}")
            (total,) = run_ranks(_single, 1, args=(str(out), task, variant), timeout=120)
            assert total[1] > 0 and torch.isfinite(torch.tensor(total)).all()
            made[(task, variant)] = (str(out), total[:2], total[2])
        return made[(task, variant)]

    return get


# (world, tp, pp, ep, etp)
DENSE_LAYOUTS = {"tp2": (2, 2, 1, 1, None), "pp2": (2, 1, 2, 1, None), "dp2": (2, 1, 1, 1, None),
                 "tp2-pp2": (4, 2, 2, 1, None)}
MOE_LAYOUTS = {"ep2": (2, 1, 1, 2, None), "tp2-ep2-etp2": (4, 2, 1, 2, None),
               "pp2-ep2": (4, 1, 2, 2, None), "tp2-ep2-etp1": (4, 2, 1, 2, 1)}
CASES = (
    [(task, "dense", name) for task in ("captioning", "retrieval") for name in DENSE_LAYOUTS]
    + [("captioning", variant, name) for variant in ("attribute-grouped", "attribute-dispatch")
       for name in MOE_LAYOUTS]
    + [("retrieval", "attribute-grouped", "tp2-ep2-etp2"),
       ("captioning", "token-dispatch", "ep2"), ("captioning", "token-dispatch", "tp2-ep2-etp2"),
       ("captioning", "token-alltoall", "ep2"), ("captioning", "attribute-alltoall", "tp2-ep2-etp1"),
       ("retrieval", "token-alltoall", "pp2-ep2"), ("captioning", "token-losses", "pp2")]
)


@pytest.mark.parametrize("task,variant,layout", CASES, ids=["-".join(c) for c in CASES])
def test_layout_reproduces_single_process(references, task: str, variant: str, layout: str
                                          ) -> None:
    out, (ref_sum, ref_count), ref_norm = references(task, variant)
    world, *sizes = {**DENSE_LAYOUTS, **MOE_LAYOUTS}[layout]
    results = run_ranks(_layout, world, args=(out, task, variant, tuple(sizes)), timeout=240)
    # One reporter per data-parallel replica: their loss sums and counts add up to the
    # single process's.
    totals = torch.tensor([r["total"] for r in results if r["total"] is not None]).sum(0)
    assert int(totals[1]) == int(ref_count)
    torch.testing.assert_close(
        float(totals[0] / totals[1]), ref_sum / ref_count, rtol=LOSS_RTOL, atol=0.0
    )
    # Every parameter of the model (experts and routers included) was compared on some rank.
    checked = set().union(*(r["checked"] for r in results))
    assert checked == set(torch.load(Path(out) / "grads.pt"))
    assert max(r["worst"] for r in results) <= GRAD_RTOL
    # The norm gradient clipping uses: every rank agrees with the single process (sharded
    # parameters counted once, replicated ones not twice).
    for r in results:
        assert r["grad_norm"] == pytest.approx(ref_norm, rel=1e-5)


def test_grouped_and_dispatch_agree_under_ddp(references) -> None:
    """Through megatron's DDP the grouped path adds its expert gradients into ``main_grad``
    itself (moe/grouped.py); the dispatch path's go through autograd: their single-process
    gradients agree, expert weights included."""
    grouped_out, grouped_loss, grouped_norm = references("captioning", "attribute-grouped")
    dispatch_out, dispatch_loss, dispatch_norm = references("captioning", "attribute-dispatch")
    a, b = torch.load(Path(grouped_out) / "grads.pt"), torch.load(Path(dispatch_out) / "grads.pt")
    assert a.keys() == b.keys() and any("experts" in k for k in a)
    for key in a:
        scale = max(float(b[key].abs().max()), 1e-12)
        assert float((a[key] - b[key]).abs().max()) / scale <= GRAD_RTOL, key
    assert grouped_loss[0] / grouped_loss[1] == pytest.approx(dispatch_loss[0] / dispatch_loss[1],
                                                              rel=LOSS_RTOL)
    assert grouped_norm == pytest.approx(dispatch_norm, rel=1e-5)
