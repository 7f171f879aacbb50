"""Which task each training step trains: one weighted draw per step, the same on every rank.

The draw for step ``k`` is a pure function of ``(seed, k)``: a counter-based hash (SplitMix64)
turns them into a uniform number in [0, 1), and the task is where it falls in the cumulative
weights. Nothing depends on the data-parallel rank, so every rank trains the same task at the
same step. That is required, not a convenience: retrieval's cross-rank negatives and split
target sets (class names, vocabulary) are gathered across data-parallel ranks, and those
collectives only match when every rank is in the same task. Because the draw has no state,
resuming at step ``k`` needs nothing saved, and the number of times a task was drawn before ``k``
can be counted without replaying anything.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

_MASK = (1 << 64) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = (x + np.uint64(0x9E3779B97F4A7C15)) & np.uint64(_MASK)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def uniform(seed: int, steps: np.ndarray) -> np.ndarray:
    """[n] uniform numbers in [0, 1) for ``steps`` [n] under ``seed`` (53 random bits each)."""
    with np.errstate(over="ignore"):
        key = _splitmix64(np.array([seed & _MASK], dtype=np.uint64))
        x = _splitmix64(np.asarray(steps, dtype=np.uint64) ^ key)
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


class TaskSampler:
    """Weighted task draw per step; tasks with weight 0 are never drawn."""

    def __init__(self, weights: Mapping[str, float], seed: int) -> None:
        self.names = [name for name, w in weights.items() if w > 0]
        if not self.names:
            raise ValueError("no task has a weight > 0")
        w = np.array([weights[n] for n in self.names], dtype=np.float64)
        self.probs = w / w.sum()
        self._cumulative = np.cumsum(self.probs)
        self._cumulative[-1] = 1.0  # uniform() < 1, so the last task catches rounding
        self.seed = seed

    def indices(self, start: int, stop: int) -> np.ndarray:
        """[stop - start] task indices (into ``names``) of steps start .. stop-1."""
        u = uniform(self.seed, np.arange(start, stop, dtype=np.uint64))
        return np.searchsorted(self._cumulative, u, side="right")

    def task_at(self, step: int) -> str:
        """The task of training step ``step``."""
        return self.names[int(self.indices(step, step + 1)[0])]

    def tasks(self, start: int, stop: int) -> list[str]:
        """Tasks of steps start .. stop-1."""
        return [self.names[int(i)] for i in self.indices(start, stop)]
