"""Train Uni-Perceiver(-MoE): ``python -m megatron_uni.train --config FILE [key=value ...]``.

Runs the same single-process, under torchrun, srun or mpirun (the launcher's environment decides
rank and world size). Writes ``<train.run_dir>/`` (config.yaml, git_revision.txt, command.txt,
metrics.jsonl, tensorboard/, checkpoints/), holding ``run.lock`` for the run's life. Resumes from
the run dir's latest checkpoint, else initialises from ``checkpoint.load``. Bad configuration,
checkpoint and run-directory problems end with one clear line, exit 2.
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
    return parser.parse_args(argv)


def setup_logging(level: str) -> None:
    """Rank 0 logs at the configured level, the others only warnings."""
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    logging.basicConfig(level=level if rank == 0 else "WARNING", format="%(message)s")
    logging.getLogger("megatron").setLevel("WARNING")


def report_error(err: Exception) -> int:
    if os.environ.get("RANK", "0") == "0":
        kind = "config error" if isinstance(err, ConfigError) else "error"
        print(f"{kind}: {err}", file=sys.stderr, flush=True)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv, __doc__)
    from megatron_uni.training.checkpoint import CheckpointError  # noqa: PLC0415
    from megatron_uni.training.run_dir import RunDirError  # noqa: PLC0415

    try:
        cfg = load_config(args.config, args.overrides)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
