"""Pixels: timm image transforms, uniform frame sampling for video, mixup/cutmix.

Shape legend: B clips, T frames, C channels, H/W pixels, K classes.

Training transforms are timm's (random resized crop, optional horizontal flip and RandAugment,
ImageNet normalisation); evaluation resizes to ``image_size / crop_pct`` and centre-crops. timm
and torchvision draw from the global ``random``/``torch`` generators, so :func:`seeded` seeds
them per sample from the loader's own seed and restores them afterwards: the stream stays a
function of the seed, and a trainer sharing the process keeps its random state. All frames of
a clip get the same draws (the same crop and augmentation), which keeps motion intact.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from megatron_uni.config import TaskConfig

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")


def image_transform(task: TaskConfig, train: bool) -> Callable[[object], torch.Tensor]:
    """PIL image -> [C, H, W] float tensor, normalised, for ``task`` in training or evaluation."""
    from timm.data import create_transform

    if train:
        return create_transform(
            task.image_size,
            is_training=True,
            scale=tuple(task.crop_scale),
            hflip=task.hflip,
            color_jitter=0.0,
            auto_augment=task.rand_augment or None,
            interpolation="bicubic",
            re_prob=0.0,
        )
    return create_transform(
        task.image_size, is_training=False, crop_pct=task.crop_pct, interpolation="bicubic"
    )


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[Callable[[int], None]]:
    """Seed Python's, NumPy's and torch's global generators, restore them on exit.

    Yields ``reseed(seed)`` to seed them again inside the block (once per sample or frame)
    without paying for another save/restore.
    """
    # Only torch's CPU generator: torch.manual_seed would also seed (and on CPU-only machines
    # queue lazy calls for) every accelerator, which costs more than the transform itself.
    cpu = torch.default_generator
    saved = random.getstate(), np.random.get_state(), cpu.get_state()

    def reseed(value: int) -> None:
        random.seed(value)
        np.random.seed(value % 2**32)
        cpu.manual_seed(value)

    try:
        reseed(seed)
        yield reseed
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        cpu.set_state(saved[2])


def frame_indices(available: int, num_frames: int, rng: np.random.Generator | None) -> list[int]:
    """``num_frames`` indices into ``available`` frames, one per equal segment of the clip:
    a random frame of each segment in training (``rng``), its middle in evaluation (None).
    Clips shorter than ``num_frames`` repeat frames."""
    if available < 1:
        raise ValueError("a clip without frames")
    edges = np.linspace(0, available, num_frames + 1)
    if rng is None:
        points = (edges[:-1] + edges[1:]) / 2
    else:
        points = edges[:-1] + rng.random(num_frames) * (edges[1:] - edges[:-1])
    return [min(int(p), available - 1) for p in points]


def one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """[B] -> [B, K] targets with label smoothing spread over all K classes (as timm does)."""
    off = smoothing / num_classes
    out = torch.full((labels.shape[0], num_classes), off)
    return out.scatter_(1, labels.long()[:, None], 1.0 - smoothing + off)


def mix_batch(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    mixup: float,
    cutmix: float,
    smoothing: float,
    rng: np.random.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or cutmix of a batch with its reverse (timm's batch mode), one draw per batch.

    ``images`` [B, T, C, H, W], ``labels`` [B] -> mixed images and soft targets [B, K] whose
    rows sum to 1 and already include label smoothing. With both alphas set, cutmix is chosen
    with probability 0.5. A cutmix box covers the same pixels in every frame.
    """
    use_cutmix = cutmix > 0 and (mixup <= 0 or rng.random() < 0.5)
    alpha = cutmix if use_cutmix else mixup
    lam = float(rng.beta(alpha, alpha))
    flipped = images.flip(0)
    if use_cutmix:
        height, width = images.shape[-2:]
        cut = np.sqrt(1.0 - lam)
        cut_h, cut_w = int(height * cut), int(width * cut)
        cy, cx = int(rng.integers(height)), int(rng.integers(width))
        y0, y1 = np.clip([cy - cut_h // 2, cy + cut_h // 2], 0, height)
        x0, x1 = np.clip([cx - cut_w // 2, cx + cut_w // 2], 0, width)
        images = images.clone()
        images[..., y0:y1, x0:x1] = flipped[..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / float(height * width)  # the area actually swapped
    else:
        images = images * lam + flipped * (1.0 - lam)
    targets = one_hot(labels, num_classes, smoothing)
    return images, targets * lam + targets.flip(0) * (1.0 - lam)


def stack_clips(clips: Sequence[torch.Tensor]) -> torch.Tensor:
    """[T, C, H, W] clips -> [B, T, C, H, W]."""
    return torch.stack(list(clips)) if clips else torch.zeros(0, 1, 3, 1, 1)
