"""The multi-task training stream (:class:`MultiTaskLoader`) and evaluation (:class:`EvalLoader`).

Which task a step trains (:mod:`megatron_uni.data.sampler`), by ``data.task_sampling``:
- ``per_step``: one task per step, drawn by weight from ``(data.seed, step)``; every
  data-parallel rank trains it (retrieval then gathers negatives across all ranks);
- ``per_rank`` (the reference's ``WeightedBatchSampler``): each *draw unit* draws its own task
  from ``(data.seed, step, unit)``. A unit is ``draw_ranks`` consecutive data-parallel replicas
  (``slots_per_draw = draw_ranks * num_microbatches`` slots; slot ``g`` is in unit
  ``g // slots_per_draw``): one replica, or the replicas that one expert-parallel token exchange
  spans when the MoE path needs equal shapes across it (training/loop.py ``task_draw_ranks``).
  TP / PP peers read the same slots, so they draw alike. All micro-batches of a rank share the
  draw (megatron's schedule needs one [R, S] per rank per step). Split target sets are encoded
  in shards by every rank every step whatever its task (data/tasks.py ``TargetMix``), so their
  gather stays aligned; retrieval takes in-batch negatives only (other ranks may be in other
  tasks; heads.py).

The global batch is a function of the step, as in megatron: a step is ``G`` global micro-batch
*slots* (``G = dp_size * num_microbatches`` = ``train.global_batch_size /
train.micro_batch_size``), and data-parallel rank ``r`` takes slots ``g = r * num_microbatches
+ j`` as its micro-batches ``j = 0 .. num_microbatches - 1`` (gradient accumulation), each a
:class:`PackedBatch` of the task's fixed shape [R, S]. Everything in slot ``g``'s micro-batch
(the shard stream it reads, augmentation, masking, mixup and packing seeds) is a function of
(data.seed, task, g, step) and the data config only, not of the data-parallel rank or size: with
the global batch kept, a run under another data-parallel size trains on the same samples in the
same steps (the micro-batches just land on other ranks). What still depends on the
data-parallel size is the part of a split target set (``split_target_set``) a rank encodes, and
with it ``num_rows`` when unset; the gathered target set, hence the loss, is the same.

What a slot reads. Every task has ``data.reader_streams`` (V) independent
:class:`~megatron_uni.data.readers.SampleStream` s per slot; step ``k`` takes its micro-batch
from stream ``k % V`` of its task. Shards are split over the ``G * V`` streams of all slots
(write at least that many shards per task, or every stream reads every shard and keeps every
``G * V``-th sample). Loader worker ``w`` of ``W`` (W divides V) serves the steps with
``k % W == w``, hence exactly the streams ``v % W == w``, and the main process puts the steps
back in order. So the batches do not depend on the global rank (tensor- and pipeline-parallel
peers of a replica build identical batches), nor on the number of workers (0, 1, 2 and 4
workers give the same stream, and a run may resume with another number of workers).

Resuming. :meth:`MultiTaskLoader.state_dict` is the data position: the next step, and per slot
of this rank and per (task, stream) its :class:`~megatron_uni.data.readers.Position` and
bad-sample count. :meth:`~MultiTaskLoader.load_state_dict` takes a state that holds (at least)
this rank's slots, whichever data-parallel size saved them (the checkpoint stores one object per
slot), and the stream continues exactly (shards are re-opened and the samples before the
position skipped without decoding). ``start_step`` without a saved state fast-forwards by
counting the samples each stream would have used; that is exact unless samples failed to decode
before ``start_step``. Bad samples are counted per slot stream; ``data.max_bad_samples`` bounds
the sum over a rank's slots.
"""

from __future__ import annotations

import copy
import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from megatron_uni.config import Config, ConfigError
from megatron_uni.batch import PackedBatch
from megatron_uni.data.examples import Decoder, Example, SampleError, make_micro_batch
from megatron_uni.data.readers import (
    BadDataError,
    BadSampleCounter,
    Position,
    SampleStream,
    read_in_order,
    stable_hash,
)
from megatron_uni.data.sampler import TaskSampler
from megatron_uni.data.task_plan import TaskPlan, plan_task, plan_training_tasks
from megatron_uni.data.transforms import seeded
from megatron_uni.data.text_tokenizer import ClipTokenizer, get_tokenizer

logger = logging.getLogger(__name__)

STATE_VERSION = 2  # 1: positions per data-parallel rank (a data order that depended on dp_size)


def slot_range(dp_rank: int, num_microbatches: int) -> range:
    """The global micro-batch slots data-parallel rank ``dp_rank`` reads, in micro-batch order."""
    return range(dp_rank * num_microbatches, (dp_rank + 1) * num_microbatches)


def task_draw_ranks(cfg: Config) -> int:
    """Consecutive data-parallel replicas that must share a task draw under per-rank mixing.

    TP / PP peers of a replica share it by construction (same slots). Expert-parallel groups
    span data-parallel replicas: megatron's EP x expert-TP group of a rank is ``ep * etp``
    consecutive ranks of one pipeline stage, i.e. ``ep * etp / tp`` consecutive replicas. They
    must train one shape when the expert linears may exchange tokens: the all-gather token
    dispatcher gathers ``[rows * seq_len, h]`` across that group (equal sizes), and ``auto``
    picks dispatch or grouped from the micro-batch's shape, so peers of different shapes would
    run different collectives. ``moe.execution=grouped`` gathers only expert weights (shapes
    fixed by the model), so each replica draws on its own there, as without MoE or EP."""
    p, moe = cfg.parallel, cfg.moe
    if not moe.enabled or p.ep == 1 or moe.execution == "grouped":
        return 1
    return max(1, p.ep * p.expert_tp() // p.tp)


@dataclass
class _Step:
    """One produced step, with the positions (per slot) of the stream it used after it."""

    step: int
    task: str
    batches: list[PackedBatch]
    stream: int
    positions: list[tuple[int, int, int]]
    bad_samples: list[int]


@dataclass
class _Setup:
    """Everything a producer needs; pickled into loader workers."""

    plans: dict[str, TaskPlan]
    sampler: TaskSampler
    seed: int
    slots: range  # this rank's global micro-batch slots
    num_slots: int  # G: slots per step over all data-parallel ranks
    num_streams: int
    shuffle_buffer: int
    max_bad_samples: int
    start_step: int
    draw_unit: int | None = None  # per-rank mixing: this rank's draw unit (None: per step)
    # [slot][task] -> per stream: position / bad-sample count
    positions: dict[int, dict[str, list[tuple[int, int, int] | None]]] = field(
        default_factory=dict)
    bad: dict[int, dict[str, list[int]]] = field(default_factory=dict)


def _identity(item: Any) -> Any:
    return item


class _Producer:
    """Builds steps from the streams it owns (created on first use)."""

    def __init__(self, setup: _Setup, tokenizer: ClipTokenizer) -> None:
        self.setup = setup
        self.tokenizer = tokenizer
        self.streams: dict[tuple[str, int, int], SampleStream] = {}
        self.decoders = {n: Decoder(p, tokenizer, train=True) for n, p in setup.plans.items()}
        self._history: np.ndarray | None = None

    def _stream(self, task: str, slot: int, v: int) -> SampleStream:
        if (task, slot, v) in self.streams:
            return self.streams[task, slot, v]
        s = self.setup
        saved = s.positions[slot][task][v]
        counter = BadSampleCounter(task, s.max_bad_samples, s.bad[slot][task][v])
        stream = SampleStream(
            list(s.plans[task].shards), task=task, seed=s.seed,
            unit=slot * s.num_streams + v, num_units=s.num_slots * s.num_streams,
            shuffle_buffer=s.shuffle_buffer, counter=counter,
            position=Position(*saved) if saved is not None else Position(),
        )
        if saved is None and s.start_step > 0:
            for _ in range(self._samples_before_start(task, v)):
                next(stream)
        self.streams[task, slot, v] = stream
        return stream

    def _samples_before_start(self, task: str, v: int) -> int:
        """Samples stream v of ``task`` (of any slot) used in steps before start_step (no decode
        failures)."""
        s = self.setup
        if self._history is None:
            self._history = s.sampler.indices(0, s.start_step, s.draw_unit)
        steps = np.arange(s.start_step)
        drawn = (self._history == s.sampler.names.index(task)) & (steps % s.num_streams == v)
        return int(drawn.sum()) * s.plans[task].cfg.micro_batch_size

    def produce(self, step: int) -> _Step:
        s = self.setup
        task = s.sampler.task_at(step, s.draw_unit)
        v = step % s.num_streams
        plan, decoder = s.plans[task], self.decoders[task]
        batches, positions, bad = [], [], []
        for slot in s.slots:
            stream = self._stream(task, slot, v)
            # No data-parallel rank or size in here: slot g's batch is the same whoever reads it.
            seed = [s.seed, stable_hash("batch", task), slot, step]
            rng = np.random.default_rng(seed)
            examples: list[Example] = []
            with seeded(int(rng.integers(2**62))) as reseed:
                while len(examples) < plan.cfg.micro_batch_size:
                    raw = next(stream)
                    sample_rng = np.random.default_rng([*seed, len(examples)])
                    try:
                        examples.append(decoder(raw, sample_rng, reseed))
                    except SampleError as err:
                        stream.skip(raw, str(err))
                batches.append(make_micro_batch(plan, examples, rng, train=True))
            positions.append(tuple(stream.position))
            bad.append(stream.counter.count)
        return _Step(step, task, batches, v, positions, bad)


class _StepDataset(IterableDataset):
    """Endless steps; in a worker only the steps (and streams) of that worker."""

    def __init__(self, setup: _Setup) -> None:
        self.setup = setup

    def __iter__(self) -> Iterator[_Step]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        producer = _Producer(self.setup, get_tokenizer())
        start = self.setup.start_step
        first = start + (worker - start) % workers
        for step in itertools.count(first, workers):
            yield producer.produce(step)


def _check_transforms(plan: TaskPlan, tokenizer: ClipTokenizer) -> None:
    try:
        Decoder(plan, tokenizer, train=True)
    except (AssertionError, ValueError, KeyError) as err:
        field = f"data.tasks.{plan.name}.rand_augment"
        raise ConfigError(
            f"task {plan.name}: timm cannot build its training transform ({err!r})",
            field=field, value=plan.cfg.rand_augment,
            fix="use a timm RandAugment spec such as rand-m9-mstd0.5-inc1, or ''",
        ) from None


class MultiTaskLoader:
    """Training micro-batches for data-parallel rank ``dp_rank`` of ``dp_size``: its slots
    ``dp_rank * num_microbatches + j`` of the ``dp_size * num_microbatches`` slots per step.

    ``next_step() -> (task name, [PackedBatch] * num_microbatches)``; also an iterator of
    those. ``state_dict()`` / ``load_state_dict()`` save and restore the data position.
    ``num_workers`` overrides ``data.num_workers``. ``draw_ranks``: under per-rank mixing, the
    consecutive data-parallel replicas that share one task draw (must divide ``dp_size``).
    """

    def __init__(
        self,
        cfg: Config,
        dp_rank: int,
        dp_size: int,
        num_microbatches: int,
        start_step: int = 0,
        *,
        num_workers: int | None = None,
        draw_ranks: int = 1,
    ) -> None:
        if num_microbatches < 1:
            raise ValueError(f"num_microbatches must be >= 1, got {num_microbatches}")
        d = cfg.data
        self.num_workers = d.num_workers if num_workers is None else num_workers
        if self.num_workers > 0 and d.reader_streams % self.num_workers:
            raise ConfigError(
                f"loader workers must divide data.reader_streams ({d.reader_streams})",
                field="data.num_workers", value=self.num_workers,
                fix="use a divisor of data.reader_streams, or change data.reader_streams",
            )
        tokenizer = get_tokenizer()
        self.plans = plan_training_tasks(cfg, dp_rank, dp_size, tokenizer)
        for plan in self.plans.values():
            # Fails here, not in a worker, on a bad augmentation spec; and workers forked from
            # this process find timm imported already.
            _check_transforms(plan, tokenizer)
        sampler = TaskSampler({n: cfg.data.tasks[n].weight for n in self.plans}, d.seed)
        slots = slot_range(dp_rank, num_microbatches)
        unit = None
        self.draw_ranks = draw_ranks  # kept for a loader rebuilt at another start step
        if d.task_sampling == "per_rank":
            if draw_ranks < 1 or dp_size % draw_ranks:
                raise ValueError(f"draw_ranks={draw_ranks} must divide dp_size={dp_size}")
            self.slots_per_draw = draw_ranks * num_microbatches
            unit = slots[0] // self.slots_per_draw
        else:
            self.slots_per_draw = dp_size * num_microbatches
        self._setup = _Setup(
            plans=self.plans, sampler=sampler, seed=d.seed, slots=slots,
            num_slots=dp_size * num_microbatches, num_streams=d.reader_streams,
            shuffle_buffer=d.shuffle_buffer, max_bad_samples=d.max_bad_samples,
            start_step=start_step, draw_unit=unit,
            positions={g: {n: [None] * d.reader_streams for n in self.plans} for g in slots},
            bad={g: {n: [0] * d.reader_streams for n in self.plans} for g in slots},
        )
        self.sampler = sampler
        self.prefetch_factor = d.prefetch_factor
        self._step = start_step
        self._pending: dict[int, _Step] = {}
        self._loader: DataLoader | None = None
        self._iterator: Iterator[_Step] | None = None

    # ------------------------------------------------------------------ iteration
    @property
    def step(self) -> int:
        """The step the next call of :meth:`next_step` returns."""
        return self._step

    @property
    def slots(self) -> range:
        """This rank's global micro-batch slots (its micro-batches, in order)."""
        return self._setup.slots

    @property
    def num_slots(self) -> int:
        """Global micro-batch slots per step, over all data-parallel ranks."""
        return self._setup.num_slots

    @property
    def bad_samples(self) -> int:
        """Samples and shards skipped so far (over all tasks, slots and streams of this rank)."""
        return sum(sum(c) for per_task in self._setup.bad.values() for c in per_task.values())

    def _start(self) -> Iterator[_Step]:
        dataset = _StepDataset(copy.deepcopy(self._setup))  # workers see a snapshot
        if self.num_workers == 0:
            return iter(dataset)
        self._loader = DataLoader(
            dataset, batch_size=None, num_workers=self.num_workers, collate_fn=_identity,
            prefetch_factor=self.prefetch_factor,
        )
        return iter(self._loader)

    def next_step(self) -> tuple[str, list[PackedBatch]]:
        """The task and micro-batches of the next step."""
        if self._iterator is None:
            self._iterator = self._start()
        while self._step not in self._pending:
            item = next(self._iterator)
            self._pending[item.step] = item
        item = self._pending.pop(self._step)
        s = self._setup
        for slot, position, bad in zip(s.slots, item.positions, item.bad_samples):
            s.positions[slot][item.task][item.stream] = position
            s.bad[slot][item.task][item.stream] = bad
        if self.bad_samples > s.max_bad_samples:
            raise BadDataError(
                f"{self.bad_samples} bad samples or shards on this rank, more than "
                f"data.max_bad_samples={s.max_bad_samples} (see the warnings above)"
            )
        self._step += 1
        return item.task, item.batches

    def __iter__(self) -> Iterator[tuple[str, list[PackedBatch]]]:
        while True:
            yield self.next_step()

    # ------------------------------------------------------------------ position
    def state_dict(self) -> dict[str, Any]:
        """The data position after the steps returned so far (plain Python values): common
        fields and one entry per slot of this rank under ``"slots"``."""
        s = self._setup
        return {
            "version": STATE_VERSION,
            "step": self._step,
            "seed": s.seed,
            "reader_streams": s.num_streams,
            "num_slots": s.num_slots,
            "task_sampling": "per_step" if s.draw_unit is None else "per_rank",
            "slots_per_draw": self.slots_per_draw,
            "slots": [
                {"slot": g,
                 "positions": {t: [list(p) if p is not None else None for p in ps]
                               for t, ps in s.positions[g].items()},
                 "bad_samples": {t: list(c) for t, c in s.bad[g].items()}}
                for g in s.slots
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``: from :meth:`state_dict` of loaders with the same data config
        and number of slots per step (any data-parallel size), holding at least this rank's
        slots (entries of other slots are ignored); restarts the workers."""
        s = self._setup
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"data position of format {state.get('version')} cannot resume this loader "
                f"(format {STATE_VERSION}: positions per global micro-batch slot; format 1 "
                f"kept them per data-parallel rank, in a data order this version does not "
                f"produce): restart the data order with start_step instead"
            )
        expected = {"seed": s.seed, "reader_streams": s.num_streams, "num_slots": s.num_slots}
        for key, value in expected.items():
            if state.get(key) != value:
                raise ValueError(
                    f"data position saved with {key}={state.get(key)} cannot resume a loader "
                    f"with {key}={value}"
                    + (" (slots = train.global_batch_size / train.micro_batch_size)"
                       if key == "num_slots" else "")
                )
        mine = ("per_step" if s.draw_unit is None else "per_rank", self.slots_per_draw)
        theirs = (state.get("task_sampling", "per_step"), state.get("slots_per_draw", mine[1]))
        if theirs != mine:
            # The positions stay valid (they are per slot and task); which task a slot trains
            # at each step changes from here on.
            logger.warning(
                "data position saved with task sampling %s over %s slots per draw, this run "
                "%s over %s: the streams continue, the tasks per slot and step follow this run",
                *theirs, *mine)
        saved = {int(entry["slot"]): entry for entry in state["slots"]}
        missing = [g for g in s.slots if g not in saved]
        if missing:
            raise ValueError(f"data position lacks slots {missing} of this rank "
                             f"(it holds {sorted(saved)})")
        self.close()
        for g in s.slots:
            entry = saved[g]
            for task in self.plans:
                positions = entry["positions"].get(task)
                s.positions[g][task] = ([tuple(p) if p is not None else None for p in positions]
                                        if positions is not None else [None] * s.num_streams)
                s.bad[g][task] = list(entry["bad_samples"].get(task, [0] * s.num_streams))
        s.start_step = self._step = int(state["step"])
        self._pending.clear()

    def close(self) -> None:
        """Stop the loader workers (a later :meth:`next_step` starts them again)."""
        iterator, self._iterator, self._loader = self._iterator, None, None
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        s = self._setup
        s.start_step = self._step
        self._pending.clear()

    def __enter__(self) -> MultiTaskLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EvalLoader:
    """Evaluation micro-batches of one task: its ``eval_shards`` once, in file order,
    evaluation transforms, no mixup. Sample ``i`` goes to data-parallel rank ``i % dp_size``;
    the last micro-batch may be smaller (same [R, S] shape, fewer sequences)."""

    def __init__(self, cfg: Config, task: str, dp_rank: int = 0, dp_size: int = 1) -> None:
        if task not in cfg.data.tasks:
            raise ConfigError(f"no task {task!r} in data.tasks ({', '.join(cfg.data.tasks)})",
                              field="data.tasks", fix="name a configured task")
        self.tokenizer = get_tokenizer()
        self.plan = plan_task(cfg, task, dp_rank, dp_size, self.tokenizer,
                              need_train=False, need_eval=True)
        self.seed, self.dp_rank, self.dp_size = cfg.data.seed, dp_rank, dp_size
        self.counter = BadSampleCounter(task, cfg.data.max_bad_samples)

    def __iter__(self) -> Iterator[PackedBatch]:
        plan = self.plan
        decoder = Decoder(plan, self.tokenizer, train=False)
        examples: list[Example] = []
        raws = read_in_order(list(plan.eval_shards), self.counter)
        for i, raw in enumerate(raws):
            if i % self.dp_size != self.dp_rank:
                continue
            rng = np.random.default_rng([self.seed, stable_hash("eval", plan.name), i])
            try:
                with seeded(int(rng.integers(2**62))) as reseed:
                    examples.append(decoder(raw, rng, reseed))
            except SampleError as err:
                self.counter.record(raw.shard, raw.key, str(err))
                continue
            if len(examples) == plan.cfg.micro_batch_size:
                yield make_micro_batch(plan, examples, rng, train=False)
                examples = []
        if examples:
            yield make_micro_batch(plan, examples, np.random.default_rng(0), train=False)

