"""Tables of ``tools.bench_step``: the text table rank 0 prints, the Markdown table and the JSON
it writes. ``vs first`` / ``vs own dense`` compare forward+backward milliseconds."""

from __future__ import annotations

import json
from typing import Any

# a variant's own dense baseline (None: it is one); ours compare with "dense"
OWN_DENSE = {"mcore-moe": "mcore-dense", "ref-merged": "ref-dense",
             "deepspeed-moe": "ref-dense", "mcore-dense": None, "ref-dense": None}


def _fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _mib(value: int) -> str:
    return f"{value / 2**20:.1f}"


def _comm(kinds: dict[str, int]) -> str:
    short = {"all_reduce": "ar", "all_gather_into_tensor": "ag", "all_gather": "ag(list)",
             "reduce_scatter_tensor": "rs", "all_to_all_single": "a2a", "all_to_all": "a2a(list)",
             "broadcast": "bc", "send": "send", "recv": "recv"}
    parts = [f"{short.get(k, k)} {v / 1e6:.2f}" for k, v in kinds.items() if v]
    return " / ".join(parts) if parts else "0"


COLUMNS = ("variant", "ms/step", "fwd+bwd", "fwd", "bwd", "opt", "tokens/s", "TFLOP/s/rank",
           "MFU", "peak mem MiB", "expert MiB", "saved act MiB", "comm MB/step", "vs first",
           "vs own dense", "step vs first", "note")


def _ratio(row: dict[str, Any], base: dict[str, Any] | None, key: str) -> str:
    if base is None or base is row:
        return "-"
    return f"{row['ms'][key] / base['ms'][key]:.2f}"


def table_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    """Ratios ``vs first`` / ``vs own dense`` compare forward+backward (the optimizer step is
    beside the point of an MoE comparison and is shown on its own); ``step vs first`` the
    whole step."""
    by_name = {r["variant"]: r for r in rows if "ms" in r}
    first = next((r for r in rows if "ms" in r), None)
    out = []
    for r in rows:
        if "ms" not in r:
            out.append([r["variant"], *["-"] * (len(COLUMNS) - 2), "skipped: " + r["skipped"]])
            continue
        own_name = OWN_DENSE.get(r["variant"], "dense")
        own = by_name.get(own_name) if own_name else None
        ms = r["ms"]
        out.append([
            r["variant"], _fmt_ms(ms["step"]), _fmt_ms(ms["fwd_bwd"]), _fmt_ms(ms["forward"]),
            _fmt_ms(ms["backward"]), _fmt_ms(ms["optimizer"]),
            f"{r['tokens_per_s']:,.0f}", f"{r['tflops_per_rank']:.4g}", f"{100 * r['mfu']:.1f}%",
            _mib(r["peak_memory_bytes"]), _mib(r["expert_param_bytes"]),
            _mib(r["saved_activation_bytes"]), _comm(r["collective_bytes_per_step"]),
            _ratio(r, first, "fwd_bwd") if r is not first else "1.00",
            _ratio(r, own, "fwd_bwd"), _ratio(r, first, "step") if r is not first else "1.00",
            r["note"],
        ])
    return out


def _timed(report: dict[str, Any]) -> str:
    rounds = report.get("rounds", 1)
    if rounds == 1:
        return f"{report['steps']} steps"
    return (f"{rounds * report['steps']} steps in {rounds} rounds (the variants in turn, "
            f"reversed every other round; each round of a variant built afresh)")


def markdown(report: dict[str, Any]) -> str:
    head = (f"`{report['command']}`\n\n{report['device']}, world {report['world_size']}, "
            f"{report['precision']}, {report['threads']} thread(s); batch {report['rows']} x "
            f"{report['seq_len']} tokens; median of {_timed(report)} after "
            f"{report['warmup']} warm-up per round; matmul ceiling {report['ceiling_tflops']:.4g} TFLOP/s "
            f"({report['ceiling_shape']}).\n\n")
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(report["variants"])]
    return head + "\n".join(lines) + "\n"


def text_table(report: dict[str, Any]) -> str:
    rows = [list(COLUMNS), *table_rows(report["variants"])]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)



def write_outputs(report: dict[str, Any], args: Any) -> None:
    """``--json`` and ``--markdown`` (rewritten after every variant: a cut-short run keeps its
    rows)."""
    report = {k: v for k, v in report.items() if k != "is_main"}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown(report))
