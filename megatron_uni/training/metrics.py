"""What a run reports: progress lines, ``metrics.jsonl``, TensorBoard, FLOP counts.

Only global rank 0 writes; the numbers it writes are reduced over all ranks first (losses live
on the last pipeline stage, summed over data-parallel replicas; MoE aux losses live on the stage
that owns each layer).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist

from megatron_uni.config import Config

log = logging.getLogger(__name__)


def step_flops(cfg: Config, tokens: int, seq_len: int) -> float:
    """Model FLOPs of one training step (forward + backward = 3 x forward), active experts only.

    Linear maps: 2 FLOPs per weight per token (qkv 3h^2, out h^2, fc1 and fc2 h*f each); an
    expert linear of an MoE layer counts ``topk`` times (the chosen experts only, never E).
    Attention scores and weighted sums: 4 * S * h per token and layer (rows are packed, so S is
    the row length). Routers, norms, embeddings and the head are left out.
    """
    m, moe = cfg.model, cfg.moe
    h, f, layers = m.hidden_size, m.ffn_hidden_size, m.num_layers
    weights = {"qkv": 3 * h * h, "out": h * h, "fc1": h * f, "fc2": h * f}
    moe_layers = set(moe.layer_indices(layers)) if moe.enabled else set()
    per_token = 0.0
    for layer in range(layers):
        for name, size in weights.items():
            k = moe.topk if layer in moe_layers and name in moe.linears else 1
            per_token += 2 * size * k
        per_token += 4 * seq_len * h
    return 3.0 * per_token * tokens


def memory_gb() -> float:
    """Peak accelerator memory, or this process's resident memory on the CPU, in GiB."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import psutil  # noqa: PLC0415

    return psutil.Process().memory_info().rss / 2**30


def _device() -> torch.device:
    """The device collectives run on: the current GPU, else the CPU."""
    from megatron_uni.parallel import cpu_backend  # noqa: PLC0415

    if torch.cuda.is_available() and not cpu_backend.is_enabled():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def reduce_step_metrics(
    per_microbatch: Sequence[dict[str, torch.Tensor]], reporter: bool
) -> dict[str, float]:
    """Sum [value, count] pairs over micro-batches and over every reporting rank (one per
    data-parallel replica on the last stage); collective over the world."""
    keys = ("loss", "accuracy")
    # Summed where the values live and moved to the host once: a GPU run's NCCL all-reduce
    # needs a device tensor, and a copy per micro-batch would stall the step each time.
    device = per_microbatch[0]["loss"].device if reporter and per_microbatch else _device()
    local = torch.zeros(2 * len(keys), dtype=torch.float64, device=device)
    if reporter:
        for item in per_microbatch:
            for i, key in enumerate(keys):
                local[2 * i : 2 * i + 2] += item[key].detach().double()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(local)
    local = local.cpu()
    return {key: float(local[2 * i] / local[2 * i + 1]) if local[2 * i + 1] > 0 else math.nan
            for i, key in enumerate(keys)}


def gather_router_losses(local: dict[str, float]) -> dict[str, float]:
    """Per-layer aux / z losses from every rank (layers live on different stages)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return dict(local)
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, dict(local))
    merged: dict[str, float] = {}
    for part in parts:
        merged.update(part)
    return merged


def gather_routing_stats(local: dict[tuple[str, str], torch.Tensor]
                         ) -> dict[tuple[str, str], torch.Tensor]:
    """Sum the per-(layer, condition) expert counts of every rank: sequence-parallel shards,
    data-parallel replicas and pipeline stages each counted their own tokens and layers."""
    parts: list[Any] = [local]
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, {k: v.cpu() for k, v in local.items()})
    merged: dict[tuple[str, str], torch.Tensor] = {}
    for part in parts:
        for key, counts in part.items():
            merged[key] = merged.get(key, torch.zeros_like(counts)) + counts
    return merged


def open_log(path: Path, start_step: int) -> Any:
    """``path`` (JSON lines with a "step") opened for appending after ``start_step``: rows of
    later steps, written by a run killed after its last checkpoint and re-run now, are dropped
    (the file is rewritten atomically), so that every step has at most one row."""
    if path.is_file():
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)

        def keep(line: str) -> bool:
            try:
                return int(json.loads(line)["step"]) <= start_step
            except (ValueError, KeyError, TypeError):
                return False  # a line cut by the kill

        kept = [line for line in lines if keep(line)]
        if len(kept) != len(lines):
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text("".join(kept), encoding="utf-8")
            os.replace(tmp, path)
    return path.open("a", encoding="utf-8")


class RunLog:
    """Progress lines, metrics.jsonl and TensorBoard events of rank 0. A record's ``step`` is
    the number of optimizer steps done (1 for the first), as the console prints it."""

    def __init__(self, cfg: Config, run_dir: Path, total_steps: int, start_step: int,
                 active: bool) -> None:
        self.active = active
        self.cfg = cfg
        self.total = total_steps
        self.start_step = start_step
        self.t0 = time.time()
        self.jsonl = None
        self.tb = None
        self.bar = None
        if not active:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open_log(run_dir / "metrics.jsonl", start_step)
        self.routing = open_log(run_dir / "routing_stats.jsonl", start_step)
        if cfg.logging.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415
            except ImportError:
                log.warning("tensorboard is not installed: no event files (pip install tensorboard)")
            else:
                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        if cfg.logging.progress_bar:
            from tqdm import tqdm  # noqa: PLC0415

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", leave=False,
                            dynamic_ncols=True)

    def step(self, record: dict[str, Any], print_line: bool) -> None:
        if not self.active:
            return
        step = record["step"]
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(task=record["task"], loss=f"{record['loss']:.3f}")
        if not print_line:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(f"{record['task']}/{key}" if key in ("loss", "accuracy")
                                       else key, value, step)
        done = step - self.start_step
        eta = (time.time() - self.t0) / max(done, 1) * (self.total - step)
        aux_text = ""
        for kind in ("aux", "z"):
            values = [v for k, v in record.items() if k.startswith(f"{kind}/")]
            if values:  # mean over MoE layers
                aux_text += f" | {kind} {sum(values) / len(values):.4f}"
        line = (
            f"step {step:>5}/{self.total} | {record['task']:<18} loss {record['loss']:.4f} "
            f"acc {record['accuracy']:.3f} | lr {record['lr']:.2e} | grad {record['grad_norm']:.3f}"
            f" | {record['tokens_per_s']:,.0f} tok/s | {record['tflops']:.3f} TFLOP/s | "
            f"mem {record['mem_gb']:.1f} GiB | ETA {eta / 60:.1f} min{aux_text}"
        )
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def routing_stats(self, step: int, task: str, stats: dict[str, Any]) -> None:
        """One line of routing_stats.jsonl: per layer and condition, the share of tokens per
        expert (plot with tools/plot_routing.py after extracting a line)."""
        if self.active and stats.get("layers"):
            self.routing.write(json.dumps({"step": step, "task": task, **stats}) + "\n")
            self.routing.flush()

    def close(self) -> None:
        for handle in (self.bar, self.tb, self.jsonl, getattr(self, "routing", None)):
            if handle is not None:
                handle.close()
