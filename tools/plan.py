"""Memory, compute and communication planner: which TP / PP / EP / expert-TP / DP layout to take.

    python -m tools.plan --config configs/models/uniperceiver_large_moe.yaml --gpus 8
    python -m tools.plan --config configs/models/moe_30b.yaml --gpus 64 --gpu-memory-gib 141 \
        --rows 32 --seq-len 256 --json plan.json

For the config's own layout and for every layout the validator accepts on ``--gpus`` ranks
(``megatron_uni/config/validate.py``: TP, PP, EP, expert-TP in {1, TP}, with and without full
recompute), ``tools/plan_model.py`` estimates per-rank memory, the training log's FLOPs,
communication per axis and a step time; the table ranks the layouts that fit by estimated step
time (those that do not fit follow). Every layout does the same work per step: the global batch
is ``train.global_batch_size``, or ``train.micro_batch_size x --gpus`` when unset, so a layout
with less data parallelism accumulates more micro-batches. A micro-batch is ``--rows`` rows of
``--seq-len`` tokens (default: ``train.micro_batch_size`` rows of the longest task's row length,
256 without tasks) carrying ``--conditions`` distinct routing conditions.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from typing import Sequence

from megatron_uni.config import Config, ConfigError, apply_overrides, load_config, validate
from megatron_uni.train import report_error
from tools.plan_model import Hardware, Plan, Shape, gib, human_flops, plan_layout


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def default_shape(cfg: Config, rows: int | None, seq_len: int | None, conditions: int
                  ) -> tuple[int, int, int]:
    tasks = cfg.data.tasks.values()
    seq = seq_len or max((task.seq_len for task in tasks), default=256)
    return rows or cfg.train.micro_batch_size, seq, conditions


def layout_overrides(tp: int, pp: int, ep: int, etp: int, recompute: bool) -> list[str]:
    return [f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.ep={ep}", f"parallel.etp={etp}",
            "parallel.vpp=null", "parallel.sequence_parallel=null",
            f"train.recompute={'true' if recompute else 'false'}"]


def plan_config(cfg: Config, hw: Hardware, rows: int, seq_len: int, conditions: int,
                precision: str) -> Plan:
    """The plan of ``cfg``'s own layout (raises ``ConfigError`` when the validator refuses it)."""
    gbs = cfg.train.global_batch_size or cfg.train.micro_batch_size * hw.gpus
    cfg = apply_overrides(cfg, [f"train.global_batch_size={gbs}"])
    validate(cfg, hw.gpus)
    dp = cfg.parallel.dp(hw.gpus)
    shape = Shape(rows, seq_len, conditions, gbs // (cfg.train.micro_batch_size * dp))
    return plan_layout(cfg, hw, shape, precision)


def plan_all(cfg: Config, hw: Hardware, rows: int, seq_len: int, conditions: int,
             precision: str) -> list[Plan]:
    """Every layout the validator accepts, fitting ones first, each group by step time."""
    experts = cfg.moe.num_experts if cfg.moe.enabled else 1
    plans = []
    for tp in _divisors(hw.gpus):
        for pp in _divisors(hw.gpus // tp):
            for ep in _divisors(experts):
                for etp in sorted({1, tp}) if cfg.moe.enabled else [tp]:
                    for recompute in (False, True):
                        try:
                            layout = apply_overrides(cfg, layout_overrides(tp, pp, ep, etp,
                                                                           recompute))
                            plans.append(plan_config(layout, hw, rows, seq_len, conditions,
                                                     precision))
                        except ConfigError:
                            continue
    return sorted(plans, key=lambda p: (not p.fits, p.step_s, p.total_bytes))


def layout_name(plan: Plan) -> str:
    etp = "" if plan.etp == plan.tp else f" etp{plan.etp}"
    return (f"tp{plan.tp} pp{plan.pp} ep{plan.ep}{etp} dp{plan.dp}"
            + (" +recompute" if plan.recompute else ""))


COLUMNS = ["rank", "layout", "micro-batches", "GiB/rank", "weights+grads", "optimizer",
           "activations", "MoE bufs", "fits", "experts", "TP GB", "EP GB", "DP GB", "PP GB",
           "compute s", "step s"]


def table_row(i: int, plan: Plan) -> list[str]:
    mem = plan.memory
    paths = ",".join(sorted(set(plan.execution.values()))) or "-"
    return [str(i), layout_name(plan), str(plan.micro_batches), f"{gib(plan.total_bytes):.1f}",
            f"{gib(mem['weights'] + mem['gradients']):.1f}",
            f"{gib(mem['main_weights'] + mem['adam_moments']):.1f}",
            f"{gib(mem['activations'] + mem['backward_working_set'] + mem['batch_and_mask']):.1f}",
            f"{gib(mem['moe_gathered_experts']):.1f}", "yes" if plan.fits else "NO", paths,
            *(f"{plan.comm[k] / 1e9:.2f}" for k in ("tp", "ep", "dp", "pp")),
            f"{plan.compute_s:.3f}", f"{plan.step_s:.3f}"]


def markdown(plans: list[Plan], limit: int) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for i, plan in enumerate(plans[:limit], 1):
        lines.append("| " + " | ".join(table_row(i, plan)) + " |")
    return "\n".join(lines)


def verdict(plan: Plan, hw: Hardware) -> str:
    mem = ", ".join(f"{k} {gib(v):.2f}" for k, v in plan.memory.items())
    limit = hw.headroom * hw.gpu_memory_gib
    return (f"{layout_name(plan)}: {gib(plan.total_bytes):.2f} GiB per rank of "
            f"{limit:.1f} usable ({hw.headroom:.0%} of {hw.gpu_memory_gib:g}) -> "
            f"{'fits' if plan.fits else 'does NOT fit'}; {mem}; "
            f"{human_flops(plan.flops)} per step, estimated {plan.step_s:.3f} s")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--gpus", type=int, required=True)
    p.add_argument("--gpu-memory-gib", type=float, default=141.0)
    p.add_argument("--gpu-tflops", type=float, default=400.0,
                   help="sustained matmul TFLOP/s per GPU (default 400: half an H200's bf16 peak)")
    p.add_argument("--intra-node-gbps", type=float, default=400.0, help="GB/s per GPU in a node")
    p.add_argument("--inter-node-gbps", type=float, default=50.0, help="GB/s per GPU across nodes")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--rows", type=int, default=None, help="rows of a micro-batch")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per row")
    p.add_argument("--conditions", type=int, default=2,
                   help="distinct routing conditions in a micro-batch (grouped path's merges)")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--top", type=int, default=15, help="rows of the table")
    p.add_argument("--json", nargs="?", const="-", default=None,
                   help="write every plan as JSON to this file ('-' or no value: stdout)")
    p.add_argument("overrides", nargs="*")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        return report_error(err)
    hw = Hardware(args.gpus, args.gpu_memory_gib, args.gpu_tflops, args.intra_node_gbps,
                  args.inter_node_gbps, args.gpus_per_node)
    rows, seq_len, conditions = default_shape(cfg, args.rows, args.seq_len, args.conditions)
    try:
        current: Plan | None = plan_config(cfg, hw, rows, seq_len, conditions, args.precision)
        refused = ""
    except ConfigError as err:
        current, refused = None, str(err)
    plans = plan_all(cfg, hw, rows, seq_len, conditions, args.precision)
    if args.json is not None:
        text = json.dumps({"gpus": hw.gpus, "hardware": asdict(hw), "rows": rows,
                           "seq_len": seq_len, "conditions": conditions,
                           "precision": args.precision,
                           "config_layout": current.as_dict() if current else refused,
                           "layouts": [p.as_dict() for p in plans]}, indent=1, default=str)
        if args.json == "-":
            print(text)
            return 0
        with open(args.json, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
    print(f"{cfg.model.name} on {hw.gpus} x {hw.gpu_memory_gib:g} GiB, {args.precision}, "
          f"micro-batch {rows} x {seq_len} tokens, {conditions} routing conditions")
    print("config layout: " + (verdict(current, hw) if current else f"refused: {refused}"))
    fitting = [p for p in plans if p.fits]
    print(f"{len(plans)} valid layouts, {len(fitting)} fit; ranked by estimated step time:")
    print(markdown(plans, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
