"""Task formulations -> packed batches: every task is "match inputs against candidate targets".

Shape legend: N clips, T frames, C channels, H/W pixels, B pairs, K targets.

Builders take preprocessed examples (pixels, BPE ids, labels) and lay out the input and target
sequences with their segments and routing attributes (the reference's attribute table), the
queries and the labels, then pack them (:func:`megatron_uni.data.packing.pack`):

- classification: input "[SPE] patches" per clip; targets "[SPE] class name" per class; the
  query is each input's SPE, the label its class.
- MLM: input "[SPE] text" with masked tokens; targets "[SPE] token" per vocabulary entry; queries
  are the masked positions, labels the original tokens.
- captioning: input "[SPE] patches caption slots"; slot i sees the image, caption tokens before
  i and itself, and predicts caption token i against the vocabulary targets.
- retrieval: inputs "[SPE] patches", targets "[SPE] caption"; pair i matches pair i, all other
  pairs (of every data-parallel rank) are negatives.

Text positions are the reference's: the text after a sequence's leading ``<SPE>`` counts from 0
(:func:`megatron_uni.data.packing.pack`'s default), and captioning's caption tokens and slots both
take 0..L-1 (``TokenBaseEmbedding.get_time_step`` for ``text_spe_cat``).

Large target sets (``split``) are encoded in shards: rank r of D packs targets
``[r*K/D, (r+1)*K/D)`` of the list padded to a multiple of D; labels always index the full list.

Per-rank task mixing (``data.task_sampling=per_rank``, a :class:`TargetMix`): ranks of one step
train different tasks, yet the split target sets are gathered across every data-parallel rank.
As in the reference, every rank then packs its shard of *every* shared (split) target set of the
training mixture into each micro-batch, whatever its task (:func:`with_shared_targets`), so the
one gather of those features (models/heads.py) has the same shape on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch

from megatron_uni.batch import IGNORE_INDEX, LossSpec, Modality, PackedBatch, Segment, Side

from megatron_uni.data.packing import SequenceSpec, TokenRun, pack
from megatron_uni.data.text_tokenizer import ClipTokenizer

SPE_ID = ClipTokenizer.spe_id


def _spe(attribute: str, segment: Segment = Segment.BIDIR) -> TokenRun:
    return TokenRun(Modality.TEXT, attribute, segment, text_ids=(SPE_ID,))


def _text(ids: Sequence[int], attribute: str, segment: Segment = Segment.BIDIR,
          positions: Sequence[int] | None = None) -> TokenRun:
    return TokenRun(Modality.TEXT, attribute, segment, text_ids=tuple(int(i) for i in ids),
                    positions=None if positions is None else tuple(positions))


def _clip(index: int, tokens: int, video: bool, attribute: str) -> TokenRun:
    modality = Modality.VIDEO if video else Modality.IMAGE
    return TokenRun(modality, attribute, Segment.BIDIR, clip=index, num_patches=tokens)


def patches_per_clip(images: torch.Tensor, patch_size: int) -> int:
    """Tokens one clip becomes: frames x (H/p) x (W/p)."""
    _, frames, _, height, width = images.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"image size {height}x{width} is not a multiple of patch {patch_size}")
    return frames * (height // patch_size) * (width // patch_size)


def target_shard(num_targets: int, rank: int, world: int) -> range:
    """Indices of the full target list that data-parallel ``rank`` encodes (padded list)."""
    per_rank = -(-num_targets // world)
    return range(rank * per_rank, (rank + 1) * per_rank)


def _target_sequences(
    targets: Sequence[Sequence[int]], attribute: str, shard: range | None
) -> list[SequenceSpec]:
    indices = range(len(targets)) if shard is None else shard
    # Past the end of the list (padding of the last shard) repeat the last target: its logits
    # are dropped after the gather (LossSpec.num_targets).
    return [
        SequenceSpec((_spe(attribute), _text(targets[min(i, len(targets) - 1)], attribute)),
                     Side.TARGET)
        for i in indices
    ]


@dataclass(frozen=True)
class SharedTargets:
    """A split target set of the training mixture that every rank encodes a shard of each step
    under per-rank mixing: its targets (BPE ids per target), their attribute, this rank's shard."""

    key: str  # "classes:<target_set>" or "vocab:<target_set>"
    targets: tuple[tuple[int, ...], ...]
    attribute: str
    shard: range


@dataclass(frozen=True)
class TargetMix:
    """Per-rank mixing: the shared target sets in one order on every rank, and which of them is
    this task's own (-1: none, e.g. retrieval or an unsplit target set)."""

    sets: tuple[SharedTargets, ...]
    own: int = -1


def with_shared_targets(
    sequences: Sequence[SequenceSpec], loss: LossSpec, mix: TargetMix | None
) -> tuple[list[SequenceSpec], LossSpec]:
    """Append this rank's shards of the shared target sets other than the task's own (whose
    shard the builder packed already) and say where each set's SPEs are; also switches retrieval
    to in-batch negatives. ``mix=None`` (per-step sampling) changes nothing."""
    if mix is None:
        return list(sequences), loss
    seqs, pieces, sizes = list(sequences), [], []
    for i, shared in enumerate(mix.sets):
        if i == mix.own:
            own = loss.target_index.reshape(-1, 2)
            pieces.append(own)
            sizes.append(own.shape[0])
            continue
        new = _target_sequences(shared.targets, shared.attribute, shared.shard)
        pieces.append(_queries([(len(seqs) + j, 0) for j in range(len(new))]))
        seqs += new
        sizes.append(len(new))
    index = torch.cat(pieces) if pieces else torch.zeros(0, 2, dtype=torch.long)
    return seqs, replace(
        loss, shared_index=index, shared_sizes=tuple(sizes),
        shared_num_targets=tuple(len(t.targets) for t in mix.sets), own_shared=mix.own,
        local_negatives=True,
    )


def _queries(pairs: list[tuple[int, int]]) -> torch.Tensor:
    return torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)


def classification_batch(
    images: torch.Tensor,
    labels: torch.Tensor,
    class_names: Sequence[Sequence[int]],
    *,
    patch_size: int,
    seq_len: int,
    video: bool = False,
    num_rows: int | None = None,
    label_smoothing: float = 0.0,
    soft_labels: torch.Tensor | None = None,
    shard: range | None = None,
    task_id: int = 0,
    task_name: str = "",
    loss_weight: float = 1.0,
    mix: TargetMix | None = None,
) -> PackedBatch:
    """Images/videos ``[N, T, C, H, W]`` with ``labels`` [N] against class-name targets."""
    n, tokens = images.shape[0], patches_per_clip(images, patch_size)
    inputs = [SequenceSpec((_spe("visual_input"), _clip(i, tokens, video, "visual_input")))
              for i in range(n)]
    targets = _target_sequences(class_names, "text_target", shard)
    loss = LossSpec(
        family="classification",
        query_index=_queries([(i, 0) for i in range(n)]),
        target_index=_queries([(n + j, 0) for j in range(len(targets))]),
        labels=labels.long(),
        soft_labels=soft_labels,
        label_smoothing=label_smoothing,
        split_targets=shard is not None,
        num_targets=len(class_names),
        loss_weight=loss_weight,
    )
    sequences, loss = with_shared_targets(inputs + targets, loss, mix)
    return pack(sequences, seq_len, loss, images, num_rows, task_id, task_name)


def mlm_batch(
    input_ids: Sequence[Sequence[int]],
    mlm_labels: Sequence[Sequence[int]],
    vocab: Sequence[int],
    *,
    seq_len: int,
    num_rows: int | None = None,
    shard: range | None = None,
    task_id: int = 0,
    task_name: str = "",
    loss_weight: float = 1.0,
    mix: TargetMix | None = None,
) -> PackedBatch:
    """Masked texts (``input_ids``, masks already applied; ``mlm_labels`` = original id at
    masked positions, IGNORE_INDEX elsewhere) against the vocabulary targets ``vocab``.

    A masked token whose original id is not in ``vocab`` gets no loss.
    """
    where = {tok: k for k, tok in enumerate(vocab)}
    inputs, queries, labels = [], [], []
    for i, (ids, labs) in enumerate(zip(input_ids, mlm_labels)):
        if len(ids) != len(labs):
            raise ValueError(f"text {i}: {len(ids)} ids but {len(labs)} labels")
        inputs.append(SequenceSpec((_spe("text_input"), _text(ids, "text_input"))))
        for j, lab in enumerate(labs):
            if lab != IGNORE_INDEX:
                queries.append((i, 1 + j))
                labels.append(where.get(int(lab), IGNORE_INDEX))
    targets = _target_sequences([[tok] for tok in vocab], "vocab_target", shard)
    n = len(inputs)
    loss = LossSpec(
        family="mlm",
        query_index=_queries(queries),
        target_index=_queries([(n + j, 0) for j in range(len(targets))]),
        labels=torch.tensor(labels, dtype=torch.long),
        split_targets=shard is not None,
        num_targets=len(vocab),
        loss_weight=loss_weight,
    )
    sequences, loss = with_shared_targets(inputs + targets, loss, mix)
    return pack(sequences, seq_len, loss, None, num_rows, task_id, task_name)


def captioning_batch(
    images: torch.Tensor,
    captions: Sequence[Sequence[int]],
    vocab: Sequence[int],
    *,
    patch_size: int,
    seq_len: int,
    max_caption_len: int,
    video: bool = False,
    num_rows: int | None = None,
    label_smoothing: float = 0.0,
    shard: range | None = None,
    task_id: int = 0,
    task_name: str = "",
    loss_weight: float = 1.0,
    mix: TargetMix | None = None,
) -> PackedBatch:
    """Clips with one caption each: "[SPE] patches caption slots", slot i predicts token i.

    Captions are cut to ``max_caption_len`` tokens; caption tokens and slots both take positions
    0..L-1 (the reference's repeated slot positions), which the attention rule uses as their
    causal order.
    """
    n, tokens = images.shape[0], patches_per_clip(images, patch_size)
    where = {tok: k for k, tok in enumerate(vocab)}
    inputs, queries, labels = [], [], []
    for i in range(n):
        cap = [int(t) for t in captions[i][:max_caption_len]]
        length = len(cap)
        runs = (
            _spe("caption_visual"),
            _clip(i, tokens, video, "caption_visual"),
            _text(cap, "caption_text", Segment.CAUSAL, positions=range(length)),
            _text([SPE_ID] * length, "caption_text", Segment.SLOT, positions=range(length)),
        )
        inputs.append(SequenceSpec(runs))
        first_slot = 1 + tokens + length
        for j, tok in enumerate(cap):
            queries.append((i, first_slot + j))
            labels.append(where.get(tok, IGNORE_INDEX))
    targets = _target_sequences([[tok] for tok in vocab], "vocab_target", shard)
    loss = LossSpec(
        family="captioning",
        query_index=_queries(queries),
        target_index=_queries([(n + j, 0) for j in range(len(targets))]),
        labels=torch.tensor(labels, dtype=torch.long),
        label_smoothing=label_smoothing,
        split_targets=shard is not None,
        num_targets=len(vocab),
        loss_weight=loss_weight,
    )
    sequences, loss = with_shared_targets(inputs + targets, loss, mix)
    return pack(sequences, seq_len, loss, images, num_rows, task_id, task_name)


def retrieval_batch(
    images: torch.Tensor,
    captions: Sequence[Sequence[int]],
    *,
    patch_size: int,
    seq_len: int,
    video: bool = False,
    num_rows: int | None = None,
    label_smoothing: float = 0.0,
    task_id: int = 0,
    task_name: str = "",
    loss_weight: float = 1.0,
    mix: TargetMix | None = None,
) -> PackedBatch:
    """B (clip, caption) pairs; symmetric contrastive loss with in-batch (and cross-DP)
    negatives."""
    n, tokens = images.shape[0], patches_per_clip(images, patch_size)
    if len(captions) != n:
        raise ValueError(f"{n} clips but {len(captions)} captions")
    inputs = [SequenceSpec((_spe("visual_input"), _clip(i, tokens, video, "visual_input")))
              for i in range(n)]
    texts = [SequenceSpec((_spe("text_target"), _text(c, "text_target")), Side.TARGET)
             for c in captions]
    loss = LossSpec(
        family="retrieval",
        query_index=_queries([(i, 0) for i in range(n)]),
        target_index=_queries([(n + i, 0) for i in range(n)]),
        labels=torch.arange(n),
        label_smoothing=label_smoothing,
        num_targets=n,
        loss_weight=loss_weight,
    )
    sequences, loss = with_shared_targets(inputs + texts, loss, mix)
    return pack(sequences, seq_len, loss, images, num_rows, task_id, task_name)
