"""Training resumed from a resharded checkpoint continues with the original layout's losses.

A tiny attribute-routed MoE (demo config) trains 3 steps under TP=2 x PP=2 x EP=2 on 8 gloo ranks
(data-parallel size 2) through the real entry point (``megatron_uni.train.main``) and saves. The
checkpoint is resharded (``checkpoints_utils.reshard``) to TP=1 x PP=1 x EP=1 and to
TP=1 x PP=2 x EP=4. Then 3 more steps run from (a) the original checkpoint under the original
layout, (b) the 1x1x1 checkpoint on 1 rank (data-parallel size 1) and (c) the 1x2x4 checkpoint on
8 ranks (data-parallel size 4). With the global batch fixed (4 micro-batch slots per step), the
data position travels per slot, so every run trains on the same samples in the same steps, and
(b) and (c) must report (a)'s per-step losses.

What makes the losses comparable, and why each setting is what it is:
- losses are per-query sums divided by the global query count (classification, MLM, captioning:
  ``megatron_uni/models/heads.py``), so it does not matter which rank holds which micro-batch;
  retrieval (weight 0 here) is left out: its in-batch negatives depend on the grouping;
- ``moe.aux_loss_coeff=0`` and ``moe.z_loss_coeff=0``: the router losses are computed over each
  rank's local tokens, which another data-parallel size groups differently;
- ``moe.noise_std=0`` (the default is 1/E) and ``model.drop_path_rate=0`` (the model has no
  dropout): random draws come from per-rank RNG states, which another layout does not restore.
Seen: the largest relative difference of (b) and (c) from (a) is ~1e-7 (float32 sums in another
order); the test allows 1e-5.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from checkpoints_utils.reshard import reshard
from tests.multirank import run_ranks

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "runs" / "demo.yaml"
SAVED_AT, STEPS = 3, 6
REL_TOL = 1e-5
SETTINGS = [
    "moe.noise_std=0", "moe.aux_loss_coeff=0", "moe.z_loss_coeff=0", "model.drop_path_rate=0",
    "data.tasks.image_text_retrieval.weight=0", "data.reader_streams=1", "data.num_workers=0",
    "train.micro_batch_size=4", "train.global_batch_size=16",  # 4 slots per step
    f"train.steps={STEPS}", "logging.log_interval=1", "logging.tensorboard=false",
    "checkpoint.save_interval=0", "checkpoint.keep_last=0", "parallel.etp=1",
    # Resumes under other data-parallel sizes compare step by step: one task per step keeps
    # that order whatever the size (per-rank mixing ties it to the draw units).
    "data.task_sampling=per_step",
]


def _layout(tp: int, pp: int, ep: int) -> list[str]:
    return [f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.ep={ep}"]


def _train(rank: int, world: int, overrides: list[str]) -> int:
    from megatron_uni.train import main

    return main(["--config", str(DEMO), *overrides])


def _run(world: int, data: Path, run_dir: Path, *overrides: str) -> dict[int, tuple[str, float]]:
    """Train on ``world`` ranks; the (task, loss) of each step logged in ``run_dir`` (a resumed
    run appends to its run dir's metrics.jsonl)."""
    codes = run_ranks(_train, world, args=([f"data.root={data}", f"train.run_dir={run_dir}",
                                            *SETTINGS, *overrides],), timeout=600)
    assert codes == [0] * world
    records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: (r["task"], r["loss"]) for r in records}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, demo_root: Path
         ) -> dict[str, dict[int, tuple[str, float]]]:
    tmp = tmp_path_factory.mktemp("resume_layouts")
    data = demo_root
    original = tmp / "tp2pp2ep2"
    first = _run(8, data, original, *_layout(2, 2, 2), f"train.stop_at_step={SAVED_AT}")
    assert sorted(first) == list(range(1, SAVED_AT + 1))
    saved = original / "checkpoints" / f"iter_{SAVED_AT:07d}"
    out: dict[str, dict[int, tuple[str, float]]] = {}
    resumed = _run(8, data, original, *_layout(2, 2, 2))  # resumes from its latest
    assert all(resumed[step] == first[step] for step in first)
    out["a"] = {step: resumed[step] for step in range(SAVED_AT + 1, STEPS + 1)}
    for name, (tp, pp, ep), world in (("b", (1, 1, 1), 1), ("c", (1, 2, 4), 8)):
        target = reshard(saved, tmp / f"resharded_{name}", tp=tp, pp=pp, ep=ep, verbose=False)
        meta = json.loads((target / "meta.json").read_text())
        assert meta["loader_slots"] == 4 and meta["layout"]["dp"] == world // (tp * pp)
        out[name] = _run(world, data, tmp / f"run_{name}", *_layout(tp, pp, ep),
                         f"checkpoint.load={target}")
    return out


@pytest.mark.parametrize("name", ["b", "c"])
def test_resumed_from_resharded_checkpoint_trains_like_the_original(runs: dict, name: str
                                                                     ) -> None:
    original, resumed = runs["a"], runs[name]
    assert sorted(original) == sorted(resumed) == list(range(SAVED_AT + 1, STEPS + 1))
    assert len({task for task, _ in original.values()}) > 1  # several tasks checked
    rel = {}
    for step in original:
        (task_a, loss_a), (task_b, loss_b) = original[step], resumed[step]
        assert task_a == task_b, step
        rel[step] = abs(loss_b - loss_a) / abs(loss_a)
    print(f"({name}) relative loss differences from (a) per step: {rel}")
    assert max(rel.values()) <= REL_TOL, (rel, original, resumed)
