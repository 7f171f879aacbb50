"""Loader throughput: samples/s and micro-batches/s of the multi-task training stream.

    python -m tools.bench_loader --config configs/runs/demo_data.yaml --workers 2 --steps 100
    python -m tools.bench_loader --config ... --workers 2 --model-proxy   # + is it a bottleneck?

The first ``--warmup`` steps (worker start-up, first shard opens) are not timed. With
``--model-proxy`` it also times a stand-in for training: a plain-torch encoder of the config's
model size (embeddings, patch projection, pre-norm layers, block-diagonal mask from the batch
metadata, AdamW) on the same batches, alone and fed by the loader. The real model (megatron
layers, MoE) is slower than this stand-in, so a loader faster than the proxy is not the
bottleneck of training.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from collections.abc import Sequence

import torch
from torch import nn

from megatron_uni.config import Config, load_config
from megatron_uni.batch import PackedBatch, Side, attention_mask
from megatron_uni.data.loader import MultiTaskLoader


def _samples(batch: PackedBatch) -> int:
    """Input samples of a micro-batch (its input sequences)."""
    return int((batch.side.flatten()[batch.spe_index] == Side.INPUT).sum())


class ProxyModel(nn.Module):
    """Dense pre-norm encoder of the model config's size over a packed batch."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        m = cfg.model
        self.heads = m.num_attention_heads
        self.embed = nn.Embedding(m.vocab_size, m.hidden_size)
        self.patch = nn.Linear(3 * m.patch_size * m.patch_size, m.hidden_size)
        self.patch_size = m.patch_size
        layer = nn.TransformerEncoderLayer(m.hidden_size, m.num_attention_heads, m.ffn_hidden_size,
                                           dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, m.num_layers, enable_nested_tensor=False)

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        x = self.embed(batch.text_ids)
        if batch.images.numel() and (batch.patch_index >= 0).any():
            p = self.patch_size
            n, t, c, h, w = batch.images.shape
            patches = batch.images.reshape(n * t, c, h // p, p, w // p, p)
            patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(-1, c * p * p)
            where = batch.patch_index >= 0
            x = x.clone()
            x[where] = self.patch(patches)[batch.patch_index[where]]
        mask = attention_mask(batch)[:, 0].repeat_interleave(self.heads, 0)
        out = self.encoder(x, mask=mask)
        return out.flatten(0, 1)[batch.spe_index].pow(2).mean()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--workers", type=int, default=0, help="loader worker processes")
    parser.add_argument("--steps", type=int, default=100, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed first steps")
    parser.add_argument("--microbatches", type=int, default=1, help="micro-batches per step")
    parser.add_argument("--model-proxy", action="store_true", help="also time a stand-in model")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)

    with MultiTaskLoader(cfg, 0, 1, args.microbatches, num_workers=args.workers) as loader:
        for _ in range(args.warmup):
            loader.next_step()
        counts: collections.Counter[str] = collections.Counter()
        samples = micro = 0
        kept: list[PackedBatch] = []
        start = time.perf_counter()
        for _ in range(args.steps):
            task, batches = loader.next_step()
            counts[task] += 1
            micro += len(batches)
            samples += sum(_samples(b) for b in batches)
            if args.model_proxy and len(kept) < 50:
                kept.extend(batches)
        elapsed = time.perf_counter() - start
        print(f"loader, {args.workers} workers, {args.steps} steps x {args.microbatches} "
              f"micro-batches: {samples / elapsed:.0f} samples/s, {micro / elapsed:.1f} "
              f"micro-batches/s ({elapsed:.2f} s; bad samples {loader.bad_samples})")
        print("steps per task: " + ", ".join(f"{t} {n}" for t, n in sorted(counts.items())))
        if args.model_proxy:
            _time_proxy(cfg, loader, kept)
    return 0


def _time_proxy(cfg: Config, loader: MultiTaskLoader, kept: list[PackedBatch]) -> None:
    model = ProxyModel(cfg)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train(batch: PackedBatch) -> None:
        optim.zero_grad()
        model(batch).backward()
        optim.step()

    for batch in kept:  # warm-up: the first batch of every shape is slow
        train(batch)
    start, samples = time.perf_counter(), 0
    for batch in kept:
        train(batch)
        samples += _samples(batch)
    alone = samples / (time.perf_counter() - start)
    start, samples, count = time.perf_counter(), 0, 0
    while count < len(kept):
        for batch in loader.next_step()[1]:
            train(batch)
            samples += _samples(batch)
            count += 1
    fed = samples / (time.perf_counter() - start)
    print(f"model proxy ({cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}, plain "
          f"torch, {torch.get_num_threads()} threads): {alone:.0f} samples/s on prepared "
          f"batches, {fed:.0f} samples/s fed by the loader")


if __name__ == "__main__":
    sys.exit(main())
