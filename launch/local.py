"""One machine, N processes (CPU or GPU): a thin ``torchrun --standalone`` wrapper.

    python -m launch.local --nproc 4 --config configs/runs/demo.yaml [key=value ...] [--dry-run]

SIGTERM / SIGUSR1 to this process reach every worker (through torchrun): they finish the step,
save a checkpoint and exit, and the launch exits 0 (torchrun itself would exit 1).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from launch import ENTRY, FORWARDED_SIGNALS, run_forwarding_signals, run_or_print
from launch import validate as v


def command(nproc: int, config: str, overrides: Sequence[str], entry: str = "train",
            python: str = sys.executable, shutdown_timeout: int = 300) -> list[str]:
    signals = ",".join(sig.name for sig in FORWARDED_SIGNALS)
    return [python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            str(nproc), "--signals-to-handle", signals, "--shutdown-timeout",
            str(shutdown_timeout), "-m", ENTRY[entry], "--config", config, *overrides]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, required=True, help="processes (one per GPU on GPU)")
    p.add_argument("--config", required=True)
    p.add_argument("--entry", choices=sorted(ENTRY), default="train")
    p.add_argument("--shutdown-timeout", type=int, default=300,
                   help="seconds the workers get to save after a stop signal before torchrun "
                   "kills them")
    p.add_argument("--dry-run", action="store_true", help="print the command, run nothing")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    from megatron_uni.config import ConfigError  # noqa: PLC0415
    from megatron_uni.train import report_error  # noqa: PLC0415

    try:
        v.positive("--nproc", args.nproc)
        v.positive("--shutdown-timeout", args.shutdown_timeout)
        cfg = v.load_run_config(args.config, args.overrides, args.nproc, f"--nproc {args.nproc}")
    except (ConfigError, v.LaunchError) as err:
        return report_error(err)
    cmd = command(args.nproc, args.config, args.overrides, args.entry,
                  shutdown_timeout=args.shutdown_timeout)
    if args.dry_run:
        return run_or_print(cmd, dry_run=True)
    return run_forwarding_signals(cmd, Path(cfg.train.run_dir))


if __name__ == "__main__":
    sys.exit(main())
