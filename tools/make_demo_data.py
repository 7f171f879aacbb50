"""Write the built-in demo dataset (rendered shapes, moving shapes, captions, sentences).

    python -m tools.make_demo_data --out data/demo [--seed 0 --num-train 2000 --num-eval 200]

Deterministic: the same arguments give byte-identical shards. ``configs/tasks/demo.yaml`` reads
the result; see ``megatron_uni/data/demo.py`` for what it holds.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from tqdm import tqdm

from megatron_uni.data.demo import make_demo_data, total_samples
from megatron_uni.data.shards import human_bytes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="data/demo", help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-train", type=int, default=2000,
                        help="training images and texts (videos: half as many)")
    parser.add_argument("--num-eval", type=int, default=200, help="evaluation samples per kind")
    parser.add_argument("--shards", type=int, default=8, help="training shards per kind")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.num_train < 1 or args.num_eval < 1 or args.shards < 1:
        parser.error("--num-train, --num-eval and --shards must be >= 1")
    start = time.perf_counter()
    with tqdm(total=total_samples(args.num_train, args.num_eval), unit="sample",
              disable=args.quiet, desc="demo data") as bar:
        summaries = make_demo_data(args.out, seed=args.seed, num_train=args.num_train,
                                   num_eval=args.num_eval, num_train_shards=args.shards,
                                   progress=bar.update)
    for name, summary in summaries.items():
        print(f"{name:13s} {summary}")
    samples = sum(s.samples for s in summaries.values())
    shards = sum(len(s.shards) for s in summaries.values())
    size = sum(s.bytes for s in summaries.values())
    print(f"total: {samples} samples in {shards} shards, {human_bytes(size)} under {args.out} "
          f"({time.perf_counter() - start:.1f} s); target sets: image_classes.txt, "
          "video_classes.txt, vocab.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
