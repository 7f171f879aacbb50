"""Rewrite a checkpoint for another parallel layout, offline on CPU: weights, optimizer state
(fp32 master weights, Adam moments and step), scheduler and step, so that a run under the new
layout resumes training where the old one stopped.

    python -m checkpoints_utils.reshard --load DIR --save DIR --tp N --pp N --ep N [--etp N]

Starts ``pp * lcm(tp, ep * etp)`` gloo processes on this machine (the smallest world that holds
the target layout; data parallelism is what it leaves over), builds model and optimizer under
the target layout, loads the checkpoint (dist_checkpointing reads any layout) and saves it again
with the target layout in meta.json. ``--save`` is a save root: ``DIR/iter_XXXXXXX`` + ``latest``.
RNG states start afresh. The data position (per global micro-batch slot) moves along whenever
the target keeps the number of slots per step (``train.global_batch_size /
train.micro_batch_size``, when set, is kept by every layout it divides), so the resumed run reads
the same data in the same steps as the original layout would have.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

from checkpoints_utils.common import ToolError, open_checkpoint, run_cli, tensor_index
from checkpoints_utils.spawn import run_world


def target_config(meta: dict[str, Any], tp: int, pp: int, ep: int, etp: int | None
                  ) -> tuple[Any, int]:
    """(config for the target layout, world size) or a :class:`ToolError` saying why not."""
    from megatron_uni.config import ConfigError, validate
    from megatron_uni.config.loader import from_dict  # noqa: PLC0415

    cfg = from_dict(meta["config"])
    par = cfg.parallel
    for name, value in (("tp", tp), ("pp", pp), ("ep", ep), ("etp", etp)):
        if value is not None and value < 1:
            raise ToolError(f"--{name} {value}: must be >= 1")
    experts = cfg.moe.num_experts or 0
    if ep > 1 and experts == 0:
        raise ToolError(f"--ep {ep}: the checkpoint's model has no experts (moe.num_experts "
                        "unset); use --ep 1")
    if experts and experts % ep:
        raise ToolError(f"--ep {ep} does not divide the {experts} experts (moe.num_experts); "
                        f"choose a divisor of {experts}")
    if cfg.model.num_layers % pp:
        raise ToolError(f"--pp {pp} does not divide the {cfg.model.num_layers} layers "
                        "(model.num_layers)")
    par.tp, par.pp, par.ep = tp, pp, ep
    if etp is not None:
        par.etp = etp
    elif experts and par.etp is None:
        par.etp = 1 if tp > 1 else None  # biased experts need expert-TP 1 (megatron 0.16.1)
    par.device, par.backend, par.sequence_parallel = "cpu", "gloo", None
    par.vpp = None
    world = pp * math.lcm(tp * par.cp, ep * par.expert_tp())
    try:
        validate(cfg, world_size=world)
    except ConfigError as err:
        raise ToolError(f"the target layout tp={tp} pp={pp} ep={ep} etp={par.expert_tp()} "
                        f"is impossible for this model: {err}") from err
    return cfg, world


def _rank(rank: int, world: int, load: str, save: str, cfg_dict: dict, with_optimizer: bool
          ) -> dict[str, Any]:
    from megatron_uni.config.loader import from_dict  # noqa: PLC0415
    from megatron_uni.config.to_mcore import resolved_precision  # noqa: PLC0415
    from megatron_uni.parallel.initialize import initialize  # noqa: PLC0415
    from megatron_uni.training.checkpoint import (  # noqa: PLC0415
        DataSlots,
        current_layout,
        load_checkpoint,
        save_checkpoint,
    )
    from megatron.core import parallel_state  # noqa: PLC0415

    from megatron_uni.data.loader import slot_range  # noqa: PLC0415
    from megatron_uni.training.loop import build_model_chunks, num_microbatches  # noqa: PLC0415
    from megatron_uni.training.optimizer import build_optimizer, build_scheduler  # noqa: PLC0415

    cfg = from_dict(cfg_dict)
    runtime = initialize(cfg)
    chunks, _ = build_model_chunks(cfg, runtime)
    optimizer = scheduler = None
    if with_optimizer:
        optimizer = build_optimizer(cfg, chunks, runtime.use_cpu,
                                    resolved_precision(cfg, runtime.use_cpu))
        scheduler = build_scheduler(cfg, optimizer)
    # The data position moves with the checkpoint: each rank takes the global micro-batch slots
    # its data-parallel rank reads under the target layout (dropped, with a warning, when the
    # target cannot keep the slot count).
    nmb = num_microbatches(cfg, runtime.dp)
    slots = DataSlots(runtime.dp * nmb, slot_range(parallel_state.get_data_parallel_rank(), nmb))
    step, loader_state = load_checkpoint(Path(load), chunks, optimizer, scheduler, cfg,
                                         data_slots=slots)
    if rank == 0:
        print(f"  loaded step {step} on {world} ranks", flush=True)
    path = save_checkpoint(Path(save), step, chunks, optimizer, scheduler, loader_state, cfg,
                           keep_last=0)
    return {"path": str(path), "step": step, "layout": current_layout()}


def reshard(load: str | Path, save: str | Path, tp: int = 1, pp: int = 1, ep: int = 1,
            etp: int | None = None, verbose: bool = True) -> Path:
    """Reshard ``load`` (iter_* dir or save root) into the save root ``save``; returns the new
    ``iter_*`` directory."""
    start = time.perf_counter()
    say = print if verbose else (lambda *a, **k: None)
    src, meta = open_checkpoint(load)
    tensor_index(src)  # the index is readable and no shard file is truncated
    save = Path(save)
    if save.resolve() == src.parent.resolve() or save.resolve() == src.resolve():
        raise ToolError(f"--save {save} is where the source checkpoint lives; give another "
                        "directory")
    target = save / src.name
    if target.exists():
        raise ToolError(f"{target} exists already; remove it or give another --save")
    if save.exists() and not save.is_dir():
        raise ToolError(f"--save {save} is a file, not a directory")
    cfg, world = target_config(meta, tp, pp, ep, etp)
    from megatron_uni.config import to_dict  # noqa: PLC0415

    say(f"reshard {src} (step {meta['step']}, layout "
        + " ".join(f"{k}={v}" for k, v in meta["layout"].items()) + ")")
    say(f"  target tp={tp} pp={pp} ep={ep} etp={cfg.parallel.expert_tp()}: {world} CPU "
        f"processes (dp={world // (tp * pp)}); optimizer: {meta.get('optimizer') or 'none'}",
        flush=True)
    results = run_world(_rank, world, args=(str(src), str(save), to_dict(cfg),
                                             meta.get("optimizer") is not None))
    out = Path(results[0]["path"])
    say(f"  saved {out} in {time.perf_counter() - start:.1f} s")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m checkpoints_utils.reshard",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--load", required=True, help="iter_XXXXXXX directory or save root")
    parser.add_argument("--save", required=True, help="save root for the resharded checkpoint")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=1)
    parser.add_argument("--etp", type=int, default=None,
                        help="expert tensor-parallel size (default: 1 for MoE when tp > 1)")
    args = parser.parse_args(argv)
    reshard(args.load, args.save, args.tp, args.pp, args.ep, args.etp)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
