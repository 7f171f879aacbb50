"""Timing for tools.bench_step: one round of one built variant (``measure``), a variant's rounds
pooled per rank (``summarize``), the order rounds run in (``round_order``), every rank's results
as one row (``combine``)."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from tools.bench_counters import (
    CollectiveCounter,
    SavedActivationCounter,
    peak_memory_bytes,
    reset_peak_memory,
    synchronize,
)


@dataclass
class Subject:
    """One built variant: ``step(marks)`` runs a training step and records phase times."""

    step: Callable[[dict[str, float]], None]
    params: list[torch.Tensor]  # every parameter (excluded from saved activations)
    expert_bytes: int
    tokens: int  # tokens of one step over all ranks
    flops: float  # model FLOPs of one step over all ranks
    phases: bool  # forward end observable (one pipeline stage)
    note: str = ""


def now(device: torch.device) -> float:
    """Seconds (perf_counter) once the device has run everything queued on it."""
    synchronize(device)
    return time.perf_counter()


def median_or_none(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def measure(subject: Subject, device: torch.device, warmup: int, steps: int) -> dict[str, Any]:
    """Warm-up, one counted step (saved activations), then ``steps`` timed steps: one round of
    one variant; ``summarize`` pools a variant's rounds."""
    for _ in range(warmup):
        subject.step({})
    with SavedActivationCounter(subject.params) as saved:
        subject.step({})
    reset_peak_memory(device)
    times: dict[str, list[float]] = {k: [] for k in PHASES}
    with CollectiveCounter() as comm:
        for _ in range(steps):
            marks: dict[str, float] = {}
            start = now(device)
            subject.step(marks)
            end = now(device)
            times["step"].append(end - start)
            times["fwd_bwd"].append(marks["backward"] - start)
            if subject.phases and "forward" in marks:
                times["forward"].append(marks["forward"] - start)
                times["backward"].append(marks["backward"] - marks["forward"])
                times["optimizer"].append(end - marks["backward"])
    return {
        "seconds": times,
        "peak_memory_bytes": peak_memory_bytes(device),
        "expert_param_bytes": subject.expert_bytes,
        "saved_activation_bytes": saved.bytes,
        "collective_bytes_per_step": {k: v // max(steps, 1) for k, v in sorted(comm.bytes.items())},
    }


PHASES = ("step", "fwd_bwd", "forward", "backward", "optimizer")


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One rank's rounds of one variant -> medians over every timed step of every round (ms),
    the highest peak memory, the largest counts (a round's counts are alike)."""
    pooled = {k: [t for r in rounds for t in r["seconds"][k]] for k in PHASES}
    kinds = sorted({k for r in rounds for k in r["collective_bytes_per_step"]})
    return {
        "ms": {k: (None if median_or_none(v) is None else 1e3 * median_or_none(v)) for k, v in pooled.items()},
        "ms_all_steps": [1e3 * t for t in pooled["step"]],
        "rounds": len(rounds),
        "peak_memory_bytes": max(r["peak_memory_bytes"] for r in rounds),
        "expert_param_bytes": max(r["expert_param_bytes"] for r in rounds),
        "saved_activation_bytes": max(r["saved_activation_bytes"] for r in rounds),
        "collective_bytes_per_step": {
            k: max(r["collective_bytes_per_step"].get(k, 0) for r in rounds) for k in kinds},
    }


def round_order(variants: Sequence[str], rounds: int) -> list[tuple[int, str]]:
    """(round, variant) in the order they run: the variants in turn, reversed every other round
    (A B C, C B A, A B C, ...), so a machine's load drifting during the run weighs on each
    variant alike instead of on whichever ran last."""
    return [(r, name) for r in range(rounds)
            for name in (variants if r % 2 == 0 else list(reversed(variants)))]


def gather_ranks(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (a collective: every rank calls it)."""
    import torch.distributed as dist  # noqa: PLC0415

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, obj)
    return parts


def combine(per_rank: list[dict[str, Any]], subject_info: dict[str, Any], world: int
            ) -> dict[str, Any]:
    """Rank results -> one row: the slowest rank's medians, the largest per-rank bytes (MFU is
    filled in once the run's ceiling is known)."""
    ms = {k: (max(r["ms"][k] for r in per_rank) if per_rank[0]["ms"][k] is not None else None)
          for k in per_rank[0]["ms"]}
    step_s = ms["step"] / 1e3
    tflops = subject_info["flops"] / world / step_s / 1e12
    kinds = sorted({k for r in per_rank for k in r["collective_bytes_per_step"]})
    return {
        **subject_info,
        "ms": ms,
        "tokens_per_s": subject_info["tokens"] / step_s,
        "tflops_per_rank": tflops,
        "mfu": None,
        "peak_memory_bytes": max(r["peak_memory_bytes"] for r in per_rank),
        "expert_param_bytes": max(r["expert_param_bytes"] for r in per_rank),
        "saved_activation_bytes": max(r["saved_activation_bytes"] for r in per_rank),
        "collective_bytes_per_step": {
            k: max(r["collective_bytes_per_step"].get(k, 0) for r in per_rank) for k in kinds},
        "per_rank": per_rank,
    }
