"""The packed micro-batch: rows of sequences with per-token metadata (DESIGN.md, "The batch").

Shape legend:
    R  rows of the micro-batch          S  tokens per row (fixed per task)
    N  image/video clips                T  frames per clip    C, H, W  channels, pixels
    P  patches per frame                Q  query tokens       K  target sequences (this rank)
    A  distinct attribute vectors       D  attribute bits (8)

Every sequence, input or target, starts with the ``<SPE>`` token; its encoder output is the
sequence's representation. As in the reference (which embeds the data and prepends the SPE after
it, ``uniperceiver/utils/transformer_util.py`` ``preprocess``), the leading SPE stands outside the
text's position count: the text after it takes positions 0, 1, ... (:func:`pack`), and the
tokenizer gives the leading SPE no position and no type embedding (:func:`sequence_start`). A sequence is a list of :class:`TokenRun` (a run of text tokens or of
one clip's patches, with its attention segment and routing attribute); :func:`pack` places
sequences into rows first-fit and writes the per-token metadata. Everything a pipeline stage
needs (attention mask, routing conditions, where the queries and targets are) follows from this
metadata, which is small, so every stage receives the whole :class:`PackedBatch`.

Attention rule (:func:`attention_mask`): a query token sees a key token of the same sequence when
- the key is in segment ``BIDIR`` (a prefix everybody sees: SPE, image, plain text), or
- both are ``CAUSAL`` and key.position <= query.position (a caption's causal text), or
- the query is a ``SLOT`` and the key is ``CAUSAL`` with key.position < query.position, or
- the query is the key (slots see themselves).
Sequences packed in one row never see each other; padding sees only itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from enum import IntEnum
from typing import Sequence

import torch

IGNORE_INDEX = -100


class Modality(IntEnum):
    TEXT = 0
    IMAGE = 1
    VIDEO = 2


class Side(IntEnum):
    INPUT = 0
    TARGET = 1


class Segment(IntEnum):
    BIDIR = 0  # seen by every token of its sequence
    CAUSAL = 1  # caption text: causal among itself
    SLOT = 2  # captioning prediction slots: see the prefix, earlier caption tokens, themselves


# Loss families; each has its own learnable logit scale.
TASK_FAMILIES = ("classification", "mlm", "captioning", "retrieval")
FAMILY_OF_TASK_TYPE = {
    "image_classification": "classification",
    "video_classification": "classification",
    "mlm": "mlm",
    "captioning": "captioning",
    "retrieval": "retrieval",
}

# The reference's 8-bit attribute vectors (uniperceiver/datasets/moe_embeddings.py); the names
# are our reading of where each is used.
ATTRIBUTES: dict[str, tuple[int, ...]] = {
    "visual_input": (1, 0, 0, 1, 1, 0, 0, 0),  # image/video classification & retrieval input
    "text_input": (0, 1, 0, 1, 0, 1, 0, 0),  # MLM input, text classification input
    "caption_visual": (1, 1, 0, 1, 1, 0, 0, 0),  # captioning: the image part
    "caption_text": (1, 1, 0, 1, 0, 1, 0, 1),  # captioning: caption tokens and slots
    "text_target": (1, 0, 0, 1, 0, 1, 1, 0),  # retrieval text target, class-name targets
    "vocab_target": (1, 1, 0, 1, 0, 1, 1, 0),  # vocabulary targets
}


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


@dataclass
class LossSpec:
    """Where the loss reads its queries and targets, and what the labels are.

    ``query_index`` and ``target_index`` are flat token indices (row * S + col) into the encoder
    output. Classification, MLM and captioning score each query against the target sequences'
    SPE features; ``labels`` index the global target list (after a split target set is gathered
    across data-parallel ranks, in rank order). Retrieval pairs query i with target i and uses
    the other pairs of all data-parallel ranks as negatives (labels unused).
    """

    family: str
    query_index: torch.Tensor  # [Q] long
    target_index: torch.Tensor  # [K] long
    labels: torch.Tensor  # [Q] long, IGNORE_INDEX where no loss
    soft_labels: torch.Tensor | None = None  # [Q, K_global] (mixup/cutmix), rows sum to 1
    label_smoothing: float = 0.0
    split_targets: bool = False  # targets are this rank's shard of a set split over DP
    num_targets: int = -1  # length of the full target list (the gathered shards are padded)
    loss_weight: float = 1.0


@dataclass
class PackedBatch:
    """One micro-batch (one task). Token tensors are [R, S]; see the module docstring."""

    text_ids: torch.Tensor  # [R, S] long: token id at text positions, 0 elsewhere
    patch_index: torch.Tensor  # [R, S] long: index into images' N*T*P patches, -1 elsewhere
    seq_id: torch.Tensor  # [R, S] long: sequence number (global in the batch), -1 = padding
    position: torch.Tensor  # [R, S] long
    modality: torch.Tensor  # [R, S] long (Modality)
    side: torch.Tensor  # [R, S] long (Side)
    segment: torch.Tensor  # [R, S] long (Segment)
    attribute: torch.Tensor  # [R, S] long: row of `attributes`
    attributes: torch.Tensor  # [A, D] float: the distinct attribute vectors
    images: torch.Tensor  # [N, T, C, H, W] float (N may be 0)
    loss: LossSpec
    task_id: int = 0
    task_name: str = ""
    spe_index: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    @property
    def num_rows(self) -> int:
        return int(self.text_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.text_ids.shape[1])

    def to(self, device: torch.device | str) -> "PackedBatch":
        """A copy with every tensor on ``device``."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                moved[f.name] = value.to(device)
        loss = replace(
            self.loss,
            **{
                f.name: getattr(self.loss, f.name).to(device)
                for f in fields(self.loss)
                if isinstance(getattr(self.loss, f.name), torch.Tensor)
            },
        )
        return replace(self, loss=loss, **moved)


def sequence_start(seq_id: torch.Tensor) -> torch.Tensor:
    """[R, S] bool: True at each sequence's first token (the ``<SPE>`` every sequence starts
    with). Sequences are contiguous in a row and numbered apart, so a start is a token whose
    ``seq_id`` differs from its left neighbour's."""
    left = torch.cat([torch.full_like(seq_id[:, :1], -1), seq_id[:, :-1]], dim=1)
    return (seq_id >= 0) & (seq_id != left)


def attention_mask(batch: PackedBatch) -> torch.Tensor:
    """[R, 1, S, S] bool, True where attention is NOT allowed (megatron-core's convention)."""
    seq, seg, pos = batch.seq_id, batch.segment, batch.position
    q_seq, k_seq = seq[:, :, None], seq[:, None, :]
    q_seg, k_seg = seg[:, :, None], seg[:, None, :]
    q_pos, k_pos = pos[:, :, None], pos[:, None, :]
    same = (q_seq == k_seq) & (q_seq >= 0)
    causal_key = k_seg == Segment.CAUSAL
    allowed = same & (
        (k_seg == Segment.BIDIR)
        | (causal_key & (q_seg == Segment.CAUSAL) & (k_pos <= q_pos))
        | (causal_key & (q_seg == Segment.SLOT) & (k_pos < q_pos))
    )
    s = seq.shape[1]
    allowed |= torch.eye(s, dtype=torch.bool, device=seq.device)[None]  # itself (slots, padding)
    return ~allowed[:, None]


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
