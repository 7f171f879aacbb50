"""The planner's per-rank memory against one GPU's allocated peak, MoE-B and MoE-L (marker gpu).

One process, bf16, the trainer's model and distributed optimizer, megatron's schedule on a
36 x 256-token captioning micro-batch (the GPU check's benchmark shape); "measured" is
``torch.cuda.max_memory_allocated`` during the third step minus ``memory_allocated`` before the
model was built (``tools.plan_measure``). Within 20 % of ``tools.plan``'s estimate, as on the CPU
(tests/unit/tools/test_plan_memory.py). Not yet run on a GPU: the dry run
(``MEGATRON_UNI_GPU_DRY_RUN=1``) checks the plumbing with the debug model on the CPU in fp32.
"""

from __future__ import annotations

import os

import pytest

from tests.multirank import run_ranks

pytestmark = pytest.mark.gpu

DRY_RUN = os.environ.get("MEGATRON_UNI_GPU_DRY_RUN") == "1"
if DRY_RUN:
    CASES = {"debug": ("configs/models/debug.yaml", ["moe.num_experts=4"], 16, 128)}
    DEVICE, PRECISION = "cpu", "fp32"
else:
    CASES = {"moe-b": ("configs/models/uniperceiver_base_moe.yaml", [], 36, 256),
             "moe-l": ("configs/models/uniperceiver_large_moe.yaml", [], 36, 256)}
    DEVICE, PRECISION = "cuda", "bf16"


def _overrides(extra: list[str]) -> list[str]:
    return [f"parallel.device={DEVICE}", f"train.precision={PRECISION}",
            "model.drop_path_rate=0.0", *extra]


def _measure(rank: int, world: int, config: str, extra: list[str], rows: int, seq: int) -> dict:
    from megatron_uni.config import load_config
    from tools.plan_measure import measure_rank

    return measure_rank(load_config(config, _overrides(extra)), rows, seq)


@pytest.mark.parametrize("name", list(CASES))
def test_planned_memory_within_20_percent_of_gpu_allocated(name: str) -> None:
    from megatron_uni.config import load_config
    from tools.plan_model import Hardware, Shape, plan_layout

    config, extra, rows, seq = CASES[name]
    measured = run_ranks(_measure, 1, (config, extra, rows, seq), timeout=240)[0]
    cfg = load_config(config, _overrides(extra))
    plan = plan_layout(cfg, Hardware(1), Shape(rows, seq, measured["conditions"], 1), PRECISION,
                       DEVICE)
    ratio = plan.total_bytes / measured["measured_peak_bytes"]
    print(f"{name}: planned {plan.total_bytes / 2**30:.3f} GiB, measured "
          f"{measured['measured_peak_bytes'] / 2**30:.3f} GiB, ratio {ratio:.3f}; "
          + ", ".join(f"{k} {v / 2**30:.3f}" for k, v in plan.memory.items()))
    assert abs(ratio - 1) <= 0.20, (name, plan.memory, measured)
