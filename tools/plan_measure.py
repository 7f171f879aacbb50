"""Measure what ``tools.plan`` predicts: the per-rank memory peak of real training steps on CPU.

    torchrun --standalone --nproc-per-node 4 -m tools.plan_measure \
        --config configs/models/debug.yaml --rows 16 --seq-len 128 parallel.tp=2 moe.num_experts=4

A step is ``tools.bench_step``'s for our model: the trainer's model chunks (megatron DDP), the
distributed optimizer, megatron's forward-backward schedule on a captioning micro-batch of
``rows x seq_len`` tokens, then the optimizer step. "Measured peak" (per rank) is the largest
in-use C heap (glibc ``mallinfo2``: what torch's CPU allocator holds, sampled after every aten
operator by ``tools.bench_counters.HeapPeakCounter``) during the third step, minus the heap in
use just before the model was built (after the batch): weights, gradient buffers, optimizer
state (created by the first step), activations and every temporary alive between two
operators. On a GPU it is ``torch.cuda.max_memory_allocated`` during that step minus
``memory_allocated`` before the build.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from typing import Any, Sequence

from megatron_uni.config import Config, load_config


def measure_rank(cfg: Config, rows: int, seq_len: int, micro_batches: int = 1) -> dict[str, Any]:
    """This rank's measured peak (see the module docstring) and what it is made of."""
    import torch  # noqa: PLC0415

    from megatron_uni.config.to_mcore import resolved_precision  # noqa: PLC0415
    from megatron_uni.parallel.initialize import initialize  # noqa: PLC0415
    from megatron_uni.training.loop import build_model_chunks  # noqa: PLC0415
    from megatron_uni.training.optimizer import build_optimizer  # noqa: PLC0415
    from megatron_uni.training.step import forward_backward  # noqa: PLC0415
    from tools.bench_counters import HeapPeakCounter, SavedActivationCounter, heap_bytes
    from tools.bench_step import caption_batch

    runtime = initialize(cfg)
    torch.manual_seed(cfg.train.seed)
    # the batch first: building it loads the text tokenizer (heap that is no part of a step)
    batches = [caption_batch(cfg, rows, seq_len, cfg.train.seed + i) for i in range(micro_batches)]
    gpu = runtime.device.type == "cuda"
    if gpu:  # on the GPU: the allocator's own counters
        batches = [b.to(runtime.device) for b in batches]
        torch.cuda.synchronize()
    gc.collect()
    base = torch.cuda.memory_allocated() if gpu else heap_bytes()
    chunks, _ = build_model_chunks(cfg, runtime)
    optimizer = build_optimizer(cfg, chunks, runtime.use_cpu,
                                resolved_precision(cfg, runtime.use_cpu))
    params = [p for c in chunks for p in c.parameters()]

    def step() -> None:
        for chunk in chunks:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        forward_backward(chunks, batches)
        optimizer.step()

    step()
    with SavedActivationCounter(params) as saved:
        step()
    if gpu:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        with HeapPeakCounter() as heap:
            step()
        before, peak = heap.base, heap.peak
    return {
        "measured_peak_bytes": peak - base,
        "heap_before_step_bytes": before - base,
        "param_bytes": sum(p.numel() * p.element_size() for p in params),
        "saved_activation_bytes": saved.bytes,
        "conditions": int(batches[0].attributes.shape[0]),
        "rank": runtime.rank,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batches", type=int, default=1)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, ["parallel.device=cpu", "train.precision=fp32",
                                    *args.overrides])
    print(json.dumps(measure_rank(cfg, args.rows, args.seq_len, args.micro_batches)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
