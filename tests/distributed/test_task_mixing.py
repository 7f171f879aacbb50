"""Per-rank task mixing (``data.task_sampling=per_rank``) reproduces a single process that runs
the same per-replica tasks.

Two data-parallel replicas train different tasks in one step (captioning and retrieval,
classification and captioning, ...). Under per-rank mixing every rank packs its shard of every
shared target set (here the captioning vocabulary and the class names) whatever its task, the
head gathers them in one all-gather, and retrieval takes in-batch negatives only
(``data/tasks.py`` ``with_shared_targets``, ``models/heads.py``). The single process runs each
replica's micro-batches with the whole target sets and that replica's pairs alone, accumulates
the summed-loss gradients of all replicas, and divides once by the total query count: the
per-token average megatron's ``finalize_model_grads`` takes over data-parallel ranks.

Task routing is left out: the shared target sets a rank encodes carry its micro-batch's task id
(one task per micro-batch is the batch contract), so under task routing they are encoded with
another task's gate than in a single process that encodes them with their own task.

Tolerances are those of test_model_layouts.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.distributed.compare import check_grads, save_full_grads
from tests.distributed.test_model_layouts import (
    GRAD_RTOL,
    LOSS_RTOL,
    MICROBATCHES,
    _cfg,
    _grad_norm,
    _setup,
    _total,
)
from tests.multirank import run_ranks

PAIRS = 2  # samples per micro-batch of a replica
VOCAB = list(range(100, 124))  # 24 targets: 12 per rank
CLASSES = [[130 + i, 140 + i] for i in range(5)]  # 5 class names: shards of 3, one padded


def _mix(task: str, dp_rank: int, dp: int):
    """The TargetMix a rank of this task packs (as data/task_plan.py builds it)."""
    from megatron_uni.data import tasks

    sets = (
        tasks.SharedTargets("vocab:v", tuple((t,) for t in VOCAB), "vocab_target",
                            tasks.target_shard(len(VOCAB), dp_rank, dp)),
        tasks.SharedTargets("classes:c", tuple(tuple(c) for c in CLASSES), "text_target",
                            tasks.target_shard(len(CLASSES), dp_rank, dp)),
    )
    return tasks.TargetMix(sets, {"captioning": 0, "classification": 1}.get(task, -1))


def _batches(task: str, replica: int, mixed: bool, dp: int) -> list:
    """Replica ``replica``'s micro-batches of ``task``; ``mixed``: as a rank of a per-rank-mixing
    run packs them (shards of every shared set), else as a single process (whole sets)."""
    from megatron_uni.data import tasks

    out = []
    for mb in range(MICROBATCHES):
        gen = torch.Generator().manual_seed(100 + 10 * replica + mb)
        images = torch.randn(PAIRS, 1, 3, 32, 32, generator=gen)
        captions = [torch.randint(100, 124, (5,), generator=gen).tolist() for _ in range(PAIRS)]
        labels = torch.randint(0, len(CLASSES), (PAIRS,), generator=gen)
        mix = _mix(task, replica, dp) if mixed else None
        common = dict(patch_size=16, seq_len=32, mix=mix)
        if task == "retrieval":
            out.append(tasks.retrieval_batch(images, captions, **common))
        elif task == "classification":
            shard = mix.sets[1].shard if mixed else None
            out.append(tasks.classification_batch(images, labels, CLASSES, shard=shard, **common))
        else:
            shard = mix.sets[0].shard if mixed else None
            out.append(tasks.captioning_batch(images, captions, VOCAB, max_caption_len=5,
                                              shard=shard, **common))
    return out


def _single(rank: int, world: int, out: str, replica_tasks: tuple, variant: str) -> list[float]:
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
    # One schedule call per replica (their shapes differ); gradients of the loss sums add up in
    # the DDP buffers, divided once by the total count below.
    model.config.finalize_model_grads_func = None
    ddp.zero_grad_buffer()
    total = torch.zeros(2, dtype=torch.float64)
    for replica, task in enumerate(replica_tasks):
        total += _total(forward_backward([ddp], _batches(task, replica, False, 1)))
    for param in model.parameters():
        param.main_grad /= total[1]
    save_full_grads(model, Path(out) / "grads.pt")
    return total.tolist() + [_grad_norm(cfg, ddp)]


def _layout(rank: int, world: int, out: str, replica_tasks: tuple, variant: str,
            layout: tuple) -> dict:
    from megatron.core import dist_checkpointing, parallel_state

    from megatron_uni.parallel.initialize import initialize
    from megatron_uni.training.step import forward_backward

    cfg = _cfg(variant, *layout)
    runtime = initialize(cfg)
    torch.manual_seed(1000 + rank)
    model, ddp = _setup(cfg, prescaled=True)
    model.load_state_dict(
        dist_checkpointing.load(model.sharded_state_dict(), str(Path(out) / "ckpt")))
    ddp.zero_grad_buffer()
    dp_rank = parallel_state.get_data_parallel_rank()
    total = _total(forward_backward(
        [ddp], _batches(replica_tasks[dp_rank], dp_rank, True, runtime.dp)))
    checked, worst = check_grads(model, Path(out) / "grads.pt", GRAD_RTOL, rank)
    norm = _grad_norm(cfg, ddp)
    reports = (parallel_state.is_pipeline_last_stage()
               and parallel_state.get_tensor_model_parallel_rank() == 0)
    return {"total": total.tolist() if reports else None, "checked": checked, "worst": worst,
            "grad_norm": norm}


# (replica tasks, variant, (world, tp, pp, ep)); every layout has 2 data-parallel replicas.
CASES = {
    "dp2-caption+retrieval": (("captioning", "retrieval"), "dense", (2, 1, 1, 1)),
    "tp2-dp2-classify+caption": (("classification", "captioning"), "dense", (4, 2, 1, 1)),
    "pp2-dp2-retrieval+classify": (("retrieval", "classification"), "dense", (4, 1, 2, 1)),
    # EP spans the two replicas; the grouped path gathers only expert weights, so the replicas
    # may train different shapes (data/loader.py task_draw_ranks).
    "ep2-grouped-caption+classify": (("captioning", "classification"), "attribute-grouped",
                                     (2, 1, 1, 2)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_mixed_tasks_reproduce_single_process(tmp_path: Path, name: str) -> None:
    replica_tasks, variant, (world, tp, pp, ep) = CASES[name]
    (ref,) = run_ranks(_single, 1, args=(str(tmp_path), replica_tasks, variant), timeout=120)
    ref_sum, ref_count, ref_norm = ref
    results = run_ranks(_layout, world, args=(str(tmp_path), replica_tasks, variant,
                                              (tp, pp, ep, None)), timeout=240)
    totals = torch.tensor([r["total"] for r in results if r["total"] is not None]).sum(0)
    assert int(totals[1]) == int(ref_count)
    torch.testing.assert_close(float(totals[0] / totals[1]), ref_sum / ref_count,
                               rtol=LOSS_RTOL, atol=0.0)
    checked = set().union(*(r["checked"] for r in results))
    assert checked == set(torch.load(tmp_path / "grads.pt"))
    assert max(r["worst"] for r in results) <= GRAD_RTOL
    for r in results:
        assert r["grad_norm"] == pytest.approx(ref_norm, rel=1e-5)
