"""tools.plan and tools.param_count: counts of every preset, the planner's FLOPs, layouts, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_uni.config import load_config, validate
from megatron_uni.training.metrics import step_flops

PRESETS = ["uniperceiver_tiny_moe", "uniperceiver_base_moe", "uniperceiver_large_moe",
           "moe_2b", "moe_8b", "moe_30b"]


@pytest.mark.parametrize("name", PRESETS)
def test_preset_builds_with_the_arithmetic_count(name: str) -> None:
    from tools.param_count import arithmetic_count, built_count, moe_counts

    cfg = load_config(f"configs/models/{name}.yaml")
    assert built_count(cfg) == arithmetic_count(cfg)
    counts = moe_counts(cfg)
    # the scaled presets are the sizes their names promise
    expected = {"moe_2b": (2e9, 2.5e9), "moe_8b": (7.5e9, 9e9), "moe_30b": (30e9, 35e9)}
    low, high = expected.get(name, (0, float("inf")))
    assert low <= counts["total"] <= high
    assert counts["per_expert"] * cfg.moe.num_experts == counts["expert_params"]
    assert counts["active_per_token"] < counts["total"]


def test_param_count_agrees_for_moe_large(capsys: pytest.CaptureFixture) -> None:
    from tools.param_count import main

    assert main(["--config", "configs/models/uniperceiver_large.yaml", "moe.num_experts=8"]) == 0
    out = capsys.readouterr().out
    assert "1,413,663,748" in out and "deploy_one_condition" in out
    # folded for one condition, MoE-L is the dense Large model
    assert "355,458,052" in out


def test_planner_flops_are_the_training_logs() -> None:
    from tools.plan_model import Hardware, Shape, plan_layout

    cfg = load_config("configs/models/uniperceiver_base_moe.yaml", ["parallel.ep=2"])
    plan = plan_layout(cfg, Hardware(8), Shape(16, 256, 2, 3), "bf16")
    assert plan.flops == step_flops(cfg, 16 * 256 * 3 * plan.dp, 256)


def test_every_planned_layout_is_valid_and_sharding_shrinks_memory() -> None:
    from tools.plan import layout_overrides, plan_all
    from tools.plan_model import Hardware
    from megatron_uni.config import apply_overrides

    cfg = load_config("configs/models/uniperceiver_large_moe.yaml",
                      ["train.micro_batch_size=8", "train.global_batch_size=64"])
    plans = plan_all(cfg, Hardware(8), 8, 256, 2, "bf16")
    assert plans and all(p.fits for p in plans)
    assert [p.step_s for p in plans] == sorted(p.step_s for p in plans)
    for plan in plans:
        layout = apply_overrides(cfg, layout_overrides(plan.tp, plan.pp, plan.ep, plan.etp,
                                                       plan.recompute))
        validate(layout, 8)
        assert plan.dp * plan.tp * plan.pp == 8
    by_layout = {(p.tp, p.pp, p.ep, p.etp, p.recompute): p for p in plans}
    base = by_layout[(1, 1, 1, 1, False)]
    # EP shards the experts; recompute drops activations; PP splits the layers
    assert by_layout[(1, 1, 8, 1, False)].memory["weights"] < base.memory["weights"]
    assert by_layout[(1, 1, 1, 1, True)].memory["activations"] < base.memory["activations"]
    assert by_layout[(1, 2, 1, 1, False)].memory["weights"] < base.memory["weights"]


def test_plan_cli_table_and_json(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from tools.plan import main

    out = tmp_path / "plan.json"
    assert main(["--config", "configs/models/moe_30b.yaml", "--gpus", "8", "--gpu-memory-gib",
                 "80", "--seq-len", "256", "--json", str(out), "train.micro_batch_size=8"]) == 0
    text = capsys.readouterr().out
    assert "config layout: tp1 pp1 ep1 dp8" in text and "does NOT fit" in text
    report = json.loads(out.read_text())
    assert report["layouts"] and report["layouts"][0]["fits"] is True
    assert {"weights", "gradients", "adam_moments", "activations"} <= set(
        report["layouts"][0]["memory"])
