"""Routing statistics: counted by the routers of a real tiny model, shares per condition,
JSON round trip, and the heatmap tool writing a PNG.

Share convention under test: share[e] = fraction of the condition's tokens routed to expert e,
so the shares of one condition sum to top-k.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_uni.moe.stats import stats_to_json
from tests.multirank import run_ranks
from tests.unit.moe.test_fold import OVERRIDES

TASKS = ["captioning", "image_classification", "retrieval"]


def _collect(rank: int, world: int) -> dict:
    from megatron_uni.moe.stats import collect_routing_stats
    from tests.unit.models.test_generalist import _model, _task_batch

    model = _model(OVERRIDES + ["moe.router=attribute"])
    model.train()  # collect_routing_stats runs in eval and puts training back
    batches = [_task_batch(t) for t in TASKS]
    stats = collect_routing_stats(model, batches)
    # valid tokens per attribute vector over the batches, counted from the metadata
    tokens: dict[str, int] = {}
    for b in batches:
        keys = ["".join(str(int(v)) for v in row) for row in b.attributes]
        for row, key in enumerate(keys):
            tokens[key] = tokens.get(key, 0) + int(((b.attribute == row) & (b.seq_id >= 0)).sum())
    tracker = model.routing_tracker
    return {"stats": stats, "tokens": tokens, "training": model.training,
            "collect_after": tracker.collect_stats, "stats_after": len(tracker.stats())}


@pytest.fixture(scope="module")
def collected() -> dict:
    (res,) = run_ranks(_collect, 1, timeout=120)
    return res


def test_model_stats_per_layer_and_condition(collected: dict) -> None:
    stats = collected["stats"]
    assert stats["topk"] == 2 and stats["num_experts"] == 4
    assert list(stats["layers"]) == ["layer0.attn", "layer0.mlp", "layer1.attn", "layer1.mlp"]
    for layer, conditions in stats["layers"].items():
        # captioning, classification, retrieval: five of the six reference vectors
        assert {c: e["tokens"] for c, e in conditions.items()} == collected["tokens"], layer
        for entry in conditions.values():
            shares = entry["shares"]
            assert abs(sum(shares) - 2.0) < 1e-6  # each token counts its top-2 experts
            # attribute routing is segment-constant: a condition's tokens all take 2 experts
            assert sorted(shares) == [0.0, 0.0, 1.0, 1.0]
    assert stats["layers"]["layer0.mlp"]["11010101"]["name"] == "caption_text"
    # the context is as before: statistics off and empty, training mode back
    assert collected["training"] and not collected["collect_after"]
    assert collected["stats_after"] == 0


def test_json_round_trip(collected: dict, tmp_path: Path) -> None:
    path = tmp_path / "stats.json"
    path.write_text(json.dumps(collected["stats"]))
    assert json.loads(path.read_text()) == collected["stats"]


def test_shares_from_counts_and_order() -> None:
    # token routing: 3 tokens, top-2, experts 0 and 3 saw two of them, 1 and 2 one each
    ctx_stats = {
        ("layer10.mlp", "10011000"): torch.tensor([2.0, 1.0, 1.0, 2.0]),
        ("layer2.mlp", "11111111"): torch.tensor([4.0, 0.0, 0.0, 0.0]),
        ("layer2.mlp", "10011000"): torch.tensor([0.0, 4.0, 4.0, 0.0]),
    }
    out = stats_to_json(ctx_stats, topk=2)
    assert list(out["layers"]) == ["layer2.mlp", "layer10.mlp"]
    assert list(out["layers"]["layer2.mlp"]) == ["10011000", "11111111"]  # reference order first
    entry = out["layers"]["layer10.mlp"]["10011000"]
    assert entry["tokens"] == 3 and entry["name"] == "visual_input"
    assert entry["shares"] == pytest.approx([2 / 3, 1 / 3, 1 / 3, 2 / 3], abs=1e-6)
    assert out["layers"]["layer2.mlp"]["11111111"]["name"] == "11111111"
    with pytest.raises(ValueError, match="topk"):
        stats_to_json(ctx_stats, topk=0)


def test_plot_tool_writes_a_png(collected: dict, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from tools.plot_routing import main

    stats_file = tmp_path / "stats.json"
    stats_file.write_text(json.dumps(collected["stats"]))
    out = tmp_path / "plots" / "routing.png"
    assert main([str(stats_file), "--out", str(out)]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"not": "stats"}))
    assert main([str(bad), "--out", str(tmp_path / "x.png")]) == 2
