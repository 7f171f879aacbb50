"""Expert linears in the slots of megatron's tensor-parallel linears.

Shape legend: S sequence, s = S / TP (sequence-parallel shard), b rows, i/o in/out features,
E experts, n = s * b tokens on this rank.

``MoEColumnLinear`` stands where ``ColumnParallelLinear`` stands (qkv, fc1): it takes the
sequence-parallel input ``[s, b, i]`` and returns megatron's column layout ``[S, b, o/TP]``.
``MoERowLinear`` stands where ``RowParallelLinear`` stands (attention out, fc2): it takes
``[S, b, i/TP]`` and returns ``[s, b, o]``. Inside, both work on this rank's tokens with whole
features, ``[n, i] -> [n, o]``, so the attention and MLP around them are those of a dense layer
(variation lives in specs: a dense and an MoE layer differ only in which linear fills a slot).

The first linear of a pair (qkv / fc1) owns the router and returns its decision beside its
output; the attention / MLP hands that decision to the second (out / fc2), as in the reference.
Every linear of our encoder takes ``(x, conditions, decision)`` and returns ``(out, bias,
decision)`` (``models/encoder.py``; the dense linears pass the decision through). Two execution
paths give the same numbers:
- ``dispatch``: megatron's token dispatcher (``moe.token_dispatcher``: ``allgather``, or
  ``alltoall``, which sends each token copy only to the EP rank of its expert) brings token
  copies to the ranks of their experts, which apply them with one grouped GEMM; the combine
  sums the gate-weighted outputs (any router);
- ``grouped``: for routers whose decision is constant per condition, each distinct condition's
  k chosen experts are merged into one weight (sum of gate x W_e over the k chosen only, never
  all E; gradients reach those k only) and applied to that condition's tokens in one grouped
  GEMM after one permutation (``grouped_matmul``); no host synchronisation. Under EP the ranks
  exchange partial merges by one reduce-scatter, each keeping its own experts
  (``ExpertLinears.merged_weights``); under expert-TP > 1 the expert shards of the TP x EP
  group are all-gathered for the merge. In an expert MLP
  (TP = 1) the fc1 output stays in that sorted order through the activation into fc2; where
  all four slots of every layer are expert linears routed by attribute or modality (TP = 1),
  the encoder block keeps its hidden states in that order between the layers
  (``conditions.stream_order``, ``models/encoder.py``), and only the attention core's input
  and output change order: 2 permutations per layer instead of 6.
``auto`` picks per call whichever :func:`choose_execution` estimates cheaper (FLOPs and bytes
moved for the micro-batch's shape and the layout).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler, unpermute
from megatron.core.transformer.moe.token_dispatcher import (
    MoEAllGatherTokenDispatcher,
    MoEAlltoAllTokenDispatcher,
)
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_uni.config import MoEConfig
from megatron_uni.moe.conditions import RoutingConditions
from megatron_uni.moe.experts import ExpertLinears, expert_init_std
from megatron_uni.moe.grouped import Grouping, grouped_matmul, keeps_sorted_order
from megatron_uni.moe.routers import SEGMENT_CONSTANT, Decision


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


class _LinearAlltoAllDispatcher(MoEAlltoAllTokenDispatcher):
    """megatron's all-to-all dispatcher (tokens sent only to the EP ranks of their experts),
    for experts whose output width differs from the input's."""

    def combine_postprocess(self, permutated_local_input_tokens: torch.Tensor) -> torch.Tensor:
        width = permutated_local_input_tokens.shape[-1]
        output = unpermute(
            permutated_local_input_tokens,
            self.reversed_local_input_permutation_mapping,
            restore_shape=torch.Size([self.hidden_shape_before_permute[0], width]),
            routing_map=self.routing_map,
            fused=self.config.moe_permute_fusion,
            drop_and_pad=self.drop_and_pad,
        )
        return output.view(*self.hidden_shape[:-1], width)


DISPATCHERS = {"allgather": _LinearDispatcher, "alltoall": _LinearAlltoAllDispatcher}


def resolve_execution(moe: MoEConfig) -> str:
    """The configured path: ``dispatch`` or ``grouped``; ``auto`` stays ``auto`` for routers whose
    decision is constant per condition (chosen per call by :func:`choose_execution`) and is
    ``dispatch`` for the others (the grouped path needs per-condition decisions)."""
    if moe.execution == "auto":
        return "auto" if moe.router in SEGMENT_CONSTANT else "dispatch"
    return moe.execution


# Default FLOPs one byte of collective traffic costs, per device type: an H200's bf16 matmuls
# run ~790 TFLOP/s against ~400 GB/s of NVLink all-gather bandwidth per GPU (~2000 FLOP/byte;
# inter-node links are slower still); gloo over loopback on this project's CPUs moves ~1-3 GB/s
# against ~30-60 GFLOP/s of fp32 matmul per core: 10-60 FLOP/byte, more when ranks share cores.
FLOPS_PER_BYTE = {"cuda": 2000.0, "cpu": 100.0}


def choose_execution(*, tokens: int, conditions: int, topk: int, in_features: int,
                     out_features: int, local_experts: int, group_size: int, etp: int,
                     element_bytes: int, flops_per_byte: float, alltoall: bool = False,
                     exchange_bound: Optional[int] = None) -> str:
    """``grouped`` or ``dispatch`` for one expert linear and micro-batch, by estimated cost.

    Cost = FLOPs + flops_per_byte x bytes this rank moves, forward plus backward:
    - grouped: one dense product of the n tokens, 2 n i o (x3 with the backward), plus the
      k-term merge of the A conditions, 2 A k o i (x2); with ``exchange_bound`` B (the experts
      stay on their ranks and the ranks exchange merges, ``ExpertLinears.exchanges_merges``; B
      the group's largest table) the merge covers the padded conditions of all G ranks,
      2 G B k o i (x2), and the reduce-scatter of the partial merges and the all-gather of
      their gradients move 2 (G - 1) B o i elements; otherwise the
      all-gather of every expert shard of the TP x EP group of size G and the reduce-scatter
      of their gradients move 2 (G - 1) E_local o (i / ETP) elements;
    - dispatch: each token copy through its expert, 2 k n i o (x3); all-gather of the group's
      tokens and reduce-scatter of the outputs, then the same for the gradients,
      2 (G - 1) n (i + o) elements (``alltoall``: each of the k copies of a token leaves the
      rank with probability (G - 1) / G, 2 k n (i + o) (G - 1) / G).
    With G = 1 nothing moves and the FLOPs decide (grouped unless the merge outweighs the
    k-fold product, i.e. very few tokens per condition).
    """
    n, a, k, i, o, g = tokens, conditions, topk, in_features, out_features, group_size
    dispatch_flops = 3 * 2 * k * n * i * o
    if exchange_bound is not None and g > 1:
        grouped_flops = 3 * 2 * n * i * o + 2 * 2 * g * exchange_bound * k * o * i
        grouped_bytes = 2 * (g - 1) * exchange_bound * o * i * element_bytes
    else:
        grouped_flops = 3 * 2 * n * i * o + 2 * 2 * a * k * o * i
        grouped_bytes = 2 * (g - 1) * local_experts * o * (i // etp) * element_bytes
    copies = k * n * (g - 1) / g if alltoall else (g - 1) * n
    dispatch_bytes = 2 * copies * (i + o) * element_bytes
    grouped = grouped_flops + flops_per_byte * grouped_bytes
    dispatch = dispatch_flops + flops_per_byte * dispatch_bytes
    return "grouped" if grouped <= dispatch else "dispatch"


class _MoELinear(MegatronModule):
    """Shared machinery; see the module docstring."""

    output_layer = False
    reads_stream = False  # input from the block's hidden states (qkv, fc1)
    writes_stream = False  # output into the block's hidden states (out, fc2)

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        config: TransformerConfig,
        bias: bool,
        moe: MoEConfig,
        router: Optional[ModuleSpec],
        name: str,
        pg_collection: Any = None,
        **megatron_kwargs: Any,  # init_method, gather_output, skip_bias_add, ...: not used
    ) -> None:
        super().__init__(config=config)
        from megatron.core.process_groups_config import ProcessGroupCollection  # noqa: PLC0415

        pgs = pg_collection or ProcessGroupCollection.use_mpu_process_groups()
        self.tp_group = pgs.tp
        self.tp = pgs.tp.size()
        self.name = name
        self.execution = resolve_execution(moe)
        self.flops_per_byte = moe.auto_flops_per_byte
        if self.execution == "grouped" and moe.router not in SEGMENT_CONSTANT:
            raise ValueError(f"moe.execution=grouped needs a segment-constant router "
                             f"({', '.join(SEGMENT_CONSTANT)}), not {moe.router!r}")
        self.experts = ExpertLinears(
            config, moe.num_experts, input_size, output_size, bias,
            expert_init_std(config, self.output_layer), pgs,
        )
        # The pair's first linear owns the router (its parameters live here: checkpoint names
        # ``linear_qkv.router.*``); the second gets the decision as an argument.
        self.router = None if router is None else build_module(router, config=config)
        # Set once by the MLP holding this linear as fc1 with an expert fc2 (models/encoder.py):
        # on the grouped path fc1's output then stays in the decision's group order (the
        # activation between them works per token) and fc2 takes it as it is, saving the
        # un-permute and re-permute of the widest activation, both ways.
        self.hand_off_group_order = False
        if moe.token_dispatcher == "alltoall" and pgs.expt_tp.size() > 1:
            from megatron_uni.parallel import cpu_backend  # noqa: PLC0415

            if cpu_backend.is_enabled():
                # megatron all-gathers uneven token counts over expert-TP, which gloo refuses
                raise ValueError("moe.token_dispatcher=alltoall with expert-TP > 1 needs NCCL "
                                 "(gloo has no uneven all-gather); on CPU set parallel.etp=1 or "
                                 "moe.token_dispatcher=allgather")
        self.dispatcher = DISPATCHERS[moe.token_dispatcher](
            self.experts.num_local, self.experts.local_indices, config, pg_collection=pgs
        )

    def _experts_forward(self, x: torch.Tensor, conditions: RoutingConditions,
                         decision: Optional[Decision]) -> tuple[torch.Tensor, Decision]:
        """[s, b, i] this rank's tokens with whole features -> ([s, b, o], the decision).

        Token order in and out: the first linear of a pair reads the block's stream, in group
        order where ``conditions.stream_order`` says so (qkv, fc1); the second reads what the
        first handed on (``decision.in_group_order``) and writes the stream (out, fc2)."""
        stream = conditions.stream_order is not None
        if self.router is not None:
            decision = self.router(x.reshape(-1, x.shape[-1]), conditions)
            arrives_sorted = stream and self.reads_stream
        elif decision is None:
            raise RuntimeError(f"{self.name}: the paired expert linear passed no routing "
                               f"decision")
        else:
            arrives_sorted = decision.in_group_order
        if (decision.table_index is not None and decision.exchange is None
                and self.execution != "dispatch" and self.experts.exchanges_merges()):
            # every rank of the group takes this branch alike (same config, same router)
            decision = dataclasses.replace(decision, exchange=self.experts.plan_exchange(
                decision.table_index, decision.table_gates))
        writes_sorted = stream and self.writes_stream  # the stream must get group order
        path = self._path(x, decision)
        if decision.grouping is None and (path == "grouped" or arrives_sorted or writes_sorted):
            decision = dataclasses.replace(decision, grouping=(
                conditions.stream_order if stream
                else Grouping.of(decision.rows, int(decision.table_index.shape[0]))))
        g = decision.grouping
        if path == "dispatch":
            if arrives_sorted:  # back to megatron's token order for the dispatcher
                x = g.to_token_order(x)
            out = self._dispatch(x, decision)
            if writes_sorted:
                out = g.to_group_order(out)
            leaves_sorted = writes_sorted
        else:
            leaves_sorted = writes_sorted or (self.hand_off_group_order and keeps_sorted_order(x))
            out = self._grouped(x.reshape(-1, x.shape[-1]), decision, arrives_sorted,
                                leaves_sorted).view(*x.shape[:-1], -1)
        if self.router is not None and decision.in_group_order != leaves_sorted:
            decision = dataclasses.replace(decision, in_group_order=leaves_sorted)
        if self.router is not None and decision.aux_loss is not None:
            out = MoEAuxLossAutoScaler.apply(out, decision.aux_loss)
        return out, decision

    def _path(self, x: torch.Tensor, decision: Decision) -> str:
        """This call's path: the configured one, or the cheaper by :func:`choose_execution`
        (host arithmetic on shapes, and under EP the group's largest table, which the merge
        exchange read once per decision)."""
        if self.execution != "auto":
            return self.execution
        experts = self.experts
        return choose_execution(
            tokens=x.numel() // x.shape[-1], conditions=int(decision.table_index.shape[0]),
            topk=int(decision.table_index.shape[1]), in_features=experts.in_features,
            out_features=experts.out_features, local_experts=experts.num_local,
            group_size=experts.group_size, etp=experts.etp_group.size(),
            element_bytes=experts.weight.element_size(),
            flops_per_byte=self.flops_per_byte or FLOPS_PER_BYTE.get(x.device.type, 100.0),
            alltoall=isinstance(self.dispatcher, MoEAlltoAllTokenDispatcher),
            exchange_bound=None if decision.exchange is None else decision.exchange.bound,
        )

    def _dispatch(self, x: torch.Tensor, decision: Decision) -> torch.Tensor:
        d = self.dispatcher
        tokens, probs = d.dispatch_preprocess(x, decision.routing_map, decision.probs)
        tokens, probs = d.token_dispatch(tokens, probs)
        tokens, per_expert, probs = d.dispatch_postprocess(tokens, probs)
        out = self.experts.forward_dispatched(tokens, per_expert, probs)
        return d.combine_postprocess(d.token_combine(d.combine_preprocess(out)))

    def _grouped(self, tokens: torch.Tensor, decision: Decision, sorted_in: bool,
                 sorted_out: bool) -> torch.Tensor:
        """tokens [n, i] -> [n, o]: per condition a k-term merge of its chosen experts
        (tokens / output in the decision's group order where ``sorted_in`` / ``sorted_out``)."""
        if decision.table_index is None:
            raise ValueError(f"{self.name}: the grouped path needs a decision that is constant "
                             f"per condition (modality, task or attribute routing)")
        merged, merged_bias = self.experts.merged_weights(
            decision.table_index, decision.table_gates, decision.exchange)
        return grouped_matmul(tokens, decision.rows, merged, merged_bias, decision.grouping,
                              sorted_in=sorted_in, sorted_out=sorted_out)

    @property
    def group_order_ok(self) -> bool:
        """Whether this linear's input / output can stay in a decision's group order: its
        tokens are this rank's with whole features (no tensor-parallel gather or scatter
        around the experts, which would mix ranks' orders)."""
        return self.tp == 1

    @property
    def keeps_stream_order(self) -> bool:
        """Whether the encoder block may run its hidden states in group order around this
        linear: group order possible here, a path other than always-dispatch, and (the pair's
        first linear) a router whose grouping depends on the conditions only and has more
        than one group (attribute, modality)."""
        routes = self.router is None or getattr(self.router, "groups_tokens", False)
        return self.group_order_ok and self.execution != "dispatch" and routes


class MoEColumnLinear(_MoELinear):
    """In the slot of ``ColumnParallelLinear``: ``[s, b, i] -> ([S, b, o/TP], None, decision)``."""

    reads_stream = True  # qkv, fc1: input from the block's hidden states (through a norm)
    writes_stream = False

    def forward(self, x: torch.Tensor, conditions: RoutingConditions,
                decision: Optional[Decision] = None
                ) -> tuple[torch.Tensor, None, Decision]:
        out, decision = self._experts_forward(x, conditions, decision)  # [s, b, o]
        if self.tp > 1:
            # Whole sequence, this rank's block of output features (megatron's column layout).
            out = tensor_parallel.gather_from_sequence_parallel_region(out, group=self.tp_group)
            block = out.shape[-1] // self.tp
            rank = self.tp_group.rank()
            out = out[..., rank * block : (rank + 1) * block]
        return out, None, decision


class MoERowLinear(_MoELinear):
    """In the slot of ``RowParallelLinear``: ``[S, b, i/TP] -> ([s, b, o], None, decision)``."""

    output_layer = True
    reads_stream = False
    writes_stream = True  # out, fc2: output into the residual stream

    def forward(self, x: torch.Tensor, conditions: RoutingConditions,
                decision: Optional[Decision] = None
                ) -> tuple[torch.Tensor, None, Decision]:
        if self.tp > 1:
            # Whole features, this rank's sequence shard: the layout the experts work in.
            x = tensor_parallel.gather_from_tensor_model_parallel_region(x, group=self.tp_group)
            x = tensor_parallel.scatter_to_sequence_parallel_region(x, group=self.tp_group)
        out, decision = self._experts_forward(x, conditions, decision)
        return out, None, decision
