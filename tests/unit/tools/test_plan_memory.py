"""The planner's per-rank memory against the measured peak of real training steps (CPU, fp32).

Four layouts of the debug model with 4 experts (attribute routing, every other layer, experts on
qkv/out/fc1/fc2) and a 16 x 128-token captioning micro-batch, so activations are about half the
memory: TP=2, PP=2, EP=2, and TP=2 x PP=2 x EP=2 (expert-TP 1) with full recompute. "Measured"
is ``tools.plan_measure``: the largest in-use C heap during a training step (sampled after every
aten operator) minus the heap before the model was built, the largest rank's.
"""

from __future__ import annotations

import pytest

from tests.multirank import run_ranks

ROWS, SEQ_LEN = 16, 128
BASE = ["parallel.device=cpu", "train.precision=fp32", "moe.num_experts=4"]
LAYOUTS = {
    "tp2": (2, ["parallel.tp=2"]),
    "pp2": (2, ["parallel.pp=2"]),
    "ep2": (2, ["parallel.ep=2"]),
    "tp2-pp2-ep2-recompute": (4, ["parallel.tp=2", "parallel.pp=2", "parallel.ep=2",
                                  "parallel.etp=1", "train.recompute=true"]),
}


def _measure(rank: int, world: int, overrides: list[str]) -> dict:
    from megatron_uni.config import load_config
    from tools.plan_measure import measure_rank

    cfg = load_config("configs/models/debug.yaml", [*BASE, *overrides])
    return measure_rank(cfg, ROWS, SEQ_LEN)


def compare(name: str) -> tuple[float, float, dict]:
    """(planned bytes, measured bytes, the plan's terms) of one layout."""
    from megatron_uni.config import load_config
    from tools.plan_model import Hardware, Shape, plan_layout

    world, overrides = LAYOUTS[name]
    measured = run_ranks(_measure, world, (overrides,), timeout=300)
    cfg = load_config("configs/models/debug.yaml", [*BASE, *overrides])
    conditions = measured[0]["conditions"]
    plan = plan_layout(cfg, Hardware(world), Shape(ROWS, SEQ_LEN, conditions, 1), "fp32",
                       "cpu")
    return plan.total_bytes, max(r["measured_peak_bytes"] for r in measured), plan.memory


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_planned_memory_within_20_percent_of_measured(name: str) -> None:
    planned, measured, terms = compare(name)
    print(f"{name}: planned {planned / 2**20:.2f} MiB, measured {measured / 2**20:.2f} MiB, "
          f"ratio {planned / measured:.3f}; " + ", ".join(f"{k} {v / 2**20:.2f}"
                                                        for k, v in terms.items()))
    assert abs(planned / measured - 1) <= 0.20, (name, planned, measured, terms)
