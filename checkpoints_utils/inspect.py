"""What a checkpoint holds, and how two checkpoints differ regardless of their layouts.

    python -m checkpoints_utils.inspect DIR                  # layout, config, step, tensors, counts
    python -m checkpoints_utils.inspect DIR --compare DIR2   # largest |difference| per tensor

DIR: an ``iter_XXXXXXX`` directory or a save root (its latest). ``--compare`` exits 1 when a
tensor differs by more than ``--atol`` (default 0: bit-identical) or the key sets/shapes differ.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch

from checkpoints_utils.common import (
    is_optimizer_key,
    open_checkpoint,
    read_common,
    read_tensors,
    run_cli,
    tensor_index,
)


def parameter_counts(index: dict[str, tuple[tuple[int, ...], Any]], num_experts: int
                     ) -> dict[str, int]:
    """total (all weights), experts (all experts' weights), per_expert, shared (the rest)."""
    weights = {k: shape for k, (shape, _) in index.items() if not is_optimizer_key(k)}
    total = sum(math.prod(s) for s in weights.values())
    experts = sum(math.prod(s) for k, s in weights.items() if ".experts." in k)
    per_expert = experts // num_experts if num_experts else 0
    return {"total": total, "experts": experts, "per_expert": per_expert,
            "shared": total - experts}


def scalar_state(path: Path) -> dict[str, Any]:
    """Step, scheduler and optimizer param-group scalars (Adam step, lr) from common.pt."""
    common = read_common(path)
    out: dict[str, Any] = {"step": common.get("step")}
    for k, v in (common.get("scheduler") or {}).items():
        out[f"scheduler.{k}"] = v
    optim = common.get("optimizer") or {}
    groups = [g for o in (optim.values() if isinstance(optim, dict) else [])
              if isinstance(o, dict) for g in (o.get("optimizer") or {}).get("param_groups", [])]
    groups += (optim.get("optimizer") or {}).get("param_groups", []) if isinstance(
        optim, dict) and isinstance(optim.get("optimizer"), dict) else []
    out["optimizer.param_group_steps"] = sorted({float(g.get("step", 0)) for g in groups})
    out["optimizer.lrs"] = sorted({float(g["lr"]) for g in groups if "lr" in g})
    return out


def summary(path: str | Path) -> dict[str, Any]:
    resolved, meta = open_checkpoint(path)
    index = tensor_index(resolved)
    num_experts = int(meta.get("config", {}).get("moe", {}).get("num_experts") or 0)
    return {"path": str(resolved), "step": meta["step"], "layout": meta["layout"],
            "optimizer": meta.get("optimizer"), "config": meta.get("config", {}),
            "tensors": {k: {"shape": list(s), "dtype": str(d).replace("torch.", "")}
                        for k, (s, d) in index.items()},
            "parameters": parameter_counts(index, num_experts), "num_experts": num_experts,
            "scalars": scalar_state(resolved)}


def compare(path_a: str | Path, path_b: str | Path) -> dict[str, Any]:
    """{"diff": {key: max |a-b|}, "only_a": [...], "only_b": [...], "shape": {key: (sa, sb)}}."""
    a, _ = open_checkpoint(path_a)
    b, _ = open_checkpoint(path_b)
    ia, ib = tensor_index(a), tensor_index(b)
    common = [k for k in ia if k in ib]
    shape = {k: (ia[k][0], ib[k][0]) for k in common if ia[k][0] != ib[k][0]}
    keys = [k for k in common if k not in shape]
    diff: dict[str, float] = {}
    batches, batch, size = [], [], 0
    for k in keys:  # bounded memory: about 1 GiB of tensors per read
        batch.append(k)
        size += math.prod(ia[k][0]) * ia[k][1].itemsize
        if size > 2**30:
            batches.append(batch)
            batch, size = [], 0
    batches += [batch] if batch else []
    for batch in batches:
        ta, tb = read_tensors(a, batch), read_tensors(b, batch)
        for k in batch:
            x, y = ta[k].double(), tb[k].double()
            same_nan = torch.isnan(x) & torch.isnan(y)
            d = (x - y).abs().masked_fill(same_nan, 0.0)
            diff[k] = float(d.max()) if d.numel() else 0.0
    sa, sb = scalar_state(a), scalar_state(b)
    scalars = {k: (sa.get(k), sb.get(k)) for k in sorted(set(sa) | set(sb))
               if sa.get(k) != sb.get(k)}
    return {"a": str(a), "b": str(b), "diff": diff, "shape": shape, "scalars": scalars,
            "only_a": [k for k in ia if k not in ib], "only_b": [k for k in ib if k not in ia]}


def _print_summary(info: dict[str, Any], show_config: bool) -> None:
    print(f"checkpoint {info['path']}")
    print(f"step       {info['step']}")
    print("layout     " + " ".join(f"{k}={v}" for k, v in info["layout"].items()))
    print(f"optimizer  {info['optimizer']} " + " ".join(
        f"{k.split('.')[-1]}={v}" for k, v in info["scalars"].items() if k.startswith("optim")))
    if show_config:
        print("config     " + json.dumps(info["config"], indent=1).replace("\n", "\n           "))
    else:
        model = info["config"].get("model", {})
        print("model      " + " ".join(f"{k}={v}" for k, v in model.items()
                                       if isinstance(v, (int, float, str, bool))))
    print(f"tensors    {len(info['tensors'])}")
    width = max((len(k) for k in info["tensors"]), default=0)
    for key, t in info["tensors"].items():
        print(f"  {key:<{width}}  {str(tuple(t['shape'])):<20} {t['dtype']}")
    p = info["parameters"]
    print(f"parameters total={p['total']:,} shared={p['shared']:,} experts={p['experts']:,} "
          f"(num_experts={info['num_experts']}, per expert={p['per_expert']:,})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m checkpoints_utils.inspect",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("dir", help="iter_XXXXXXX directory or save root")
    parser.add_argument("--compare", metavar="DIR2", help="report max |difference| per tensor")
    parser.add_argument("--atol", type=float, default=0.0,
                        help="--compare: differences above this fail (exit 1); default 0")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--config", action="store_true", help="print the whole config")
    args = parser.parse_args(argv)
    if args.compare is None:
        info = summary(args.dir)
        if args.json:
            print(json.dumps(info, indent=1, default=str))
        else:
            _print_summary(info, args.config)
        return 0
    result = compare(args.dir, args.compare)
    failed = bool(result["shape"] or result["scalars"] or result["only_a"] or result["only_b"]) or any(
        not (d <= args.atol) for d in result["diff"].values())
    if args.json:
        print(json.dumps({**result, "ok": not failed}, indent=1, default=str))
        return int(failed)
    print(f"comparing {result['a']}\n      and {result['b']}")
    width = max((len(k) for k in result["diff"]), default=0)
    for key, d in result["diff"].items():
        print(f"  {key:<{width}}  max|diff|={d:.3e}{'  DIFFERS' if not d <= args.atol else ''}")
    for key, (sa, sb) in result["shape"].items():
        print(f"  {key}: shape {sa} vs {sb}")
    for key, (va, vb) in result["scalars"].items():
        print(f"  {key}: {va} vs {vb}")
    for key in result["only_a"]:
        print(f"  {key}: only in the first")
    for key in result["only_b"]:
        print(f"  {key}: only in the second")
    worst = max(result["diff"].values(), default=0.0)
    print(f"{len(result['diff'])} tensors compared, largest difference {worst:.3e}; "
          + ("DIFFERENT" if failed else "identical within atol"))
    return int(failed)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
