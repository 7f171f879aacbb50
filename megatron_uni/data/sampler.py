"""Which task each training step trains: a weighted draw per step (``per_step``) or per draw
unit of global micro-batch slots (``per_rank``, the reference's ``WeightedBatchSampler``).

``per_step``: the draw for step ``k`` is a pure function of ``(seed, k)``: a counter-based hash
(SplitMix64) turns them into a uniform number in [0, 1), and the task is where it falls in the
cumulative weights. Every data-parallel rank trains the same task at the same step.

``per_rank``: the draw for step ``k`` and draw unit ``u`` is a pure function of ``(seed, k, u)``
(a second SplitMix64 round over the unit). A unit is ``slots_per_draw`` consecutive global
micro-batch slots: one data-parallel replica's slots, or those of the replicas one expert-
parallel token exchange spans (``MultiTaskLoader``); slot ``g`` belongs to unit ``g //
slots_per_draw``. Tensor- and pipeline-parallel peers read the same slots, so they draw alike
by construction. The task of slot ``g`` at step ``k`` is thus a function of ``(seed, k, g,
slots_per_draw)``: exact resume holds, and so does the data order under another layout that keeps
the global batch and ``slots_per_draw``.

Neither draw has state: resuming at step ``k`` needs nothing saved, and the number of times a
task was drawn before ``k`` can be counted without replaying anything.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

_MASK = (1 << 64) - 1
_UNIT_SALT = 0xD1B54A32D192ED03  # separates the per-unit round from the per-step one


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = (x + np.uint64(0x9E3779B97F4A7C15)) & np.uint64(_MASK)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _to_unit_interval(x: np.ndarray) -> np.ndarray:
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def uniform(seed: int, steps: np.ndarray) -> np.ndarray:
    """[n] uniform numbers in [0, 1) for ``steps`` [n] under ``seed`` (53 random bits each)."""
    with np.errstate(over="ignore"):
        key = _splitmix64(np.array([seed & _MASK], dtype=np.uint64))
        x = _splitmix64(np.asarray(steps, dtype=np.uint64) ^ key)
    return _to_unit_interval(x)


def uniform_per_unit(seed: int, steps: np.ndarray, unit: int) -> np.ndarray:
    """[n] uniform numbers in [0, 1) for ``steps`` [n] of draw unit ``unit`` under ``seed``."""
    with np.errstate(over="ignore"):
        key = _splitmix64(np.array([seed & _MASK], dtype=np.uint64))
        x = _splitmix64(np.asarray(steps, dtype=np.uint64) ^ key)
        salt = np.uint64((_UNIT_SALT * (unit + 1)) & _MASK)
        x = _splitmix64(x ^ salt)
    return _to_unit_interval(x)


class TaskSampler:
    """Weighted task draw per step (``unit=None``) or per step and draw unit; tasks with
    weight 0 are never drawn."""

    def __init__(self, weights: Mapping[str, float], seed: int) -> None:
        self.names = [name for name, w in weights.items() if w > 0]
        if not self.names:
            raise ValueError("no task has a weight > 0")
        w = np.array([weights[n] for n in self.names], dtype=np.float64)
        self.probs = w / w.sum()
        self._cumulative = np.cumsum(self.probs)
        self._cumulative[-1] = 1.0  # uniform() < 1, so the last task catches rounding
        self.seed = seed

    def indices(self, start: int, stop: int, unit: int | None = None) -> np.ndarray:
        """[stop - start] task indices (into ``names``) of steps start .. stop-1 (of draw unit
        ``unit``; None = the one draw per step)."""
        steps = np.arange(start, stop, dtype=np.uint64)
        u = uniform(self.seed, steps) if unit is None else uniform_per_unit(self.seed, steps, unit)
        return np.searchsorted(self._cumulative, u, side="right")

    def task_at(self, step: int, unit: int | None = None) -> str:
        """The task of training step ``step`` (for draw unit ``unit``)."""
        return self.names[int(self.indices(step, step + 1, unit)[0])]

    def tasks(self, start: int, stop: int, unit: int | None = None) -> list[str]:
        """Tasks of steps start .. stop-1 (for draw unit ``unit``)."""
        return [self.names[int(i)] for i in self.indices(start, stop, unit)]
