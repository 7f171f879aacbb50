"""The visual tokenizer's optional RGB-difference stream (``model.frame_difference``)."""

from __future__ import annotations

import torch

from megatron_uni.config import ModelConfig
from megatron_uni.models.embeddings import VisualEmbedding


def _pair(**fields) -> tuple[VisualEmbedding, VisualEmbedding]:
    """A tokenizer without and one with the difference stream, sharing every other weight."""
    torch.manual_seed(0)
    plain = VisualEmbedding(ModelConfig(hidden_size=32, patch_size=8, **fields)).eval()
    torch.manual_seed(0)
    diff = VisualEmbedding(ModelConfig(hidden_size=32, patch_size=8, frame_difference=True,
                                       **fields)).eval()
    diff.load_state_dict(plain.state_dict(), strict=False)
    torch.nn.init.normal_(diff.diff_proj.weight, std=0.05)
    return plain, diff


def test_images_are_unchanged() -> None:
    plain, diff = _pair()
    images = torch.randn(3, 1, 3, 16, 16)
    assert diff.diff_proj is not None and plain.diff_proj is None
    torch.testing.assert_close(diff(images), plain(images), rtol=0, atol=0)


def test_each_frame_adds_the_embedding_of_its_difference_to_the_previous_one() -> None:
    plain, diff = _pair()
    clips = torch.randn(2, 4, 3, 16, 16)  # [N, T, C, H, W]
    got = diff(clips).reshape(2, 4, 4, 32)  # [N, T, P, h]
    previous = torch.cat([clips[:, :1], clips[:, :-1]], dim=1)
    delta = diff.diff_proj((clips - previous).reshape(8, 3, 16, 16))  # [N*T, h, 2, 2]
    delta = delta.flatten(2).transpose(1, 2).reshape(2, 4, 4, 32)
    want = plain(clips).reshape(2, 4, 4, 32) + delta
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[:, 0], plain(clips).reshape(2, 4, 4, 32)[:, 0])  # frame 0


def test_frame_order_is_visible_to_an_order_free_pooling() -> None:
    """Mean-pooling the tokens cannot tell a clip from its reverse without the stream (the same
    frames, and the temporal embedding sums alike), but can with it."""
    plain, diff = _pair()
    plain.temporal.data.zero_()
    diff.temporal.data.zero_()
    clip = torch.randn(1, 4, 3, 16, 16)
    reverse = clip.flip(1)
    torch.testing.assert_close(plain(clip).mean(1), plain(reverse).mean(1))
    gap = (diff(clip).mean(1) - diff(reverse).mean(1)).abs().max()
    assert gap > 1e-2, gap


def test_param_count_arithmetic_includes_the_stream() -> None:
    from megatron_uni.config import Config, apply_overrides
    from tools.param_count import arithmetic_count

    plain, diff = _pair()
    cfg = apply_overrides(Config(), ["model.hidden_size=32", "model.patch_size=8"])
    cfg_diff = apply_overrides(cfg, ["model.frame_difference=true"])
    added = arithmetic_count(cfg_diff)["tokenizer"] - arithmetic_count(cfg)["tokenizer"]
    assert added == sum(p.numel() for p in diff.parameters()) - sum(
        p.numel() for p in plain.parameters()) == 3 * 8 * 8 * 32
