"""Parameter counts of a model config: built module by module, and from the sizes alone.

    python -m tools.param_count --config configs/models/uniperceiver_base.yaml
    python -m tools.param_count --config configs/models/uniperceiver_large.yaml moe.num_experts=8

The model is built on the ``meta`` device (no memory, no initialisation time) in one process
with TP = PP = 1, so any size can be counted on a laptop. The arithmetic count uses only the
config's numbers; the two must agree (the tool exits 1 if they do not).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from typing import Sequence

from megatron_uni.config import Config, ConfigError, apply_overrides, load_config
from megatron_uni.train import report_error


LINEAR_SHAPES = ("qkv", "out", "fc1", "fc2")


def linear_shape(cfg: Config, name: str) -> tuple[int, int]:
    """(out, in) features of one of a layer's four linears."""
    h, f = cfg.model.hidden_size, cfg.model.ffn_hidden_size
    return {"qkv": (3 * h, h), "out": (h, h), "fc1": (f, h), "fc2": (h, f)}[name]


def router_params(cfg: Config) -> int:
    """One router (owned by the first expert linear of a pair): a table router embeds its
    condition vector, LayerNorm(Linear(D -> h)), then gates Linear(h -> E, no bias)."""
    from megatron_uni.batch import Modality  # noqa: PLC0415
    from megatron_uni.moe.routers import ATTRIBUTE_BITS, SEGMENT_CONSTANT  # noqa: PLC0415

    h, moe = cfg.model.hidden_size, cfg.moe
    gate = moe.num_experts * h
    if moe.router not in SEGMENT_CONSTANT:
        return gate
    width = {"modality": len(Modality), "task": max(len(cfg.data.tasks), 1),
             "attribute": ATTRIBUTE_BITS}[moe.router]
    return width * h + h + 2 * h + gate


def layer_params(cfg: Config, layer: int) -> dict[str, int]:
    """One encoder layer by kind: ``norms`` (LayerNorms and LayerScale, replicated over TP),
    ``dense`` per dense linear (weight + bias), ``experts`` per expert linear (E x (o i + o)),
    ``routers``."""
    h, moe = cfg.model.hidden_size, cfg.moe
    is_moe = moe.enabled and layer in moe.layer_indices(cfg.model.num_layers)
    experts_at = set(moe.linears) if is_moe else set()
    out: dict[str, int] = {"norms": 2 * (2 * h) + 2 * h, "dense": 0, "experts": 0,
                           "routers": 0}
    for name in LINEAR_SHAPES:
        o, i = linear_shape(cfg, name)
        if name in experts_at:
            out["experts"] += moe.num_experts * (o * i + o)
        else:
            out["dense"] += o * i + o
    for first, second in (("qkv", "out"), ("fc1", "fc2")):
        if first in experts_at or second in experts_at:
            out["routers"] += router_params(cfg)
    return out


def arithmetic_count(cfg: Config) -> dict[str, int]:
    """Uni-Perceiver parameters from the sizes (experts and routers included), grouped like
    :func:`built_count`."""
    from megatron_uni.batch import TASK_FAMILIES  # noqa: PLC0415
    from megatron_uni.models.embeddings import padded_vocab_size  # noqa: PLC0415

    m = cfg.model
    h = m.hidden_size
    norm = 2 * h
    tokenizer = (
        3 * m.patch_size**2 * h + h  # conv patch embedding
        + m.max_frames * h  # temporal embedding
        + (3 * m.patch_size**2 * h if m.frame_difference else 0)  # RGB-difference stream
        + padded_vocab_size(m.vocab_size, 1) * h  # word embeddings (padded vocabulary)
        + m.max_text_positions * h  # text positions
        + h  # type embedding
        + norm  # shared LayerNorm
    )
    encoder = sum(sum(layer_params(cfg, i).values()) for i in range(m.num_layers))
    head = norm + h * h + h + len(TASK_FAMILIES)
    return {"tokenizer": tokenizer, "encoder": encoder, "head": head}


def moe_counts(cfg: Config) -> dict[str, int]:
    """Total; active per token (each expert linear counted top-k times: the experts a token
    goes through, routers included); one expert (one of each MoE linear's E, summed over the
    model); a deploy copy for one condition, as ``moe/fold.py`` folds it (every expert linear
    one dense o x i + o weight, routers dropped: the dense model's size); and each further
    condition (the folded linears again)."""
    total = sum(arithmetic_count(cfg).values())
    experts = sum(layer_params(cfg, i)["experts"] for i in range(cfg.model.num_layers))
    routers = sum(layer_params(cfg, i)["routers"] for i in range(cfg.model.num_layers))
    e = max(cfg.moe.num_experts, 1)
    per_expert = experts // e
    folded = total - experts - routers + per_expert
    return {"total": total, "active_per_token": total - experts + cfg.moe.topk * per_expert
            if cfg.moe.enabled else total, "per_expert": per_expert if cfg.moe.enabled else 0,
            "expert_params": experts, "router_params": routers,
            "deploy_one_condition": folded, "deploy_per_extra_condition": per_expert}


def built_count(cfg: Config) -> dict[str, int]:
    """Build the model on the meta device (single process) and count its parameters."""
    import torch  # noqa: PLC0415

    from megatron_uni.models.generalist import build_model  # noqa: PLC0415
    from megatron_uni.parallel.initialize import initialize, shutdown  # noqa: PLC0415

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    single = apply_overrides(
        cfg, ["parallel.tp=1", "parallel.pp=1", "parallel.ep=1", "parallel.etp=null",
              "parallel.sequence_parallel=null", "parallel.device=cpu"]
    )
    from megatron_uni.parallel.env import DistEnv, free_port  # noqa: PLC0415

    initialize(single, DistEnv(0, 1, 0, 1, "127.0.0.1", free_port(), "single"))
    try:
        with torch.device("meta"):
            model = build_model(single, use_cpu=True)
        groups: dict[str, int] = defaultdict(int)
        for name, param in model.named_parameters():
            groups[name.split(".")[0]] += param.numel()
        return {"tokenizer": groups["tokenizer"], "encoder": groups["encoder"],
                "head": groups["head"]}
    finally:
        shutdown()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        return report_error(err)
    built, expected = built_count(cfg), arithmetic_count(cfg)
    print(f"{cfg.model.name}: {cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}, "
          f"{cfg.model.num_attention_heads} heads, ffn {cfg.model.ffn_hidden_size}")
    print(f"{'part':<10} {'built':>14} {'from sizes':>14}")
    for part in expected:
        print(f"{part:<10} {built[part]:>14,} {expected[part]:>14,}")
    total_b, total_e = sum(built.values()), sum(expected.values())
    print(f"{'total':<10} {total_b:>14,} {total_e:>14,}  ({total_b / 1e6:.1f}M)")
    if cfg.moe.enabled:
        c = moe_counts(cfg)
        layers = cfg.moe.layer_indices(cfg.model.num_layers)
        print(f"MoE: {cfg.moe.num_experts} experts top-{cfg.moe.topk} on "
              f"{'/'.join(cfg.moe.linears)} of layers {layers}")
        for key in ("expert_params", "per_expert", "router_params", "active_per_token",
                    "deploy_one_condition", "deploy_per_extra_condition"):
            print(f"  {key:<28} {c[key]:>14,}  ({c[key] / 1e6:.1f}M)")
    if built != expected:
        print("MISMATCH between the built model and the arithmetic count", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
