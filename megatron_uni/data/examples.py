"""Raw samples -> preprocessed examples -> one packed micro-batch, per task family.

Shape legend: B examples, T frames, C channels, H/W pixels.

Members a sample needs (webdataset extensions; shard builders in ``tools/build_shards.py``):

| family                 | members                                                         |
|------------------------|-----------------------------------------------------------------|
| image classification   | ``jpg``/``png``/... image, ``cls`` (class index as text)        |
| video classification   | frames ``0000.jpg``, ``0001.jpg``, ... (one sample), ``cls``    |
| captioning, retrieval  | an image (or frames when the task is video), ``txt``: captions, |
|                        | one per line                                                    |
| MLM                    | ``txt``: plain text                                             |

``json`` may stand in for ``cls``/``txt`` as ``{"label": 3}`` / ``{"captions": [...]}``.
img2dataset's shards (``NNNN.jpg``, ``NNNN.txt``, ``NNNN.json`` with its ``url``, ``status``,
``caption``, ...) are read as they are: a ``json`` with one ``caption`` string marks ``txt`` as
that one caption (a line break inside it does not make two captions); its ``_stats.json`` and
``.parquet`` side files are not shards (point ``shards`` at the ``.tar`` files).
A sample that lacks a member or does not decode raises :class:`SampleError`; the loader skips
and counts it. Every random choice (caption, frames, crop, masks) comes from the generator the
caller passes, so a micro-batch is a function of the loader's seed and its place in the stream.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from megatron_uni.data import tasks
from megatron_uni.batch import PackedBatch
from megatron_uni.data.packing import PackingError
from megatron_uni.data.masking import whole_word_mask
from megatron_uni.data.readers import RawSample
from megatron_uni.data.task_plan import TaskPlan
from megatron_uni.data.transforms import (
    IMAGE_EXTENSIONS,
    frame_indices,
    image_transform,
    mix_batch,
    stack_clips,
)
from megatron_uni.data.text_tokenizer import ClipTokenizer

FRAME = re.compile(r"^(?:frame)?(\d+)\.(?:" + "|".join(IMAGE_EXTENSIONS) + r")$")


class SampleError(ValueError):
    """A sample cannot be used: a member is missing or does not decode."""


@dataclass
class Example:
    """One preprocessed sample: a clip [T, C, H, W] and/or text ids, and a label."""

    key: str
    clip: torch.Tensor | None = None
    label: int = -1
    text: tuple[int, ...] = ()  # caption ids, or MLM input ids with masks applied
    mlm_labels: tuple[int, ...] = ()


def _decode_image(data: bytes, what: str):  # noqa: ANN202 - a PIL image
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ... on bad bytes
        raise SampleError(f"corrupt image {what}: {type(err).__name__}: {err}") from None


def _json(raw: RawSample) -> dict:
    if "json" not in raw.members:
        return {}
    try:
        value = json.loads(raw.members["json"])
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SampleError(f"member json does not parse: {err}") from None
    return value if isinstance(value, dict) else {}


def _text(raw: RawSample, ext: str) -> str:
    try:
        return raw.members[ext].decode("utf-8")
    except UnicodeDecodeError as err:
        raise SampleError(f"member {ext} is not UTF-8: {err}") from None


class Decoder:
    """Raw sample -> :class:`Example` for one task, in training or evaluation mode."""

    def __init__(self, plan: TaskPlan, tokenizer: ClipTokenizer, train: bool) -> None:
        self.plan, self.tokenizer, self.train = plan, tokenizer, train
        self.transform = image_transform(plan.cfg, train) if plan.family != "mlm" else None

    def __call__(
        self, raw: RawSample, rng: np.random.Generator, reseed: Callable[[int], None]
    ) -> Example:
        family = self.plan.family
        example = Example(raw.key)
        if family != "mlm":
            example.clip = self._clip(raw, rng, reseed)
        if family == "classification":
            example.label = self._label(raw)
        elif family == "mlm":
            example.text, example.mlm_labels = self._masked_text(raw, rng)
        else:
            example.text = self._caption(raw, rng)
        return example

    def _clip(self, raw: RawSample, rng: np.random.Generator, reseed: Callable[[int], None]
              ) -> torch.Tensor:
        members = raw.members
        if self.plan.video:
            frames = sorted((int(m.group(1)), ext) for ext in members if (m := FRAME.match(ext)))
            if not frames:
                raise SampleError("missing member: no video frames (0000.jpg, 0001.jpg, ...)")
            chosen = [frames[i][1] for i in frame_indices(
                len(frames), self.plan.cfg.num_frames, rng if self.train else None)]
        else:
            image = next((e for e in IMAGE_EXTENSIONS if e in members), None)
            if image is None:
                raise SampleError(f"missing member: no image ({'/'.join(IMAGE_EXTENSIONS)})")
            chosen = [image]
        seed = int(rng.integers(2**62))
        out = []
        for ext in chosen:
            reseed(seed)  # the same crop and augmentation for every frame of the clip
            assert self.transform is not None
            out.append(self.transform(_decode_image(members[ext], ext)))
        return torch.stack(out)

    def _label(self, raw: RawSample) -> int:
        if "cls" in raw.members:
            text = _text(raw, "cls").strip()
            if not re.fullmatch(r"-?\d+", text):
                raise SampleError(f"member cls is not an integer: {text[:40]!r}")
            label = int(text)
        elif isinstance((meta := _json(raw)).get("label"), int):
            label = meta["label"]
        else:
            raise SampleError("missing member: cls (the class index)")
        if not 0 <= label < len(self.plan.class_names):
            raise SampleError(
                f"class {label} is outside the task's {len(self.plan.class_names)} class names"
            )
        return label

    def _captions(self, raw: RawSample) -> list[str]:
        meta = _json(raw) if "json" in raw.members else {}
        if "txt" in raw.members and isinstance(meta.get("caption"), str):  # img2dataset
            caption = " ".join(_text(raw, "txt").split())
            if not caption:
                raise SampleError("empty caption (member txt)")
            return [caption]
        if "txt" in raw.members:
            captions = [c.strip() for c in _text(raw, "txt").splitlines() if c.strip()]
        else:
            meta = _json(raw)
            captions = meta.get("captions") or ([meta["caption"]] if "caption" in meta else [])
        if not captions:
            raise SampleError("missing member: txt (captions, one per line)")
        return captions

    def _caption(self, raw: RawSample, rng: np.random.Generator) -> tuple[int, ...]:
        captions = self._captions(raw)
        caption = captions[int(rng.integers(len(captions)))] if self.train else captions[0]
        ids = self.tokenizer.encode(caption)
        if not ids:
            raise SampleError("empty caption")
        length = self.plan.max_text_len
        # <end_of_text> closes the caption, cut or not (the reference appends it to captioning
        # and retrieval captions, image_text_pair.py): the last captioning slot learns to stop.
        return tuple(ids[: length - 1] + [self.tokenizer.eot_id])

    def _masked_text(self, raw: RawSample, rng: np.random.Generator
                     ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        if "txt" not in raw.members:
            raise SampleError("missing member: txt (the text)")
        ids = self.tokenizer.encode(_text(raw, "txt"))
        if not ids:
            raise SampleError("empty text")
        length = self.plan.max_text_len
        start = int(rng.integers(len(ids) - length + 1)) if self.train and len(ids) > length else 0
        inputs, labels = whole_word_mask(
            ids[start : start + length], self.tokenizer, mask_prob=self.plan.cfg.mask_prob,
            random_ids=self.plan.vocab, rng=rng,
        )
        return tuple(inputs), tuple(labels)


def make_micro_batch(
    plan: TaskPlan, examples: Sequence[Example], rng: np.random.Generator, train: bool
) -> PackedBatch:
    """Pack ``examples`` into the task's [R, S] batch with its targets (``tasks`` builders)."""
    cfg = plan.cfg
    common = dict(seq_len=plan.seq_len, num_rows=plan.num_rows, task_id=plan.task_id,
                  task_name=plan.name, loss_weight=cfg.loss_weight,
                  mix=plan.mix if train else None)
    images = stack_clips([e.clip for e in examples if e.clip is not None])
    try:
        if plan.family == "classification":
            labels = torch.tensor([e.label for e in examples], dtype=torch.long)
            soft, smoothing = None, cfg.label_smoothing
            if train and (cfg.mixup > 0 or cfg.cutmix > 0):
                images, soft = mix_batch(images, labels, plan.num_targets, mixup=cfg.mixup,
                                         cutmix=cfg.cutmix, smoothing=smoothing, rng=rng)
                smoothing = 0.0  # already in the soft targets
            return tasks.classification_batch(
                images, labels, plan.class_names, patch_size=plan.patch_size, video=plan.video,
                label_smoothing=smoothing, soft_labels=soft, shard=plan.target_shard, **common)
        if plan.family == "mlm":
            return tasks.mlm_batch([e.text for e in examples], [e.mlm_labels for e in examples],
                                   plan.vocab, shard=plan.target_shard, **common)
        captions = [e.text for e in examples]
        if plan.family == "captioning":
            return tasks.captioning_batch(
                images, captions, plan.vocab, patch_size=plan.patch_size,
                max_caption_len=plan.max_text_len, video=plan.video,
                label_smoothing=cfg.label_smoothing, shard=plan.target_shard, **common)
        return tasks.retrieval_batch(images, captions, patch_size=plan.patch_size,
                                     video=plan.video, label_smoothing=cfg.label_smoothing,
                                     **common)
    except PackingError as err:
        raise PackingError(
            f"task {plan.name}: {err} (data.tasks.{plan.name}.num_rows={plan.num_rows}, "
            f"seq_len={plan.seq_len})"
        ) from None
