"""Evaluation samples and the packed batches evaluation runs.

Shape legend: N clips, T frames, C channels, H/W pixels, R rows, S row length, L caption slots.

Samples. :func:`eval_samples` reads a task's ``eval_shards`` once in file order, exactly as
:class:`~megatron_uni.data.loader.EvalLoader` does (sample ``i`` goes to data-parallel rank
``i % dp_size``, decoded with the evaluation transforms and a generator seeded by
``(data.seed, task, i)``), and keeps what evaluation needs besides the batch: the sample's global
index (results are put back in that order, so every layout reports the same) and all of its
reference captions (BLEU and retrieval use every caption, not the one a batch would hold).

Batches. Evaluation encodes a task's target set (class names, vocabulary) once, not in every
micro-batch as training does, so input batches carry no targets: the task builders of
:mod:`megatron_uni.data.tasks` are called with the empty target shard ``range(0)`` (labels still
index the full target list). Targets and captions are encoded on their own as "[SPE] text"
sequences with the attribute training gives them (``text_target`` for class names and
retrieval captions, ``vocab_target`` for vocabulary tokens), so every sequence is laid out and
routed exactly as in training.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from megatron_uni.config import Config
from megatron_uni.data import tasks
from megatron_uni.batch import IGNORE_INDEX, PackedBatch
from megatron_uni.data.examples import Decoder, Example, SampleError
from megatron_uni.data.readers import BadSampleCounter, read_in_order, stable_hash
from megatron_uni.data.task_plan import TaskPlan, worst_case_rows
from megatron_uni.data.transforms import seeded
from megatron_uni.data.text_tokenizer import ClipTokenizer

NO_TARGETS = range(0)  # the target shard of a batch that carries no targets


@dataclass
class EvalSample:
    """One decoded evaluation sample with its place in the eval set and its references."""

    index: int  # position in the task's eval shards (over all data-parallel ranks)
    example: Example
    references: tuple[str, ...] = ()  # every caption (captioning, retrieval)


def eval_samples(
    cfg: Config, plan: TaskPlan, tokenizer: ClipTokenizer, dp_rank: int, dp_size: int
) -> Iterator[EvalSample]:
    """This data-parallel rank's samples of ``plan``'s eval shards (see the module docstring);
    undecodable samples are skipped and counted against ``data.max_bad_samples``."""
    decoder = Decoder(plan, tokenizer, train=False)
    counter = BadSampleCounter(plan.name, cfg.data.max_bad_samples)
    for i, raw in enumerate(read_in_order(list(plan.eval_shards), counter)):
        if i % dp_size != dp_rank:
            continue
        rng = np.random.default_rng([cfg.data.seed, stable_hash("eval", plan.name), i])
        try:
            with seeded(int(rng.integers(2**62))) as reseed:
                example = decoder(raw, rng, reseed)
            references = (
                tuple(decoder._captions(raw))  # noqa: SLF001 - the decoder's caption rules
                if plan.family in ("captioning", "retrieval") else ()
            )
        except SampleError as err:
            counter.record(raw.shard, raw.key, str(err))
            continue
        yield EvalSample(i, example, references)


def micro_batches(samples: Iterator[EvalSample], size: int) -> Iterator[list[EvalSample]]:
    """Consecutive groups of ``size`` samples (the last may be smaller)."""
    group: list[EvalSample] = []
    for sample in samples:
        group.append(sample)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def dummy_sample(plan: TaskPlan, tokenizer: ClipTokenizer) -> EvalSample:
    """A sample of the task's shape whose results are thrown away (lockstep padding)."""
    cfg = plan.cfg
    clip = None
    if plan.family != "mlm":
        clip = torch.zeros(cfg.num_frames, 3, cfg.image_size, cfg.image_size)
    example = Example("dummy", clip=clip, label=0, text=(tokenizer.eot_id,),
                      mlm_labels=(IGNORE_INDEX,))
    return EvalSample(-1, example, ("",))


def clips_of(group: Sequence[EvalSample]) -> torch.Tensor:
    """The clips of ``group`` as one ``[N, T, C, H, W]`` tensor."""
    return torch.stack([s.example.clip for s in group])


def _common(plan: TaskPlan, rows: int) -> dict:
    return dict(seq_len=plan.seq_len, num_rows=rows, task_id=plan.task_id, task_name=plan.name)


# ----------------------------------------------------------------------- input batches
def clip_rows(plan: TaskPlan) -> int:
    """Rows of a micro-batch of ``micro_batch_size`` "[SPE] clip" inputs and no targets."""
    return max(worst_case_rows("classification", plan.cfg.micro_batch_size, plan.seq_len,
                               plan.clip_tokens, 0, []), 1)


def clip_batch(plan: TaskPlan, group: Sequence[EvalSample]) -> PackedBatch:
    """"[SPE] clip" inputs (classification; retrieval's visual side: the same sequences),
    labels = class indices (0 for retrieval); query i = clip i's SPE."""
    labels = torch.tensor([max(s.example.label, 0) for s in group], dtype=torch.long)
    return tasks.classification_batch(
        clips_of(group), labels, plan.class_names, patch_size=plan.patch_size, video=plan.video,
        shard=NO_TARGETS, **_common(plan, clip_rows(plan)))


def mlm_rows(plan: TaskPlan) -> int:
    return max(worst_case_rows("mlm", plan.cfg.micro_batch_size, plan.seq_len, 0,
                               plan.max_text_len, []), 1)


def mlm_input_batch(plan: TaskPlan, group: Sequence[EvalSample]) -> PackedBatch:
    """Masked texts; queries = masked positions, labels = vocabulary index of the original
    token (IGNORE_INDEX when it is not in the vocabulary)."""
    return tasks.mlm_batch([s.example.text for s in group], [s.example.mlm_labels for s in group],
                           plan.vocab, shard=NO_TARGETS, **_common(plan, mlm_rows(plan)))


def caption_rows(plan: TaskPlan) -> int:
    return max(worst_case_rows("captioning", plan.cfg.micro_batch_size, plan.seq_len,
                               plan.clip_tokens, plan.max_text_len, []), 1)


def caption_batch(plan: TaskPlan, clips: torch.Tensor, captions: torch.Tensor) -> PackedBatch:
    """"[SPE] clip caption slots" with ``captions`` ``[N, L]`` (L = plan.max_text_len) token ids;
    query ``i * L + t`` is slot t of clip i, which sees the clip and caption tokens ``< t``."""
    return tasks.captioning_batch(
        clips, captions.tolist(), plan.vocab, patch_size=plan.patch_size,
        max_caption_len=captions.shape[1], video=plan.video, shard=NO_TARGETS,
        **_common(plan, caption_rows(plan)))


# ----------------------------------------------------------------------- text batches
def texts_per_batch(plan: TaskPlan, rows: int, longest: int) -> int:
    """"[SPE] text" sequences of at most ``longest`` text tokens that always fit ``rows`` rows:
    first fit leaves no row with fewer than S // (1 + longest) of them unfilled."""
    per_row = plan.seq_len // (1 + longest)
    if per_row < 1:
        raise ValueError(f"task {plan.name}: texts of {longest} tokens do not fit rows of "
                         f"{plan.seq_len}")
    return rows * per_row


def text_batch(plan: TaskPlan, texts: Sequence[Sequence[int]], vocab: bool, rows: int
               ) -> PackedBatch:
    """"[SPE] text" sequences only: vocabulary entries (``vocab``: one token each, attribute
    ``vocab_target``) or class names / captions (``text_target``); their SPE positions are
    ``loss.target_index`` in order."""
    texts = [tuple(int(i) for i in t) for t in texts]
    common = _common(plan, rows)
    if vocab:
        if any(len(t) != 1 for t in texts):
            raise ValueError("vocabulary entries are single tokens")
        return tasks.mlm_batch([], [], [t[0] for t in texts], shard=range(len(texts)), **common)
    no_clips = torch.zeros(0, 1, 3, plan.patch_size, plan.patch_size)
    return tasks.classification_batch(
        no_clips, torch.zeros(0, dtype=torch.long), texts, patch_size=plan.patch_size,
        shard=range(len(texts)), **common)
