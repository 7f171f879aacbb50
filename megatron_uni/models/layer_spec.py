"""The Uni-Perceiver encoder layer as a megatron-core ``ModuleSpec``.

Block (reference order): ``x = x + gamma_1 * attn(LN1(x)); x = x + gamma_2 * fc2(gelu(fc1(LN2(x))))``
with DropPath before the gamma scaling in training. Built from megatron's ``TransformerLayer``,
``SelfAttention`` (fused QKV with bias, tensor-parallel) and ``MLP`` in the subclasses of
``models/encoder.py`` (same modules and names; their forwards pass the routing conditions);
our pieces fill the slots: ``LayerNorm`` (sequence-parallel capable), ``SDPAttention`` (arbitrary
masks) and ``ScaledResidualAdd`` (LayerScale + DropPath in the bias-dropout-add slot). Dense and
MoE layers differ only in the spec: which linear fills a slot and which router the pair's first
expert linear owns (``moe.routers.router_class``), never in ``forward``.
"""

from __future__ import annotations

from typing import Any

from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.attention import SelfAttentionSubmodules
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayerSubmodules

from megatron_uni.config import Config, ModelConfig
from megatron_uni.models.attention import SDPAttention
from megatron_uni.models.encoder import (
    DenseColumnLinear,
    DenseRowLinear,
    EncoderLayer,
    EncoderMLP,
    EncoderSelfAttention,
)
from megatron_uni.models.norm import LayerNorm
from megatron_uni.models.residual import ScaledResidualAdd
from megatron_uni.moe.linear import MoEColumnLinear, MoERowLinear
from megatron_uni.moe.routers import TableRouter, router_class
from megatron_uni.moe.tracker import RoutingTracker


def _residual_spec(config: TransformerConfig, model: ModelConfig) -> ModuleSpec:
    return ModuleSpec(
        module=ScaledResidualAdd,
        params={
            "config": config,
            "hidden_size": model.hidden_size,
            "layer_scale_init": model.layer_scale_init,
            "drop_path_rate": model.drop_path_rate,
        },
    )


def task_route(cfg: Config) -> tuple[int, ...]:
    """Per task id, the task whose router row it uses: itself when it trains (weight > 0), the
    task named by ``moe.unseen_task_route`` otherwise, or -1 (refused) under ``refuse``.

    "Never trained" is decided from the config: a task of weight 0 is not in the training
    mixture, so its row of the task router's table never received a gradient."""
    names = list(cfg.data.tasks)
    fallback = cfg.moe.unseen_task_route
    other = names.index(fallback) if fallback != "refuse" and fallback in names else -1
    return tuple(i if cfg.data.tasks[n].weight > 0 else other for i, n in enumerate(names))


def refused_task(cfg: Config, name: str) -> str | None:
    """Why the model refuses to run task ``name`` (the task router on a task that never
    trained, under ``moe.unseen_task_route=refuse``), or None. Decided from the config alone,
    so every rank agrees without a collective."""
    from megatron_uni.moe.routers import unseen_task_message  # noqa: PLC0415

    if not (cfg.moe.enabled and cfg.moe.router == "task") or name not in cfg.data.tasks:
        return None
    if task_route(cfg)[list(cfg.data.tasks).index(name)] >= 0:
        return None
    return unseen_task_message(name)


def _router_spec(cfg: Config, tracker: RoutingTracker, name: str) -> ModuleSpec:
    cls = router_class(cfg.moe)
    params = {"moe": cfg.moe, "hidden_size": cfg.model.hidden_size, "tracker": tracker,
              "name": name}
    if cls is TableRouter:
        params["num_tasks"] = max(len(cfg.data.tasks), 1)
        params["task_names"] = tuple(cfg.data.tasks)
        params["task_route"] = task_route(cfg)
    return ModuleSpec(module=cls, params=params)


def _linear_pair(cfg: Config, tracker: RoutingTracker, layer: int, pair: str
                 ) -> tuple[object, object]:
    """The (column, row) linears of the attention (qkv, out) or MLP (fc1, fc2) of a layer:
    megatron's dense linears, or expert linears sharing one routing decision (the first expert
    linear of the pair owns the router)."""
    first, second = ("qkv", "out") if pair == "attn" else ("fc1", "fc2")
    wanted = set(cfg.moe.linears)
    name = f"layer{layer}.{pair}"

    def expert(cls: type, owns_router: bool) -> ModuleSpec:
        router = _router_spec(cfg, tracker, name) if owns_router else None
        return ModuleSpec(module=cls, params={"moe": cfg.moe, "router": router, "name": name})

    column = expert(MoEColumnLinear, True) if first in wanted else DenseColumnLinear
    row = expert(MoERowLinear, first not in wanted) if second in wanted else DenseRowLinear
    return column, row


def layer_spec(
    config: TransformerConfig,
    cfg: Config,
    layer: int = 0,
    tracker: RoutingTracker | None = None,
    tp_group: Any = None,
) -> ModuleSpec:
    """Encoder layer number ``layer`` (global index): dense, or MoE when ``cfg.moe`` places
    experts there (its routers report to ``tracker``, the model's). ``tp_group``: the MLP's
    tensor-parallel group (megatron's layer passes it only to a module that *is* ``MLP``)."""
    model = cfg.model
    linears = {"attn": (DenseColumnLinear, DenseRowLinear),
               "mlp": (DenseColumnLinear, DenseRowLinear)}
    if cfg.moe.enabled and layer in cfg.moe.layer_indices(model.num_layers):
        if tracker is None:
            raise ValueError("an MoE layer needs the model's RoutingTracker")
        linears = {pair: _linear_pair(cfg, tracker, layer, pair) for pair in linears}
    return ModuleSpec(
        module=EncoderLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=LayerNorm,
            self_attention=ModuleSpec(
                module=EncoderSelfAttention,
                params={"attn_mask_type": AttnMaskType.arbitrary},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=linears["attn"][0],
                    core_attention=SDPAttention,
                    linear_proj=linears["attn"][1],
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=_residual_spec(config, model),
            pre_mlp_layernorm=LayerNorm,
            mlp=ModuleSpec(
                module=EncoderMLP,
                params={} if tp_group is None else {"tp_group": tp_group},
                submodules=MLPSubmodules(
                    linear_fc1=linears["mlp"][0], linear_fc2=linears["mlp"][1]
                ),
            ),
            mlp_bda=_residual_spec(config, model),
        ),
    )


def encoder_block_spec(
    config: TransformerConfig,
    cfg: Config,
    first_layer: int,
    num_layers_this_stage: int,
    tracker: RoutingTracker | None = None,
    tp_group: Any = None,
) -> TransformerBlockSubmodules:
    """The layers of this pipeline stage; no final LayerNorm (the reference encoder has none)."""
    return TransformerBlockSubmodules(
        layer_specs=[
            layer_spec(config, cfg, first_layer + i, tracker, tp_group)
            for i in range(num_layers_this_stage)
        ],
        layer_norm=None,
    )
