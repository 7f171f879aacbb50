"""The encoder's forward with routing conditions as an argument, on megatron's modules.

Shape legend: S sequence, s = S / TP under sequence parallelism (else S), b rows, h hidden,
np heads on this TP rank, ng query groups on this rank, hn head size.

megatron's ``TransformerBlock`` -> ``TransformerLayer`` -> ``SelfAttention`` / ``MLP`` forwards
pass only hidden states to their linears. Conditional routing needs the micro-batch's
:class:`~megatron_uni.moe.conditions.RoutingConditions` in the expert linears, and a module
attribute carrying them breaks under pipeline schedules with recompute (a recomputed forward
would read whichever micro-batch wrote last). So these subclasses keep megatron's construction,
parameters, checkpoint names and submodules, and replace only ``forward``: the conditions travel
as an argument from the block through every layer into each linear, and recompute
(``tensor_parallel.checkpoint``: full, uniform or block; selective ``core_attn`` and ``mlp``)
closes over the conditions of its own call.

Every linear slot of our attention and MLP takes ``(x, conditions, decision)`` and returns
``(out, bias, decision)``: an expert linear that owns a router returns its routing decision, the
attention hands it from qkv to out and the MLP from fc1 to fc2 (the reference shares one
decision per pair); :class:`DenseColumnLinear` / :class:`DenseRowLinear` are megatron's linears
passing the decision through. Dense and MoE layers still differ only in the spec.

What these forwards do not carry over from megatron (none is used by Uni-Perceiver): rotary
embeddings, cross-attention, inference caches, packed-sequence parameters, CPU offloading,
fp8/fp4 contexts, CUDA graphs.
"""

from __future__ import annotations

import dataclasses
import logging
from contextlib import nullcontext
from functools import partial
from typing import Any, Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_layer import TransformerLayer
from megatron.core.utils import make_viewless_tensor

from megatron_uni.moe.conditions import RoutingConditions
from megatron_uni.moe.grouped import keeps_sorted_order

Decision = Any  # megatron_uni.moe.routers.Decision, or None for a dense pair


class _KnownMLPFilter(logging.Filter):
    """megatron's TransformerLayer warns "Unknown MLP type ... Using default kwargs" for any MLP
    module that is not exactly ``MLP``; :class:`EncoderMLP` is one, and its spec passes the
    kwarg megatron would (``tp_group``), so that warning says nothing here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Unknown MLP type")


logging.getLogger("megatron.core.transformer.transformer_layer").addFilter(_KnownMLPFilter())


class DenseColumnLinear(ColumnParallelLinear):
    """megatron's ``ColumnParallelLinear`` with the encoder's linear signature."""

    def forward(self, x: torch.Tensor, conditions: Optional[RoutingConditions] = None,
                decision: Decision = None) -> tuple[torch.Tensor, Any, Decision]:
        out, bias = super().forward(x)
        return out, bias, decision


class DenseRowLinear(RowParallelLinear):
    """megatron's ``RowParallelLinear`` with the encoder's linear signature."""

    def forward(self, x: torch.Tensor, conditions: Optional[RoutingConditions] = None,
                decision: Decision = None) -> tuple[torch.Tensor, Any, Decision]:
        out, bias = super().forward(x)
        return out, bias, decision


class EncoderSelfAttention(SelfAttention):
    """megatron's ``SelfAttention`` (fused QKV, per-head layout, core attention, projection)."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor],
                conditions: Optional[RoutingConditions] = None
                ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        mixed, _, decision = self.linear_qkv(hidden_states, conditions)  # [S, b, ng*(np/ng+2)*hn]
        heads_per_group = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        hn = self.hidden_size_per_attention_head
        mixed = mixed.view(*mixed.shape[:-1], self.num_query_groups_per_partition,
                           (heads_per_group + 2) * hn)
        query, key, value = torch.split(mixed, [heads_per_group * hn, hn, hn], dim=3)
        query = query.reshape(query.size(0), query.size(1), -1, hn)  # [S, b, np, hn]
        if self.checkpoint_core_attention and self.training:
            context = self._checkpointed_attention_forward(
                query, key, value, attention_mask, attn_mask_type=self.attn_mask_type)
        else:
            context = self.core_attention(query, key, value, attention_mask,
                                          attn_mask_type=self.attn_mask_type)
        output, bias, _ = self.linear_proj(context, conditions, decision)
        return output, bias


class EncoderMLP(MLP):
    """megatron's ``MLP``: fc1, activation on (fc1 + bias), fc2 (exact GELU, as the reference;
    megatron's fused bias-GELU would use the tanh approximation).

    With expert linears in both slots that can (``group_order_ok``: TP = 1), fc1 hands its
    output to fc2 in the routing decision's group order: everything between them works per
    token, so nothing here changes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        fc1, fc2 = self.linear_fc1, self.linear_fc2
        if getattr(fc1, "group_order_ok", False) and getattr(fc2, "group_order_ok", False):
            fc1.hand_off_group_order = True

    def forward(self, hidden_states: torch.Tensor,
                conditions: Optional[RoutingConditions] = None
                ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        intermediate, bias, decision = self.linear_fc1(hidden_states, conditions)
        if bias is not None:
            intermediate = intermediate + bias
        intermediate = self.activation_func(intermediate)
        output, output_bias, _ = self.linear_fc2(intermediate, conditions, decision)
        return output, output_bias


class EncoderLayer(TransformerLayer):
    """Pre-LN layer: x + attn(LN1(x)), then x + mlp(LN2(x)) through the bias-dropout-add slots
    (LayerScale + DropPath in ours)."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor],
                conditions: Optional[RoutingConditions] = None, **unused: Any
                ) -> tuple[torch.Tensor, None]:
        # the order of the stream's tokens, where the block keeps them in group order
        order = None if conditions is None or conditions.stream_order is None \
            else conditions.stream_order.order
        residual = hidden_states
        attention = self.self_attention(self.input_layernorm(hidden_states), attention_mask,
                                        conditions)
        with self.bias_dropout_add_exec_handler():
            hidden_states = self.self_attn_bda(self.training, self.config.bias_dropout_fusion)(
                attention, residual, self.hidden_dropout, order)
        residual = hidden_states
        normed = self.pre_mlp_layernorm(hidden_states)
        if self.recompute_mlp:
            mlp = tensor_parallel.checkpoint(partial(self.mlp, conditions=conditions), False,
                                             normed)
        else:
            mlp = self.mlp(normed, conditions)
        with self.bias_dropout_add_exec_handler():
            hidden_states = self.mlp_bda(self.training, self.config.bias_dropout_fusion)(
                mlp, residual, self.hidden_dropout, order)
        # megatron's layer returns a viewless tensor (pipeline sends require it)
        output = make_viewless_tensor(inp=hidden_states, requires_grad=hidden_states.requires_grad,
                                      keep_graph=True)
        return output, None


def stream_router(layers: Any) -> Optional[Any]:
    """The router by whose grouping a block of ``layers`` can keep its hidden states between
    the layers, or None: every layer's qkv, out, fc1 and fc2 are expert linears that can work
    in group order (``keeps_stream_order``: TP = 1, not always dispatch, attribute or modality
    routing; one router strategy per model, so the first router's grouping is every one's)."""
    routers = []
    for layer in layers:
        attention, mlp = layer.self_attention, layer.mlp
        slots = [getattr(attention, "linear_qkv", None), getattr(attention, "linear_proj", None),
                 getattr(mlp, "linear_fc1", None), getattr(mlp, "linear_fc2", None)]
        if not all(getattr(slot, "keeps_stream_order", False) for slot in slots):
            return None
        routers += [slots[0].router, slots[2].router]
    if not routers or any(r is None for r in routers):
        return None
    return routers[0]


class EncoderBlock(TransformerBlock):
    """This pipeline stage's layers (megatron's construction, input tensor and recompute
    settings); ``forward`` passes the conditions to every layer.

    Where :func:`stream_router` finds one, the hidden states run between the layers in its
    grouping's sorted order (tokens grouped by condition): the block permutes them once in and
    once out, each expert linear of the stream then takes and gives group order, only the
    attention core's input and output are permuted (2 permutations per layer instead of 6), and
    drop path keeps its per-row choice (``models/residual.py``). The layers' results are those
    of the token-ordered stream: everything else in a layer works per token."""

    def _stream_grouping(self, hidden_states: torch.Tensor,
                         conditions: Optional[RoutingConditions]) -> Optional[Any]:
        """The grouping to run this call's stream in, or None (token order). Looked up per
        call (a few attribute reads), so replacing linears (``moe/fold.py``) is seen."""
        if conditions is None or not keeps_sorted_order(hidden_states):
            return None  # no grouped GEMM on this device / dtype: the linears would permute
        router = stream_router(self.layers)
        if router is None:
            return None
        grouping = router.grouping(conditions)
        return grouping if grouping.ends.shape[0] > 1 else None

    def _run_layers(self, start: int, end: int, conditions: Optional[RoutingConditions]):
        def run(hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor]
                ) -> torch.Tensor:
            for index in range(start, end):
                hidden_states, _ = self.layers[index](hidden_states, attention_mask, conditions)
            return hidden_states

        return run

    def forward(self, hidden_states: Optional[torch.Tensor], attention_mask: Optional[torch.Tensor],
                conditions: Optional[RoutingConditions] = None, **unused: Any) -> torch.Tensor:
        if not self.pre_process:
            hidden_states = self.input_tensor  # from the previous stage (set_input_tensor)
        hidden_states = make_viewless_tensor(inp=hidden_states, requires_grad=True,
                                             keep_graph=True)
        rng = (tensor_parallel.get_cuda_rng_tracker().fork() if self.config.sequence_parallel
               else nullcontext())
        num = len(self.layers)
        grouping = self._stream_grouping(hidden_states, conditions)
        if grouping is not None:
            hidden_states = grouping.to_group_order(hidden_states)
            conditions = dataclasses.replace(conditions, stream_order=grouping)
        with rng:
            if self.config.recompute_granularity == "full" and self.training:
                hidden_states = self._recomputed(hidden_states, attention_mask, conditions, num)
            else:
                hidden_states = self._run_layers(0, num, conditions)(hidden_states,
                                                                     attention_mask)
        if grouping is not None:
            hidden_states = grouping.to_token_order(hidden_states)
        if not self.pre_process and num == 0:
            hidden_states = hidden_states.clone()  # an empty stage must not pass its input on
        return hidden_states

    def _recomputed(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor],
                    conditions: Optional[RoutingConditions], num: int) -> torch.Tensor:
        """megatron's full recompute: ``uniform`` checkpoints chunks of recompute_num_layers,
        ``block`` the first recompute_num_layers layers one by one."""
        chunk = self.config.recompute_num_layers
        if self.config.recompute_method == "uniform":
            for start in range(0, num, chunk):
                hidden_states = tensor_parallel.checkpoint(
                    self._run_layers(start, min(start + chunk, num), conditions),
                    self.config.distribute_saved_activations, hidden_states, attention_mask)
            return hidden_states
        for index in range(num):
            run = self._run_layers(index, index + 1, conditions)
            if index < chunk:
                hidden_states = tensor_parallel.checkpoint(
                    run, self.config.distribute_saved_activations, hidden_states, attention_mask)
            else:
                hidden_states = run(hidden_states, attention_mask)
        return hidden_states
