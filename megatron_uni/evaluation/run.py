"""Evaluate a model on every configured eval set; build the eval model; write the report.

    chunks = build_eval_model(cfg, runtime)
    step = load_weights(cfg.checkpoint.load, chunks, cfg)          # or random weights
    results = evaluate_tasks(cfg, runtime, chunks)                  # every rank, same results
    write_report(path, cfg, results, step=..., checkpoint=...)      # rank 0

:func:`evaluate_tasks` takes any model chunks of this rank (the training loop's DDP-wrapped ones
too) and leaves them in eval mode; a caller that trains on must switch back to ``train()``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


from megatron_uni.config import Config, to_dict
from megatron_uni.data.task_plan import plan_task
from megatron_uni.evaluation.evaluators import (
    EvalContext,
    TaskResult,
    evaluate_plan,
    evaluation_tasks,
)
from megatron_uni.evaluation.forward import ForwardRunner
from megatron_uni.models.layer_spec import refused_task
from megatron_uni.data.text_tokenizer import get_tokenizer
from megatron_uni.parallel.initialize import Runtime

log = logging.getLogger(__name__)

DEFAULT_MICROBATCHES_PER_CALL = 8


def build_eval_model(cfg: Config, runtime: Runtime) -> list[Any]:
    """This rank's model stage for inference: on its device, wrapped for its precision as the
    training loop wraps it (Float16Module, LayerScale kept fp32), no DDP, in eval mode."""
    from megatron_uni.models.generalist import build_placed_model  # noqa: PLC0415

    module, _ = build_placed_model(cfg, runtime)
    module.eval()
    return [module]


def load_weights(path: str | Path, chunks: Sequence[Any], cfg: Config) -> tuple[int, str]:
    """Load the weights of checkpoint ``path`` (a save root or an ``iter_*`` directory; any
    layout) into ``chunks``; returns (its step, the resolved checkpoint directory)."""
    from megatron_uni.training import checkpoint as ckpt  # noqa: PLC0415

    resolved = ckpt.resolve(Path(path))
    step, _ = ckpt.load_checkpoint(resolved, list(chunks), None, None, cfg, load_optimizer=False)
    return step, str(resolved)


def evaluate_tasks(
    cfg: Config,
    runtime: Runtime,
    chunks: Sequence[Any],
    tasks: Iterable[str] | None = None,
    *,
    microbatches_per_call: int = DEFAULT_MICROBATCHES_PER_CALL,
) -> dict[str, TaskResult]:
    """Evaluate ``tasks`` (default: every task with eval_shards) in config order. A collective:
    every rank calls it; every rank gets the same results."""
    from megatron.core import parallel_state  # noqa: PLC0415

    tokenizer = get_tokenizer()
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    ctx = EvalContext(cfg, ForwardRunner(chunks, runtime.device), tokenizer, dp_rank, dp_size,
                      microbatches_per_call)
    from megatron_uni.moe.stats import stats_to_json  # noqa: PLC0415
    from megatron_uni.training.metrics import gather_routing_stats  # noqa: PLC0415
    from megatron_uni.training.step import unwrap  # noqa: PLC0415

    tracker = unwrap(chunks[0]).routing_tracker
    results: dict[str, TaskResult] = {}
    for name in evaluation_tasks(cfg, tasks):
        start = time.perf_counter()
        refusal = refused_task(cfg, name)
        if refusal is not None:  # the same on every rank (config only): no collective skipped
            results[name] = TaskResult(metrics={}, num_samples=0, refused=refusal)
            if runtime.is_main:
                log.warning("eval %s: not evaluated: %s", name, refusal)
            continue
        plan = plan_task(cfg, name, dp_rank, dp_size, tokenizer, need_train=False, need_eval=True)
        with tracker.collecting():
            results[name] = evaluate_plan(ctx, plan)
            counts = tracker.stats()
        if cfg.moe.enabled:  # collective: every rank takes this branch alike
            results[name].routing = stats_to_json(gather_routing_stats(counts), cfg.moe.topk)
        if runtime.is_main:
            shown = "  ".join(f"{k} {v:.4f}" for k, v in results[name].metrics.items())
            log.info("eval %s (%s, %d samples, %.1f s): %s", name, plan.family,
                     results[name].num_samples, time.perf_counter() - start, shown)
    return results


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def report(
    cfg: Config,
    results: dict[str, TaskResult],
    *,
    step: int | None,
    checkpoint: str | None,
    layout: dict[str, Any],
    seconds: float | None = None,
) -> dict[str, Any]:
    """The eval.json content: ``metrics`` (task -> metric -> value in [0, 1], null if
    undefined), per-task family / sample count / example captions, step, checkpoint, layout."""
    return {
        "step": step,
        "checkpoint": checkpoint,
        "layout": layout,
        "metrics": {name: {k: _finite(v) for k, v in r.metrics.items()}
                    for name, r in results.items()},
        "tasks": {
            name: {
                "type": cfg.data.tasks[name].type,
                "held_out": cfg.data.tasks[name].weight == 0,
                "num_samples": r.num_samples,
                **({"examples": r.examples} if r.examples else {}),
                **({"routing": r.routing} if r.routing else {}),
                **({"refused": r.refused} if r.refused else {}),
            }
            for name, r in results.items()
        },
        "seconds": seconds,
        "config": to_dict(cfg),
    }


def write_report(path: str | Path, content: dict[str, Any]) -> Path:
    """Write ``content`` as JSON (rank 0 only); RunDirError when the place is not writable."""
    from megatron_uni.training.run_dir import unwritable  # noqa: PLC0415

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content, indent=1) + "\n")
    except OSError as err:
        raise unwritable(path.parent, err) from err
    return path


def format_table(content: dict[str, Any]) -> str:
    """A readable table of a :func:`report`: one line per task, metrics in percent."""
    header = ("task", "type", "samples", "metrics (%)")
    rows = []
    for name, metrics in content["metrics"].items():
        info = content["tasks"][name]
        shown = "  ".join(f"{k} {'n/a' if v is None else f'{100 * v:.2f}'}"
                          for k, v in metrics.items())
        if info.get("refused"):
            shown = "- (refused: task routing cannot route a task that never trained)"
        rows.append((name + (" (held out)" if info["held_out"] else ""), info["type"],
                     str(info["num_samples"]), shown))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3]
             for r in [header, *rows]]
    lines.insert(1, "-" * max(len(line) for line in lines))
    where = content["checkpoint"] or "random weights (no checkpoint)"
    step = "" if content["step"] is None else f", step {content['step']}"
    layout = " ".join(f"{k}={v}" for k, v in content["layout"].items())
    lines.insert(0, f"evaluation of {where}{step} [{layout}]")
    for name, info in content["tasks"].items():
        for ex in info.get("examples", [])[:2]:
            lines.append(f"  {name} #{ex['sample']}: {ex['caption']!r} "
                         f"(ref {ex['references'][0]!r})")
    return "\n".join(lines)
