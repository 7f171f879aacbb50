"""The dense generalist model, single process: every task trains, sequences stay apart.

Building megatron modules needs process groups and the CPU backend, so each check runs in a
one-rank child process (tests.multirank).
"""

from __future__ import annotations

import pytest
import torch

from tests.multirank import run_ranks

VOCAB = list(range(100, 130))  # a small vocabulary target set (BPE ids)


def _model(overrides: list[str] = ()):
    from megatron_uni.config import Config, apply_overrides
    from megatron_uni.models.generalist import build_model
    from megatron_uni.parallel.initialize import initialize

    cfg = apply_overrides(
        Config(), ["parallel.device=cpu", "model.drop_path_rate=0.0", *overrides]
    )
    initialize(cfg)
    torch.manual_seed(0)
    return build_model(cfg, use_cpu=True)


def _task_batch(task: str, seed: int = 0):
    from megatron_uni.data import tasks

    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(4, 1, 3, 32, 32, generator=gen)
    captions = [torch.randint(100, 130, (5,), generator=gen).tolist() for _ in range(4)]
    if task == "image_classification":
        names = [[200 + k, 300 + k] for k in range(5)]
        return tasks.classification_batch(
            images, torch.tensor([0, 1, 2, 3]), names, patch_size=16, seq_len=24,
            label_smoothing=0.1,
        )
    if task == "video_classification":
        video = torch.randn(4, 3, 3, 32, 32, generator=gen)
        names = [[200 + k] for k in range(3)]
        return tasks.classification_batch(
            video, torch.tensor([0, 1, 2, 0]), names, patch_size=16, seq_len=24, video=True
        )
    if task == "mlm":
        ids = [c + [101, 102] for c in captions]
        labels = [[-100] * 7 for _ in ids]
        for row, (text, lab) in enumerate(zip(ids, labels)):
            for j in (1 + row % 3, 5):
                lab[j] = text[j]
                text[j] = 49410  # <|spe|>, the reference's mask token
        return tasks.mlm_batch(ids, labels, VOCAB, seq_len=24)
    if task == "captioning":
        return tasks.captioning_batch(
            images, captions, VOCAB, patch_size=16, seq_len=24, max_caption_len=5
        )
    if task == "retrieval":
        return tasks.retrieval_batch(images, captions, patch_size=16, seq_len=24)
    raise ValueError(task)


TASKS = ["image_classification", "video_classification", "mlm", "captioning", "retrieval"]


def _overfit(rank: int, world: int, task: str) -> list[float]:
    model = _model()
    batch = _task_batch(task)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss_sum, count, _ = model.loss(batch, model(batch))
        loss = loss_sum / count
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("task", TASKS)
def test_each_task_overfits_one_batch(task: str) -> None:
    (losses,) = run_ranks(_overfit, 1, args=(task,), timeout=120)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.7 * losses[0], f"{task}: loss {losses[0]:.3f} -> {losses[-1]:.3f}"


def _isolation(rank: int, world: int) -> dict:
    from megatron_uni.batch import Modality
    from megatron_uni.data.packing import SequenceSpec, TokenRun, pack
    from megatron_uni.data.tasks import SPE_ID

    model = _model()
    model.eval()

    def seq(ids: list[int]) -> SequenceSpec:
        return SequenceSpec((TokenRun(Modality.TEXT, "text_input", text_ids=(SPE_ID, *ids)),))

    def image_seq(clip: int) -> SequenceSpec:
        return SequenceSpec((
            TokenRun(Modality.TEXT, "visual_input", text_ids=(SPE_ID,)),
            TokenRun(Modality.IMAGE, "visual_input", clip=clip, num_patches=4),
        ))

    gen = torch.Generator().manual_seed(1)
    images = torch.randn(2, 1, 3, 32, 32, generator=gen)
    base = [seq([101, 102, 103]), image_seq(0), seq([104, 105]), image_seq(1)]
    changed = [seq([101, 999, 103]), image_seq(0), seq([104, 105]), image_seq(1)]
    images2 = images.clone()
    images2[1] += 1.0  # the second clip's pixels change too
    with torch.no_grad():
        out_a = model(pack(base, seq_len=20, images=images)).transpose(0, 1).reshape(-1, 64)
        b2 = pack(changed, seq_len=20, images=images2)
        out_b = model(b2).transpose(0, 1).reshape(-1, 64)
    rows_of = b2.seq_id.reshape(-1)
    same = {i: bool(torch.equal(out_a[rows_of == i], out_b[rows_of == i])) for i in range(4)}
    return {"rows": b2.num_rows, "same": same}


def test_packed_sequences_do_not_see_each_other() -> None:
    (res,) = run_ranks(_isolation, 1, timeout=60)
    assert res["rows"] == 1  # all four sequences share one row
    # Sequence 0 changed a token, sequence 3 its pixels: only they differ.
    assert res["same"] == {0: False, 1: True, 2: True, 3: False}


def _visual(rank: int, world: int) -> dict:
    model = _model()
    vis = model.tokenizer.visual
    vis.eval()
    small = torch.randn(2, 1, 3, 32, 32)
    big = torch.randn(2, 2, 3, 48, 64)
    out = {"small": tuple(vis(small).shape), "big": tuple(vis(big).shape)}
    vis.train()
    torch.manual_seed(3)
    a = vis(big)
    torch.manual_seed(4)
    b = vis(big)
    vis.eval()
    out["train_offsets_vary"] = not torch.equal(a, b)
    out["eval_is_deterministic"] = torch.equal(vis(big), vis(big))
    return out


def test_visual_tokenizer_any_grid_and_temporal_offset() -> None:
    (res,) = run_ranks(_visual, 1, timeout=60)
    assert res["small"] == (2, 4, 64)  # 1 frame x 2x2 patches
    assert res["big"] == (2, 2 * 3 * 4, 64)  # 2 frames x 3x4 patches (rescaled grid)
    assert res["train_offsets_vary"] and res["eval_is_deterministic"]


def test_sincos_embedding_is_fixed_and_distinct() -> None:
    from megatron_uni.models.embeddings import sincos_2d

    emb = sincos_2d(3, 4, 64)
    assert emb.shape == (12, 64)
    assert torch.equal(emb, sincos_2d(3, 4, 64))
    assert torch.cdist(emb, emb).add(torch.eye(12) * 1e3).min() > 0.1  # positions differ
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(2, 2, 30)


def test_padded_vocab_is_layout_independent() -> None:
    from megatron_uni.models.embeddings import padded_vocab_size

    assert padded_vocab_size(49411, 1) == padded_vocab_size(49411, 8) == 49536
    assert padded_vocab_size(49411, 3) % 3 == 0
