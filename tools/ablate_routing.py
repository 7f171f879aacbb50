"""Routing ablation: dense vs token, modality, task and attribute routing, over seeds.

    python -m tools.ablate_routing --config configs/runs/demo.yaml --steps 300 --seeds 3
        [--nproc 1] [--variants dense,token,modality,task,attribute]
        [--unseen-route image_text_retrieval] [key=value ...]

Every (variant, seed) trains from scratch into ``<train.run_dir>/ablation/<variant>/seed<i>``
with the same data and step count (seed i sets ``train.seed`` and ``data.seed`` to the config's
plus i) and is evaluated (``megatron_uni.evaluate``). The table gives mean +- std (sample std
over seeds, in percent) of every metric of every seen task and of the held-out zero-shot tasks
(weight 0: video-text retrieval in the demo).

Task routing cannot route a task it never trained: the evaluation refuses it (``moe.
unseen_task_route=refuse``) and the table shows "-", as the paper does. The same task-routed
checkpoints are then evaluated once more with ``moe.unseen_task_route=<--unseen-route>`` (the
held-out task routed like that seen task), reported as the separate column
``task->ROUTE``. Writes ``results.json`` (per seed and summarised) and ``results.png`` (bar
chart of the means with std error bars) beside the runs.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from megatron_uni.config import ConfigError, load_config
from megatron_uni.train import report_error

VARIANTS: dict[str, list[str]] = {
    "dense": ["moe.num_experts=0", "parallel.ep=1"],
    "token": ["moe.router=token", "moe.execution=dispatch"],
    "modality": ["moe.router=modality", "moe.execution=grouped"],
    "task": ["moe.router=task", "moe.execution=grouped"],
    "attribute": ["moe.router=attribute", "moe.execution=grouped"],
}


def _launch(nproc: int, module: str, args: list[str]) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", module, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", "-m", module, *args]


def variant_args(name: str, run_dir: Path, steps: int, nproc: int, seed: int, data_seed: int,
                 overrides: list[str]) -> list[str]:
    """Overrides of one (variant, seed) run: the user's first, then what the run must have."""
    common = [*overrides, f"train.run_dir={run_dir}", f"train.steps={steps}",
              f"train.seed={seed}", f"data.seed={data_seed}", "logging.progress_bar=false",
              *VARIANTS[name]]
    if nproc == 1:
        common += ["parallel.tp=1", "parallel.ep=1", "parallel.pp=1"]
    return common


def run_variant(config: str, name: str, run_dir: Path, steps: int, nproc: int, seed: int,
                data_seed: int, overrides: list[str], unseen_route: str | None = None
                ) -> dict[str, dict]:
    """Train and evaluate one (variant, seed); returns ``{"metrics": ..., "refused": [...]}``
    and, with ``unseen_route``, the held-out metrics routed like that task under ``"routed"``."""
    common = variant_args(name, run_dir, steps, nproc, seed, data_seed, overrides)
    print(f"== {name} seed {seed}: training {steps} steps into {run_dir}", flush=True)
    subprocess.run(_launch(nproc, "megatron_uni.train", ["--config", config, *common]), check=True)
    print(f"== {name} seed {seed}: evaluating", flush=True)
    load = f"checkpoint.load={run_dir}/checkpoints"
    subprocess.run(_launch(nproc, "megatron_uni.evaluate",
                           ["--config", config, *common, load]), check=True)
    report = json.loads((run_dir / "eval.json").read_text())
    out = {"metrics": report["metrics"],
           "refused": [t for t, info in report["tasks"].items() if info.get("refused")]}
    if unseen_route and out["refused"]:
        routed_path = run_dir / f"eval_unseen_as_{unseen_route}.json"
        subprocess.run(_launch(nproc, "megatron_uni.evaluate", [
            "--config", config, "--tasks", ",".join(out["refused"]), "--out", str(routed_path),
            *common, load, f"moe.unseen_task_route={unseen_route}"]), check=True)
        out["routed"] = json.loads(routed_path.read_text())["metrics"]
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def summarise(per_seed: dict[str, list[dict]]) -> dict[str, dict[str, dict[str, list[float]]]]:
    """column -> task -> metric -> [mean, std, n] over the seeds that report it (refused tasks
    and undefined metrics are absent). Column ``task->ROUTE`` holds the routed held-out runs."""
    columns: dict[str, list[dict]] = {}
    for name, runs in per_seed.items():
        columns[name] = [r["metrics"] for r in runs]
        routed = [r["routed"] for r in runs if "routed" in r]
        if routed:
            columns[f"{name}->{runs[0]['route']}"] = routed
    out: dict[str, dict[str, dict[str, list[float]]]] = {}
    for column, metrics_list in columns.items():
        table: dict[str, dict[str, list[float]]] = {}
        keys = {(t, m) for metrics in metrics_list for t, ms in metrics.items() for m in ms}
        for task, metric in sorted(keys):
            values = [float(ms[task][metric]) for ms in metrics_list
                      if ms.get(task, {}).get(metric) is not None]
            if values:
                table.setdefault(task, {})[metric] = [*mean_std(values), len(values)]
        out[column] = table
    return out


def format_table(summary: dict[str, dict], held_out: set[str]) -> str:
    """Markdown: rows task/metric (held-out tasks marked), columns variants; mean +- std in %,
    "-" where a variant has no value (task routing refused the task)."""
    names = list(summary)
    rows = sorted({(t, m) for col in summary.values() for t, ms in col.items() for m in ms},
                  key=lambda r: (r[0] in held_out, r))
    lines = ["| task / metric (%) | " + " | ".join(names) + " |",
             "|---|" + "---|" * len(names)]
    for task, metric in rows:
        label = f"{task} {metric}" + (" (held out, zero-shot)" if task in held_out else "")
        cells = []
        for n in names:
            value = summary[n].get(task, {}).get(metric)
            cells.append("-" if value is None else f"{100 * value[0]:.1f} +- {100 * value[1]:.1f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: dict[str, dict], held_out: set[str], path: Path) -> Path | None:
    """Grouped bars (one group per task/metric, one bar per variant) with std error bars."""
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        print("matplotlib is not installed: no chart written", file=sys.stderr)
        return None
    names = list(summary)
    rows = sorted({(t, m) for col in summary.values() for t, ms in col.items() for m in ms},
                  key=lambda r: (r[0] in held_out, r))
    width = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(rows)), 4.5))
    for i, n in enumerate(names):
        means = [100 * summary[n].get(t, {}).get(m, [math.nan])[0] for t, m in rows]
        stds = [100 * summary[n].get(t, {}).get(m, [0, 0])[1] for t, m in rows]
        xs = [k + (i - (len(names) - 1) / 2) * width for k in range(len(rows))]
        ax.bar(xs, means, width, yerr=stds, capsize=2, label=n)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([f"{t}\n{m}" + ("\n(held out)" if t in held_out else "")
                        for t, m in rows], fontsize=7, rotation=35, ha="right")
    ax.set_ylabel("%  (mean +- std over seeds)")
    ax.legend(fontsize=7, ncol=len(names))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/runs/demo.yaml")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=3, help="runs per variant")
    parser.add_argument("--nproc", type=int, default=1, help="ranks per run (torchrun when > 1)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--unseen-route", default=None,
                        help="seen task whose route the held-out task takes in the extra task "
                        "column (default: the first trained task of the held-out task's type)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        return report_error(err)
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown or args.seeds < 1:
        print(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}" if unknown
              else "--seeds must be >= 1", file=sys.stderr)
        return 2
    out = Path(cfg.train.run_dir) / "ablation"
    tasks = cfg.data.tasks
    held_out = {name for name, task in tasks.items() if task.weight == 0}
    route = args.unseen_route or next(
        (n for h in held_out for n, t in tasks.items() if t.weight > 0 and t.type == tasks[h].type),
        next((n for n, t in tasks.items() if t.weight > 0), None))
    start = time.time()
    per_seed: dict[str, list[dict]] = {}
    for v in chosen:
        for i in range(args.seeds):
            result = run_variant(args.config, v, out / v / f"seed{i}", args.steps, args.nproc,
                                 cfg.train.seed + i, cfg.data.seed + i, args.overrides,
                                 unseen_route=route if v == "task" else None)
            result["seed"], result["route"] = i, route
            per_seed.setdefault(v, []).append(result)
    summary = summarise(per_seed)
    table = format_table(summary, held_out)
    elapsed = time.time() - start
    print(table)
    print(f"{args.seeds} seed(s) x {len(chosen)} variant(s), {args.steps} steps each, "
          f"{elapsed / 60:.1f} min")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({
        "config": args.config, "steps": args.steps, "seeds": args.seeds, "nproc": args.nproc,
        "overrides": args.overrides, "held_out": sorted(held_out), "unseen_route": route,
        "seconds": elapsed, "summary": summary, "runs": per_seed, "table": table,
    }, indent=2))
    chart = plot(summary, held_out, out / "results.png")
    print(f"wrote {out / 'results.json'}" + (f" and {chart}" if chart else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
