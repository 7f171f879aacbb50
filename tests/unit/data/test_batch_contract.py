"""The packed-batch contract: layout, metadata and the attention rule, on hand-written cases."""

from __future__ import annotations

import pytest
import torch

from megatron_uni.batch import ATTRIBUTES, Segment, Side, attention_mask

from megatron_uni.data.packing import PackingError
from megatron_uni.data.tasks import SPE_ID, captioning_batch, retrieval_batch, target_shard

# Captioning of one 32x16 image (2 patches) with the 2-token caption [7, 8], then a 2-token
# vocabulary target packed in the same row. Tokens of the first sequence:
#   0 SPE   1 patch0   2 patch1   3 cap0   4 cap1   5 slot0   6 slot1
# 1 = may attend. Written by hand from the rule in the paper: image tokens see the image; caption
# tokens are causal and see the image; slot i sees the image, caption tokens before i, itself.
EXPECTED_CAPTION = [
    [1, 1, 1, 0, 0, 0, 0],  # SPE
    [1, 1, 1, 0, 0, 0, 0],  # patch0
    [1, 1, 1, 0, 0, 0, 0],  # patch1
    [1, 1, 1, 1, 0, 0, 0],  # cap0
    [1, 1, 1, 1, 1, 0, 0],  # cap1
    [1, 1, 1, 0, 0, 1, 0],  # slot0 predicts cap0
    [1, 1, 1, 1, 0, 0, 1],  # slot1 predicts cap1
]


def _caption_batch():
    images = torch.zeros(1, 1, 3, 32, 16)
    return captioning_batch(
        images, [[7, 8]], [7, 8], patch_size=16, seq_len=16, max_caption_len=4, num_rows=1
    )


def test_captioning_mask_matches_the_hand_written_example() -> None:
    batch = _caption_batch()
    allowed = (~attention_mask(batch))[0, 0].int()
    assert allowed[:7, :7].tolist() == EXPECTED_CAPTION
    # The vocabulary targets ([SPE, 7] and [SPE, 8], tokens 7..10) share the row but see only
    # themselves; the padding after them sees only itself.
    assert allowed[7:9, 7:9].tolist() == [[1, 1], [1, 1]]
    assert allowed[:7, 7:].sum() == 0 and allowed[7:, :7].sum() == 0
    assert allowed[11:, :].sum() == allowed.shape[1] - 11  # diagonal only


def test_captioning_metadata_queries_and_labels() -> None:
    batch = _caption_batch()
    row = lambda t: t[0, :11].tolist()  # noqa: E731
    assert row(batch.text_ids)[:1] == [SPE_ID] and row(batch.text_ids)[3:7] == [7, 8, SPE_ID, SPE_ID]
    assert row(batch.patch_index)[:3] == [-1, 0, 1]
    assert row(batch.segment)[:7] == [0, 0, 0, Segment.CAUSAL, Segment.CAUSAL, Segment.SLOT, Segment.SLOT]
    assert row(batch.position)[3:7] == [0, 1, 0, 1]  # slots repeat the caption positions
    assert row(batch.side) == [0] * 7 + [1] * 4
    assert row(batch.seq_id) == [0] * 7 + [1, 1, 2, 2]
    # The image part and the text part route by different attribute vectors.
    attrs = [tuple(int(v) for v in batch.attributes[a]) for a in row(batch.attribute)]
    assert attrs[:3] == [ATTRIBUTES["caption_visual"]] * 3
    assert attrs[3:7] == [ATTRIBUTES["caption_text"]] * 4
    assert attrs[7:] == [ATTRIBUTES["vocab_target"]] * 4
    assert batch.loss.query_index.tolist() == [5, 6]  # the slots
    assert batch.loss.target_index.tolist() == [7, 9]  # the targets' SPE tokens
    assert batch.loss.labels.tolist() == [0, 1]
    assert batch.spe_index.tolist() == [0, 7, 9]


def test_retrieval_pairs_and_sides() -> None:
    images = torch.zeros(3, 1, 3, 16, 16)
    batch = retrieval_batch(images, [[5], [6, 7], [8]], patch_size=16, seq_len=8)
    assert batch.loss.family == "retrieval" and batch.loss.labels.tolist() == [0, 1, 2]
    flat_side = batch.side.reshape(-1)
    assert flat_side[batch.loss.query_index].tolist() == [Side.INPUT] * 3
    assert flat_side[batch.loss.target_index].tolist() == [Side.TARGET] * 3
    assert batch.text_ids.reshape(-1)[batch.loss.target_index].tolist() == [SPE_ID] * 3


def test_target_shards_cover_the_list_in_order() -> None:
    shards = [target_shard(10, r, 4) for r in range(4)]
    assert [list(s) for s in shards] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]


def test_packing_errors_name_the_fix() -> None:
    images = torch.zeros(4, 1, 3, 16, 16)
    with pytest.raises(PackingError, match="raise its rows or seq_len"):
        retrieval_batch(images, [[1, 2]] * 4, patch_size=16, seq_len=4, num_rows=2)
    with pytest.raises(PackingError, match="raise the task's seq_len"):
        retrieval_batch(images[:1], [[1] * 9], patch_size=16, seq_len=8)
