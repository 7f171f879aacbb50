"""Routing statistics as a heatmap: rows layer x condition, columns experts, cells the share of
that condition's tokens the expert processes (shares of a row sum to top-k).

    python -m tools.plot_routing STATS.json --out routing.png [--title TEXT]

STATS.json is what ``megatron_uni.moe.stats.stats_to_json`` / ``collect_routing_stats`` give.
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stats", type=Path, help="routing statistics JSON (stats_to_json)")
    parser.add_argument("--out", type=Path, default=Path("routing.png"), help="PNG to write")
    parser.add_argument("--title", default=None, help="figure title")
    args = parser.parse_args(argv)
    try:
        stats = json.loads(args.stats.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        print(f"plot_routing: cannot read {args.stats}: {err}", file=sys.stderr)
        return 2
    if not isinstance(stats, dict) or "layers" not in stats:
        print(f"plot_routing: {args.stats} is not routing statistics (no 'layers' key; "
              f"write it with megatron_uni.moe.stats.stats_to_json)", file=sys.stderr)
        return 2
    render(stats, args.out, args.title)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
