"""Reference Uni-Perceiver / Uni-Perceiver-MoE state-dict names -> ours: the plan of an import.

Every name below was read from the reference source, ``fundamentalvision/Uni-Perceiver``
(commit a8c9e37); the file that defines it is named next to each table. Shape legend: V
vocabulary (49,411), P text positions (``TOKEN_EMBED.POSITION_MAX_LEN``), h hidden, C channels,
p patch size, N spatial patches ((``IMG_INPUT_SIZE`` / p)^2), T ``VIDEO_EMBED.MAX_FRAMES``,
E experts, D ``MOE.ATTRIBUTE_LENGTH``.

A plan sorts every reference tensor into: placed (our key <- a conversion of reference
tensors), dropped (no counterpart by design and nothing lost: a duplicate, a tensor the
reference never reads, training state), or not placed (a weight the reference uses that our
model cannot hold, with the reason; or a name the mapping does not know).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from megatron_uni.batch import TASK_FAMILIES
from megatron_uni.models.embeddings import sincos_2d

VideoType = Literal["auto", "fold", "drop"]

# DeepSpeed-era pieces -> current names, in order (tools/convertmoe.ipynb,
# tools/convert_checkpoint.py): the released "ds" checkpoints, mp_rank_00_model_states.pt with a
# 'module' key.
OLD_NAMES = [
    (r"^encoder\.", "fused_encoder."), (r"^predictor\.", "loss_prepare."),
    (r"\.attention\.self\.qkv_proj\.", ".self_attn.qkv_proj."),
    (r"\.attention\.output\.dense\.", ".self_attn.dense."),
    (r"\.attention_output\.residual_scale$", ".gamma_1"),  # [1, 1, h]
    (r"\.ffn_output\.residual_scale$", ".gamma_2"),
    (r"\.ffn\.dense\.", ".linear1."), (r"\.ffn\.dense2\.", ".linear2."),
    (r"\.LayerNormModules\.0\.", ".norm1."), (r"\.LayerNormModules\.1\.", ".norm2."),
    (r"\.deepspeed_moe\.gate\.", ".gate."), (r"\.deepspeed_moe\.experts\.", ".experts."),
]
# Inside a layer: torch nn.MultiheadAttention names of the dense Uni-Perceiver
# (modeling/layers/transformer_encoder_layer.py; tools/convert_checkpoint.py writes them).
MHA_NAMES = [("self_attn.in_proj_weight", "self_attn.qkv_proj.weight"),
             ("self_attn.in_proj_bias", "self_attn.qkv_proj.bias"),
             ("self_attn.out_proj.", "self_attn.dense.")]
# Encoder layer (modeling/layers/transformer_encoder_moe_layer.py: MoETransformerEncoderLayer and
# MoEAttentionBlock; task_moe/layer.py TaskMoE; task_moe/experts.py FusedExperts
# ``deepspeed_experts``; task_moe/gate.py TopKGate ``wg`` and ``tag_transform`` =
# Sequential(Linear(D, h), LayerNorm(h))). QKV rows are [Q; K; V] blocks (``.chunk(3, dim=-1)``).
LINEARS = {"self_attn.qkv_proj": "self_attention.linear_qkv",
           "self_attn.dense": "self_attention.linear_proj",
           "linear1": "mlp.linear_fc1", "linear2": "mlp.linear_fc2"}
PLAIN = {"norm1": "input_layernorm", "norm2": "pre_mlp_layernorm",
         "gamma_1": "self_attn_bda.gamma", "gamma_2": "mlp_bda.gamma"}
ROUTER = {"gate.wg.weight": "router.gate.weight",
          "gate.tag_transform.0.weight": "router.embed.weight",
          "gate.tag_transform.0.bias": "router.embed.bias",
          "gate.tag_transform.1.weight": "router.norm.weight",
          "gate.tag_transform.1.bias": "router.norm.bias"}
DROPPED_GATES = ("self_attn.dense", "linear2")  # they reuse the QKV / fc1 routing
# Non-encoder tensors: reference name -> (ours, conversion).
# modeling/embedding/token_embed.py (TokenBaseEmbedding): ``embeddings`` [V, h]; ``embeddings_pos``
# an NNEmbeddingEncoding (modeling/embedding/position_embedding.py: ``position_embeddings`` [P, h]);
# ``embeddings_token_type`` [TYPE_VOCAB_SIZE, h], only row 0 is ever added (to text, not to a
# sequence's leading SPE, which under OLD_CHECKPONT is LN(word) alone: ours does the same, so
# nothing to convert); ``embeddings_norm``.
# modeling/embedding/video_embed.py (VideoBaseEmbedding, DIVIDE_ST_POS): ``embeddings`` a Conv2d
# [h, C, p, p] (an nn.Linear [h, C*p*p] in the other path, same element order);
# ``embeddings_st_pos.temporal_pos_embed`` [T, h].
# modeling/predictor/embed_cls_predictor.py (EmbedClsAsRetrievalPredictor, the model's
# ``loss_prepare``): ``ln_post``, ``proj`` (OUTPUT_PROJ) and log-valued ``logit_scale_*`` scalars
# (initialised to log(1/temperature), used as ``.exp()``, capped at 100): log values, like ours.
OTHER_NAMES = {
    "token_embed.embeddings.weight": ("tokenizer.word_embeddings.weight", "vocab"),
    "token_embed.embeddings_pos.position_embeddings.weight":
        ("tokenizer.position_embeddings.weight", "rows"),
    "token_embed.embeddings_token_type.weight": ("tokenizer.type_embedding", "row0"),
    "token_embed.embeddings_norm.weight": ("tokenizer.norm.weight", "copy"),
    "token_embed.embeddings_norm.bias": ("tokenizer.norm.bias", "copy"),
    "video_embed.embeddings.weight": ("tokenizer.visual.proj.weight", "copy"),
    "video_embed.embeddings.bias": ("tokenizer.visual.proj.bias", "copy"),
    "video_embed.embeddings_st_pos.temporal_pos_embed.weight":
        ("tokenizer.visual.temporal", "rows"),
    "loss_prepare.ln_post.weight": ("head.norm.weight", "copy"),
    "loss_prepare.ln_post.bias": ("head.norm.bias", "copy"),
    "loss_prepare.proj.weight": ("head.proj.weight", "copy"),
    "loss_prepare.proj.bias": ("head.proj.bias", "copy"),
}
# The reference's per-task scales (the TEMP_NAME of the pre-training task configs) -> our family.
LOGIT_SCALES = {"loss_prepare.logit_scale_img_cls": "classification",
                "loss_prepare.logit_scale_text_mlm": "mlm",
                "loss_prepare.logit_scale_caption": "captioning",
                "loss_prepare.logit_scale_retrieve": "retrieval"}
VIDEO_TYPE = "video_embed.embeddings_type.weight"  # [1, h]
SPATIAL = "video_embed.embeddings_st_pos.spatial_pos_embed.weight"  # [N, h]
_PROMPT = "prompt-tuning parameter (MODEL.PROMPT); our model has no prompt tuning"
# (pattern, dropped?, reason): known names with no counterpart in our model.
KNOWN = [
    (r"^visual_embed\.", True, "DeepSpeed-era image tokenizer: video_embed shares its patch "
     "projection and spatial positions (video_embed.py replace_weight / share_spatial_pos); "
     "tools/convert_checkpoint.py drops it too"),
    (r"^token_embed\.embeddings_token_seg\.", True, "never read: token_embed.py passes "
     "token_seg_ids=None"),
    (r"^loss_prepare\.queue_(h1|h2|ptr1|ptr2)_", True, "memory-bank queue of retrieval "
     "negatives (MEMORY_BANK): training state, not weights; ours draws negatives from the "
     "data-parallel gather"),
    (r"^loss_prepare\.logit_scale_(text_caption|mlm|tqa_mlm|tqa_caption|tqa_retrieve)$", True,
     "no task config in the reference repository reads it (TEMP_NAME), so it holds its initial "
     "value"),
    (r"^loss_prepare\.logit_scale_video_cls$", False, "video classification's own scale; ours "
     "has one scale per task family (classification takes logit_scale_img_cls)"),
    (r"^loss_prepare\.logit_scale_downstream$", False, "the fine-tuning configs' scale; ours has "
     "one scale per task family"),
    (r"^video_embed\.embeddings_pos\.", False, "learned position table of the "
     "VIDEO_EMBED.DIVIDE_ST_POS=False path; ours adds a fixed 2-D sin-cos and a learned temporal "
     "embedding"),
    (r"^(prompt_embed\.|fc_prompt\.|similarity_weight$|s_token_bias$|token_embed\.s_token_bias)",
     False, _PROMPT),
    (r"\.deep_prompt_embedding\.", False, _PROMPT),
    (r"\.gate\.tag_transform\.2\.", False, "gate with a GELU between Linear and LayerNorm "
     "(MOE.TAG_Transform_ACT); our router has none"),
]
_LAYER = re.compile(r"^fused_encoder\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^experts\.deepspeed_experts\.(\d+)\.(weight|bias)$")


@dataclass
class Plan:
    """``targets``: {our key: (kind, source)}; kinds: copy, qkv, experts, experts_qkv, rows,
    vocab, row0, bias_type (source [bias, type]), scales (source {index: key})."""

    targets: dict[str, tuple[str, Any]] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    unplaced: dict[str, str] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)
    deepspeed_era: bool = False


def modernize(name: str) -> str:
    """A reference key in current names (``module.`` prefix and DeepSpeed-era pieces removed)."""
    name = name.removeprefix("module.")
    for old, new in OLD_NAMES:
        name = re.sub(old, new, name)
    return name


def plan(reference: dict[str, torch.Tensor], extra_names: dict[str, str] | None = None,
         video_type: VideoType = "auto", spatial_scale: float = 1.0) -> Plan:
    """Sort every reference tensor (see the module docstring). ``extra_names`` ({reference key
    or its current name: our key}, copied as they are) win over the tables; a table source they
    displace is reported as dropped. ``spatial_scale`` is our ``model.spatial_position_scale``,
    which the reference's frozen spatial table is checked against."""
    out = Plan(deepspeed_era=any(modernize(k) != k.removeprefix("module.") for k in reference))
    current = {modernize(k): k for k in reference}
    extra = extra_names or {}
    overrides: dict[str, tuple[str, Any]] = {}
    experts: dict[str, dict[int, str]] = {}
    scales: dict[int, str] = {}
    for name, key in current.items():
        if key in extra or name in extra:
            overrides[extra.get(key, extra.get(name))] = ("copy", key)
        elif name in OTHER_NAMES:
            ours, kind = OTHER_NAMES[name]
            out.targets[ours] = (kind, key)
        elif name in LOGIT_SCALES:
            scales[TASK_FAMILIES.index(LOGIT_SCALES[name])] = key
        elif name == VIDEO_TYPE:
            _video_type(out, current, key, video_type)
        elif name == SPATIAL:
            _spatial(out, key, reference[key], spatial_scale)
        elif name.startswith("video_embed.embeddings_norm."):
            _video_norm(out, current, name, key, reference)
        elif (known := next((k for k in KNOWN if re.search(k[0], name)), None)) is not None:
            (out.dropped if known[1] else out.unplaced)[key] = known[2]
        elif (m := _LAYER.match(name)) is not None:
            _layer(out, experts, key, int(m.group(1)), m.group(2))
        else:
            out.unknown.append(key)
            out.unplaced[key] = "unknown name (map it with --names)"
    if scales:
        out.targets["head.logit_scale"] = ("scales", scales)
    for target, by_expert in experts.items():
        ours, _, qkv = target.partition("|")
        if sorted(by_expert) != list(range(len(by_expert))):
            for key in by_expert.values():
                out.unplaced[key] = f"experts of {ours} are not numbered 0..E-1"
            continue
        out.targets[ours] = (f"experts{qkv}", [by_expert[e] for e in range(len(by_expert))])
    for ours, (kind, key) in overrides.items():
        if ours in out.targets:
            for replaced in sources(out.targets[ours][1]):
                out.dropped[replaced] = f"{ours} is filled from {key} (--names)"
        out.targets[ours] = (kind, key)
    return out


def sources(source: Any) -> list[str]:
    """The reference keys behind one planned target."""
    if isinstance(source, dict):
        return list(source.values())
    return list(source) if isinstance(source, list) else [source]


def _layer(out: Plan, experts: dict[str, dict[int, str]], key: str, layer: int, rest: str) -> None:
    for old, new in MHA_NAMES:
        if rest.startswith(old):
            rest = new + rest[len(old):]
    prefix = f"encoder.layers.{layer}."
    for ref, ours in PLAIN.items():
        if rest == ref or rest.startswith(ref + "."):
            out.targets[prefix + ours + rest[len(ref):]] = ("copy", key)
            return
    for ref, ours in LINEARS.items():
        if not rest.startswith(ref + "."):
            continue
        tail = rest[len(ref) + 1:]
        qkv = "_qkv" if ref == "self_attn.qkv_proj" else ""
        if tail in ("weight", "bias"):
            out.targets[f"{prefix}{ours}.{tail}"] = (f"copy{qkv}" if qkv else "copy", key)
            return
        if (e := _EXPERT.match(tail)) is not None:
            target = f"{prefix}{ours}.experts.{e.group(2)}" + ("|_qkv" if qkv else "")
            experts.setdefault(target, {})[int(e.group(1))] = key
            return
        if tail in ROUTER:
            if ref in DROPPED_GATES:
                out.dropped[key] = ("never used: this linear reuses the "
                                    f"{'QKV' if ref == 'self_attn.dense' else 'linear1'} routing "
                                    "decision (transformer_encoder_moe_layer.py)")
            else:
                out.targets[f"{prefix}{ours}.{ROUTER[tail]}"] = ("copy", key)
            return
    out.unknown.append(key)
    out.unplaced[key] = "unknown name in an encoder layer (map it with --names)"


def _video_type(out: Plan, current: dict[str, str], key: str, video_type: VideoType) -> None:
    """The visual type embedding: the DeepSpeed-era model adds row 0 to every patch token (so
    tools/convert_checkpoint.py folds it into the patch bias); the current one only with
    VIDEO_EMBED.ADD_TYPE_EMBED (default off, as in the released MoE configs)."""
    fold = video_type == "fold" or (video_type == "auto" and out.deepspeed_era)
    bias = current.get("video_embed.embeddings.bias")
    if fold and bias is not None:
        out.targets["tokenizer.visual.proj.bias"] = ("bias_type", [bias, key])
    else:
        out.dropped[key] = ("not added to patch tokens by the current reference unless "
                            "VIDEO_EMBED.ADD_TYPE_EMBED (tools/convert_checkpoint.py folds it into "
                            "the patch bias); --video-type-embedding fold adds it to our bias")


def _video_norm(out: Plan, current: dict[str, str], name: str, key: str,
                reference: dict[str, torch.Tensor]) -> None:
    token = current.get(name.replace("video_embed.", "token_embed.", 1))
    if token is not None and torch.equal(reference[token], reference[key]):
        out.dropped[key] = ("the same module as token_embed.embeddings_norm "
                            "(MODEL.SHARE_LAYERNORM, utils/transformer_util.py)")
    else:
        out.unplaced[key] = ("the reference normalises visual tokens with their own LayerNorm "
                             "(MODEL.SHARE_LAYERNORM off); ours shares one norm")


def reference_spatial(grid: int, dim: int, scale: float = 1.0) -> torch.Tensor:
    """The reference's fixed spatial table ``[grid^2, dim]``: 2-D sin-cos of row and column
    coordinates times ``scale`` (MODEL.POSEMBED_SCALE), channels [sin r, cos r, sin c, cos c]
    (utils/transformer_util.py build_2d_sincos_position_embedding, frozen by POSEMBEDFIX)."""
    coords = torch.arange(grid, dtype=torch.float64) * scale
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows = coords.repeat_interleave(grid)[:, None] * omega
    cols = coords.repeat(grid)[:, None] * omega
    return torch.cat([rows.sin(), rows.cos(), cols.sin(), cols.cos()], dim=1).float()


def _spatial(out: Plan, key: str, table: torch.Tensor, ours: float) -> None:
    """Ours computes the spatial embedding (a fixed 2-D sin-cos at ``model.spatial_position_scale``
    = ``ours``); say whether the reference's table is the same function of the patch grid."""
    n, dim = table.shape
    grid = math.isqrt(n)
    if grid * grid != n or dim % 4:
        out.unplaced[key] = f"a spatial table of {n} rows (not a square grid); ours is computed"
        return
    table = table.double()
    if torch.allclose(table, sincos_2d(grid, grid, dim, ours).double(), atol=1e-4):
        out.dropped[key] = ("equals our fixed 2-D sin-cos (models/embeddings.py sincos_2d) at "
                            f"model.spatial_position_scale={ours:g}")
        return
    # Channel dim/2 of patch (0, 1) is sin(scale), channel 3*dim/4 cos(scale) (omega_0 = 1).
    scale = math.atan2(float(table[1, dim // 2]), float(table[1, 3 * dim // 4])) if grid > 1 else 0
    if scale > 0 and torch.allclose(table, reference_spatial(grid, dim, scale).double(), atol=1e-4):
        out.unplaced[key] = (f"fixed 2-D sin-cos with positions scaled by {scale:.4f} "
                             "(MODEL.POSEMBED_SCALE, 160/224 = 0.7143 in the released 224 px "
                             f"configs) but model.spatial_position_scale is {ours:g}: set "
                             f"model.spatial_position_scale={scale:.6f} or visual positions differ")
    else:
        out.unplaced[key] = "a learned spatial table; ours computes a fixed 2-D sin-cos"


def reorder_qkv(t: torch.Tensor, heads: int, is_bias: bool) -> torch.Tensor:
    """[Q; K; V] rows -> megatron's per-head [q_h; k_h; v_h] (rows: dim -1 for a bias)."""
    if is_bias:
        lead, rows, rest = t.shape[:-1], t.shape[-1], ()
    else:
        lead, rows, rest = t.shape[:-2], t.shape[-2], (t.shape[-1],)
    d = rows // 3 // heads
    x = t.reshape(*lead, 3, heads, d, *rest).transpose(len(lead), len(lead) + 1)
    return x.reshape(t.shape).contiguous()


def build_tensor(kind: str, source: Any, reference: dict[str, torch.Tensor], ours: torch.Tensor,
                 target: str, heads: int, vocab_size: int) -> tuple[torch.Tensor, str]:
    """(our tensor, note or "") for one planned target; ValueError when the shapes cannot fit."""
    note = ""
    if kind.startswith("experts"):
        t = torch.stack([reference[k] for k in source])
    elif kind == "scales":
        t = ours.detach().clone()
        for index, key in source.items():
            t[index] = reference[key].reshape(())
        return t, ""
    elif kind == "bias_type":
        t = reference[source[0]] + reference[source[1]][0]
    else:
        t = reference[source]
    if kind.endswith("qkv"):
        t = reorder_qkv(t, heads, target.endswith("bias"))
    if kind == "row0":
        t = t[0]
    if kind in ("rows", "vocab"):
        if t.dim() != 2 or t.shape[1] != ours.shape[1]:
            raise ValueError(f"reference {tuple(t.shape)}, ours {tuple(ours.shape)}")
        if kind == "vocab" and t.shape[0] != vocab_size:
            raise ValueError(f"reference vocabulary {t.shape[0]}, model.vocab_size {vocab_size}")
        n = min(t.shape[0], ours.shape[0])
        full = torch.zeros_like(ours) if kind == "vocab" else ours.detach().clone()
        full[:n] = t[:n]
        if kind == "rows" and t.shape[0] != ours.shape[0]:
            note = (f"{target}: reference has {t.shape[0]} rows, ours {ours.shape[0]}: "
                    + ("extra rows dropped" if t.shape[0] > n else "the rest keep their init"))
        return full, note
    if t.numel() != ours.numel():
        raise ValueError(f"reference {tuple(t.shape)}, ours {tuple(ours.shape)}")
    return t.reshape(ours.shape), note
