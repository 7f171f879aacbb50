"""Router losses and routing statistics, collected where the trainer and evaluation read them.

Shape legend: A distinct attribute vectors of a micro-batch, D = 8 bits, E experts.

megatron's aux-loss tracker is the model: routers report into it during the forward, the owner
reads and resets it once per step. Ours belongs to the model (one per stage, handed to its
routers at construction; no global state) and records tensors only, so recording makes no host
synchronisation; :meth:`RoutingTracker.losses` and :meth:`RoutingTracker.stats` convert once per
step.

Counted once per micro-batch under recompute: a checkpointed forward runs twice, first inside
the checkpoint function's forward (training mode, autograd disabled), then again in the backward
(autograd enabled). Recording happens when autograd is enabled or the module is in eval mode,
i.e. in the forward whose outputs are used, exactly once per micro-batch with or without
recompute. (A training-mode forward under ``torch.no_grad()`` records nothing.)
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch


def records_now(training: bool) -> bool:
    """Whether this forward is the one that counts (see the module docstring)."""
    return torch.is_grad_enabled() or not training


@dataclass
class RoutingTracker:
    """Per-step accumulator of router losses and expert counts; see the module docstring."""

    collect_stats: bool = False
    # per "layer0.attn.aux": [sum over micro-batches, micro-batch count], device tensors
    _losses: dict[str, list] = field(default_factory=dict)
    # per layer name: list of (attribute table [A, D], counts [A, E]) device tensors
    _counts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)

    def reset(self, collect_stats: bool = False) -> None:
        self.collect_stats = collect_stats
        self._losses.clear()
        self._counts.clear()

    @contextmanager
    def collecting(self) -> Iterator["RoutingTracker"]:
        """Statistics on, from empty, for the ``with`` body; the previous state afterwards."""
        saved = (self.collect_stats, self._losses, self._counts)
        self.collect_stats, self._losses, self._counts = True, {}, {}
        try:
            yield self
        finally:
            self.collect_stats, self._losses, self._counts = saved

    def record_loss(self, name: str, value: torch.Tensor) -> None:
        """One micro-batch's value of a router loss (``layer0.attn.aux``, ``layer0.mlp.z``)."""
        entry = self._losses.setdefault(name, [torch.zeros((), device=value.device), 0])
        entry[0] = entry[0] + value.detach().float()
        entry[1] += 1

    def record_counts(self, layer: str, table: torch.Tensor, counts: torch.Tensor) -> None:
        """Tokens per (attribute row, expert) of one micro-batch, with its attribute table."""
        if self.collect_stats:
            self._counts.setdefault(layer, []).append((table.detach(), counts.detach()))

    def losses(self) -> dict[str, float]:
        """Mean per micro-batch of every recorded loss (one host synchronisation)."""
        if not self._losses:
            return {}
        names = sorted(self._losses)
        values = torch.stack([self._losses[n][0] / self._losses[n][1] for n in names]).tolist()
        return dict(zip(names, values))

    def stats(self) -> dict[tuple[str, str], torch.Tensor]:
        """Summed counts per (layer, attribute key like "10011000") on the host: the form
        ``moe.stats.stats_to_json`` takes."""
        out: dict[tuple[str, str], torch.Tensor] = {}
        for layer, items in self._counts.items():
            for table, counts in items:
                counts = counts.cpu()
                for row, bits in enumerate(table.cpu().tolist()):
                    if counts[row].sum() <= 0:
                        continue  # a condition of the table with no (valid) token here
                    key = (layer, "".join(str(int(b)) for b in bits))
                    out[key] = out.get(key, torch.zeros_like(counts[row])) + counts[row]
        return out
