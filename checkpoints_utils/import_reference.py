"""Import a reference Uni-Perceiver / Uni-Perceiver-MoE checkpoint into our checkpoint format.

    python -m checkpoints_utils.import_reference FILE --config FILE --save DIR [--names FILE.json]

FILE: ``torch.save`` output with the state dict under ``model`` (Uni-Perceiver) or ``module``
(DeepSpeed ``mp_rank_00_model_states.pt``), or a bare state dict; read with
``torch.load(weights_only=True)``. ``--config``: our YAML config describing the same model.
Writes a weights-only checkpoint ``DIR/iter_0000000`` (train from it with
``checkpoint.load_optimizer=false``) and reports every tensor it placed, dropped by design
(the attention-output and fc2 gates: those linears reuse the QKV / fc1 routing) or could not
place, and every tensor of ours that nothing filled (left at its initial value).

Encoder layers follow the reference layout (docs: /work/shared/reference/uni-perceiver-moe.md §5):
``fused_encoder.layers.{l}.{norm1,norm2,gamma_1,gamma_2}``, ``self_attn.qkv_proj``,
``self_attn.dense``, ``linear1``, ``linear2``, each either dense (``.weight``/``.bias``) or MoE
(``.experts.deepspeed_experts.{e}.*``, ``.gate.wg.weight``, ``.gate.tag_transform.{0,1}.*``);
the DeepSpeed-era names (``deepspeed_moe.gate/experts``, ``attention.self.qkv_proj``,
``attention.output.dense``, ``ffn.dense``/``ffn.dense2``, ``LayerNormModules.{0,1}``,
``residual_scale.{0,1}``) are renamed to those first. QKV rows are reordered from the
reference's [Q; K; V] blocks to megatron's per-head [q_h; k_h; v_h]. Tokenizer names are in
``OTHER_NAMES`` (an assumption to check against a real file: extend or override with --names).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any

import torch

from checkpoints_utils.common import ToolError, run_cli
from checkpoints_utils.spawn import run_world

# Older (DeepSpeed-era) name pieces -> current ones, applied in order.
OLD_NAMES = [
    ("deepspeed_moe.gate.", "gate."), ("deepspeed_moe.experts.", "experts."),
    ("attention.self.qkv_proj.", "self_attn.qkv_proj."),
    ("attention.output.dense.", "self_attn.dense."), ("attention.self.dense.", "self_attn.dense."),
    ("ffn.dense2.", "linear2."), ("ffn.dense.", "linear1."),
    ("LayerNormModules.0.", "norm1."), ("LayerNormModules.1.", "norm2."),
    ("residual_scale.0", "gamma_1"), ("residual_scale.1", "gamma_2"),
]
# Non-encoder tensors: reference name -> ours (assumed; see the module docstring).
OTHER_NAMES = {
    "token_embed.embeddings.weight": "tokenizer.word_embeddings.weight",
    "token_embed.embeddings_pos.weight": "tokenizer.position_embeddings.weight",
    "token_embed.embeddings_token_type.weight": "tokenizer.type_embedding",
    "token_embed.embeddings_norm.weight": "tokenizer.norm.weight",
    "token_embed.embeddings_norm.bias": "tokenizer.norm.bias",
    "video_embed.embeddings.weight": "tokenizer.visual.proj.weight",
    "video_embed.embeddings.bias": "tokenizer.visual.proj.bias",
    "video_embed.embeddings_time": "tokenizer.visual.temporal",
}
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
_LAYER = re.compile(r"^(?:module\.)?(?:fused_encoder|encoder)\.layers\.(\d+)\.(.+)$")


def read_reference(file: str | Path) -> dict[str, torch.Tensor]:
    """The reference state dict (``model`` / ``module`` / bare), or a :class:`ToolError`."""
    file = Path(file)
    if not file.is_file():
        raise ToolError(f"reference checkpoint {file}: does not exist (or is not a file)")
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise ToolError(f"reference checkpoint {file}: torch.load(weights_only=True) failed "
                        f"({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
                        "); it is truncated, corrupt, or holds pickled objects beyond tensors "
                        "(re-save just the state dict: torch.save({'model': sd}, path))") from err
    for key in ("model", "module", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise ToolError(f"reference checkpoint {file}: no state dict of tensors under 'model', "
                        "'module' or at the top level")
    return dict(obj)


def modernize(name: str) -> str:
    """DeepSpeed-era names -> current reference names."""
    for old, new in OLD_NAMES:
        name = name.replace(old, new)
    return name


def plan(reference: dict[str, torch.Tensor], extra_names: dict[str, str] | None = None
         ) -> tuple[dict[str, tuple[str, Any]], list[str], list[str]]:
    """({our key: (kind, source)}, dropped, unplaced). kind "plain": source = reference key;
    "experts": source = [reference key per expert]; ``qkv`` kinds reorder rows."""
    names = {**OTHER_NAMES, **(extra_names or {})}
    targets: dict[str, tuple[str, Any]] = {}
    experts: dict[str, dict[int, str]] = {}
    dropped, unplaced = [], []
    for ref_key in reference:
        name = modernize(ref_key)
        bare = name.removeprefix("module.")
        if ref_key in names or bare in names:
            targets[names.get(ref_key, names.get(bare))] = ("plain", ref_key)
            continue
        m = _LAYER.match(name)
        if not m:
            unplaced.append(ref_key)
            continue
        layer, rest = int(m.group(1)), m.group(2)
        prefix = f"encoder.layers.{layer}."
        placed = False
        for ref, ours in PLAIN.items():
            if rest == ref or rest.startswith(ref + "."):
                targets[prefix + ours + rest[len(ref):]] = ("plain", ref_key)
                placed = True
        for ref, ours in LINEARS.items():
            if not rest.startswith(ref + "."):
                continue
            tail = rest[len(ref) + 1:]
            qkv = "qkv" if ref == "self_attn.qkv_proj" else ""
            if tail in ("weight", "bias"):
                targets[f"{prefix}{ours}.{tail}"] = (f"plain{qkv}", ref_key)
                placed = True
            elif (e := re.match(r"^experts\.deepspeed_experts\.(\d+)\.(weight|bias)$", tail)):
                key = f"{prefix}{ours}.experts.{e.group(2)}"
                experts.setdefault(key + ("|qkv" if qkv else ""), {})[int(e.group(1))] = ref_key
                placed = True
            elif tail in ROUTER:
                if ref in DROPPED_GATES:
                    dropped.append(ref_key)
                else:
                    targets[f"{prefix}{ours}.{ROUTER[tail]}"] = ("plain", ref_key)
                placed = True
        if not placed:
            unplaced.append(ref_key)
    for key, by_expert in experts.items():
        ours, _, qkv = key.partition("|")
        if sorted(by_expert) != list(range(len(by_expert))):
            unplaced += list(by_expert.values())
            continue
        targets[ours] = (f"experts{qkv}", [by_expert[e] for e in range(len(by_expert))])
    return targets, dropped, unplaced


def _reorder(t: torch.Tensor, heads: int, is_bias: bool) -> torch.Tensor:
    """[Q; K; V] rows -> megatron's per-head [q_h; k_h; v_h] (rows: dim -1 for a bias)."""
    if is_bias:
        lead, rows, rest = t.shape[:-1], t.shape[-1], ()
    else:
        lead, rows, rest = t.shape[:-2], t.shape[-2], (t.shape[-1],)
    d = rows // 3 // heads
    x = t.reshape(*lead, 3, heads, d, *rest).transpose(len(lead), len(lead) + 1)
    return x.reshape(t.shape).contiguous()


def build_tensor(kind: str, source: Any, reference: dict[str, torch.Tensor], heads: int,
                 target: str) -> torch.Tensor:
    t = (torch.stack([reference[k] for k in source]) if kind.startswith("experts")
         else reference[source])
    if kind.endswith("qkv"):
        t = _reorder(t, heads, target.endswith("bias"))
    return t


def _import_rank(rank: int, world: int, file: str, cfg_dict: dict, save: str,
                 extra_names: dict | None) -> dict[str, Any]:
    from megatron_uni.config.loader import from_dict  # noqa: PLC0415
    from megatron_uni.models.generalist import build_model  # noqa: PLC0415
    from megatron_uni.parallel.initialize import initialize  # noqa: PLC0415
    from megatron_uni.training.checkpoint import save_checkpoint  # noqa: PLC0415

    cfg = from_dict(cfg_dict)
    initialize(cfg)
    model = build_model(cfg, use_cpu=True)
    reference = read_reference(file)
    targets, dropped, unplaced = plan(reference, extra_names)
    ours = {k: v for k, v in model.state_dict().items()
            if torch.is_tensor(v) and not k.endswith("_extra_state")}
    heads = cfg.model.num_attention_heads
    placed, problems = {}, []
    for key, (kind, source) in targets.items():
        if key not in ours:
            unplaced += source if isinstance(source, list) else [source]
            continue
        t = build_tensor(kind, source, reference, heads, key)
        if t.numel() != ours[key].numel():
            problems.append(f"{key}: reference {tuple(t.shape)}, ours {tuple(ours[key].shape)}")
            continue
        with torch.no_grad():
            ours[key].copy_(t.reshape(ours[key].shape).to(ours[key].dtype))
        placed[key] = source
    if problems:
        raise ToolError("the reference tensors do not fit --config (another model size?): "
                        + "; ".join(problems[:5]) + (f" (+{len(problems) - 5} more)"
                                                     if len(problems) > 5 else ""))
    save_checkpoint(Path(save), 0, [model], None, None, None, cfg, keep_last=0)
    return {"placed": placed, "dropped": dropped, "unplaced": sorted(unplaced),
            "unfilled": sorted(k for k in ours if k not in placed)}


def import_reference(file: str | Path, config: str | Path, save: str | Path,
                     extra_names: dict[str, str] | None = None, verbose: bool = True
                     ) -> dict[str, Any]:
    """Import; returns {"placed": {ours: reference key(s)}, "dropped", "unplaced", "unfilled"}."""
    from megatron_uni.config import ConfigError, load_config, to_dict  # noqa: PLC0415

    start = time.perf_counter()
    say = print if verbose else (lambda *a, **k: None)
    read_reference(file)  # clear errors before starting a process
    try:
        cfg = load_config(config, ["parallel.tp=1", "parallel.pp=1", "parallel.ep=1",
                                   "parallel.device=cpu", "parallel.backend=gloo"])
    except (ConfigError, OSError) as err:
        raise ToolError(f"--config {config}: {err}") from err
    save = Path(save)
    if (save / "iter_0000000").exists():
        raise ToolError(f"{save / 'iter_0000000'} exists already; give another --save")
    say(f"import {file} -> {save}", flush=True)
    (result,) = run_world(_import_rank, 1, args=(str(file), to_dict(cfg), str(save),
                                                  extra_names))
    say(f"  placed {len(result['placed'])} tensors of ours")
    for key in result["dropped"]:
        say(f"  dropped by design (reuses the QKV / fc1 routing): {key}")
    for key in result["unplaced"]:
        say(f"  COULD NOT PLACE: {key}")
    for key in result["unfilled"]:
        say(f"  not in the reference (left at its initial value): {key}")
    say(f"  saved {save / 'iter_0000000'} in {time.perf_counter() - start:.1f} s")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m checkpoints_utils.import_reference",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("file", help="reference checkpoint (.pt / .pth)")
    parser.add_argument("--config", required=True, help="our YAML config of the same model")
    parser.add_argument("--save", required=True, help="save root for our checkpoint")
    parser.add_argument("--names", help="JSON {reference key: our key} for other tensors")
    args = parser.parse_args(argv)
    extra = None
    if args.names:
        try:
            extra = json.loads(Path(args.names).read_text())
        except (OSError, ValueError) as err:
            raise ToolError(f"--names {args.names}: {err}") from err
    result = import_reference(args.file, args.config, args.save, extra)
    return 1 if result["unplaced"] else 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
