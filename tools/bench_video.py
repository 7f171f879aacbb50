"""Video in shards: stored frames against the encoded clip, in bytes per sample and samples/s.

    python -m tools.bench_video [--clips 8] [--seconds 10] [--size 340x256] [--frames 4]

Generates clips with PyAV (a moving square over a noisy gradient), then per clip measures
- frames: what ``tools.build_shards videos`` stores (every 32nd frame at 30 fps, short side
  256, JPEG q90); the loader decodes ``--frames`` of them;
- clip: the encoded file itself; the loader opens it and decodes up to the frames the
  reference samples (``--frames`` at stride 32 from a random offset, its ``random_clip``).
Both loader paths end in RGB PIL images (the transforms that follow are the same). One process,
one thread per decode; the ratio is what counts (DESIGN.md, "Performance method").
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tools import video_files as vf


def _reference_clip_indices(total: int, fps: float, frames: int, rng: np.random.Generator
                            ) -> list[int]:
    step = vf.REFERENCE_STRIDE * fps / vf.REFERENCE_FPS
    highest = total - int(step * (frames - 1) + 1)
    offset = int(rng.integers(0, highest)) if highest > 0 else 0
    return [int(offset + int(i * step)) % total for i in range(frames)]


def measure(clips: int, seconds: float, size: tuple[int, int], frames: int, suffix: str = ".mp4"
            ) -> dict[str, dict[str, float]]:
    from PIL import Image  # noqa: PLC0415

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        paths = [vf.write_test_video(Path(tmp) / f"c{i}{suffix}", seconds=seconds, size=size,
                                     seed=i) for i in range(clips)]
        blobs = [p.read_bytes() for p in paths]
        stored = [vf.frame_members(b)[0] for b in blobs]
        t0 = time.perf_counter()
        for members in stored:
            names = sorted(members)
            pick = np.linspace(0, len(names) - 1, frames).round().astype(int)
            for n in pick:
                with Image.open(io.BytesIO(members[names[n]])) as im:
                    im.convert("RGB")
        t_frames = time.perf_counter() - t0
        t0 = time.perf_counter()
        for blob in blobs:
            total, fps = vf.probe(blob)
            vf.decode_frames(blob, _reference_clip_indices(total, fps, frames, rng))
        t_clip = time.perf_counter() - t0
    return {
        "frames": {"bytes_per_sample": sum(sum(map(len, m.values())) for m in stored) / clips,
                   "samples_per_s": clips / t_frames},
        "clip": {"bytes_per_sample": sum(map(len, blobs)) / clips, "samples_per_s": clips / t_clip},
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--size", default="340x256", help="WIDTHxHEIGHT of the generated clips")
    parser.add_argument("--frames", type=int, default=4, help="frames the loader takes")
    parser.add_argument("--suffix", default=".mp4", help="container: .mp4, .webm, .avi, .mkv")
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.split("x"))
    result = measure(args.clips, args.seconds, (width, height), args.frames, args.suffix)
    for name, r in result.items():
        print(f"{name:<7} {r['bytes_per_sample'] / 1024:9.1f} KiB/sample  "
              f"{r['samples_per_s']:8.1f} samples/s")
    ratio = result["frames"]["samples_per_s"] / result["clip"]["samples_per_s"]
    size = result["clip"]["bytes_per_sample"] / result["frames"]["bytes_per_sample"]
    print(f"stored frames: {ratio:.1f}x the samples/s, clip/frames bytes {size:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
