"""import_reference: a file with the reference's key names and shapes (random values) for a tiny
config, as fundamentalvision/Uni-Perceiver writes them (current MoE names, the DeepSpeed-era
names of the released "ds" checkpoints, and the dense model's nn.MultiheadAttention names);
every tensor lands where the mapping says after its layout conversion (QKV rows from [Q; K; V] to
megatron's per-head order, padded vocabulary rows, leading position rows, type-embedding row 0,
the DeepSpeed-era video type embedding folded into the patch bias, log-valued logit scales per
task family); duplicates, unused gates and training state are dropped, tensors our model has no
counterpart for are reported with a reason; clear errors for bad files."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from checkpoints_utils.common import ToolError, read_tensors, tensor_index
from checkpoints_utils.import_reference import import_reference, main, read_reference
from checkpoints_utils.reference_names import build_tensor, plan, reference_spatial

# Layers, hidden, heads, FFN, experts, attribute bits, vocabulary (ours pads it to 512), text
# positions (reference; ours 32), frames, patch, spatial grid of the reference (4 x 4 patches).
L, H, HEADS, F, E, W, V, P, T, PATCH, GRID = 2, 64, 4, 256, 4, 8, 500, 40, 8, 16, 4
YAML = """model: {num_layers: 2, vocab_size: 500, max_text_positions: 32, drop_path_rate: 0.0}
moe: {num_experts: %d, layers: every_other}
"""
SCALES = ("img_cls", "video_cls", "text_mlm", "text_caption", "caption", "mlm", "retrieve",
          "tqa_mlm", "tqa_caption", "tqa_retrieve", "downstream")
STYLES = ("current", "deepspeed", "dense")
# Layer names per style: LN 1/2, LayerScale 1/2, and where the MoE pieces sit.
NAMES = {
    "current": {"qkv": "self_attn.qkv_proj", "dense": "self_attn.dense", "linear1": "linear1",
                "linear2": "linear2", "norm1": "norm1", "norm2": "norm2", "gamma_1": "gamma_1",
                "gamma_2": "gamma_2", "moe": "", "encoder": "fused_encoder",
                "head": "loss_prepare"},
    "deepspeed": {"qkv": "attention.self.qkv_proj", "dense": "attention.output.dense",
                  "linear1": "ffn.dense", "linear2": "ffn.dense2", "norm1": "LayerNormModules.0",
                  "norm2": "LayerNormModules.1", "gamma_1": "attention_output.residual_scale",
                  "gamma_2": "ffn_output.residual_scale", "moe": "deepspeed_moe.",
                  "encoder": "encoder", "head": "predictor"},
}
SHAPES = {"qkv": (3 * H, H), "dense": (H, H), "linear1": (F, H), "linear2": (H, F)}


def reference(style: str) -> dict[str, torch.Tensor]:
    """A reference state dict; MoE on layer 0 (MOE_EXPERT_LOCATION 'odd'), dense layer 1."""
    gen = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    names = NAMES["deepspeed" if style == "deepspeed" else "current"]
    head = names["head"]
    sd = {"token_embed.embeddings.weight": r(V, H),
          "token_embed.embeddings_pos.position_embeddings.weight": r(P, H),
          "token_embed.embeddings_token_type.weight": r(2, H),
          "token_embed.embeddings_norm.weight": r(H), "token_embed.embeddings_norm.bias": r(H),
          "video_embed.embeddings.weight": r(H, 3, PATCH, PATCH),
          "video_embed.embeddings.bias": r(H),
          "video_embed.embeddings_type.weight": r(1, H),
          "video_embed.embeddings_st_pos.temporal_pos_embed.weight": r(T, H),
          # POSEMBEDFIX sin-cos; the DeepSpeed-era file with POSEMBED_SCALE 160/224.
          "video_embed.embeddings_st_pos.spatial_pos_embed.weight":
              reference_spatial(GRID, H, 160 / 224 if style == "deepspeed" else 1.0),
          f"{head}.ln_post.weight": r(H), f"{head}.ln_post.bias": r(H),
          f"{head}.proj.weight": r(H, H), f"{head}.proj.bias": r(H),
          f"{head}.queue_h1_cc3m_retrieve": r(16, H), f"{head}.queue_h2_cc3m_retrieve": r(16, H),
          f"{head}.queue_ptr1_cc3m_retrieve": torch.zeros(1, dtype=torch.long),
          f"{head}.queue_ptr2_cc3m_retrieve": torch.zeros(1, dtype=torch.long),
          "fc_prompt.weight": r(10, H), "some_head.unknown": r(3)}
    for name in SCALES:
        sd[f"{head}.logit_scale_{name}"] = r(()).abs() + 2.0
    # SHARE_LAYERNORM: the video norm is the token norm, listed twice in the state dict.
    sd["video_embed.embeddings_norm.weight"] = sd["token_embed.embeddings_norm.weight"].clone()
    sd["video_embed.embeddings_norm.bias"] = sd["token_embed.embeddings_norm.bias"].clone()
    if style == "deepspeed":  # the image tokenizer video_embed shares its tensors with
        sd["visual_embed.patch_embed.proj.weight"] = sd["video_embed.embeddings.weight"].clone()
        sd["visual_embed.patch_embed.proj.bias"] = sd["video_embed.embeddings.bias"].clone()
        sd["visual_embed.patch_embed.pos_embed.weight"] = sd[
            "video_embed.embeddings_st_pos.spatial_pos_embed.weight"].clone()
    for layer in range(L):
        p = f"{names['encoder']}.layers.{layer}."
        for n in ("norm1", "norm2"):
            sd[f"{p}{names[n]}.weight"], sd[f"{p}{names[n]}.bias"] = r(H), r(H)
        gamma_shape = (1, 1, H) if style == "deepspeed" else (H,)
        sd[p + names["gamma_1"]], sd[p + names["gamma_2"]] = r(*gamma_shape), r(*gamma_shape)
        for lin, (o, i) in SHAPES.items():
            if style == "dense" or layer == 1:
                if style == "dense" and lin in ("qkv", "dense"):  # nn.MultiheadAttention
                    mha = {"qkv": ("self_attn.in_proj_weight", "self_attn.in_proj_bias"),
                           "dense": ("self_attn.out_proj.weight", "self_attn.out_proj.bias")}[lin]
                    sd[p + mha[0]], sd[p + mha[1]] = r(o, i), r(o)
                else:
                    sd[f"{p}{names[lin]}.weight"], sd[f"{p}{names[lin]}.bias"] = r(o, i), r(o)
                continue
            q = f"{p}{names[lin]}.{names['moe']}"
            for e in range(E):
                sd[f"{q}experts.deepspeed_experts.{e}.weight"] = r(o, i)
                sd[f"{q}experts.deepspeed_experts.{e}.bias"] = r(o)
            sd[f"{q}gate.wg.weight"] = r(E, H)
            for i, shapes in ((0, ((H, W), (H,))), (1, ((H,), (H,)))):  # Linear, LayerNorm
                sd[f"{q}gate.tag_transform.{i}.weight"] = r(*shapes[0])
                sd[f"{q}gate.tag_transform.{i}.bias"] = r(*shapes[1])
    return sd


def _qkv_rows(t: torch.Tensor, part: str) -> torch.Tensor:
    """Our row h*3d + j*d + i is the reference's j*H + h*d + i (rows: the last dim of a bias)."""
    d = H // HEADS
    rows = [j * H + h * d + i for h in range(HEADS) for j in range(3) for i in range(d)]
    return t[..., rows] if part == "bias" else t[..., rows, :]


def expected(style: str) -> dict[str, torch.Tensor]:
    """Our keys -> values, written out independently of the importer."""
    ref = reference(style)
    names = NAMES["deepspeed" if style == "deepspeed" else "current"]
    head = names["head"]
    word = torch.zeros(512, H)
    word[:V] = ref["token_embed.embeddings.weight"]
    bias = ref["video_embed.embeddings.bias"]
    if style == "deepspeed":  # the DeepSpeed-era model adds the video type embedding
        bias = bias + ref["video_embed.embeddings_type.weight"][0]
    out = {"tokenizer.word_embeddings.weight": word,
           "tokenizer.position_embeddings.weight":
               ref["token_embed.embeddings_pos.position_embeddings.weight"][:32],
           "tokenizer.type_embedding": ref["token_embed.embeddings_token_type.weight"][0],
           "tokenizer.norm.weight": ref["token_embed.embeddings_norm.weight"],
           "tokenizer.norm.bias": ref["token_embed.embeddings_norm.bias"],
           "tokenizer.visual.proj.weight": ref["video_embed.embeddings.weight"],
           "tokenizer.visual.proj.bias": bias,
           "tokenizer.visual.temporal":
               ref["video_embed.embeddings_st_pos.temporal_pos_embed.weight"],
           "head.norm.weight": ref[f"{head}.ln_post.weight"],
           "head.norm.bias": ref[f"{head}.ln_post.bias"],
           "head.proj.weight": ref[f"{head}.proj.weight"],
           "head.proj.bias": ref[f"{head}.proj.bias"],
           # [classification, mlm, captioning, retrieval], log values in both models
           "head.logit_scale": torch.stack([ref[f"{head}.logit_scale_{n}"] for n in
                                            ("img_cls", "text_mlm", "caption", "retrieve")])}
    ours = {"qkv": "self_attention.linear_qkv", "dense": "self_attention.linear_proj",
            "linear1": "mlp.linear_fc1", "linear2": "mlp.linear_fc2"}
    for layer in range(L):
        p, q = f"{names['encoder']}.layers.{layer}.", f"encoder.layers.{layer}."
        out[q + "input_layernorm.weight"] = ref[p + names["norm1"] + ".weight"]
        out[q + "input_layernorm.bias"] = ref[p + names["norm1"] + ".bias"]
        out[q + "pre_mlp_layernorm.weight"] = ref[p + names["norm2"] + ".weight"]
        out[q + "pre_mlp_layernorm.bias"] = ref[p + names["norm2"] + ".bias"]
        out[q + "self_attn_bda.gamma"] = ref[p + names["gamma_1"]].reshape(H)
        out[q + "mlp_bda.gamma"] = ref[p + names["gamma_2"]].reshape(H)
        for lin in SHAPES:
            for part in ("weight", "bias"):
                if style == "dense" or layer == 1:
                    if style == "dense" and lin == "qkv":
                        t = ref[p + f"self_attn.in_proj_{part}"]
                    elif style == "dense" and lin == "dense":
                        t = ref[p + f"self_attn.out_proj.{part}"]
                    else:
                        t = ref[f"{p}{names[lin]}.{part}"]
                    out[f"{q}{ours[lin]}.{part}"] = _qkv_rows(t, part) if lin == "qkv" else t
                    continue
                g = f"{p}{names[lin]}.{names['moe']}"
                t = torch.stack([ref[f"{g}experts.deepspeed_experts.{e}.{part}"]
                                 for e in range(E)])
                out[f"{q}{ours[lin]}.experts.{part}"] = _qkv_rows(t, part) if lin == "qkv" else t
            if layer == 0 and style != "dense" and lin in ("qkv", "linear1"):
                g = f"{p}{names[lin]}.{names['moe']}gate."
                out[f"{q}{ours[lin]}.router.gate.weight"] = ref[g + "wg.weight"]
                out[f"{q}{ours[lin]}.router.embed.weight"] = ref[g + "tag_transform.0.weight"]
                out[f"{q}{ours[lin]}.router.embed.bias"] = ref[g + "tag_transform.0.bias"]
                out[f"{q}{ours[lin]}.router.norm.weight"] = ref[g + "tag_transform.1.weight"]
                out[f"{q}{ours[lin]}.router.norm.bias"] = ref[g + "tag_transform.1.bias"]
    return out


def _read(path: Path, keys: list[str]) -> dict[str, torch.Tensor]:
    """Our tensors by per-layer key; identical layers are saved stacked
    (``encoder.layers.X`` with a leading layer dimension)."""
    index = tensor_index(path)
    stacked = {k: re.sub(r"^encoder\.layers\.\d+\.", "encoder.layers.", k) for k in keys
               if k not in index}
    got = read_tensors(path, sorted({stacked.get(k, k) for k in keys}))
    return {k: got[stacked[k]][int(k.split(".")[2])] if k in stacked else got[k] for k in keys}


@pytest.mark.parametrize("style", STYLES)
def test_every_tensor_lands_where_the_mapping_says(tmp_path: Path, style: str) -> None:
    sd = reference(style)
    file = tmp_path / "ref.pt"
    torch.save({"module": sd} if style == "deepspeed" else {"model": sd}, file)
    config = tmp_path / "tiny.yaml"
    config.write_text(YAML % (0 if style == "dense" else E))
    result = import_reference(file, config, tmp_path / "ours", verbose=False)
    head = "predictor" if style == "deepspeed" else "loss_prepare"
    assert result["deepspeed_era"] == (style == "deepspeed")
    assert result["unknown"] == ["some_head.unknown"]
    assert result["unfilled"] == []
    assert result["notes"] == ["tokenizer.position_embeddings.weight: reference has 40 rows, "
                               "ours 32: extra rows dropped"]
    spatial = "video_embed.embeddings_st_pos.spatial_pos_embed.weight"
    unplaced = {"some_head.unknown", "fc_prompt.weight", f"{head}.logit_scale_video_cls",
                f"{head}.logit_scale_downstream"}
    dropped = {"video_embed.embeddings_norm.weight", "video_embed.embeddings_norm.bias",
               *(f"{head}.queue_{q}_cc3m_retrieve" for q in ("h1", "h2", "ptr1", "ptr2")),
               *(f"{head}.logit_scale_{n}" for n in ("text_caption", "mlm", "tqa_mlm",
                                                     "tqa_caption", "tqa_retrieve"))}
    if style == "deepspeed":
        unplaced.add(spatial)
        assert "scaled by 0.7143" in result["unplaced"][spatial]
        dropped |= {k for k in sd if k.startswith("visual_embed.")}
    else:
        dropped |= {spatial, "video_embed.embeddings_type.weight"}
    if style != "dense":  # attention-output and fc2 gates of the MoE layer
        names = NAMES[style]
        dropped |= {k for k in sd if any(f".{names[n]}.{names['moe']}gate." in k
                                         for n in ("dense", "linear2"))}
        assert len(dropped & {k for k in sd if ".gate." in k}) == 2 * 5
    assert set(result["unplaced"]) == unplaced
    assert set(result["dropped"]) == dropped
    assert all(result["dropped"].values()) and all(result["unplaced"].values())
    want = expected(style)
    got = _read(tmp_path / "ours" / "iter_0000000", list(want))
    for key, value in want.items():
        assert torch.equal(got[key], value), key
    # Everything is accounted for: placed (one or more sources), dropped or not placed.
    sources = {s for v in result["placed"].values()
               for s in (v.values() if isinstance(v, dict) else v if isinstance(v, list) else [v])}
    assert sources | set(result["dropped"]) | set(result["unplaced"]) == set(sd)
    if style == "deepspeed":  # an unknown name: exit status 1 (once; each import is a process)
        assert main([str(file), "--config", str(config), "--save", str(tmp_path / "o2")]) == 1


def test_names_override_and_video_type_option(tmp_path: Path) -> None:
    sd = reference("current")
    del sd["some_head.unknown"]
    file = tmp_path / "ref.pt"
    torch.save({"model": sd}, file)
    config = tmp_path / "tiny.yaml"
    config.write_text(YAML % E)
    names = tmp_path / "names.json"
    names.write_text('{"token_embed.embeddings_norm.weight": "head.norm.weight"}')
    # --names wins over the table; the displaced source is reported; known names exit 0.
    result = import_reference(file, config, tmp_path / "o1", {"token_embed.embeddings_norm.weight":
                                                              "head.norm.weight"}, verbose=False)
    assert "(--names)" in result["dropped"]["loss_prepare.ln_post.weight"]
    assert result["unfilled"] == ["tokenizer.norm.weight"]
    got = read_tensors(tmp_path / "o1" / "iter_0000000", ["head.norm.weight"])
    assert torch.equal(got["head.norm.weight"], sd["token_embed.embeddings_norm.weight"])
    assert main([str(file), "--config", str(config), "--save", str(tmp_path / "o2"),
                 "--names", str(names), "--video-type-embedding", "fold"]) == 0
    got = read_tensors(tmp_path / "o2" / "iter_0000000", ["tokenizer.visual.proj.bias"])
    want = sd["video_embed.embeddings.bias"] + sd["video_embed.embeddings_type.weight"][0]
    assert torch.equal(got["tokenizer.visual.proj.bias"], want)
    # A config whose MoE layout differs from the file's: a clear error, nothing written.
    config.write_text(YAML.replace("every_other", "all") % E)
    with pytest.raises(ToolError, match="no such tensor.*moe.layers"):
        import_reference(file, config, tmp_path / "o3", verbose=False)


def test_layout_conversions_and_spatial_check() -> None:
    """Without a model: the Linear-form patch projection, padded vocabulary, the spatial table."""
    ours = torch.empty(H, 3, PATCH, PATCH)
    linear = torch.randn(H, 3 * PATCH * PATCH)  # video_embed.py: '(s c p1 p2)' with s = 1
    t, _ = build_tensor("copy", "w", {"w": linear}, ours, "tokenizer.visual.proj.weight", HEADS, V)
    assert torch.equal(t[:, 1, 2, 3], linear[:, 1 * PATCH * PATCH + 2 * PATCH + 3])
    with pytest.raises(ValueError, match="vocabulary 499"):
        build_tensor("vocab", "w", {"w": torch.zeros(499, H)}, torch.empty(512, H), "x", HEADS, V)
    key = "video_embed.embeddings_st_pos.spatial_pos_embed.weight"
    assert key in plan({key: reference_spatial(14, 768)}).dropped
    the_plan = plan({key: reference_spatial(14, 768, 160 / 224)})
    assert "scaled by 0.7143" in the_plan.unplaced[key]
    assert "model.spatial_position_scale=0.714286" in the_plan.unplaced[key]
    # With the released 224 px value configured (model.spatial_position_scale), ours computes
    # the same table: nothing lost.
    assert key in plan({key: reference_spatial(14, 768, 160 / 224)},
                       spatial_scale=160 / 224).dropped
    assert "scaled by 1.0000" in plan({key: reference_spatial(14, 768)},
                                      spatial_scale=160 / 224).unplaced[key]
    assert "learned" in plan({key: torch.randn(196, 768)}).unplaced[key]
    assert math.isclose(float(reference_spatial(2, 8)[1, 4]), math.sin(1.0), rel_tol=1e-6)


class _Pickled:
    """An arbitrary pickled object, as a checkpoint saved with full pickling may hold."""


def test_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ToolError, match="does not exist"):
        read_reference(tmp_path / "missing.pt")
    torch.save({"model": reference("current")}, tmp_path / "ref.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "ref.pt").read_bytes()[:1000])
    with pytest.raises(ToolError, match="truncated"):
        read_reference(tmp_path / "cut.pt")
    # A class of this module: never on torch's safe-globals list (pathlib.Path can be: megatron
    # registers some classes for weights_only loading when it is imported).
    torch.save({"model": {"w": torch.zeros(1)}, "obj": _Pickled()}, tmp_path / "pickled.pt")
    with pytest.raises(ToolError, match="weights_only"):
        read_reference(tmp_path / "pickled.pt")
    torch.save({"epoch": 3}, tmp_path / "nostate.pt")
    with pytest.raises(ToolError, match="no state dict"):
        read_reference(tmp_path / "nostate.pt")
    with pytest.raises(ToolError, match="does not exist"):
        read_reference(tmp_path)
