"""The training stream: deterministic, independent of loader workers, resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_uni.config import Config, ConfigError
from megatron_uni.data.loader import MultiTaskLoader
from megatron_uni.data.sampler import TaskSampler
from tests.unit.data.conftest import assert_steps_equal, demo_config

STEPS = 14


def run(cfg: Config, steps: int, *, workers: int = 0, dp_rank: int = 0, dp_size: int = 1,
        microbatches: int = 2, start_step: int = 0) -> list:
    with MultiTaskLoader(cfg, dp_rank, dp_size, microbatches, start_step,
                         num_workers=workers) as loader:
        return [loader.next_step() for _ in range(steps)]


@pytest.fixture(scope="module")
def reference(demo_root: Path) -> list:
    """The uninterrupted stream every other run is compared with."""
    return run(demo_config(demo_root), STEPS)


def test_same_seed_same_batches_and_tasks_follow_the_sampler(demo_cfg: Config,
                                                              reference: list) -> None:
    assert_steps_equal(run(demo_cfg, STEPS), reference)
    weights = {n: t.weight for n, t in demo_cfg.data.tasks.items()}
    assert [task for task, _ in reference] == TaskSampler(weights, demo_cfg.data.seed).tasks(
        0, STEPS)
    for task, batches in reference:
        assert len(batches) == 2 and all(b.task_name == task for b in batches)
        a, b = batches
        assert not (torch.equal(a.text_ids, b.text_ids) and torch.equal(a.images, b.images))
    other = run(demo_config(demo_cfg.data.root, "data.seed=7"), 4)
    assert [t for t, _ in other] != [t for t, _ in reference[:4]] or not torch.equal(
        other[0][1][0].images, reference[0][1][0].images)


def test_workers_do_not_change_the_stream(demo_cfg: Config, reference: list) -> None:
    assert_steps_equal(run(demo_cfg, STEPS, workers=2), reference)


def test_resume_from_saved_position_matches_uninterrupted(demo_cfg: Config,
                                                          reference: list) -> None:
    cut = 6
    with MultiTaskLoader(demo_cfg, 0, 1, 2, num_workers=2) as loader:
        first = [loader.next_step() for _ in range(cut)]
        state = json.loads(json.dumps(loader.state_dict()))  # plain values, as in a checkpoint
    assert state["step"] == cut
    assert_steps_equal(first, reference[:cut])
    resumed = MultiTaskLoader(demo_cfg, 0, 1, 2, num_workers=0)  # another worker count
    resumed.load_state_dict(state)
    assert resumed.step == cut
    assert_steps_equal([resumed.next_step() for _ in range(STEPS - cut)], reference[cut:])
    # Resuming the same loader in place works too.
    resumed.load_state_dict(state)
    assert_steps_equal([resumed.next_step() for _ in range(2)], reference[cut : cut + 2])


def test_start_step_without_state_fast_forwards(demo_cfg: Config, reference: list) -> None:
    assert_steps_equal(run(demo_cfg, STEPS - 9, start_step=9), reference[9:])


def test_data_parallel_ranks_share_tasks_not_samples(demo_cfg: Config) -> None:
    rank0 = run(demo_cfg, 6, dp_rank=0, dp_size=2, microbatches=1)
    rank1 = run(demo_cfg, 6, dp_rank=1, dp_size=2, microbatches=1)
    assert [t for t, _ in rank0] == [t for t, _ in rank1]  # synchronised task draws
    for (_, a), (_, b) in zip(rank0, rank1):
        assert a[0].text_ids.shape == b[0].text_ids.shape  # fixed shapes
        assert not (torch.equal(a[0].text_ids, b[0].text_ids)
                    and torch.equal(a[0].images, b[0].images))
    # A replica's tensor/pipeline peers call with the same (dp_rank, dp_size): same batches.
    assert_steps_equal(run(demo_cfg, 6, dp_rank=1, dp_size=2, microbatches=1), rank1)


GLOBAL_SLOTS = 4


@pytest.fixture
def slot_cfg(demo_root: Path) -> Config:
    """2 streams per slot: 4 slots x 2 = 8 readers, fewer than the 12 videos of a demo shard (with
    more readers than shards every reader keeps every 8th sample of each shard)."""
    return demo_config(demo_root, "data.reader_streams=2")


def _global_steps(cfg: Config, dp_size: int, steps: int, start_step: int = 0) -> list:
    """[step] -> (task, [slot] -> batch): the ranks' micro-batches joined in slot order."""
    ranks = [run(cfg, steps, dp_rank=r, dp_size=dp_size, microbatches=GLOBAL_SLOTS // dp_size,
                 start_step=start_step) for r in range(dp_size)]
    joined = []
    for per_rank in zip(*ranks):
        assert len({task for task, _ in per_rank}) == 1
        joined.append((per_rank[0][0], [b for _, batches in per_rank for b in batches]))
    return joined


def test_global_batch_does_not_depend_on_the_data_parallel_size(slot_cfg: Config) -> None:
    """Same global batch (4 slots per step) over dp 1, 2 and 4: the union of the ranks'
    micro-batches is the same at every step, slot by slot (tensors, labels, packing)."""
    steps = 5
    single = _global_steps(slot_cfg, 1, steps)
    assert len({task for task, _ in single}) > 1  # several tasks, so several plans are checked
    for _, batches in single:
        assert len(batches) == GLOBAL_SLOTS
        a, b = batches[:2]  # slots hold different samples
        assert not (torch.equal(a.text_ids, b.text_ids) and torch.equal(a.images, b.images))
    for dp_size in (2, 4):
        assert_steps_equal(_global_steps(slot_cfg, dp_size, steps), single)
    # The fast-forward path (start_step without a saved position) agrees across sizes too.
    assert_steps_equal(_global_steps(slot_cfg, 2, 2, start_step=3), single[3:5])


def test_position_resumes_under_another_data_parallel_size(slot_cfg: Config) -> None:
    """Positions saved by 2 ranks x 2 micro-batches resume 4 ranks x 1 and 1 rank x 4."""
    cut, total = 3, 6
    whole = _global_steps(slot_cfg, 1, total)
    states = []
    for r in range(2):
        with MultiTaskLoader(slot_cfg, r, 2, 2) as loader:
            for _ in range(cut):
                loader.next_step()
            states.append(json.loads(json.dumps(loader.state_dict())))
    joined = {**states[0], "slots": states[0]["slots"] + states[1]["slots"]}
    for dp_size in (4, 1):
        resumed = []
        for r in range(dp_size):
            loader = MultiTaskLoader(slot_cfg, r, dp_size, GLOBAL_SLOTS // dp_size)
            loader.load_state_dict(joined)
            resumed.append([loader.next_step() for _ in range(total - cut)])
            loader.close()
        steps = [(per_rank[0][0], [b for _, bs in per_rank for b in bs])
                 for per_rank in zip(*resumed)]
        assert_steps_equal(steps, whole[cut:])


def test_position_from_another_setup_is_refused(demo_cfg: Config) -> None:
    loader = MultiTaskLoader(demo_cfg, 0, 2, 1)
    loader.next_step()
    state = loader.state_dict()
    with pytest.raises(ValueError, match=r"lacks slots \[1\] of this rank"):
        MultiTaskLoader(demo_cfg, 1, 2, 1).load_state_dict(state)
    with pytest.raises(ValueError, match="num_slots=2 cannot resume a loader with num_slots=4"):
        MultiTaskLoader(demo_cfg, 0, 2, 2).load_state_dict(state)
    with pytest.raises(ValueError, match="format 1"):
        MultiTaskLoader(demo_cfg, 0, 2, 1).load_state_dict({**state, "version": 1})
    with pytest.raises(ConfigError, match="data.num_workers=3"):
        MultiTaskLoader(demo_cfg, 0, 1, 1, num_workers=3)


# ---------------------------------------------------------------- per-rank task mixing
def _mix_cfg(root: Path, *extra: str) -> Config:
    return demo_config(root, "data.task_sampling=per_rank", "data.reader_streams=1", *extra)


def test_per_rank_replicas_draw_their_own_task_and_peers_alike(demo_root: Path) -> None:
    cfg = _mix_cfg(demo_root)
    ranks = [run(cfg, 12, dp_rank=r, dp_size=4, microbatches=2) for r in range(4)]
    sampler = TaskSampler({n: t.weight for n, t in cfg.data.tasks.items()}, cfg.data.seed)
    for r, steps in enumerate(ranks):
        # unit = first slot // slots_per_draw = rank: the task is f(seed, step, unit)
        assert [t for t, _ in steps] == sampler.tasks(0, 12, unit=r)
        for task, batches in steps:
            assert {b.task_name for b in batches} == {task}  # one task per rank per step
            assert len({(b.num_rows, b.seq_len) for b in batches}) == 1
    per_step = [{ranks[r][k][0] for r in range(4)} for k in range(12)]
    assert any(len(tasks) > 1 for tasks in per_step)  # steps mix tasks
    # A replica's TP / PP peers build the same batches.
    assert_steps_equal(run(cfg, 12, dp_rank=2, dp_size=4, microbatches=2), ranks[2])


def test_per_rank_draw_shared_by_expert_parallel_replicas(demo_root: Path) -> None:
    cfg = _mix_cfg(demo_root)
    with MultiTaskLoader(cfg, 2, 4, 1, draw_ranks=2) as a, \
            MultiTaskLoader(cfg, 3, 4, 1, draw_ranks=2) as b:
        assert [a.next_step()[0] for _ in range(10)] == [b.next_step()[0] for _ in range(10)]
    from megatron_uni.data.loader import task_draw_ranks

    moe = ["moe.num_experts=4", "parallel.ep=2", "parallel.tp=1"]
    assert task_draw_ranks(_mix_cfg(demo_root, *moe, "moe.execution=auto")) == 2
    assert task_draw_ranks(_mix_cfg(demo_root, *moe, "moe.execution=grouped")) == 1
    assert task_draw_ranks(_mix_cfg(demo_root, "moe.num_experts=4", "parallel.ep=2",
                                    "parallel.tp=2", "parallel.etp=1")) == 1
    assert task_draw_ranks(_mix_cfg(demo_root, "moe.num_experts=4", "parallel.ep=2",
                                    "parallel.tp=2")) == 2


def test_per_rank_resumes_exactly(demo_root: Path) -> None:
    cfg = _mix_cfg(demo_root)
    whole = run(cfg, 8, dp_rank=1, dp_size=2, microbatches=1)
    with MultiTaskLoader(cfg, 1, 2, 1) as loader:
        for _ in range(3):
            loader.next_step()
        state = json.loads(json.dumps(loader.state_dict()))
    with MultiTaskLoader(cfg, 1, 2, 1) as loader:
        loader.load_state_dict(state)
        assert_steps_equal([loader.next_step() for _ in range(5)], whole[3:])
    # Fast-forward without a saved position counts this unit's draws.
    assert_steps_equal(run(cfg, 5, dp_rank=1, dp_size=2, microbatches=1, start_step=3), whole[3:])


def test_per_rank_packs_every_shared_target_set(demo_root: Path) -> None:
    """Split target sets: each rank packs its shard of every shared set whatever its task."""
    split = [f"data.tasks.{t}.split_target_set=true" for t in ("image_cls", "mlm",
                                                               "image_caption")]
    cfg = _mix_cfg(demo_root, *split)
    seen = set()
    with MultiTaskLoader(cfg, 1, 2, 1) as loader:
        for _ in range(12):
            task, (batch,) = loader.next_step()
            spec = batch.loss
            seen.add(task)
            # class names (image_cls) and the vocabulary (mlm + captioning share vocab.json)
            assert len(spec.shared_sizes) == 2 and spec.local_negatives
            assert spec.shared_index.numel() == sum(spec.shared_sizes)
            own = {"image_cls": 0, "mlm": 1, "image_caption": 1}.get(task, -1)
            assert spec.own_shared == own
            if own >= 0:  # the task's own shard is the shared one
                start = sum(spec.shared_sizes[:own])
                assert torch.equal(spec.shared_index[start:start + spec.shared_sizes[own]],
                                   spec.target_index)
            sides = batch.side.reshape(-1)[spec.shared_index]
            assert bool((sides == 1).all())  # target side
    assert len(seen) > 2
