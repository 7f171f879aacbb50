"""Fold segment-constant routing into dense weights per condition and write a single-file
safetensors deploy model (megatron_uni.moe.fold), with the parameter count per condition.

    python -m checkpoints_utils.export_deploy --load DIR --save FILE [--conditions C ...]

``--conditions``: attribute routing: names (visual_input, text_input, ...) or 8-bit strings
such as 10011000 (default: the six reference vectors); modality routing: image, text, video
(default: all); task routing: task ids (default: all). A dense checkpoint (no experts) is
exported as is. Load the file with :func:`load_deploy` (one CPU process; it starts a one-rank
gloo group when none exists).

The file holds the folded model's state dict; its metadata: ``format``, ``config`` (JSON, layout
1x1x1), ``conditions`` (JSON, as folded), ``labels``, ``params`` (JSON counts).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from checkpoints_utils.common import ToolError, open_checkpoint, run_cli, tensor_index
from checkpoints_utils.spawn import run_world

FORMAT = "megatron-uni-deploy/1"


def single_process_config(cfg_dict: dict) -> Any:
    from megatron_uni.config.loader import from_dict  # noqa: PLC0415

    cfg = from_dict(cfg_dict)
    par = cfg.parallel
    par.tp = par.pp = par.ep = 1
    par.etp, par.vpp, par.sequence_parallel = None, None, None
    par.device, par.backend = "cpu", "gloo"
    return cfg


def parse_conditions(values: Sequence[str] | None) -> list | None:
    """CLI strings -> fold_model conditions: '10011000' -> bits, '3' -> int, names as is."""
    if not values:
        return None
    out: list = []
    for v in values:
        if len(v) > 1 and set(v) <= {"0", "1"}:
            out.append([int(b) for b in v])
        elif v.isdigit():
            out.append(int(v))
        else:
            out.append(v)
    return out


def _ensure_world(cfg: Any) -> None:
    """megatron modules need process groups: a one-rank gloo group when none exists."""
    import torch.distributed as dist  # noqa: PLC0415

    from megatron_uni.parallel.initialize import initialize  # noqa: PLC0415

    if dist.is_initialized():
        from megatron.core import parallel_state as ps  # noqa: PLC0415

        if ps.model_parallel_is_initialized():
            return
    else:
        from megatron_uni.parallel.env import free_port  # noqa: PLC0415

        for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                           "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(free_port())}.items():
            os.environ.setdefault(key, value)
    initialize(cfg)


def _export_rank(rank: int, world: int, src: str, save: str, cfg_dict: dict,
                 conditions: list | None) -> dict[str, Any]:
    from safetensors.torch import save_file  # noqa: PLC0415

    from megatron_uni.models.generalist import build_model  # noqa: PLC0415
    from megatron_uni.moe.fold import fold_model  # noqa: PLC0415
    from megatron_uni.parallel.initialize import initialize  # noqa: PLC0415
    from megatron_uni.training.checkpoint import load_checkpoint  # noqa: PLC0415

    cfg = single_process_config(cfg_dict)
    initialize(cfg)
    model = build_model(cfg, use_cpu=True)
    step, _ = load_checkpoint(Path(src), [model], None, None, cfg)
    model.eval()
    moe_params = sum(p.numel() for p in model.parameters())
    report = None
    if cfg.moe.enabled:
        try:
            report = fold_model(model, conditions)
        except ValueError as err:
            raise ToolError(f"cannot fold: {err}") from err
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()
               if torch.is_tensor(v) and not k.endswith("_extra_state")}
    params = {"moe_model": moe_params, "deploy_model": sum(p.numel() for p in model.parameters())}
    labels: list[str] = []
    if report is not None:
        labels = report.conditions
        params |= {"shared": report.shared_params,
                   "folded_linears_per_condition": report.folded_linear_params,
                   "per_condition": report.params_per_condition}
    else:
        params["per_condition"] = params["deploy_model"]
    meta = {"format": FORMAT, "config": json.dumps(cfg_dict, default=str),
            "conditions": json.dumps(conditions), "labels": json.dumps(labels),
            "params": json.dumps(params), "step": str(step)}
    Path(save).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{save}.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, save)
    return {"params": params, "labels": labels, "report": report.format() if report else None,
            "step": step}


def export_deploy(load: str | Path, save: str | Path, conditions: Sequence | None = None,
                  verbose: bool = True) -> dict[str, Any]:
    """Export; returns {"params", "labels", "report", "step"}."""
    start = time.perf_counter()
    say = print if verbose else (lambda *a, **k: None)
    src, meta = open_checkpoint(load)
    tensor_index(src)  # readable index, no truncated shard file
    save = Path(save)
    if save.is_dir():
        raise ToolError(f"--save {save} is a directory; give a file name (model.safetensors)")
    say(f"export {src} (step {meta['step']}) -> {save}", flush=True)
    from megatron_uni.config import to_dict  # noqa: PLC0415

    cfg_dict = to_dict(single_process_config(meta["config"]))
    (result,) = run_world(_export_rank, 1, args=(str(src), str(save), cfg_dict,
                                                  list(conditions) if conditions else None))
    if result["report"]:
        say(result["report"])
    p = result["params"]
    say(f"parameters: MoE model {p['moe_model']:,}; per condition {p['per_condition']:,}; "
        f"deploy file {p['deploy_model']:,} ({len(result['labels']) or 1} condition(s)); "
        f"done in {time.perf_counter() - start:.1f} s")
    return result


def load_deploy(file: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(folded model in eval mode, metadata) from an exported file; run the model as
    ``model(batch)`` (a PackedBatch whose conditions were folded)."""
    from safetensors import safe_open  # noqa: PLC0415
    from safetensors.torch import load_file  # noqa: PLC0415

    from megatron_uni.models.generalist import build_model  # noqa: PLC0415
    from megatron_uni.moe.fold import fold_model  # noqa: PLC0415

    try:
        with safe_open(str(file), "pt") as f:
            meta = dict(f.metadata() or {})
        tensors = load_file(str(file))
    except Exception as err:  # noqa: BLE001
        raise ToolError(f"deploy file {file}: cannot be read ({type(err).__name__}: "
                        f"{str(err)[:200]})") from err
    if meta.get("format") != FORMAT:
        raise ToolError(f"deploy file {file}: not written by export_deploy (format "
                        f"{meta.get('format')!r})")
    cfg = single_process_config(json.loads(meta["config"]))
    _ensure_world(cfg)
    model = build_model(cfg, use_cpu=True)
    if cfg.moe.enabled:
        fold_model(model, json.loads(meta["conditions"]))  # the folded structure
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ToolError(f"deploy file {file}: does not fit its config (missing {missing[:5]}, "
                        f"unexpected {unexpected[:5]})")
    return model.eval(), {**meta, "params": json.loads(meta["params"]),
                          "labels": json.loads(meta["labels"])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m checkpoints_utils.export_deploy",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--load", required=True, help="iter_XXXXXXX directory or save root")
    parser.add_argument("--save", required=True, help="output .safetensors file")
    parser.add_argument("--conditions", nargs="*", help="conditions to fold (see above)")
    args = parser.parse_args(argv)
    export_deploy(args.load, args.save, parse_conditions(args.conditions))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
