"""Routing statistics as a heatmap: rows layer x condition, columns experts, cells the share of
that condition's tokens the expert processes (shares of a row sum to top-k).

    python -m tools.plot_routing RUN_DIR | routing_stats.jsonl | eval.json | STATS.json
        [--step N] [--source train|eval] [--out routing.png] [--title TEXT]

Inputs, as a run writes them:
- ``routing_stats.jsonl`` (training, one JSON object per logged step): the step ``--step``
  (default the last one logged); one heatmap per task logged at that step.
- ``eval.json`` (``python -m megatron_uni.evaluate``): one heatmap per evaluated task
  (``tasks.<name>.routing``).
- a run directory: its ``routing_stats.jsonl`` (``--source train``, the default when it
  exists) or its ``eval.json`` (``--source eval``).
- a single statistics object (``megatron_uni.moe.stats.stats_to_json``).
One heatmap is written to ``--out``; several go to ``<out stem>-<task>.png`` beside it.
Needs matplotlib (``pip install 'megatron-uni[plots]'``); the library itself never imports it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence


def _rows(stats: dict[str, Any]) -> tuple[list[str], list[list[float]], list[int], list[int]]:
    """(row labels, shares [rows][E], token count per row, row index where each layer starts)."""
    labels, shares, tokens, starts = [], [], [], []
    width = stats.get("num_experts", 0)
    for layer, conditions in stats["layers"].items():
        starts.append(len(labels))
        for key, entry in conditions.items():
            name = entry.get("name", key)
            label = f"{layer}  {name}" + (f" ({key})" if name != key else "")
            labels.append(label)
            row = list(entry["shares"])
            shares.append(row + [0.0] * (width - len(row)))
            tokens.append(int(entry.get("tokens", 0)))
    return labels, shares, tokens, starts


def render(stats: dict[str, Any], out: Path, title: str | None = None) -> Path:
    """Write the heatmap of ``stats`` to ``out`` (PNG)."""
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise SystemExit("plot_routing needs matplotlib: "
                         "pip install 'megatron-uni[plots]'") from err

    labels, shares, tokens, starts = _rows(stats)
    if not labels:
        raise SystemExit("no routing statistics in the file (a dense model, or nothing ran)")
    num_experts = len(shares[0])
    topk = stats.get("topk", "?")
    fig_w = 3.2 + 0.75 * num_experts + 0.9
    fig_h = 1.4 + 0.32 * len(labels)
    fig, ax = plt.subplots(figsize=(fig_w, fig_h), dpi=120)
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto",
                      interpolation="nearest")
    for r, row in enumerate(shares):
        for e, value in enumerate(row):
            if value > 0:
                ax.text(e, r, f"{value:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if value > 0.6 else "black")
    ax.set_xticks(range(num_experts), [f"e{e}" for e in range(num_experts)], fontsize=8)
    ax.xaxis.tick_top()
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    twin = ax.secondary_yaxis("right")
    twin.set_yticks(range(len(labels)), [f"{t:,}" for t in tokens], fontsize=6)
    twin.set_ylabel("tokens", fontsize=7)
    for start in starts[1:]:
        ax.axhline(start - 0.5, color="black", linewidth=0.8)
    bar = fig.colorbar(image, ax=ax, fraction=0.04, pad=0.09)
    bar.ax.tick_params(labelsize=7)
    bar.set_label("share of the condition's tokens", fontsize=7)
    ax.set_title(title or f"Routing per layer and condition (top-{topk}: a row sums to {topk})",
                 fontsize=9, pad=18)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    plt.close(fig)
    return out


class InputError(ValueError):
    """The input is not routing statistics (or not the step asked for)."""


def _is_stats(obj: Any) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("layers"), dict)


def _from_jsonl(path: Path, step: int | None) -> list[tuple[str, dict[str, Any]]]:
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{path} line {number}: {err}") from err
        if _is_stats(record) and "step" in record:
            records.append(record)
    if not records:
        raise InputError(f"{path} holds no routing statistics (a dense model, or nothing logged)")
    steps = sorted({r["step"] for r in records})
    chosen = steps[-1] if step is None else step
    picked = [r for r in records if r["step"] == chosen]
    if not picked:
        raise InputError(f"{path} has no step {chosen}; logged steps: {_span(steps)}")
    return [(f"{r.get('task', 'train')}", r) for r in picked]


def _span(steps: list[int]) -> str:
    if len(steps) <= 8:
        return ", ".join(map(str, steps))
    return ", ".join(map(str, steps[:4])) + ", ..., " + ", ".join(map(str, steps[-3:]))


def _from_json(path: Path) -> list[tuple[str, dict[str, Any]]]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        if "Extra data" in str(err):  # several objects, one per line: a routing_stats.jsonl
            return _from_jsonl(path, None)
        raise InputError(f"{path}: {err}") from err
    if _is_stats(obj):
        return [(str(obj.get("task", "routing")), obj)]
    if isinstance(obj, dict) and isinstance(obj.get("tasks"), dict):  # eval.json
        panels = [(name, info["routing"]) for name, info in obj["tasks"].items()
                  if _is_stats(info.get("routing"))]
        if not panels:
            raise InputError(f"{path} is an evaluation report without routing statistics "
                             "(a dense model)")
        return panels
    raise InputError(f"{path} is not routing statistics (no 'layers' key), nor an eval.json "
                     "or routing_stats.jsonl")


def load_panels(path: Path, step: int | None = None, source: str | None = None
                ) -> list[tuple[str, dict[str, Any]]]:
    """(task name, statistics) pairs to plot from any of the inputs the module doc lists."""
    if path.is_dir():
        jsonl, report = path / "routing_stats.jsonl", path / "eval.json"
        source = source or ("train" if jsonl.exists() else "eval")
        path = jsonl if source == "train" else report
        if not path.exists():
            what = "training routing statistics" if source == "train" else "evaluation report"
            raise InputError(f"{path} does not exist (the run directory has no {what})")
    elif not path.exists():
        raise InputError(f"{path} does not exist")
    if path.suffix == ".jsonl":
        return _from_jsonl(path, step)
    if step is not None:
        raise InputError("--step chooses a line of routing_stats.jsonl; "
                         f"{path} is a single report")
    return _from_json(path)


def _out_path(out: Path, name: str, many: bool) -> Path:
    if not many:
        return out
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return out.with_name(f"{out.stem}-{safe}{out.suffix or '.png'}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stats", type=Path,
                        help="run directory, routing_stats.jsonl, eval.json or a stats JSON")
    parser.add_argument("--step", type=int, default=None,
                        help="routing_stats.jsonl: the step to plot (default the last logged)")
    parser.add_argument("--source", choices=["train", "eval"], default=None,
                        help="run directory: routing_stats.jsonl (train) or eval.json (eval)")
    parser.add_argument("--out", type=Path, default=Path("routing.png"), help="PNG to write")
    parser.add_argument("--title", default=None, help="figure title")
    args = parser.parse_args(argv)
    try:
        panels = load_panels(args.stats, args.step, args.source)
    except (OSError, InputError) as err:
        print(f"plot_routing: {err}", file=sys.stderr)
        return 2
    many = len(panels) > 1
    for name, stats in panels:
        step = f", step {stats['step']}" if "step" in stats else ""
        title = args.title
        if title is None and (many or step):
            topk = stats.get("topk", "?")
            title = f"{name}{step}: routing per layer and condition (a row sums to {topk})"
        print(render(stats, _out_path(args.out, name, many), title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
