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


def arithmetic_count(cfg: Config) -> dict[str, int]:
    """Dense Uni-Perceiver parameters from the sizes, grouped like :func:`built_count`."""
    from megatron_uni.batch import TASK_FAMILIES  # noqa: PLC0415
    from megatron_uni.models.embeddings import padded_vocab_size  # noqa: PLC0415

    m = cfg.model
    h, f = m.hidden_size, m.ffn_hidden_size
    norm = 2 * h
    layer = (
        norm  # input LayerNorm
        + 3 * h * h + 3 * h  # fused QKV with bias
        + h * h + h  # attention output projection
        + h  # LayerScale gamma_1
        + norm  # pre-MLP LayerNorm
        + f * h + f  # fc1
        + h * f + h  # fc2
        + h  # LayerScale gamma_2
    )
    tokenizer = (
        3 * m.patch_size**2 * h + h  # conv patch embedding
        + m.max_frames * h  # temporal embedding
        + (3 * m.patch_size**2 * h if m.frame_difference else 0)  # RGB-difference stream
        + padded_vocab_size(m.vocab_size, 1) * h  # word embeddings (padded vocabulary)
        + m.max_text_positions * h  # text positions
        + h  # type embedding
        + norm  # shared LayerNorm
    )
    head = norm + h * h + h + len(TASK_FAMILIES)
    return {"tokenizer": tokenizer, "encoder": m.num_layers * layer, "head": head}


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
    if cfg.moe.num_experts:
        print("note: counting the dense model; expert counts come with the conditional MoE layers",
              file=sys.stderr)
    built, expected = built_count(cfg), arithmetic_count(cfg)
    print(f"{cfg.model.name}: {cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}, "
          f"{cfg.model.num_attention_heads} heads, ffn {cfg.model.ffn_hidden_size}")
    print(f"{'part':<10} {'built':>14} {'from sizes':>14}")
    for part in expected:
        print(f"{part:<10} {built[part]:>14,} {expected[part]:>14,}")
    total_b, total_e = sum(built.values()), sum(expected.values())
    print(f"{'total':<10} {total_b:>14,} {total_e:>14,}  ({total_b / 1e6:.1f}M)")
    if built != expected:
        print("MISMATCH between the built model and the arithmetic count", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
