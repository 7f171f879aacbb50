"""Routing-strategy ablation: dense vs token vs task vs attribute routing, equal steps.

    python -m tools.ablate_routing --config configs/runs/demo.yaml --steps 300 [--nproc 1]
        [--variants dense,token,task,attribute] [key=value ...]

Trains each variant from scratch into ``<train.run_dir>/ablation/<variant>`` with the same data,
seed and step count, evaluates it (``megatron_uni.evaluate``), and prints one table: the metrics
of every seen task and of the held-out zero-shot task (video-text retrieval in the demo), which
task routing cannot route (it never saw that task) and attribute routing can (new combination of
known attributes). The table is also written to ``<train.run_dir>/ablation/results.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from megatron_uni.config import ConfigError, load_config
from megatron_uni.train import report_error

VARIANTS: dict[str, list[str]] = {
    "dense": ["moe.num_experts=0", "parallel.ep=1"],
    "token": ["moe.router=token", "moe.execution=dispatch"],
    "task": ["moe.router=task", "moe.execution=grouped"],
    "attribute": ["moe.router=attribute", "moe.execution=grouped"],
}


def _launch(nproc: int, module: str, args: list[str]) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", module, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", "-m", module, *args]


def run_variant(config: str, name: str, out: Path, steps: int, nproc: int,
                overrides: list[str]) -> dict:
    """Train and evaluate one variant; returns its eval.json ``metrics``."""
    run_dir = out / name
    # The user's overrides first: the variant's run dir, steps and routing must win.
    common = [*overrides, f"train.run_dir={run_dir}", f"train.steps={steps}",
              "logging.progress_bar=false", *VARIANTS[name]]
    if nproc == 1:
        common += ["parallel.tp=1", "parallel.ep=1", "parallel.pp=1"]
    print(f"== {name}: training {steps} steps into {run_dir}", flush=True)
    subprocess.run(_launch(nproc, "megatron_uni.train", ["--config", config, *common]), check=True)
    print(f"== {name}: evaluating", flush=True)
    subprocess.run(_launch(nproc, "megatron_uni.evaluate",
                           ["--config", config, *common, f"checkpoint.load={run_dir}/checkpoints"]),
                   check=True)
    return json.loads((run_dir / "eval.json").read_text())["metrics"]


def format_table(results: dict[str, dict], held_out: set[str]) -> str:
    """Rows: task/metric (held-out tasks marked); columns: variants."""
    names = list(results)
    rows = sorted({(task, metric) for r in results.values() for task, m in r.items() for metric in m})
    width = max(len(f"{t}/{m}") for t, m in rows) + 12
    lines = [f"{'task/metric':<{width}}" + "".join(f"{n:>11}" for n in names)]
    for task, metric in rows:
        label = f"{task}/{metric}" + (" (zero-shot)" if task in held_out else "")
        cells = []
        for n in names:
            value = results[n].get(task, {}).get(metric)
            cells.append(f"{value:>11.3f}" if isinstance(value, (int, float)) else f"{'-':>11}")
        lines.append(f"{label:<{width}}" + "".join(cells))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/runs/demo.yaml")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--nproc", type=int, default=1, help="ranks per run (torchrun when > 1)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        return report_error(err)
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown:
        print(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}", file=sys.stderr)
        return 2
    out = Path(cfg.train.run_dir) / "ablation"
    held_out = {name for name, task in cfg.data.tasks.items() if task.weight == 0}
    results = {v: run_variant(args.config, v, out, args.steps, args.nproc, args.overrides)
               for v in chosen}
    table = format_table(results, held_out)
    print(table)
    (out / "results.json").write_text(json.dumps({"steps": args.steps, "metrics": results},
                                                 indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
