"""Routing statistics: per MoE layer and condition, the share of tokens sent to each expert.

The routers count, while their ``RoutingTracker`` collects statistics, the (non-padding) tokens
each expert receives, per routing decision (``layer0.attn``, ``layer0.mlp``, ...) and attribute
vector: ``tracker.stats()[(layer, "10011000")] = [E] counts``. Every token counts once for each of
its top-k experts, so the counts of one condition sum to k x its tokens.

Share convention: ``share[e]`` = the fraction of the condition's tokens that expert e
processes, in [0, 1]; the shares of one condition sum to top-k (each token picks k experts).
Under segment-constant routing every share is 0 or 1.

JSON form (:func:`stats_to_json`)::

    {"topk": 2, "num_experts": 4,
     "layers": {"layer0.attn": {"10011000": {"name": "visual_input", "tokens": 40,
                                             "shares": [1.0, 0.0, 1.0, 0.0]}, ...}, ...}}
"""

from __future__ import annotations

import re
from typing import Any, Iterable

import torch

from megatron_uni.batch import ATTRIBUTES
from megatron_uni.moe.routers import Router

_ORDER = ["".join(map(str, vec)) for vec in ATTRIBUTES.values()]
_NAMES = {"".join(map(str, vec)): name for name, vec in ATTRIBUTES.items()}


def _natural(text: str) -> list:
    """"layer10.mlp" after "layer2.mlp"."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _condition_order(key: str) -> tuple:
    return (_ORDER.index(key), key) if key in _ORDER else (len(_ORDER), key)


def stats_to_json(ctx_stats: dict[tuple[str, str], torch.Tensor], topk: int) -> dict[str, Any]:
    """``RoutingTracker.stats()`` -> the JSON-ready dict of the module docstring (layers in model
    order, conditions in the reference table's order). ``topk``: experts per token."""
    if topk < 1:
        raise ValueError(f"topk must be >= 1, not {topk}")
    layers: dict[str, dict[str, dict[str, Any]]] = {}
    num_experts = 0
    for layer, key in sorted(ctx_stats, key=lambda lk: (_natural(lk[0]), _condition_order(lk[1]))):
        counts = ctx_stats[(layer, key)].double()
        num_experts = max(num_experts, counts.numel())
        tokens = float(counts.sum()) / topk
        shares = (counts / tokens).tolist() if tokens > 0 else [0.0] * counts.numel()
        layers.setdefault(layer, {})[key] = {
            "name": _NAMES.get(key, key),
            "tokens": int(round(tokens)),
            "shares": [round(s, 6) for s in shares],
        }
    return {"topk": topk, "num_experts": num_experts, "layers": layers}


def collect_routing_stats(model: torch.nn.Module, batches: Iterable[Any]) -> dict[str, Any]:
    """Run ``model`` (one UniPerceiver stage that embeds its input: PP = 1 or the first stage)
    on ``batches`` in eval mode without gradients and return their routing statistics as
    :func:`stats_to_json` gives them. The model's training mode and its tracker's state are
    restored afterwards. A model without routers gives empty layers."""
    routers = [m for m in model.modules() if isinstance(m, Router)]
    if not routers:
        return {"topk": 0, "num_experts": 0, "layers": {}}
    tracker, was_training = routers[0].tracker, model.training
    model.eval()
    try:
        with tracker.collecting(), torch.no_grad():
            for batch in batches:
                model(batch)
            return stats_to_json(tracker.stats(), routers[0].topk)
    finally:
        model.train(was_training)
