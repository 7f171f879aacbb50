"""The ablation's summary: mean +- std over seeds, "-" where task routing refused, the routed
column, the chart; without training anything."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tools import ablate_routing as ablate


def _runs() -> dict[str, list[dict]]:
    seen = lambda v: {"image_cls": {"top1": v}, "held": {"r10": 0.1 + v}}  # noqa: E731
    dense = [{"metrics": seen(v), "refused": [], "route": "it"} for v in (0.2, 0.4)]
    task = [{"metrics": {"image_cls": {"top1": v}, "held": {}}, "refused": ["held"],
             "routed": {"held": {"r10": v / 2}}, "route": "it"} for v in (0.3, 0.5)]
    return {"dense": dense, "task": task}


def test_summary_means_stds_refusals_and_routed_column(tmp_path: Path) -> None:
    summary = ablate.summarise(_runs())
    assert list(summary) == ["dense", "task", "task->it"]
    mean, std, n = summary["dense"]["image_cls"]["top1"]
    assert (mean, n) == (pytest.approx(0.3), 2) and std == pytest.approx(0.1414, abs=1e-4)
    assert "held" not in summary["task"]  # refused: no value, shown as "-"
    assert summary["task->it"]["held"]["r10"][0] == pytest.approx(0.2)
    table = ablate.format_table(summary, {"held"})
    row = next(line for line in table.splitlines() if line.startswith("| held r10"))
    assert row.split("|")[2:5] == [" 40.0 +- 14.1 ", " - ", " 20.0 +- 7.1 "]
    assert "(held out, zero-shot)" in row
    assert ablate.mean_std([0.5]) == (0.5, 0.0)
    chart = ablate.plot(summary, {"held"}, tmp_path / "r.png")
    assert chart is not None and chart.stat().st_size > 1000
    json.dumps(summary)  # results.json material


def test_every_variant_and_seed_overrides() -> None:
    assert list(ablate.VARIANTS) == ["dense", "token", "modality", "task", "attribute"]
    args = ablate.variant_args("task", Path("r"), 50, 1, 7, 9, ["train.seed=1"])
    assert args.index("train.seed=7") > args.index("train.seed=1")  # the seed wins
    assert "data.seed=9" in args and "moe.router=task" in args and "parallel.ep=1" in args
