"""Packing sequences into the rows of a :class:`~megatron_uni.batch.PackedBatch`.

A sequence is a list of :class:`TokenRun` (a run of text tokens or of one clip's patches, with its
attention segment and routing attribute); :func:`pack` places sequences into rows first-fit and
writes the per-token metadata of the batch contract (``megatron_uni/batch.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch

from megatron_uni.batch import ATTRIBUTES, LossSpec, Modality, PackedBatch, Segment, Side


@dataclass(frozen=True)
class TokenRun:
    """Consecutive tokens of one sequence sharing modality, segment and attribute.

    Text runs carry ``text_ids``; image/video runs name a ``clip`` (index into the batch's
    ``images``) and cover all its ``num_patches`` patch tokens. ``positions`` default to
    continuing the sequence's count of text tokens after its leading ``<SPE>`` (text: the SPE
    itself gets 0 and is not counted, so "[SPE] a b" has positions 0, 0, 1) or 0..n-1 within
    the clip (patches).
    """

    modality: Modality
    attribute: str
    segment: Segment = Segment.BIDIR
    text_ids: tuple[int, ...] = ()
    clip: int = -1
    num_patches: int = 0
    positions: tuple[int, ...] | None = None

    def __len__(self) -> int:
        return len(self.text_ids) if self.modality == Modality.TEXT else self.num_patches


@dataclass(frozen=True)
class SequenceSpec:
    """One input or target sequence: its runs (the first must start with <SPE>) and side."""

    runs: tuple[TokenRun, ...]
    side: Side = Side.INPUT

    def __len__(self) -> int:
        return sum(len(r) for r in self.runs)


class PackingError(ValueError):
    """Sequences do not fit the configured rows."""


def pack(
    sequences: Sequence[SequenceSpec],
    seq_len: int,
    loss: LossSpec | None = None,
    images: torch.Tensor | None = None,
    num_rows: int | None = None,
    task_id: int = 0,
    task_name: str = "",
) -> PackedBatch:
    """Place ``sequences`` into rows of ``seq_len`` tokens, first fit, in order.

    ``num_rows`` fixes R (pipeline stages need a fixed shape per task); None uses as few rows as
    needed. ``loss`` index fields refer to positions inside sequences as
    ``(sequence number, token offset)`` pairs encoded by :func:`seq_token` and are rewritten to
    flat indices here. Returns the batch with ``spe_index[i]`` = flat index of sequence i's first
    token.
    """
    rows_used: list[int] = []  # tokens used per row
    placement: list[tuple[int, int]] = []  # (row, col) of each sequence's first token
    for i, spec in enumerate(sequences):
        n = len(spec)
        if n > seq_len:
            raise PackingError(
                f"sequence {i} has {n} tokens but rows hold {seq_len}; raise the task's seq_len "
                f"or shorten its inputs"
            )
        for r, used in enumerate(rows_used):
            if used + n <= seq_len:
                placement.append((r, used))
                rows_used[r] += n
                break
        else:
            placement.append((len(rows_used), 0))
            rows_used.append(n)
    rows = len(rows_used) if num_rows is None else num_rows
    if rows < len(rows_used):
        raise PackingError(
            f"{len(sequences)} sequences need {len(rows_used)} rows of {seq_len} tokens but the "
            f"task has {num_rows}; raise its rows or seq_len, or lower its micro_batch_size"
        )

    def full(value: int) -> torch.Tensor:
        return torch.full((max(rows, 0), seq_len), value, dtype=torch.long)

    text_ids, patch_index, seq_id, position = full(0), full(-1), full(-1), full(0)
    modality, side, segment, attribute = full(0), full(0), full(0), full(0)
    attr_names: list[str] = []
    for i, (spec, (r, c)) in enumerate(zip(sequences, placement)):
        col, text_pos = c, 0
        for run in spec.runs:
            n = len(run)
            sl = slice(col, col + n)
            if run.attribute not in attr_names:
                attr_names.append(run.attribute)
            attribute[r, sl] = attr_names.index(run.attribute)
            modality[r, sl] = int(run.modality)
            segment[r, sl] = int(run.segment)
            if run.modality == Modality.TEXT:
                text_ids[r, sl] = torch.tensor(run.text_ids, dtype=torch.long)
                lead = int(col == c)  # the leading <SPE>: position 0, outside the count
                default_pos = [0] * lead + list(range(text_pos, text_pos + n - lead))
                text_pos += n - lead
            else:
                if images is None or not 0 <= run.clip < images.shape[0]:
                    have = 0 if images is None else images.shape[0]
                    raise PackingError(
                        f"sequence {i} names clip {run.clip} but the batch has {have} clips"
                    )
                patch_index[r, sl] = run.clip * run.num_patches + torch.arange(n)
                default_pos = range(n)
            positions = run.positions if run.positions is not None else tuple(default_pos)
            position[r, sl] = torch.tensor(positions, dtype=torch.long)
            col += n
        seq_id[r, c:col] = i
        side[r, c:col] = int(spec.side)
    spe_index = torch.tensor([r * seq_len + c for r, c in placement], dtype=torch.long)
    if loss is None:
        loss = LossSpec("none", torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                        torch.zeros(0, dtype=torch.long))
    else:
        loss = replace(
            loss,
            query_index=_flatten(loss.query_index, placement, seq_len),
            target_index=_flatten(loss.target_index, placement, seq_len),
            shared_index=_flatten(loss.shared_index, placement, seq_len),
        )
    return PackedBatch(
        text_ids=text_ids,
        patch_index=patch_index,
        seq_id=seq_id,
        position=position,
        modality=modality,
        side=side,
        segment=segment,
        attribute=attribute,
        attributes=torch.tensor([ATTRIBUTES[a] for a in attr_names], dtype=torch.float32).reshape(
            len(attr_names), 8
        ),
        images=images if images is not None else torch.zeros(0, 1, 3, 1, 1),
        loss=loss,
        task_id=task_id,
        task_name=task_name,
        spe_index=spe_index,
    )


def seq_token(sequence: int, offset: int = 0) -> tuple[int, int]:
    """Name a token by (sequence number, offset in that sequence) before packing."""
    return (sequence, offset)


def _flatten(index: torch.Tensor, placement: list[tuple[int, int]], seq_len: int) -> torch.Tensor:
    """[n, 2] (sequence, offset) pairs -> [n] flat token indices in the packed block."""
    if index.numel() == 0:
        return index.reshape(0).long()
    index = index.reshape(-1, 2).long()
    starts = torch.tensor([r * seq_len + c for r, c in placement], dtype=torch.long)
    return starts[index[:, 0]] + index[:, 1]
