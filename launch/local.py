"""One machine, N processes (CPU or GPU): a thin ``torchrun --standalone`` wrapper.

    python -m launch.local --nproc 4 --config configs/runs/demo.yaml [key=value ...] [--dry-run]
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from launch import ENTRY, run_or_print


def command(nproc: int, config: str, overrides: Sequence[str], entry: str = "train",
            python: str = sys.executable) -> list[str]:
    return [python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            str(nproc), "-m", ENTRY[entry], "--config", config, *overrides]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, required=True, help="processes (one per GPU on GPU)")
    p.add_argument("--config", required=True)
    p.add_argument("--entry", choices=sorted(ENTRY), default="train")
    p.add_argument("--dry-run", action="store_true", help="print the command, run nothing")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    cmd = command(args.nproc, args.config, args.overrides, args.entry)
    return run_or_print(cmd, args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
