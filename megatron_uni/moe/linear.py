"""Expert linears in the slots of megatron's tensor-parallel linears.

Shape legend: S sequence, s = S / TP (sequence-parallel shard), b rows, i/o in/out features,
E experts, n = s * b tokens on this rank.

``MoEColumnLinear`` stands where ``ColumnParallelLinear`` stands (qkv, fc1): it takes the
sequence-parallel input ``[s, b, i]`` and returns megatron's column layout ``[S, b, o/TP]``.
``MoERowLinear`` stands where ``RowParallelLinear`` stands (attention out, fc2): it takes
``[S, b, i/TP]`` and returns ``[s, b, o]``. Inside, both work on this rank's tokens with whole
features, ``[n, i] -> [n, o]``, so megatron's SelfAttention and MLP run unchanged around them
(Variation lives in specs: a dense and an MoE layer differ only in which linear fills a slot).

The first linear of a pair (qkv / fc1) owns the router and leaves its decision in a shared
:class:`DecisionSlot`; the second (out / fc2) reuses it, as in the reference. Two execution paths
give the same numbers:
- ``dispatch``: megatron's all-gather token dispatcher sends token copies to the ranks of their
  experts, which apply them; the combine sums the gate-weighted outputs (any router);
- ``grouped``: for segment-constant routers, every distinct condition's experts are merged into
  one weight (sum of gate x W_e) and applied to that condition's tokens; the expert weights are
  all-gathered over TP x EP instead of the tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_utils import unpermute
from megatron.core.transformer.moe.token_dispatcher import MoEAllGatherTokenDispatcher
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_uni.config import MoEConfig
from megatron_uni.moe.experts import ExpertLinears, expert_init_std
from megatron_uni.moe.routing import SEGMENT_CONSTANT, ConditionalRouter, Decision, RoutingContext


@dataclass
class DecisionSlot:
    """Hands the owner's routing decision to the linear that reuses it (out from qkv, fc2 from
    fc1) within one forward."""

    decision: Optional[Decision] = None


class _LinearDispatcher(MoEAllGatherTokenDispatcher):
    """megatron's all-gather dispatcher, for experts whose output width differs from the input's
    (it assumes an MLP expert mapping hidden -> hidden)."""

    def combine_preprocess(self, hidden_states: torch.Tensor) -> torch.Tensor:
        restore = torch.Size([self.hidden_shape_before_permute[0], hidden_states.shape[-1]])
        return unpermute(
            hidden_states,
            self.reversed_local_input_permutation_mapping,
            restore_shape=restore,
            routing_map=self.local_map,
            fused=self.config.moe_permute_fusion,
        )

    def combine_postprocess(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states.view(*self.hidden_shape[:-1], hidden_states.shape[-1])


def resolve_execution(moe: MoEConfig) -> str:
    """``auto``: grouped for segment-constant routers (no token traffic), dispatch otherwise."""
    if moe.execution == "auto":
        return "grouped" if moe.router in SEGMENT_CONSTANT else "dispatch"
    return moe.execution


class _MoELinear(MegatronModule):
    """Shared machinery; see the module docstring."""

    output_layer = False

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        config: TransformerConfig,
        bias: bool,
        moe: MoEConfig,
        routing: RoutingContext,
        slot: DecisionSlot,
        owns_router: bool,
        name: str,
        pg_collection: Any = None,
        **megatron_kwargs: Any,  # init_method, gather_output, skip_bias_add, ...: not used
    ) -> None:
        super().__init__(config=config)
        from megatron.core.process_groups_config import ProcessGroupCollection  # noqa: PLC0415

        pgs = pg_collection or ProcessGroupCollection.use_mpu_process_groups()
        self.tp_group = pgs.tp
        self.tp = pgs.tp.size()
        self.slot = slot
        self.execution = resolve_execution(moe)
        if self.execution == "grouped" and moe.router not in SEGMENT_CONSTANT:
            raise ValueError(f"moe.execution=grouped needs a segment-constant router "
                             f"({', '.join(SEGMENT_CONSTANT)}), not {moe.router!r}")
        if moe.token_dispatcher != "allgather":
            raise ValueError("expert linears use megatron's all-gather dispatcher; set "
                             "moe.token_dispatcher=allgather")
        self.experts = ExpertLinears(
            config, moe.num_experts, input_size, output_size, bias,
            expert_init_std(config, self.output_layer), pgs,
        )
        self.router = (
            ConditionalRouter(config, moe, config.hidden_size, routing, name) if owns_router else None
        )
        self.dispatcher = _LinearDispatcher(
            self.experts.num_local, self.experts.local_indices, config, pg_collection=pgs
        )

    def _route(self, tokens: torch.Tensor) -> Decision:
        if self.router is not None:
            decision, logits = self.router(tokens.view(-1, tokens.shape[-1]))
            self.slot.decision = decision
            self._pending_losses = logits
        elif self.slot.decision is None:
            raise RuntimeError("the paired expert linear has not routed yet in this forward")
        return self.slot.decision

    def _experts_forward(self, x: torch.Tensor) -> torch.Tensor:
        """[s, b, i] this rank's tokens with whole features -> [s, b, o]."""
        decision = self._route(x)
        if self.execution == "dispatch":
            out = self._dispatch(x, decision)
        else:
            out = self._grouped(x.view(-1, x.shape[-1]), decision).view(*x.shape[:-1], -1)
        if self.router is not None:
            out = self.router.attach_losses(out, decision, self._pending_losses)
            self._pending_losses = None
        return out

    def _dispatch(self, x: torch.Tensor, decision: Decision) -> torch.Tensor:
        d = self.dispatcher
        tokens, probs = d.dispatch_preprocess(x, decision.routing_map, decision.probs)
        tokens, probs = d.token_dispatch(tokens, probs)
        tokens, per_expert, probs = d.dispatch_postprocess(tokens, probs)
        out = self.experts.forward_dispatched(tokens, per_expert, probs)
        return d.combine_postprocess(d.token_combine(d.combine_preprocess(out)))

    def _grouped(self, tokens: torch.Tensor, decision: Decision) -> torch.Tensor:
        weight, bias = self.experts.full_weights()  # [E, o, i], [E, o]
        table = decision.table_probs.to(weight.dtype)  # [A, E]
        merged = torch.einsum("ae,eoi->aoi", table, weight)
        out = tokens.new_empty(tokens.shape[0], weight.shape[1])
        for row in torch.unique(decision.rows).tolist():
            where = decision.rows == row
            y = tokens[where] @ merged[row].t()
            if bias is not None:
                y = y + table[row] @ bias
            out[where] = y
        return out


class MoEColumnLinear(_MoELinear):
    """In the slot of ``ColumnParallelLinear``: ``[s, b, i] -> ([S, b, o/TP], None)``."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        out = self._experts_forward(x)  # [s, b, o]
        if self.tp > 1:
            # Whole sequence, this rank's block of output features (megatron's column layout).
            out = tensor_parallel.gather_from_sequence_parallel_region(out, group=self.tp_group)
            block = out.shape[-1] // self.tp
            rank = self.tp_group.rank()
            out = out[..., rank * block : (rank + 1) * block]
        return out, None


class MoERowLinear(_MoELinear):
    """In the slot of ``RowParallelLinear``: ``[S, b, i/TP] -> ([s, b, o], None)``."""

    output_layer = True

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        if self.tp > 1:
            # Whole features, this rank's sequence shard: the layout the experts work in.
            x = tensor_parallel.gather_from_tensor_model_parallel_region(x, group=self.tp_group)
            x = tensor_parallel.scatter_to_sequence_parallel_region(x, group=self.tp_group)
        return self._experts_forward(x), None
