"""Import a reference Uni-Perceiver / Uni-Perceiver-MoE checkpoint into our checkpoint format.

    python -m checkpoints_utils.import_reference FILE --config FILE --save DIR [--names FILE.json]
        [--video-type-embedding {auto,fold,drop}]

FILE: ``torch.save`` output with the state dict under ``model`` (Uni-Perceiver) or ``module``
(DeepSpeed ``mp_rank_00_model_states.pt``, the released "ds" checkpoints), or a bare state dict;
read with ``torch.load(weights_only=True)``. ``--config``: our YAML config describing the same
model (``moe.layers: every_other`` is the reference's ``MOE_EXPERT_LOCATION: 'odd'``). Writes a
weights-only checkpoint ``DIR/iter_0000000`` (train from it with
``checkpoint.load_optimizer=false``) and reports every tensor it placed, dropped by design or
could not place (with the reason), and every tensor of ours that nothing filled (left at its
initial value). Exit status 1 when a reference name is unknown to the mapping (extend it with
``--names``); known tensors our model has no counterpart for are reported, not fatal.

The names and layouts come from the reference source, ``fundamentalvision/Uni-Perceiver``; the
tables with the file behind each name are in :mod:`checkpoints_utils.reference_names`:
- encoder layers (``uniperceiver/modeling/layers/transformer_encoder_moe_layer.py``,
  ``uniperceiver/task_moe/{layer,experts,gate}.py``; dense torch ``nn.MultiheadAttention`` names
  from ``uniperceiver/modeling/layers/transformer_encoder_layer.py``):
  ``fused_encoder.layers.{l}.{norm1,norm2,gamma_1,gamma_2}``, ``self_attn.qkv_proj``
  (``self_attn.in_proj_*``), ``self_attn.dense`` (``self_attn.out_proj``), ``linear1``,
  ``linear2``, each dense (``.weight``/``.bias``) or MoE (``.experts.deepspeed_experts.{e}.*``,
  ``.gate.wg.weight``, ``.gate.tag_transform.{0,1}.*``). QKV rows are reordered from the
  reference's [Q; K; V] blocks to megatron's per-head [q_h; k_h; v_h]; the attention-output and
  linear2 gates are dropped (those linears reuse the QKV / linear1 routing decision).
- DeepSpeed-era names (``tools/convertmoe.ipynb``, ``tools/convert_checkpoint.py``):
  ``encoder.`` -> ``fused_encoder.``, ``predictor.`` -> ``loss_prepare.``,
  ``attention.self.qkv_proj``, ``attention.output.dense``, ``ffn.dense``/``ffn.dense2``,
  ``LayerNormModules.{0,1}``, ``attention_output.residual_scale`` / ``ffn_output.residual_scale``
  ([1, 1, h]) for gamma_1 / gamma_2, ``deepspeed_moe.{gate,experts}``; ``visual_embed.*`` are
  duplicates of ``video_embed`` tensors and are dropped.
- tokenizers (``uniperceiver/modeling/embedding/{token_embed,position_embedding,video_embed}.py``):
  ``token_embed.embeddings`` [V, h] (our padded rows are zero), ``token_embed.embeddings_pos.
  position_embeddings`` [P, h] (leading rows), ``token_embed.embeddings_token_type`` [2, h] (row 0,
  the only one the reference adds), ``token_embed.embeddings_norm`` (``video_embed.embeddings_norm``
  is the same module under ``MODEL.SHARE_LAYERNORM``), ``video_embed.embeddings`` Conv2d
  [h, C, p, p] (or Linear [h, C*p*p], same element order),
  ``video_embed.embeddings_st_pos.temporal_pos_embed`` [T, h]; the frozen ``spatial_pos_embed``
  is compared with our computed sin-cos at ``model.spatial_position_scale`` (a table scaled by
  another ``POSEMBED_SCALE`` is reported with the value to set); ``video_embed.embeddings_type`` [1, h] is folded into
  the patch bias for DeepSpeed-era files (``--video-type-embedding``).
- head (``uniperceiver/modeling/predictor/embed_cls_predictor.py``, the model's ``loss_prepare``):
  ``ln_post``, ``proj``, and the log-valued ``logit_scale_{img_cls,text_mlm,caption,retrieve}``
  -> our log-valued ``head.logit_scale`` [classification, mlm, captioning, retrieval].
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from checkpoints_utils.common import ToolError, run_cli
from checkpoints_utils.reference_names import VideoType, build_tensor, plan, sources
from checkpoints_utils.spawn import run_world


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


def _import_rank(rank: int, world: int, file: str, cfg_dict: dict, save: str,
                 extra_names: dict | None, video_type: VideoType) -> dict[str, Any]:
    from megatron_uni.config.loader import from_dict  # noqa: PLC0415
    from megatron_uni.models.generalist import build_model  # noqa: PLC0415
    from megatron_uni.parallel.initialize import initialize  # noqa: PLC0415
    from megatron_uni.training.checkpoint import save_checkpoint  # noqa: PLC0415

    cfg = from_dict(cfg_dict)
    initialize(cfg)
    model = build_model(cfg, use_cpu=True)
    reference = read_reference(file)
    the_plan = plan(reference, extra_names, video_type, cfg.model.spatial_position_scale)
    ours = {k: v for k, v in model.state_dict().items()
            if torch.is_tensor(v) and not k.endswith("_extra_state")}
    placed, problems, notes = {}, [], []
    for key, (kind, source) in the_plan.targets.items():
        if key not in ours:
            problems.append(f"{sources(source)[0]} -> {key}: our model has no such tensor "
                            "(check moe.layers, moe.num_experts, moe.linears, or --names)")
            continue
        try:
            t, note = build_tensor(kind, source, reference, ours[key], key,
                                   cfg.model.num_attention_heads, cfg.model.vocab_size)
        except ValueError as err:
            problems.append(f"{key}: {err}")
            continue
        with torch.no_grad():
            ours[key].copy_(t.to(ours[key].dtype))
        placed[key] = source
        notes += [note] if note else []
    if problems:
        raise ToolError("the reference tensors do not fit --config (another model size or MoE "
                        "layout?): "
                        + "; ".join(problems[:5]) + (f" (+{len(problems) - 5} more)"
                                                     if len(problems) > 5 else ""))
    save_checkpoint(Path(save), 0, [model], None, None, None, cfg, keep_last=0)
    return {"placed": placed, "dropped": the_plan.dropped,
            "unplaced": dict(sorted(the_plan.unplaced.items())),
            "unknown": sorted(the_plan.unknown), "notes": notes,
            "deepspeed_era": the_plan.deepspeed_era,
            "unfilled": sorted(k for k in ours if k not in placed)}


def import_reference(file: str | Path, config: str | Path, save: str | Path,
                     extra_names: dict[str, str] | None = None, verbose: bool = True,
                     video_type: VideoType = "auto") -> dict[str, Any]:
    """Import; returns {"placed": {ours: reference key(s)}, "dropped": {reference key: reason},
    "unplaced": {reference key: reason}, "unknown": [reference key], "notes", "unfilled"}."""
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
                                                  extra_names, video_type))
    era = "DeepSpeed-era" if result["deepspeed_era"] else "current"
    say(f"  {era} reference names; placed {len(result['placed'])} tensors of ours")
    for note in result["notes"]:
        say(f"  note: {note}")
    for key, why in sorted(result["dropped"].items()):
        say(f"  dropped by design: {key}: {why}")
    for key, why in result["unplaced"].items():
        say(f"  NOT PLACED: {key}: {why}")
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
    parser.add_argument("--names", help="JSON {reference key: our key} for other tensors "
                        "(copied as they are; wins over the built-in mapping)")
    parser.add_argument("--video-type-embedding", choices=("auto", "fold", "drop"), default="auto",
                        help="add video_embed.embeddings_type row 0 to our patch bias: auto = for "
                        "DeepSpeed-era files (their model adds it), fold = always (a file "
                        "converted by tools/convertmoe.ipynb for VIDEO_EMBED.ADD_TYPE_EMBED), "
                        "drop = never")
    args = parser.parse_args(argv)
    extra = None
    if args.names:
        try:
            extra = json.loads(Path(args.names).read_text())
        except (OSError, ValueError) as err:
            raise ToolError(f"--names {args.names}: {err}") from err
    result = import_reference(args.file, args.config, args.save, extra,
                              video_type=args.video_type_embedding)
    return 1 if result["unknown"] else 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
