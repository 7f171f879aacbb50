"""The batch contract: the packed micro-batch with per-token metadata (DESIGN.md, "The batch").

Imported alike by ``data/`` (which builds batches: ``data/packing.py``), ``models/`` (which embeds
and scores them) and ``moe/`` (whose routers read their conditions), so it lives beside them.

Shape legend:
    R  rows of the micro-batch          S  tokens per row (fixed per task)
    N  image/video clips                T  frames per clip    C, H, W  channels, pixels
    P  patches per frame                Q  query tokens       K  target sequences (this rank)
    A  distinct attribute vectors       D  attribute bits (8)

Every sequence, input or target, starts with the ``<SPE>`` token (id :data:`SPE_ID`); its encoder
output is the sequence's representation. As in the reference (which embeds the data and prepends
the SPE after it, ``uniperceiver/utils/transformer_util.py`` ``preprocess``), the leading SPE
stands outside the text's position count: the text after it takes positions 0, 1, ...
(``data.packing.pack``), and the embedding gives the leading SPE no position and no type
embedding (:func:`sequence_start`). Everything a pipeline stage needs (attention mask, routing
conditions, where the queries and targets are) follows from this metadata, which is small, so
every stage receives the whole :class:`PackedBatch`.

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

import torch

IGNORE_INDEX = -100

# Text ids of the CLIP BPE vocabulary plus <|mask|>, <|gen|>, <|spe|> (data/text_tokenizer.py
# builds it and checks these numbers): the embedding needs the size and the SPE id.
VOCAB_SIZE = 49411
SPE_ID = 49410


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
    # Under data.task_sampling=per_rank every rank encodes its shard of every shared target set
    # each step, whatever its task (data/tasks.py with_shared_targets): flat indices of those
    # target SPEs, set after set, the shard length and full length of each set, and which set
    # is this task's own (-1: none). ``local_negatives``: retrieval takes negatives from this
    # rank's batch only (per_rank: other ranks may train other tasks).
    shared_index: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    shared_sizes: tuple[int, ...] = ()
    shared_num_targets: tuple[int, ...] = ()
    own_shared: int = -1
    local_negatives: bool = False


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
