"""Train Uni-Perceiver(-MoE): ``python -m megatron_uni.train --config FILE [key=value ...]``.

Runs the same single-process, under torchrun, srun or mpirun (the launcher's environment decides
rank and world size). Writes ``<train.run_dir>/`` (config.yaml, git_revision.txt, command.txt,
metrics.jsonl, tensorboard/, checkpoints/), holding ``run.lock`` for the run's life. Resumes from
the run dir's latest checkpoint, else initialises from ``checkpoint.load``. Bad configuration,
checkpoint and run-directory problems and bad data end with one clear line, exit 2.
``--dry-run`` validates the config, prints its tasks, sampling weights and per-rank batch and
whether each task's data is ready, and exits 0 without building a model (:func:`dry_run`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

from megatron_uni.config import ConfigError, load_config


def parse_args(argv: Sequence[str] | None, doc: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML run config")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tp=2")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the config, print tasks, weights and per-rank batch, exit")
    return parser.parse_args(argv)


def setup_logging(level: str) -> None:
    """Rank 0 logs at the configured level, the others only warnings."""
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    logging.basicConfig(level=level if rank == 0 else "WARNING", format="%(message)s")
    logging.getLogger("megatron").setLevel("WARNING")


def report_error(err: Exception, every_rank: bool = False) -> int:
    """Print ``error: ...`` (rank 0, or with ``every_rank`` any rank: for problems only some
    ranks meet, such as bad data) and return exit code 2."""
    rank = os.environ.get("RANK", "0")
    if rank == "0" or every_rank:
        kind = "config error" if isinstance(err, ConfigError) else "error"
        where = f"rank {rank}: " if rank != "0" else ""
        print(f"{kind}: {where}{err}", file=sys.stderr, flush=True)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv, __doc__)
    from megatron_uni.data.readers import DataError  # noqa: PLC0415
    from megatron_uni.training.checkpoint import CheckpointError  # noqa: PLC0415
    from megatron_uni.training.run_dir import RunDirError  # noqa: PLC0415

    try:
        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            return dry_run(cfg)
        setup_logging(cfg.logging.level)
        from megatron_uni.parallel.initialize import initialize, shutdown  # noqa: PLC0415
        from megatron_uni.training.loop import Trainer  # noqa: PLC0415

        runtime = initialize(cfg)
        try:
            Trainer(cfg, runtime).train()
        finally:
            shutdown()
    except (ConfigError, CheckpointError, RunDirError) as err:
        return report_error(err)
    except DataError as err:  # past data.max_bad_samples, or nothing readable: on some ranks
        return report_error(err, every_rank=True)
    return 0


# --------------------------------------------------------------------------- --dry-run
def dry_run(cfg) -> int:  # noqa: ANN001 - a Config
    """Print the validated config's tasks (type, sampling weight and share, loss weight,
    samples per rank per step, row length, frames, image size, target set) and whether each
    task's shards and target set are there under ``data.root``; build nothing, exit 0.

    The world size comes from ``WORLD_SIZE`` (default 1): it fixes the data-parallel size, hence
    the micro-batches per rank when ``train.global_batch_size`` is set.
    """
    from megatron_uni.config import validate  # noqa: PLC0415
    from megatron_uni.data.task_plan import plan_task  # noqa: PLC0415
    from megatron_uni.data.text_tokenizer import get_tokenizer  # noqa: PLC0415

    world = int(os.environ.get("WORLD_SIZE", "1"))
    validate(cfg, world)
    dp = cfg.parallel.dp(world)
    gbs = cfg.train.global_batch_size
    per_rank = 1 if gbs is None else max(gbs // (cfg.train.micro_batch_size * dp), 1)
    total = sum(t.weight for t in cfg.data.tasks.values())
    m, moe = cfg.model, cfg.moe
    experts = (f"MoE {moe.num_experts} experts top-{moe.topk}, {moe.router} routing, layers "
               f"{moe.layer_indices(m.num_layers)}" if moe.enabled else "dense")
    print(f"model {m.name}: {m.num_layers} layers, hidden {m.hidden_size}, {experts}; "
          f"image grid {m.image_size} px (scale {m.spatial_position_scale:g})")
    print(f"world {world} (tp {cfg.parallel.tp}, pp {cfg.parallel.pp}, ep {cfg.parallel.ep}, "
          f"dp {dp}); {per_rank} micro-batch(es) per rank per step; {cfg.train.steps} steps, "
          f"lr {cfg.optim.lr:g}, warmup {cfg.optim.warmup_steps}, {cfg.train.precision}")
    print(f"data.root {cfg.data.root}")
    header = ("task", "type", "weight", "share", "loss_w", "batch/rank", "seq_len", "frames",
              "size", "target_set", "data")
    rows = []
    tokenizer = get_tokenizer()
    for name, t in cfg.data.tasks.items():
        try:
            plan = plan_task(cfg, name, 0, dp, tokenizer, need_train=t.weight > 0,
                             need_eval=bool(t.eval_shards) and t.weight == 0)
            ready = f"ok: {len(plan.shards) or len(plan.eval_shards)} shards, {plan.num_rows} rows"
        except ConfigError as err:
            ready = f"not ready: {err.message}"
        rows.append((name, t.type, f"{t.weight:g}", f"{t.weight / total:.3f}" if total else "-",
                     f"{t.loss_weight:g}", str(t.micro_batch_size * per_rank), str(t.seq_len),
                     str(t.num_frames), "-" if t.type == "mlm" else str(t.image_size),
                     t.target_set or "-", ready))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
    print(f"config ok: {len(rows)} tasks (dry run: nothing trained)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
