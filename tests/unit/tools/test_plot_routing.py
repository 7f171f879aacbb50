"""tools.plot_routing reads what a run writes: a run directory, its routing_stats.jsonl (one
object per logged step; --step chooses, default the last) and eval.json (one heatmap per task)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from tools.plot_routing import load_panels, main  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def _stats(share: float) -> dict:
    return {"topk": 2, "num_experts": 4, "layers": {"layer0.mlp": {
        "10011000": {"name": "visual_input", "tokens": 10, "shares": [share, 1.0, 1 - share, 0]},
        "10010110": {"name": "class_target", "tokens": 4, "shares": [0, 0, 1.0, 1.0]}}}}


def _run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    lines = [{"step": s, "task": t, **_stats(s / 100)}
             for s, t in [(10, "mlm"), (20, "image_cls"), (30, "image_caption")]]
    (run / "routing_stats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (run / "eval.json").write_text(json.dumps({"metrics": {}, "tasks": {
        "image_cls": {"type": "image_classification", "routing": _stats(0.5)},
        "mlm": {"type": "mlm", "routing": _stats(0.25)},
        "dense_like": {"type": "retrieval"}}}))
    return run


def test_jsonl_default_last_step_and_chosen_step(tmp_path: Path) -> None:
    run = _run_dir(tmp_path)
    jsonl = run / "routing_stats.jsonl"
    (name, stats), = load_panels(jsonl)
    assert (name, stats["step"]) == ("image_caption", 30)
    (name, stats), = load_panels(jsonl, step=10)
    assert name == "mlm" and stats["layers"]["layer0.mlp"]["10011000"]["shares"][0] == 0.1
    out = tmp_path / "a.png"
    assert main([str(jsonl), "--step", "20", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG
    assert main([str(jsonl), "--step", "25", "--out", str(out)]) == 2  # not logged


def test_eval_json_one_heatmap_per_task(tmp_path: Path) -> None:
    run = _run_dir(tmp_path)
    assert [n for n, _ in load_panels(run / "eval.json")] == ["image_cls", "mlm"]
    out = tmp_path / "plots" / "eval.png"
    assert main([str(run / "eval.json"), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["eval-image_cls.png", "eval-mlm.png"]


def test_run_directory_and_single_object(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = _run_dir(tmp_path)
    (name, stats), = load_panels(run)  # training statistics first
    assert stats["step"] == 30
    assert [n for n, _ in load_panels(run, source="eval")] == ["image_cls", "mlm"]
    (run / "routing_stats.jsonl").unlink()
    assert len(load_panels(run)) == 2  # falls back to eval.json
    single = tmp_path / "stats.json"
    single.write_text(json.dumps(_stats(0.0)))
    out = tmp_path / "one.png"
    assert main([str(single), "--out", str(out)]) == 0 and out.exists()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"not": "stats"}))
    assert main([str(bad), "--out", str(tmp_path / "x.png")]) == 2
    assert "not routing statistics" in capsys.readouterr().err
