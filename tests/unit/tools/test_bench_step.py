"""tools.bench_step and its counters: the tool runs on 1 and 2 gloo ranks and writes every
column; FLOPs, collective bytes and saved-activation bytes match hand counts. No timings are
asserted (the machine is shared)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.multirank import run_ranks

TINY = [
    "model.hidden_size=32", "model.num_layers=2", "model.num_attention_heads=2",
    "model.ffn_hidden_size=64", "model.image_size=32", "moe.num_experts=4",
]
ARGS = ["--config", "configs/runs/bench_cpu.yaml", "--rows", "9", "--seq-len", "24",
        "--steps", "1", "--warmup", "0"]


def test_step_flops_match_a_hand_count() -> None:
    from megatron_uni.config import Config, apply_overrides
    from megatron_uni.training.metrics import step_flops

    cfg = apply_overrides(Config(), [
        "model.num_layers=2", "model.hidden_size=8", "model.num_attention_heads=2",
        "model.ffn_hidden_size=16", "moe.num_experts=4", "moe.topk=2", "moe.layers=[0]",
        "moe.linears=[qkv,fc1]"])
    h, f, s, k = 8, 16, 10, 2
    attention = 4 * s * h
    layer0 = 2 * (3 * h * h * k + h * h + h * f * k + h * f) + attention  # qkv, fc1 are experts
    layer1 = 2 * (3 * h * h + h * h + 2 * h * f) + attention
    assert step_flops(cfg, tokens=20, seq_len=s) == 3 * 20 * (layer0 + layer1)
    dense = apply_overrides(cfg, ["moe.num_experts=0"])
    assert step_flops(dense, tokens=20, seq_len=s) == 3 * 20 * 2 * layer1


def test_saved_activation_counter_counts_a_known_graph() -> None:
    from tools.bench_counters import SavedActivationCounter

    weight = torch.nn.Parameter(torch.randn(3, 5))
    x = torch.randn(4, 5, requires_grad=True)
    with SavedActivationCounter([weight]) as saved:
        y = torch.nn.functional.linear(x, weight)  # saves x (80 B) and the weight (excluded)
        z = torch.sin(y)  # saves y (48 B)
        w = z * z  # saves z twice: one storage (48 B)
    w.sum().backward()
    assert saved.bytes == 4 * (4 * 5 + 4 * 3 + 4 * 3)
    assert saved.tensors == 3


def _count_collectives(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from tools.bench_counters import CollectiveCounter

    dist.init_process_group("gloo")
    single = dist.new_group([0]) if rank == 0 else dist.new_group([0])
    x = torch.full((4, 8), float(rank))
    out = torch.empty(4 * world, 8)
    with CollectiveCounter() as comm:
        dist.all_gather_into_tensor(out, x)
        dist.all_reduce(torch.ones(10, dtype=torch.float64))
        parts = [torch.empty(3) for _ in range(world)]
        dist.all_gather(parts, torch.ones(3), group=None)
        if rank == 0:
            dist.all_reduce(torch.ones(100), group=single)  # one rank: moves nothing
    # restored after the block
    assert dist.all_gather_into_tensor.__name__ == "all_gather_into_tensor"
    assert out[4:].eq(1.0).all()
    dist.destroy_process_group()
    return comm.bytes


def test_collective_counter_counts_known_calls_exactly() -> None:
    counts = run_ranks(_count_collectives, world_size=2, timeout=60)
    for per_rank in counts:
        assert per_rank == {"all_gather_into_tensor": 2 * 4 * 8 * 4, "all_reduce": 10 * 8,
                            "all_gather": 2 * 3 * 4}


def _bench(rank: int, world: int, out: str, variants: str, extra: list[str]) -> None:
    from tools.bench_step import main

    assert main([*ARGS, "--variants", variants, "--json", f"{out}/b.json",
                 "--markdown", f"{out}/b.md", *TINY, *extra]) == 0


def _check_report(out: Path, variants: list[str]) -> dict:
    from tools.bench_report import COLUMNS

    report = json.loads((out / "b.json").read_text())
    assert [r["variant"] for r in report["variants"]] == variants
    for row in report["variants"]:
        if "skipped" in row:
            continue
        assert row["ms"]["step"] > 0 and row["ms"]["fwd_bwd"] > 0
        # tokens: real ones (our batch pads a little at this size), over every rank
        assert row["flops"] > 0 and 0 < row["tokens"] <= 9 * 24 * report["world_size"]
        assert row["saved_activation_bytes"] > 0
        for key in ("tokens_per_s", "tflops_per_rank", "mfu", "peak_memory_bytes",
                    "expert_param_bytes", "collective_bytes_per_step"):
            assert key in row
    md = (out / "b.md").read_text()
    assert "| " + " | ".join(COLUMNS) + " |" in md
    assert md.count("\n| ") == len(variants) + 1
    return report


def test_bench_step_one_rank_writes_every_column(tmp_path: Path) -> None:
    variants = ["dense", "attr-grouped", "token-dispatch", "mcore-dense", "mcore-moe",
                "ref-dense", "ref-merged"]
    run_ranks(_bench, 1, (str(tmp_path), ",".join(variants), []), timeout=240)
    report = _check_report(tmp_path, variants)
    rows = {r["variant"]: r for r in report["variants"]}
    assert rows["dense"]["expert_param_bytes"] == 0
    assert rows["attr-grouped"]["expert_param_bytes"] > 0
    assert rows["mcore-moe"]["expert_param_bytes"] > 0 == rows["mcore-dense"]["expert_param_bytes"]
    assert rows["ref-merged"]["ms"]["forward"] is not None  # one stage: phases measured
    assert rows["dense"]["collective_bytes_per_step"] == {}  # one rank: nothing moves


def test_bench_step_two_ranks_expert_parallel(tmp_path: Path) -> None:
    variants = ["dense", "attr-grouped", "attr-dispatch"]
    run_ranks(_bench, 2, (str(tmp_path), ",".join(variants), ["parallel.ep=2", "--rounds", "2"]),
              timeout=240)
    report = _check_report(tmp_path, variants)
    rows = {r["variant"]: r for r in report["variants"]}
    # two rounds of one timed step each, pooled per rank
    assert report["rounds"] == 2 and "2 steps in 2 rounds" in (tmp_path / "b.md").read_text()
    for row in rows.values():
        assert [(r["rounds"], len(r["ms_all_steps"])) for r in row["per_rank"]] == [(2, 2)] * 2
    # EP=2 holds half of the 4 experts per rank: 2 ranks' expert bytes equal and positive
    per_rank = [r["expert_param_bytes"] for r in rows["attr-grouped"]["per_rank"]]
    assert len(per_rank) == 2 and per_rank[0] == per_rank[1] > 0
    assert sum(rows["dense"]["collective_bytes_per_step"].values()) > 0  # DP=2 reduces grads


def test_rounds_alternate_the_order_and_pool_every_timed_step() -> None:
    from tools.bench_measure import round_order, summarize

    assert round_order(["a", "b", "c"], 3) == [
        (0, "a"), (0, "b"), (0, "c"), (1, "c"), (1, "b"), (1, "a"), (2, "a"), (2, "b"), (2, "c")]

    def one_round(steps: list[float], peak: int, comm: dict) -> dict:
        return {"seconds": {"step": steps, "fwd_bwd": [t / 2 for t in steps], "forward": [],
                            "backward": [], "optimizer": []},
                "peak_memory_bytes": peak, "expert_param_bytes": 8, "saved_activation_bytes": 4,
                "collective_bytes_per_step": comm}

    out = summarize([one_round([0.010, 0.030], 100, {"all_reduce": 5}),
                     one_round([0.020], 300, {"all_gather": 7})])
    assert out["ms"]["step"] == 20.0 and out["ms"]["fwd_bwd"] == 10.0  # median of all 3 steps
    assert out["ms"]["forward"] is None  # no phases seen (several pipeline stages)
    assert out["ms_all_steps"] == [10.0, 30.0, 20.0] and out["rounds"] == 2
    assert out["peak_memory_bytes"] == 300
    assert out["collective_bytes_per_step"] == {"all_gather": 7, "all_reduce": 5}


def test_bad_step_counts_are_refused_with_the_flag_named(capsys) -> None:  # noqa: ANN001
    from tools.bench_step import main

    assert main([*ARGS[:2], "--rounds", "0"]) != 0
    err = capsys.readouterr().err
    assert "--rounds" in err and "at least 1" in err
