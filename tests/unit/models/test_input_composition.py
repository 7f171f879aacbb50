"""The encoder input per token kind follows the reference Uni-Perceiver (released MoE configs:
OLD_CHECKPONT, SHARE_LAYERNORM, POS_BEFORE, type row 0 on text only, no visual type embedding).

For a small packed batch of each task family, every token's embedding is recomputed by hand from
the tokenizer's weights with the reference's rules (``fundamentalvision/Uni-Perceiver``):
- a sequence's leading SPE: LN(word[<|spe|>]) (``utils/transformer_util.py`` get_spe_token);
- text: LN(word + pos[t] + type[0]) with t = 0.. counted after the SPE
  (``modeling/embedding/token_embed.py``); captioning's caption and slots both 0..L-1
  (``get_time_step``), the slots being <|spe|> ids that do get position and type;
- patches: LN(conv(frame) + spatial[k] + temporal[f]) with the spatial table of
  ``build_2d_sincos_position_embedding`` (coordinates x POSEMBED_SCALE), same LN.
The hand computation reads only the builders' inputs, not the packed metadata (beyond where each
sequence starts).
"""

from __future__ import annotations

import pytest
import torch

from tests.multirank import run_ranks

SPE = 49410
H, GRID = 64, 2  # hidden, patches per side (32 px images, patch 16)


def _reference_spatial(grid: int, dim: int, scale: float) -> torch.Tensor:
    """build_2d_sincos_position_embedding, transcribed (meshgrid 'ij' of (w, h), then
    [sin w, cos w, sin h, cos h]; with ij indexing its 'w' is the raster row)."""
    grid_w, grid_h = torch.meshgrid(torch.arange(grid, dtype=torch.float32) * scale,
                                    torch.arange(grid, dtype=torch.float32) * scale,
                                    indexing="ij")
    pos_dim = dim // 4
    omega = 1.0 / 10000.0 ** (torch.arange(pos_dim, dtype=torch.float32) / pos_dim)
    out_w = grid_w.flatten()[:, None] * omega
    out_h = grid_h.flatten()[:, None] * omega
    return torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)


def _batch(family: str):
    from megatron_uni.data import tasks

    gen = torch.Generator().manual_seed(3)
    images = torch.randn(2, 1, 3, 32, 32, generator=gen)
    if family == "classification":
        names = [[200, 201], [202]]
        batch = tasks.classification_batch(images, torch.tensor([0, 1]), names, patch_size=16,
                                           seq_len=16)
        return batch, images, [("clip", 0), ("clip", 1), ("text", names[0]), ("text", names[1])]
    if family == "video_classification":
        video = torch.randn(2, 3, 3, 32, 32, generator=gen)
        names = [[210], [211, 212, 213]]
        batch = tasks.classification_batch(video, torch.tensor([1, 0]), names, patch_size=16,
                                           seq_len=16, video=True)
        return batch, video, [("clip", 0), ("clip", 1), ("text", names[0]), ("text", names[1])]
    if family == "mlm":
        texts = [[101, SPE, 103, 104], [105, 106]]  # the reference's mask is <|spe|>: text
        labels = [[-100, 102, -100, -100], [-100, -100]]
        vocab = [102, 107]
        batch = tasks.mlm_batch(texts, labels, vocab, seq_len=16)
        return batch, None, [("text", texts[0]), ("text", texts[1]),
                             ("text", [vocab[0]]), ("text", [vocab[1]])]
    if family == "captioning":
        captions = [[120, 121, 122], [123]]
        vocab = [120, 121, 122, 123]
        batch = tasks.captioning_batch(images, captions, vocab, patch_size=16, seq_len=16,
                                       max_caption_len=3)
        return batch, images, [("caption", 0, captions[0]), ("caption", 1, captions[1]),
                               *(("text", [v]) for v in vocab)]
    if family == "retrieval":
        captions = [[130, 131], [132, 133, 134]]
        batch = tasks.retrieval_batch(images, captions, patch_size=16, seq_len=16)
        return batch, images, [("clip", 0), ("clip", 1), ("text", captions[0]),
                               ("text", captions[1])]
    raise ValueError(family)


def _compose(rank: int, world: int, family: str, overrides: list[str]) -> float:
    from megatron_uni.config import Config, apply_overrides
    from megatron_uni.models.generalist import build_model
    from megatron_uni.parallel.initialize import initialize

    cfg = apply_overrides(Config(), ["parallel.device=cpu", "model.drop_path_rate=0.0",
                                     *overrides])
    initialize(cfg)
    torch.manual_seed(0)
    tok = build_model(cfg, use_cpu=True).tokenizer.eval()
    with torch.no_grad():  # a non-trivial affine norm, so "inside or outside LN" shows
        tok.norm.weight.normal_(1.0, 0.5)
        tok.norm.bias.normal_(0.0, 0.5)
        if tok.visual.diff_proj is not None:
            tok.visual.diff_proj.weight.normal_(0.0, 0.05)
    batch, clips, sequences = _batch(family)
    with torch.no_grad():
        got = tok(batch).transpose(0, 1).reshape(-1, H)  # [R*S, h]
        word = tok.word_embeddings.weight
        pos, typ = tok.position_embeddings.weight, tok.type_embedding
        spatial = _reference_spatial(GRID, H, cfg.model.spatial_position_scale)

        def ln(x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.layer_norm(x, (H,), tok.norm.weight, tok.norm.bias,
                                                  cfg.model.layernorm_epsilon)

        def text(ids, positions):
            return [ln(word[i] + pos[t] + typ) for i, t in zip(ids, positions)]

        def patches(clip: int):
            frames = clips[clip]  # [T, C, H, W]
            x = tok.visual.proj(frames)  # [T, h, 2, 2]
            if tok.visual.diff_proj is not None and frames.shape[0] > 1:
                previous = torch.cat([frames[:1], frames[:-1]])
                x = x + tok.visual.diff_proj(frames - previous)
            x = x.flatten(2).transpose(1, 2)  # [T, P, h], raster order
            x = x + spatial[None] + tok.visual.temporal[: frames.shape[0], None]
            return [ln(v) for v in x.reshape(-1, H)]

        worst = 0.0
        for i, seq in enumerate(sequences):
            want = [ln(word[SPE])]  # the leading SPE: no position, no type
            if seq[0] == "clip":
                want += patches(seq[1])
            elif seq[0] == "text":
                want += text(seq[1], range(len(seq[1])))
            else:  # captioning: patches, caption 0..L-1, slots (<|spe|> ids) 0..L-1
                caption = seq[2]
                want += patches(seq[1]) + text(caption, range(len(caption)))
                want += text([SPE] * len(caption), range(len(caption)))
            start = int(batch.spe_index[i])
            worst = max(worst, float((got[start:start + len(want)] - torch.stack(want)).abs()
                                     .max()))
    return worst


FAMILIES = ["classification", "video_classification", "mlm", "captioning", "retrieval"]


@pytest.mark.parametrize(
    "family, overrides",
    [*((f, []) for f in FAMILIES),
     ("classification", ["model.spatial_position_scale=0.714285714"]),
     ("video_classification", ["model.frame_difference=true"])],
    ids=[*FAMILIES, "classification-scaled", "video-frame-difference"],
)
def test_token_embeddings_follow_the_reference_rules(family: str, overrides: list[str]) -> None:
    (worst,) = run_ranks(_compose, 1, args=(family, overrides), timeout=120)
    assert worst < 1e-5, f"{family}: largest difference {worst}"


def test_pack_numbers_text_after_the_leading_spe_from_zero() -> None:
    from megatron_uni.batch import Modality, sequence_start
    from megatron_uni.data.packing import SequenceSpec, TokenRun, pack

    seqs = [SequenceSpec((TokenRun(Modality.TEXT, "text_input", text_ids=(SPE, 5, 6)),)),
            SequenceSpec((TokenRun(Modality.TEXT, "text_target", text_ids=(SPE,)),
                          TokenRun(Modality.TEXT, "text_target", text_ids=(7, 8, 9))))]
    batch = pack(seqs, seq_len=9)
    assert batch.position[0].tolist() == [0, 0, 1, 0, 0, 1, 2, 0, 0]
    assert sequence_start(batch.seq_id)[0].tolist() == [1, 0, 0, 1, 0, 0, 0, 0, 0]
