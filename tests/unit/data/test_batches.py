"""Each task family read back from the demo shards: packed shapes, metadata, masks, labels.

The checks go through pixels and text to the labels: a classification label names the colour
the image shows, a video label the direction its shape moves, captions and MLM labels decode to
the demo's sentences.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_uni.config import Config
from megatron_uni.batch import (
    ATTRIBUTES,
    IGNORE_INDEX,
    Modality,
    PackedBatch,
    Segment,
    Side,
    attention_mask,
)
from megatron_uni.data.demo import COLOURS, IMAGE_CLASSES, VIDEO_CLASSES
from megatron_uni.data.loader import EvalLoader, MultiTaskLoader
from megatron_uni.data.text_tokenizer import get_tokenizer
from tests.unit.data.conftest import demo_config

SPE = get_tokenizer().spe_id
MEAN = torch.tensor([0.485, 0.456, 0.406]).reshape(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).reshape(3, 1, 1)


def only(root: Path, task: str, *overrides: str) -> Config:
    """The demo config training ``task`` alone."""
    cfg = demo_config(root, *overrides)
    for name, t in cfg.data.tasks.items():
        if name != task:
            t.weight = 0.0
    return cfg


def first_batch(root: Path, task: str, *overrides: str) -> PackedBatch:
    loader = MultiTaskLoader(only(root, task, *overrides), 0, 1, num_microbatches=1)
    name, batches = loader.next_step()
    assert name == task and len(batches) == 1
    return batches[0]


def sequences(batch: PackedBatch) -> list[dict[str, torch.Tensor]]:
    """Per sequence: its tokens' metadata, in token order."""
    out = []
    for i in range(int(batch.seq_id.max()) + 1):
        where = batch.seq_id == i
        out.append({k: getattr(batch, k)[where] for k in (
            "text_ids", "patch_index", "position", "modality", "side", "segment", "attribute")})
    return out


def attribute_name(batch: PackedBatch, index: int) -> str:
    vector = tuple(int(v) for v in batch.attributes[index])
    return next(name for name, a in ATTRIBUTES.items() if a == vector)


def check_common(batch: PackedBatch, rows: int, num_inputs: int) -> list[dict]:
    assert batch.text_ids.shape == (rows, 64)
    seqs = sequences(batch)
    for i, s in enumerate(seqs):
        assert s["text_ids"][0] == SPE and s["modality"][0] == Modality.TEXT
        assert (s["side"] == (Side.INPUT if i < num_inputs else Side.TARGET)).all()
    # The SPE of sequence i is where pack says.
    assert (batch.text_ids.flatten()[batch.spe_index] == SPE).all()
    # Block-diagonal attention: no token sees another sequence.
    blocked = attention_mask(batch)[:, 0]
    same = (batch.seq_id[:, :, None] == batch.seq_id[:, None, :]) & (batch.seq_id[:, :, None] >= 0)
    assert not (~blocked & ~same & ~torch.eye(64, dtype=torch.bool)).any()
    return seqs


def dominant_colour(image: torch.Tensor) -> str:
    """The demo colour nearest to the most saturated pixel of a [3, H, W] normalised image."""
    rgb = (image * STD + MEAN).clamp(0, 1) * 255
    saturation = rgb.max(0).values - rgb.min(0).values
    pixel = rgb.flatten(1)[:, saturation.flatten().argmax()]
    return min(COLOURS, key=lambda c: float(((pixel - torch.tensor(COLOURS[c])) ** 2).sum()))


def test_image_classification(demo_root: Path) -> None:
    batch = first_batch(demo_root, "image_cls")
    seqs = check_common(batch, rows=4, num_inputs=32)
    assert batch.images.shape == (32, 1, 3, 32, 32) and len(seqs) == 32 + 16
    tok = get_tokenizer()
    for i, s in enumerate(seqs[:32]):
        assert (s["modality"][1:] == Modality.IMAGE).all() and len(s["text_ids"]) == 5
        assert s["patch_index"][1:].tolist() == list(range(4 * i, 4 * i + 4))
        assert attribute_name(batch, int(s["attribute"][0])) == "visual_input"
    for name, s in zip(IMAGE_CLASSES, seqs[32:]):
        assert s["text_ids"][1:].tolist() == tok.encode(name)
        assert attribute_name(batch, int(s["attribute"][0])) == "text_target"
    flat_side = batch.side.flatten()
    assert (flat_side[batch.loss.query_index] == Side.INPUT).all()
    assert (flat_side[batch.loss.target_index] == Side.TARGET).all()
    assert batch.loss.labels.shape == (32,) and batch.loss.soft_labels is None
    assert batch.loss.label_smoothing == 0.1 and batch.loss.num_targets == 16


def test_classification_labels_name_what_the_pixels_show(demo_cfg: Config) -> None:
    batches = list(EvalLoader(demo_cfg, "image_cls"))
    assert [b.images.shape[0] for b in batches] == [12]  # 12 eval images, one batch
    for batch in batches:
        for image, label in zip(batch.images[:, 0], batch.loss.labels):
            assert IMAGE_CLASSES[label].split()[0] == dominant_colour(image)


def test_video_classification_frames_in_order_and_label_is_the_motion(demo_cfg: Config) -> None:
    for batch in EvalLoader(demo_cfg, "video_cls"):
        assert batch.images.shape[1:] == (4, 3, 32, 32)
        seqs = sequences(batch)
        n = batch.images.shape[0]
        for s in seqs[:n]:
            assert (s["modality"][1:] == Modality.VIDEO).all() and len(s["text_ids"]) == 17
        for clip, label in zip(batch.images, batch.loss.labels):
            bright = (clip * STD[None] + MEAN[None]).amax(1) > 0.5  # [T, H, W] shape pixels
            ys, xs = torch.arange(32.0)[:, None], torch.arange(32.0)[None, :]
            cx = [(xs * m).sum() / m.sum() for m in bright]
            cy = [(ys * m).sum() / m.sum() for m in bright]
            dx, dy = float(cx[-1] - cx[0]), float(cy[-1] - cy[0])
            moved = (("right" if dx > 0 else "left") if abs(dx) > abs(dy)
                     else ("down" if dy > 0 else "up"))
            assert VIDEO_CLASSES[label] == f"moving {moved}"


def test_mlm_masks_and_labels(demo_root: Path) -> None:
    tok = get_tokenizer()
    batch = first_batch(demo_root, "mlm")
    seqs = check_common(batch, rows=10, num_inputs=16)
    vocab = [int(s["text_ids"][1]) for s in seqs[16:]]
    assert vocab == sorted(vocab) and tok.eot_id in vocab
    flat_ids, flat_seq = batch.text_ids.flatten(), batch.seq_id.flatten()
    masked = 0
    for i, s in enumerate(seqs[:16]):
        # The text after the leading SPE counts from 0 (the reference's positions).
        assert s["position"].tolist() == [0] + list(range(len(s["position"]) - 1))
        assert (s["modality"] == Modality.TEXT).all()
        queries = batch.loss.query_index[flat_seq[batch.loss.query_index] == i]
        labels = batch.loss.labels[flat_seq[batch.loss.query_index] == i]
        assert (labels != IGNORE_INDEX).all()  # the demo vocabulary covers its corpus
        original = flat_ids.clone()
        original[queries] = torch.tensor([vocab[k] for k in labels])
        text_ids = original[flat_seq == i][1:].tolist()
        # Whole words are queried, max(1, round(15% of the words)) of them.
        start = int(batch.spe_index[i]) + 1
        queried = {int(q) - start for q in queries}
        words = tok.words(text_ids)
        chosen = [w for w in words if w[0] in queried]
        assert all(set(w) <= queried for w in chosen)
        assert sum(len(w) for w in chosen) == len(queried) == len(queries)
        assert len(chosen) == max(1, round(0.15 * len(words)))
        masked += int((flat_ids[queries] == tok.spe_id).sum())  # the reference's mask
        assert len(text_ids) <= 31 and tok.decode(text_ids)  # a demo sentence comes back
    assert masked > 0.5 * len(batch.loss.query_index)  # most queries show the mask


def test_captioning_slots_and_labels(demo_root: Path) -> None:
    tok = get_tokenizer()
    batch = first_batch(demo_root, "image_caption")
    seqs = check_common(batch, rows=10, num_inputs=16)
    vocab = [int(s["text_ids"][1]) for s in seqs[16:]]
    blocked = attention_mask(batch)[:, 0]
    labels = iter(batch.loss.labels.tolist())
    queries = iter(batch.loss.query_index.tolist())
    for i, s in enumerate(seqs[:16]):
        seg, ids = s["segment"], s["text_ids"]
        caption = ids[seg == Segment.CAUSAL].tolist()
        length = len(caption)
        assert seg.tolist() == [Segment.BIDIR] * 5 + [Segment.CAUSAL] * length + [
            Segment.SLOT] * length
        assert caption[-1] == tok.eot_id and length <= 13
        assert (ids[seg == Segment.SLOT] == SPE).all()
        assert s["position"][5:].tolist() == list(range(length)) * 2
        assert tok.decode(caption[:-1]).startswith(("a ", "the "))
        for j in range(length):  # slot j predicts caption token j
            assert vocab[next(labels)] == caption[j]
            q = next(queries)
            row, col = divmod(q, 64)
            sees = ~blocked[row, col]
            start = col - 5 - length - j  # the sequence's first token
            assert sees[start : start + 5].all()  # SPE and image
            assert sees[start + 5 : start + 5 + j].all()  # earlier caption tokens
            assert not sees[start + 5 + j : start + 5 + length].any()  # not token j on
            assert sees[col] and int(sees[start + 5 + length : start + 5 + 2 * length].sum()) == 1
        assert attribute_name(batch, int(s["attribute"][-1])) == "caption_text"


def test_retrieval_pairs(demo_root: Path) -> None:
    tok = get_tokenizer()
    batch = first_batch(demo_root, "image_text_retrieval")
    seqs = check_common(batch, rows=11, num_inputs=32)
    assert len(seqs) == 64 and batch.images.shape == (32, 1, 3, 32, 32)
    assert torch.equal(batch.loss.labels, torch.arange(32))
    for s in seqs[32:]:
        text = s["text_ids"][1:].tolist()
        assert text[-1] == tok.eot_id  # closes the caption, as in the reference
        assert tok.decode(text[:-1]).startswith(("a ", "the "))


def test_mixup_gives_soft_targets(demo_root: Path) -> None:
    batch = first_batch(demo_root, "image_cls", "data.tasks.image_cls.mixup=0.8",
                        "data.tasks.image_cls.cutmix=1.0")
    soft = batch.loss.soft_labels
    assert soft is not None and soft.shape == (32, 16)
    assert torch.allclose(soft.sum(1), torch.ones(32)) and batch.loss.label_smoothing == 0.0


def test_eval_loader_splits_over_ranks_deterministically(demo_cfg: Config) -> None:
    per_rank = []
    for rank in range(2):
        loader = EvalLoader(demo_cfg, "video_text_retrieval", dp_rank=rank, dp_size=2)
        first, second = list(loader), list(loader)
        assert [b.images.shape[0] for b in first] == [6]
        assert torch.equal(first[0].images, second[0].images)
        assert first[0].text_ids.shape == (loader.plan.num_rows, 64)
        assert (first[0].modality == Modality.VIDEO).sum() == 6 * 16
        per_rank.append(first[0].images)
    assert not torch.equal(per_rank[0], per_rank[1])
