"""Task draws: frequencies match the weights, identical on every rank, stateless."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_uni.data.sampler import TaskSampler, uniform

# The demo's weights (configs/tasks/demo.yaml) plus a held-out task of weight 0.
WEIGHTS = {"image_cls": 2.5, "video_cls": 1.2, "mlm": 2.75, "image_caption": 1.8,
           "image_text_retrieval": 1.8, "held_out": 0.0}
# Chi-square critical value for 4 degrees of freedom at p = 0.001.
CHI2_DF4_P001 = 18.467


@pytest.mark.parametrize("seed", [0, 1, 1234])
def test_frequencies_over_10000_draws_match_weights(seed: int) -> None:
    sampler = TaskSampler(WEIGHTS, seed)
    draws = sampler.tasks(0, 10_000)
    names = sampler.names
    assert "held_out" not in names and "held_out" not in draws
    observed = np.array([draws.count(n) for n in names])
    total = sum(WEIGHTS[n] for n in names)
    expected = np.array([10_000 * WEIGHTS[n] / total for n in names])
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < CHI2_DF4_P001, (dict(zip(names, observed)), chi2)
    # And every frequency within 1.5 percentage points of its weight.
    assert np.abs(observed / 10_000 - expected / 10_000).max() < 0.015


def test_draw_is_a_function_of_seed_and_step_only() -> None:
    a, b = TaskSampler(WEIGHTS, 7), TaskSampler(dict(WEIGHTS), 7)
    assert a.tasks(0, 500) == b.tasks(0, 500)
    # Any window agrees with the full sequence: resuming at a step needs no state.
    assert a.tasks(123, 200) == a.tasks(0, 200)[123:]
    assert [a.task_at(k) for k in range(40, 60)] == a.tasks(40, 60)
    assert TaskSampler(WEIGHTS, 8).tasks(0, 500) != a.tasks(0, 500)


def test_uniform_is_uniform_and_in_range() -> None:
    u = uniform(3, np.arange(100_000))
    assert 0.0 <= u.min() and u.max() < 1.0
    counts, _ = np.histogram(u, bins=10, range=(0, 1))
    assert np.abs(counts / 10_000 - 1).max() < 0.05


def test_single_task_and_no_task() -> None:
    assert set(TaskSampler({"only": 0.3}, 0).tasks(0, 100)) == {"only"}
    with pytest.raises(ValueError, match="no task"):
        TaskSampler({"a": 0.0}, 0)


@pytest.mark.parametrize("unit", [0, 1, 5])
def test_per_unit_frequencies_match_weights(unit: int) -> None:
    """Per-rank mixing: every draw unit (replica) on its own follows the weights."""
    sampler = TaskSampler(WEIGHTS, 1234)
    draws = sampler.tasks(0, 10_000, unit=unit)
    names = sampler.names
    observed = np.array([draws.count(n) for n in names])
    total = sum(WEIGHTS[n] for n in names)
    expected = np.array([10_000 * WEIGHTS[n] / total for n in names])
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < CHI2_DF4_P001, (dict(zip(names, observed)), chi2)


def test_units_draw_independently_and_statelessly() -> None:
    sampler = TaskSampler(WEIGHTS, 7)
    a, b = sampler.indices(0, 4000, unit=0), sampler.indices(0, 4000, unit=1)
    # Independent units agree about as often as two independent draws do (sum of p^2).
    agree = float((a == b).mean())
    assert abs(agree - float((sampler.probs ** 2).sum())) < 0.03
    assert not np.array_equal(a, sampler.indices(0, 4000))  # not the per-step draw either
    assert sampler.tasks(100, 150, unit=3) == sampler.tasks(0, 150, unit=3)[100:]
    assert [sampler.task_at(k, 3) for k in range(10)] == sampler.tasks(0, 10, unit=3)
    # A step mixes tasks across units: with 8 units nearly every step has more than one task.
    mixed = np.mean([len({sampler.task_at(k, u) for u in range(8)}) > 1 for k in range(200)])
    assert mixed > 0.95
