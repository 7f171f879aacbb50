"""The one place that builds megatron-core's `TransformerConfig` from our `Config`.

Everything megatron needs to know about sizes, parallel layout, precision, fusions and MoE is
decided here, so model code receives a finished `TransformerConfig` and never reads `Config`
for those facts itself.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Literal

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_uni.config.schema import Config, ConfigError
from megatron_uni.config.validate import validate

ResolvedPrecision = Literal["fp32", "bf16", "fp16"]

_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}

_FUSIONS = (
    "gradient_accumulation_fusion",
    "bias_dropout_fusion",
    "bias_activation_fusion",
    "masked_softmax_fusion",
    "persist_layer_norm",
    "apply_rope_fusion",
)


def resolved_precision(cfg: Config, use_cpu: bool) -> ResolvedPrecision:
    """`train.precision` with `auto` resolved: fp32 on CPU, bf16 on GPU.

    An explicit bf16/fp16 on CPU is honoured (never chosen by `auto`): it runs the GPU's
    mixed-precision path (Float16Module, fp32 main parameters, loss scaling for fp16) on the
    numeric reference machine, slowly; the trainer says so when it starts.
    """
    precision = cfg.train.precision
    if precision == "auto":
        return "fp32" if use_cpu else "bf16"
    return precision


def torch_dtype(precision: str) -> torch.dtype:
    """torch dtype of a resolved precision name ("fp32", "bf16", "fp16")."""
    if precision not in _DTYPES:
        raise ConfigError(
            f"no dtype for precision {precision!r}", field="train.precision", value=precision,
            fix="resolve it first with resolved_precision(cfg, use_cpu)",
        )
    return _DTYPES[precision]


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a missing parent package raises instead of None
        return False


def _fusion_flags(use_cpu: bool) -> dict[str, bool]:
    """Fused kernels to enable: none on CPU, none without apex/Transformer Engine.

    Each flag is turned on only when the kernel it needs is importable, because megatron
    imports those kernels lazily and would fail mid-forward. RoPE fusion stays off:
    Uni-Perceiver has no rotary embeddings.
    """
    off = dict.fromkeys(_FUSIONS, False)
    if use_cpu or not (_installed("apex") or _installed("transformer_engine")):
        return off
    return off | {
        "gradient_accumulation_fusion": _installed("fused_weight_gradient_mlp_cuda"),
        "bias_dropout_fusion": True,
        "bias_activation_fusion": True,
        "masked_softmax_fusion": _installed("scaled_masked_softmax_cuda"),
        "persist_layer_norm": _installed("apex.contrib.layer_norm"),
    }


def _moe_kwargs(cfg: Config) -> dict[str, Any]:
    moe = cfg.moe
    if not moe.enabled:
        return {}
    moe_layers = set(moe.layer_indices(cfg.model.num_layers))
    return {
        "num_moe_experts": moe.num_experts,
        "moe_router_topk": moe.topk,
        "moe_ffn_hidden_size": cfg.model.ffn_hidden_size,
        # megatron's 0/1-per-layer pattern, for its own specs (GPT baselines, benchmarks).
        "moe_layer_freq": [int(i in moe_layers) for i in range(cfg.model.num_layers)],
        "moe_token_dispatcher_type": moe.token_dispatcher,
        "moe_grouped_gemm": False,
        "moe_aux_loss_coeff": moe.aux_loss_coeff,
        "moe_router_load_balancing_type": "aux_loss" if moe.aux_loss_coeff > 0 else "none",
        # 0 must become None: megatron logs z_loss / coeff whenever the coeff is not None.
        "moe_z_loss_coeff": moe.z_loss_coeff or None,
        # The reference gate computes its logits in fp32.
        "moe_router_dtype": "fp32",
        # Softmax over a single chosen logit is constant (zero gradient); megatron refuses
        # top-1 without softmax-before-top-k.
        "moe_router_pre_softmax": moe.topk == 1,
    }


def transformer_config(
    cfg: Config, *, use_cpu: bool, own_experts: bool = False, **overrides: Any
) -> TransformerConfig:
    """megatron-core `TransformerConfig` for `cfg`.

    `use_cpu` selects the CPU backend's needs (fp32, CPU initialisation, no fused kernels).
    `own_experts`: the model's experts are megatron_uni's expert linears (moe/), which support
    biases under expert-TP; megatron's assertion for its own MLP experts does not apply.
    `overrides` are TransformerConfig fields applied last, e.g. `add_bias_linear=False` for a
    GPT baseline; an unknown name raises TypeError as the dataclass does.
    """
    validate(cfg)
    m, p = cfg.model, cfg.parallel
    precision = resolved_precision(cfg, use_cpu)
    dtype = torch_dtype(precision)
    kwargs: dict[str, Any] = {
        "num_layers": m.num_layers,
        "hidden_size": m.hidden_size,
        "num_attention_heads": m.num_attention_heads,
        "ffn_hidden_size": m.ffn_hidden_size,
        "layernorm_epsilon": m.layernorm_epsilon,
        "init_method_std": m.init_method_std,
        # Uni-Perceiver: biased linears incl. fused QKV, exact-erf GELU, no dropout.
        "add_bias_linear": True,
        "add_qkv_bias": True,
        "activation_func": F.gelu,
        "gated_linear_unit": False,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "tensor_model_parallel_size": p.tp,
        "pipeline_model_parallel_size": p.pp,
        "virtual_pipeline_model_parallel_size": p.vpp,
        "context_parallel_size": p.cp,
        "expert_model_parallel_size": p.ep,
        "expert_tensor_parallel_size": p.expert_tp(),
        "sequence_parallel": p.sequence_parallel_enabled(),
        "params_dtype": dtype,
        # Set even without PP: megatron requires it for PP and it is harmless otherwise.
        "pipeline_dtype": dtype,
        "bf16": precision == "bf16",
        "fp16": precision == "fp16",
        "use_cpu_initialization": use_cpu,
        # [] is what megatron turns its default "full" into, minus the deprecation warning.
        "cuda_graph_scope": [],
        **_fusion_flags(use_cpu),
        **_moe_kwargs(cfg),
    }
    if cfg.train.recompute:
        kwargs |= {
            "recompute_granularity": "full",
            "recompute_method": "uniform",
            "recompute_num_layers": 1,
        }
    kwargs |= overrides
    # megatron rejects fused bias+GELU without a bias; follow a caller's add_bias_linear=False.
    if "bias_activation_fusion" not in overrides and not kwargs["add_bias_linear"]:
        kwargs["bias_activation_fusion"] = False
    etp = kwargs["expert_tensor_parallel_size"]
    if own_experts and kwargs.get("num_moe_experts") and kwargs["add_bias_linear"] and etp != 1:
        # megatron asserts "Bias in Moe is only supported when ETP==1" in __post_init__ for its
        # MLP experts; build with ETP 1 and record the real size (process groups, which our
        # expert linears use, come from parallel_state, not from this field).
        config = TransformerConfig(**{**kwargs, "expert_tensor_parallel_size": 1})
        config.expert_tensor_parallel_size = etp
        return config
    if kwargs.get("num_moe_experts") and kwargs["add_bias_linear"] and etp != 1:
        # Caught here, not in validate: it is megatron's limitation for biased experts, and a
        # bias-free build (add_bias_linear=False) is fine with expert-TP.
        raise ConfigError(
            f"megatron-core 0.16.1 supports biased expert linears only with expert-tensor-"
            f"parallel size 1, and expert-TP is {etp}"
            + (" (parallel.etp=null means 'same as parallel.tp')" if p.etp is None else ""),
            field="parallel.etp", value=p.etp,
            fix="set parallel.etp=1 (experts are then split by parallel.ep only)",
        )
    return TransformerConfig(**kwargs)
