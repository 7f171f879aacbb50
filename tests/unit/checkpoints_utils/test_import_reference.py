"""import_reference: a file with the reference's key names and shapes (random values) for a tiny
config, in the current and the DeepSpeed-era naming; every tensor lands where the mapping says
(QKV rows reordered from [Q; K; V] to megatron's per-head order), gates of the attention output
and fc2 are dropped, unknown tensors reported; clear errors for bad files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from checkpoints_utils.common import ToolError, read_tensors
from checkpoints_utils.import_reference import import_reference, main, read_reference

L, H, HEADS, F, E, W, V = 2, 64, 4, 256, 4, 8, 512
YAML = """model: {num_layers: 2, vocab_size: 512, drop_path_rate: 0.0}
moe: {num_experts: 4, layers: all}
"""


def reference(old: bool) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    names = ({"qkv": "attention.self.qkv_proj", "dense": "attention.output.dense",
              "linear1": "ffn.dense", "linear2": "ffn.dense2", "norm1": "LayerNormModules.0",
              "norm2": "LayerNormModules.1", "gamma_1": "residual_scale.0",
              "gamma_2": "residual_scale.1", "moe": "deepspeed_moe."} if old else
             {"qkv": "self_attn.qkv_proj", "dense": "self_attn.dense", "linear1": "linear1",
              "linear2": "linear2", "norm1": "norm1", "norm2": "norm2", "gamma_1": "gamma_1",
              "gamma_2": "gamma_2", "moe": ""})
    sd = {"token_embed.embeddings.weight": r(V, H), "token_embed.embeddings_pos.weight": r(V, H),
          "token_embed.embeddings_token_type.weight": r(1, H),
          "token_embed.embeddings_norm.weight": r(H), "token_embed.embeddings_norm.bias": r(H),
          "video_embed.embeddings.weight": r(H, 3, 16, 16), "video_embed.embeddings.bias": r(H),
          "video_embed.embeddings_time": r(8, H), "some_head.unknown": r(3)}
    shapes = {"qkv": (3 * H, H), "dense": (H, H), "linear1": (F, H), "linear2": (H, F)}
    for layer in range(L):
        p = f"fused_encoder.layers.{layer}."
        for n in ("norm1", "norm2"):
            sd[f"{p}{names[n]}.weight"], sd[f"{p}{names[n]}.bias"] = r(H), r(H)
        sd[p + names["gamma_1"]], sd[p + names["gamma_2"]] = r(H), r(H)
        for lin, (o, i) in shapes.items():
            q = f"{p}{names[lin]}.{names['moe']}"
            for e in range(E):
                sd[f"{q}experts.deepspeed_experts.{e}.weight"] = r(o, i)
                sd[f"{q}experts.deepspeed_experts.{e}.bias"] = r(o)
            sd[f"{q}gate.wg.weight"] = r(E, H)
            sd[f"{q}gate.tag_transform.0.weight"], sd[f"{q}gate.tag_transform.0.bias"] = r(H, W), r(H)
            sd[f"{q}gate.tag_transform.1.weight"], sd[f"{q}gate.tag_transform.1.bias"] = r(H), r(H)
    return sd


def expected(sd: dict[str, torch.Tensor], old: bool) -> dict[str, torch.Tensor]:
    """Our keys -> values, written out independently of the importer."""
    new = {k: v for k, v in reference(False).items()}  # same values, current names
    assert len(new) == len(sd)
    out = {"tokenizer.word_embeddings.weight": new["token_embed.embeddings.weight"],
           "tokenizer.position_embeddings.weight": new["token_embed.embeddings_pos.weight"],
           "tokenizer.type_embedding": new["token_embed.embeddings_token_type.weight"][0],
           "tokenizer.norm.weight": new["token_embed.embeddings_norm.weight"],
           "tokenizer.norm.bias": new["token_embed.embeddings_norm.bias"],
           "tokenizer.visual.proj.weight": new["video_embed.embeddings.weight"],
           "tokenizer.visual.proj.bias": new["video_embed.embeddings.bias"],
           "tokenizer.visual.temporal": new["video_embed.embeddings_time"]}
    d = H // HEADS
    for layer in range(L):
        p, q = f"fused_encoder.layers.{layer}.", f"encoder.layers.{layer}."
        out[q + "input_layernorm.weight"] = new[p + "norm1.weight"]
        out[q + "input_layernorm.bias"] = new[p + "norm1.bias"]
        out[q + "pre_mlp_layernorm.weight"] = new[p + "norm2.weight"]
        out[q + "pre_mlp_layernorm.bias"] = new[p + "norm2.bias"]
        out[q + "self_attn_bda.gamma"] = new[p + "gamma_1"]
        out[q + "mlp_bda.gamma"] = new[p + "gamma_2"]
        for ref, ours in (("self_attn.qkv_proj", "self_attention.linear_qkv"),
                          ("self_attn.dense", "self_attention.linear_proj"),
                          ("linear1", "mlp.linear_fc1"), ("linear2", "mlp.linear_fc2")):
            for part in ("weight", "bias"):
                t = torch.stack([new[f"{p}{ref}.experts.deepspeed_experts.{e}.{part}"]
                                 for e in range(E)])
                if ref == "self_attn.qkv_proj":  # our row h*3d + j*d + i is their j*H + h*d + i
                    rows = [j * H + h * d + i for h in range(HEADS) for j in range(3)
                            for i in range(d)]
                    t = t[:, rows]
                out[f"{q}{ours}.experts.{part}"] = t
            if ref in ("self_attn.qkv_proj", "linear1"):
                g = f"{p}{ref}.gate."
                out[f"{q}{ours}.router.gate.weight"] = new[g + "wg.weight"]
                out[f"{q}{ours}.router.embed.weight"] = new[g + "tag_transform.0.weight"]
                out[f"{q}{ours}.router.embed.bias"] = new[g + "tag_transform.0.bias"]
                out[f"{q}{ours}.router.norm.weight"] = new[g + "tag_transform.1.weight"]
                out[f"{q}{ours}.router.norm.bias"] = new[g + "tag_transform.1.bias"]
    return out


@pytest.mark.parametrize("old", [False, True], ids=["current", "deepspeed"])
def test_every_tensor_lands_where_the_mapping_says(tmp_path: Path, old: bool) -> None:
    sd = reference(old)
    file = tmp_path / "ref.pt"
    torch.save({"module": sd} if old else {"model": sd}, file)
    config = tmp_path / "tiny.yaml"
    config.write_text(YAML)
    result = import_reference(file, config, tmp_path / "ours", verbose=False)
    assert result["unplaced"] == ["some_head.unknown"]
    assert len(result["dropped"]) == L * 2 * 5  # attention-output and fc2 gates
    assert result["unfilled"] == sorted(["head.logit_scale", "head.norm.weight",
                                         "head.norm.bias", "head.proj.weight", "head.proj.bias"])
    want = expected(sd, old)
    got = read_tensors(tmp_path / "ours" / "iter_0000000", list(want))
    for key, value in want.items():
        assert torch.equal(got[key], value), key
    assert main([str(file), "--config", str(config), "--save", str(tmp_path / "o2")]) == 1


class _Pickled:
    """An arbitrary pickled object, as a checkpoint saved with full pickling may hold."""


def test_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ToolError, match="does not exist"):
        read_reference(tmp_path / "missing.pt")
    torch.save({"model": reference(False)}, tmp_path / "ref.pt")
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
