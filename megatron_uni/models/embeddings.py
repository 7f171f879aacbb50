"""Input embeddings: pixels and token ids -> one token sequence of width ``hidden``.

(The reference calls these modules tokenizers; the model keeps them under ``tokenizer.*`` so
checkpoint names and the importer's tables stay as they were.)

Shape legend: R rows, S row length, h hidden, N clips, T frames, C channels, H/W pixels,
p patch size, P = (H/p)(W/p) patches per frame, V padded vocabulary.

- Image / video (an image is a 1-frame video): per-frame conv patch embedding, a FIXED 2-D
  sin-cos spatial embedding computed for the actual patch grid (coordinates times
  ``model.spatial_position_scale``; so a model trained at 160 px runs at 224 px unchanged), a
  LEARNED temporal embedding (max frames; during training a random temporal offset shifts which
  rows a short clip uses); with ``model.frame_difference`` also a patch embedding of each frame
  minus the previous one (an RGB-difference stream, not in the reference).
- Text: vocab-parallel token embedding (CLIP BPE + 3 specials), learned positions, a type
  embedding; a sequence's leading ``<SPE>`` gets neither position nor type embedding.
- All go through one shared LayerNorm (as in the reference), then into megatron's ``[s, b, h]``
  layout, split over tensor-parallel ranks along s when sequence parallelism is on.

Token composition against the reference (``fundamentalvision/Uni-Perceiver`` a8c9e37, released
MoE configs ``configs/BERT_L12_H768_experiments/16tasks_training_basemoe_stage{1,2}_56gpu.yaml``
on ``base_model_bert_l12_h768.yaml``: ``OLD_CHECKPONT: True``, ``SHARE_LAYERNORM: True``,
``POS_BEFORE: True`` (default), ``TOKEN_EMBED.TYPE_VOCAB_SIZE: 2``, ``VIDEO_EMBED.TYPE_SIZE: 1``
with ``ADD_TYPE_EMBED: False`` (default), ``DIVIDE_ST_POS: True``, ``POSEMBEDFIX: True``,
``POSEMBED_SCALE`` 1.0 in stage 1 (160 px) and 160/224 in stage 2 (224 px)). ``LN`` is the one
shared norm (``token_embed.embeddings_norm``; ``share_token_embed_ln`` in
``uniperceiver/utils/transformer_util.py`` makes ``video_embed.embeddings_norm`` the same module).

| token | reference | ours |
|---|---|---|
| a sequence's leading SPE (every input and target sequence) | ``LN(word[<|spe|>])``: ``preprocess`` prepends ``get_spe_token``, which under ``OLD_CHECKPONT`` calls ``token_embed(..., type_embed=False, pos_embed=False)`` (``utils/transformer_util.py``) | same (``batch.sequence_start``) |
| text (MLM input, class names, vocabulary entries, retrieval captions) | ``LN(word + pos[t] + type[0])``, t = 0..n-1 counted from the first token after the SPE (the text is embedded before the SPE is prepended; ``NNEmbeddingEncoding`` numbers ``arange(n)``; ``modeling/embedding/{token_embed,position_embedding}.py``) | same (``pack`` numbers text after the SPE from 0) |
| captioning caption tokens and slots (``text_spe_cat``) | ``LN(word + pos[t] + type[0])``; ``get_time_step`` numbers the ``[caption; slots]`` block 0..L-1 twice; the slots are ``<|spe|>`` ids and do get position and type | same (``tasks.captioning_batch``) |
| MLM ``[MASK]`` | the ``<|spe|>`` id (``DATALOADER.MASK_BPE_WORD`` default ``spe``, ``datasets/task_dataset/general_corpus.py``), embedded as text | same (``data/masking.py``) |
| image / video patch | ``LN(conv(frame) + spatial[k] + temporal[f])``; ``spatial`` = frozen 2-D sin-cos of the row/column scaled by ``POSEMBED_SCALE`` (``build_2d_sincos_position_embedding``), ``temporal`` learned with a random offset in training (``modeling/embedding/video_embed.py`` ``Divide_ST_POS``); no type embedding (``ADD_TYPE_EMBED`` off; the DeepSpeed-era model added ``embeddings_type[0]`` before the norm: the importer folds it into the conv bias) | same, with ``model.spatial_position_scale``; plus the optional ``model.frame_difference`` stream (ours, off by default) inside the sum |

Sequence layout per task (``preprocess`` concatenates ``[SPE] + input_sample_list``; targets and
shared target sets are encoded separately, each as ``[SPE] text``): classification and retrieval
inputs ``[SPE][patches]``; MLM ``[SPE][text]``; captioning ``[SPE][patches][caption][slots]``
(``data_cum_length`` = [1, 1+P, 1+P+2L]); ours packs the same sequences into rows
(``data/tasks.py``). Position and type embeddings are added before the norm (``POS_BEFORE``).
Differences in the text itself (which token masks, ``<|endoftext|>`` endings) are data choices,
documented in ``data/masking.py`` and ``data/examples.py``.
"""

from __future__ import annotations

import math

import torch
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel import VocabParallelEmbedding
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_uni.config import ModelConfig
from megatron_uni.batch import SPE_ID, Modality, PackedBatch, sequence_start
from megatron_uni.parallel.main_grad import lookup

VOCAB_PAD_MULTIPLE = 128


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """Round the vocabulary up so every tensor-parallel rank holds an equal slice.

    The multiple does not depend on ``tp`` (for tp dividing 128), so checkpoints keep one shape
    across layouts.
    """
    multiple = VOCAB_PAD_MULTIPLE * tp // math.gcd(VOCAB_PAD_MULTIPLE, tp)
    return -(-vocab_size // multiple) * multiple


def sincos_2d(grid_h: int, grid_w: int, dim: int, scale: float = 1.0) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding, ``[grid_h * grid_w, dim]`` (MAE/ViT style).

    Half the channels encode the row, half the column; each half is sin/cos at ``dim/4``
    geometric frequencies of the coordinate times ``scale`` (the reference's POSEMBED_SCALE).
    """
    if dim % 4:
        raise ValueError(f"hidden size {dim} must be divisible by 4 for the 2-D sin-cos embedding")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    ys, xs = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64) * scale,
        torch.arange(grid_w, dtype=torch.float64) * scale,
        indexing="ij",
    )

    def encode(coord: torch.Tensor) -> torch.Tensor:
        angles = coord.reshape(-1, 1) * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(ys), encode(xs)], dim=1).float()


class VisualEmbedding(torch.nn.Module):
    """``[N, T, C, H, W]`` pixels -> ``[N, T * P, h]`` patch tokens (before the shared norm)."""

    def __init__(self, model: ModelConfig, in_channels: int = 3) -> None:
        super().__init__()
        self.patch_size = model.patch_size
        self.max_frames = model.max_frames
        self.position_scale = model.spatial_position_scale
        self.proj = torch.nn.Conv2d(
            in_channels, model.hidden_size, kernel_size=model.patch_size, stride=model.patch_size
        )
        self.temporal = torch.nn.Parameter(torch.zeros(model.max_frames, model.hidden_size))
        torch.nn.init.trunc_normal_(self.temporal, std=model.init_method_std)
        # Optional RGB-difference stream (model.frame_difference): motion shows up in a single
        # linear map of (frame t - frame t-1), while the reference's per-frame tokens only show it
        # through attention between frames; left vs right motion (the same frames in reverse
        # order) is invisible to any statistic that ignores frame order.
        self.diff_proj = (
            torch.nn.Conv2d(in_channels, model.hidden_size, kernel_size=model.patch_size,
                            stride=model.patch_size, bias=False)
            if model.frame_difference else None
        )
        self._spatial_cache: dict[tuple, torch.Tensor] = {}  # fixed tables, not parameters

    def _spatial_table(self, gh: int, gw: int, like: torch.Tensor) -> torch.Tensor:
        """The fixed sin-cos table of a patch grid on ``like``'s device and dtype, built once per
        grid (computing it on the host every forward cost a host-to-device copy each time)."""
        key = (gh, gw, like.shape[-1], like.dtype, like.device)
        if key not in self._spatial_cache:
            table = sincos_2d(gh, gw, like.shape[-1], self.position_scale)
            self._spatial_cache[key] = table.to(device=like.device, dtype=like.dtype)
        return self._spatial_cache[key]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        n, t, c, height, width = images.shape
        if t > self.max_frames:
            raise ValueError(f"clips have {t} frames but model.max_frames is {self.max_frames}")
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"image size {height}x{width} is not a multiple of the patch size {self.patch_size}"
            )
        x = self.proj(images.reshape(n * t, c, height, width))  # [N*T, h, H/p, W/p]
        if self.diff_proj is not None and t > 1:
            previous = torch.cat([images[:, :1], images[:, :-1]], dim=1)  # frame 0: no motion
            x = x + self.diff_proj((images - previous).reshape(n * t, c, height, width))
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2).reshape(n, t, gh * gw, -1)  # [N, T, P, h]
        spatial = self._spatial_table(gh, gw, x)
        offset = 0
        if self.training and t < self.max_frames:
            # Same draw on every tensor-parallel rank: the default RNG is seeded alike there.
            offset = int(torch.randint(0, self.max_frames - t + 1, (1,)))
        temporal = self.temporal[offset : offset + t].to(x.dtype)
        x = x + spatial[None, None] + temporal[None, :, None]
        return x.reshape(n, t * gh * gw, -1)


class WordEmbedding(VocabParallelEmbedding):
    """megatron's ``VocabParallelEmbedding`` (same parameter, sharding and checkpoint name);
    on one tensor-parallel rank its backward adds the looked-up words' gradients into megatron
    DDP's ``main_grad`` (``parallel.main_grad.lookup``) instead of a dense [V, h] zero gradient
    every step (a 49k-word table: 50 MB zero-filled and added per step at hidden 256)."""

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        if self.tp_group.size() > 1 or self.deterministic_mode or self.reduce_scatter_embeddings:
            return super().forward(input_)
        return lookup(input_, self.weight)


class InputEmbedding(MegatronModule):
    """A packed batch -> ``[S, R, h]`` encoder input (``[S/tp, R, h]`` under sequence parallel)."""

    def __init__(self, config: TransformerConfig, model: ModelConfig, tp: int) -> None:
        super().__init__(config=config)
        self.visual = VisualEmbedding(model)
        self.word_embeddings = WordEmbedding(
            padded_vocab_size(model.vocab_size, tp),
            model.hidden_size,
            init_method=config.init_method,
            config=config,
        )
        self.position_embeddings = torch.nn.Embedding(model.max_text_positions, model.hidden_size)
        self.type_embedding = torch.nn.Parameter(torch.zeros(model.hidden_size))
        torch.nn.init.normal_(self.position_embeddings.weight, std=model.init_method_std)
        torch.nn.init.normal_(self.type_embedding, std=model.init_method_std)
        # The shared norm runs on the full sequence before the sequence-parallel split, so its
        # gradients are complete on every TP rank: a plain LayerNorm, not flagged for TP reduce.
        self.norm = torch.nn.LayerNorm(model.hidden_size, eps=model.layernorm_epsilon)
        self.max_positions = model.max_text_positions

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        if int(batch.position.max()) >= self.max_positions:
            raise ValueError(
                f"a text position reaches {int(batch.position.max())} but model.max_text_positions "
                f"is {self.max_positions}"
            )
        words = self.word_embeddings(batch.text_ids)  # [R, S, h]
        # A sequence's leading <SPE> is LN(word) alone: the reference prepends it after embedding
        # the data, without position or type (get_spe_token under OLD_CHECKPONT). Other <SPE>
        # ids (captioning slots, the reference's MLM masks) are ordinary text.
        spe = (sequence_start(batch.seq_id) & (batch.text_ids == SPE_ID))[..., None]
        extras = self.position_embeddings(batch.position) + self.type_embedding
        text = torch.where(spe, words, words + extras)
        x = text
        if batch.images.numel() > 0 and bool((batch.patch_index >= 0).any()):
            patches = self.visual(batch.images.to(text.dtype)).reshape(-1, text.shape[-1])
            visual = patches[batch.patch_index.clamp(min=0)]  # [R, S, h]
            is_text = (batch.modality == Modality.TEXT)[..., None]
            x = torch.where(is_text, text, visual)
        x = self.norm(x).transpose(0, 1).contiguous()  # [S, R, h]
        if self.config.sequence_parallel:
            x = tensor_parallel.scatter_to_sequence_parallel_region(x)
        return x
