"""The routing conditions of one micro-batch: an immutable value passed down the encoder.

Shape legend: R rows, S row length, N = S * R tokens of the micro-batch in megatron's order
(s-major, ``[S, R].view(-1)``), n = N / SP this rank's sequence-parallel shard, A distinct
attribute vectors, D = 8 attribute bits, Nq sequences.

The model builds one :class:`RoutingConditions` per micro-batch from its :class:`PackedBatch`
and passes it as an argument through the encoder block, each layer, its attention and MLP into
the expert linears (``models/encoder.py``). Nothing per-batch is stored on a module, so a
recomputed forward (megatron's full or selective recompute, ``tensor_parallel.checkpoint``)
replays the conditions of its own micro-batch whatever the pipeline schedule ran in between.

Everything here is computed with tensor operations on the batch's device, plus host integers
that the batch's shapes already give (rows, sequence count): building the conditions makes no
host synchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_uni.batch import IGNORE_INDEX, PackedBatch
from megatron_uni.moe.grouped import Grouping


def megatron_order(per_token: torch.Tensor) -> torch.Tensor:
    """[R, S] -> [S * R]: the token order of megatron's ``[s, b, h].view(-1, h)``."""
    return per_token.t().reshape(-1)


@dataclass(frozen=True)
class RoutingConditions:
    """What the routers read for this rank's tokens; see the module docstring."""

    rows: int  # R
    seq_len: int  # S
    sp_rank: int
    sp_size: int
    task_id: int  # the micro-batch's task (one task per micro-batch), a host int
    attribute_table: torch.Tensor  # [A, D] float: the distinct attribute vectors
    attribute_index: torch.Tensor  # [n] long: row of attribute_table per local token
    modality: torch.Tensor  # [n] long (Modality) per local token
    sequence: torch.Tensor  # [n] long: sequence per local token, padding clamped to 0
    valid: torch.Tensor  # [n] bool: not padding
    sequence_full: torch.Tensor  # [N] long: sequence per token of the whole micro-batch, -1 pad
    spe_index: torch.Tensor  # [Nq] long: each sequence's first token (its SPE) in [N] order
    num_queries: torch.Tensor  # [] float: loss queries of the micro-batch (at least 1)
    # Set by the encoder block (models/encoder.py) while its hidden states run between the
    # layers in this grouping's sorted order (the routers' grouping of the tokens by condition).
    stream_order: Optional[Grouping] = None

    @classmethod
    def from_batch(cls, batch: PackedBatch, sp_rank: int = 0, sp_size: int = 1
                   ) -> "RoutingConditions":
        rows, seq_len = batch.num_rows, batch.seq_len
        if (rows * seq_len) % sp_size:
            raise ValueError(f"{rows * seq_len} tokens do not split over sequence-parallel size "
                             f"{sp_size}")
        per_rank = rows * seq_len // sp_size
        local = slice(sp_rank * per_rank, (sp_rank + 1) * per_rank)
        sequence_full = megatron_order(batch.seq_id)
        sequence = sequence_full[local]
        spe = batch.spe_index.to(sequence_full.device)
        labels = batch.loss.labels
        return cls(
            rows=rows,
            seq_len=seq_len,
            sp_rank=sp_rank,
            sp_size=sp_size,
            task_id=int(batch.task_id),
            attribute_table=batch.attributes.to(sequence_full.device),
            attribute_index=megatron_order(batch.attribute)[local],
            modality=megatron_order(batch.modality)[local],
            sequence=sequence.clamp(min=0),
            valid=sequence >= 0,
            sequence_full=sequence_full,
            # flat row-major index r * S + c  ->  megatron order c * R + r
            spe_index=(spe % seq_len) * rows + spe // seq_len,
            num_queries=(labels != IGNORE_INDEX).sum().clamp(min=1).float(),
        )

    @property
    def num_sequences(self) -> int:
        return int(self.spe_index.shape[0])

    @property
    def num_local(self) -> int:
        return int(self.valid.shape[0])
