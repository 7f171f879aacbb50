"""Greedy caption decoding with Uni-Perceiver's prediction slots.

Shape legend: B micro-batches, N clips of one micro-batch, L caption slots (max length),
V vocabulary targets, h hidden.

A captioning input is "[SPE] clip caption slots" with L caption tokens and L slots; slot t sees
the clip, the caption tokens at positions ``< t`` and itself, and is scored against the
vocabulary. Decoding keeps the layout of a length-L caption fixed (so every step has the same
batch shape) and fills it in: step t writes the tokens predicted so far at positions ``< t``
(later positions hold a placeholder no slot ``<= t`` can see), runs the model, and takes slot
t's best vocabulary entry as token t. A caption ends at ``<end_of_text>`` (not part of the
result) or after L tokens. The decision is made on the last pipeline stage and broadcast to the
other stages, which build the next step's batch. Every rank runs the same number of steps: the
loop stops when no caption on any rank is still open.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from megatron_uni.data.task_plan import TaskPlan
from megatron_uni.evaluation.distributed import broadcast_from_last_stage, world_max
from megatron_uni.evaluation.forward import ForwardRunner
from megatron_uni.evaluation.inputs import caption_batch


def _slot_argmax(step: int, length: int, vocab_features: torch.Tensor, vocab_ids: torch.Tensor):
    """An extractor: the vocabulary token id slot ``step`` of every clip predicts."""

    def extract(head, batch, tokens: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        slots = batch.loss.query_index.view(-1, length)[:, step]  # [N]
        features = head.features(tokens[slots])  # [N, h] unit norm
        scores = features @ vocab_features.to(features).t()  # [N, V]
        return vocab_ids.to(scores.device)[scores.argmax(1)]  # first maximum on ties

    return extract


def greedy_decode(
    runner: ForwardRunner,
    plan: TaskPlan,
    clips: Sequence[torch.Tensor],
    vocab_features: torch.Tensor | None,
    *,
    eot_id: int,
    max_len: int | None = None,
) -> list[list[list[int]]]:
    """Captions of ``clips`` (one ``[N, T, C, H, W]`` tensor per micro-batch) as token id lists
    without ``<end_of_text>``, at most ``max_len`` (default ``plan.max_text_len``) tokens each.

    ``vocab_features`` ``[V, h]`` (unit norm; the vocabulary ``plan.vocab`` encoded as targets)
    is needed on the last pipeline stage only. A collective: every rank of the pipeline passes
    the same clips, and every rank of the world calls it the same number of times.
    """
    length = plan.max_text_len if max_len is None else max_len
    if not 1 <= length <= plan.max_text_len:
        raise ValueError(f"max_len must be in [1, {plan.max_text_len}] (the task's slots), "
                         f"got {length}")
    vocab_ids = torch.tensor(plan.vocab, dtype=torch.long)
    sizes = [int(c.shape[0]) for c in clips]
    total = sum(sizes)
    captions = [torch.full((n, length), eot_id, dtype=torch.long) for n in sizes]
    lengths = torch.full((total,), length, dtype=torch.long)  # where each caption ended
    open_ = torch.ones(total, dtype=torch.bool)
    for step in range(length):
        batches = [caption_batch(plan, c, cap) for c, cap in zip(clips, captions)]
        extract = _slot_argmax(step, length, vocab_features, vocab_ids) if runner.is_last_stage \
            else None
        out = runner(batches, extract)
        predicted = torch.cat([o.cpu() for o in out]) if out is not None else \
            torch.zeros(total, dtype=torch.long)
        predicted = broadcast_from_last_stage(predicted, runner.device)
        ended = open_ & (predicted == eot_id)
        lengths[ended] = step
        predicted = torch.where(open_, predicted, torch.full_like(predicted, eot_id))
        for cap, part in zip(captions, predicted.split(sizes)):
            cap[:, step] = part
        open_ &= ~ended
        if world_max(int(open_.any()), runner.device) == 0:
            break
    flat = [cap for c in captions for cap in c.tolist()]
    result = [row[: int(n)] for row, n in zip(flat, lengths)]
    out_lists: list[list[list[int]]] = []
    start = 0
    for n in sizes:
        out_lists.append(result[start : start + n])
        start += n
    return out_lists
