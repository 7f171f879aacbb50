"""Image transforms under the loader's seed, frame sampling, mixup/cutmix."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_uni.config import TaskConfig
from megatron_uni.data.transforms import frame_indices, image_transform, mix_batch, seeded


def test_frame_indices_uniform() -> None:
    assert frame_indices(8, 4, None) == [1, 3, 5, 7]  # segment middles
    assert frame_indices(2, 4, None) == [0, 0, 1, 1]  # short clips repeat frames
    assert frame_indices(1, 3, None) == [0, 0, 0]
    for seed in range(20):
        got = frame_indices(8, 4, np.random.default_rng(seed))
        assert [g // 2 for g in got] == [0, 1, 2, 3]  # one frame from each segment
    with pytest.raises(ValueError):
        frame_indices(0, 4, None)


def test_seeded_is_reproducible_and_restores_the_callers_rng() -> None:
    task = TaskConfig(type="image_classification", image_size=32, crop_scale=(0.3, 1.0),
                      hflip=0.5, rand_augment="rand-m9-mstd0.5-inc1")
    transform = image_transform(task, train=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), np.uint8))
    torch.manual_seed(99)
    random.seed(99)
    before = torch.rand(3), random.random()
    torch.manual_seed(99)
    random.seed(99)
    with seeded(5) as reseed:
        a = transform(image)
        reseed(5)
        b = transform(image)
        reseed(6)
        c = transform(image)
    after = torch.rand(3), random.random()
    assert a.shape == (3, 32, 32)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(before[0], after[0]) and before[1] == after[1]


def test_eval_transform_is_deterministic_centre_crop() -> None:
    task = TaskConfig(type="image_classification", image_size=32, crop_pct=1.0)
    pixels = np.zeros((32, 32, 3), np.uint8)
    pixels[:, :16] = 255
    out = image_transform(task, train=False)(Image.fromarray(pixels))
    assert out.shape == (3, 32, 32)
    assert (out[:, :, :15] > 1).all() and (out[:, :, 17:] < -1).all()  # normalised, not moved


@pytest.mark.parametrize("mixup,cutmix", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mix_batch(mixup: float, cutmix: float) -> None:
    b, t, smoothing = 6, 2, 0.1
    # Sample i is filled with the value i; it is mixed with sample b-1-i.
    images = torch.arange(b, dtype=torch.float32).reshape(b, 1, 1, 1, 1).expand(b, t, 3, 8, 8)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    kinds = set()
    for seed in range(20):
        mixed, soft = mix_batch(images, labels, 5, mixup=mixup, cutmix=cutmix,
                                smoothing=smoothing, rng=np.random.default_rng(seed))
        assert mixed.shape == images.shape and soft.shape == (b, 5)
        assert torch.allclose(soft.sum(1), torch.ones(b))
        # Sample 1 (label 1) is mixed with sample 4 (label 4): its label share is lam.
        lam = float((soft[1, 1] - smoothing / 5) / (1 - smoothing))
        other = (1 - lam) * (1 - smoothing) + smoothing / 5
        assert float(soft[1, 4]) == pytest.approx(other, abs=1e-6)
        values = mixed[1].unique()
        if not set(values.tolist()) <= {1.0, 4.0}:  # mixup: a blend of the two images
            kinds.add("mixup")
            assert len(values) == 1
            assert float(values[0]) == pytest.approx(lam * 1 + (1 - lam) * 4, abs=1e-5)
        else:  # cutmix: a box (maybe empty) of the other image, the same in every frame
            kinds.add("cutmix")
            assert float((mixed[1] == 1.0).float().mean()) == pytest.approx(lam, abs=1e-5)
            assert torch.equal(mixed[1, 0], mixed[1, 1])
    assert kinds == ({"mixup"} if not cutmix else {"cutmix"} if not mixup else {"mixup", "cutmix"})
