"""The Uni-Perceiver encoder layer as a megatron-core ``ModuleSpec``.

Block (reference order): ``x = x + gamma_1 * attn(LN1(x)); x = x + gamma_2 * fc2(gelu(fc1(LN2(x))))``
with DropPath before the gamma scaling in training. Built from megatron's ``TransformerLayer``,
``SelfAttention`` (fused QKV with bias, tensor-parallel) and ``MLP``; our pieces fill the slots:
``LayerNorm`` (sequence-parallel capable), ``SDPAttention`` (arbitrary masks) and
``ScaledResidualAdd`` (LayerScale + DropPath in the bias-dropout-add slot). Dense and MoE layers
differ only in the spec (the conditional MoE issue swaps the linears), never in ``forward``.
"""

from __future__ import annotations

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_uni.config import ModelConfig
from megatron_uni.models.attention import SDPAttention
from megatron_uni.models.norm import LayerNorm
from megatron_uni.models.residual import ScaledResidualAdd


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


def dense_layer_spec(config: TransformerConfig, model: ModelConfig) -> ModuleSpec:
    """One dense encoder layer."""
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=LayerNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.arbitrary},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=SDPAttention,
                    linear_proj=RowParallelLinear,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=_residual_spec(config, model),
            pre_mlp_layernorm=LayerNorm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(
                    linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear
                ),
            ),
            mlp_bda=_residual_spec(config, model),
        ),
    )


def encoder_block_spec(
    config: TransformerConfig, model: ModelConfig, num_layers_this_stage: int
) -> TransformerBlockSubmodules:
    """The layers of this pipeline stage; no final LayerNorm (the reference encoder has none)."""
    return TransformerBlockSubmodules(
        layer_specs=[dense_layer_spec(config, model) for _ in range(num_layers_this_stage)],
        layer_norm=None,
    )
