"""Expert linear maps, sharded over expert parallelism (EP) and expert tensor parallelism (ETP).

Shape legend: E experts, El = E / EP local experts, o output features, i input features,
it = i / ETP this rank's input slice, m routed token copies on this rank, G = ETP x EP.

Each expert is one linear map ``y = W_e x + b_e`` (Uni-Perceiver's experts are the qkv, attention
out, fc1 and fc2 matrices themselves). A rank holds ``El`` experts and, of each, the input-column
slice of its ETP rank: its products are partial sums that the token-combine step (a reduce-scatter
over the TP x EP group) adds up, so every ETP size works for every linear; the bias is added on
ETP rank 0 only.

Two ways to apply them, with the same numbers:
- :meth:`forward_dispatched`: tokens already permuted to this rank's experts by megatron's
  dispatcher (any routing);
- :meth:`merged_weights` per condition (segment-constant routing): the gate-weighted sum of each
  condition's k chosen experts. With one rank in the TP x EP group the chosen experts are summed
  in place. Under EP with whole experts per rank (expert-TP 1) the ranks exchange merges, not
  experts: the group's tables are all-gathered once per routing decision
  (:meth:`ExpertLinears.plan_exchange`, each padded to the largest, B rows), every rank sums,
  for every condition of every rank, the terms whose experts it holds (a partial merge
  [G B, o, i]), and one reduce-scatter hands each rank the merged weights of its own
  conditions (the backward all-gathers their gradients; the gates get theirs back by
  reduce-scatter). Nothing per expert leaves its rank, so expert memory per rank is E / EP,
  what the backward keeps is A merged matrices as with one rank, and the bytes moved are
  2 (G - 1) B o i per linear and step, whatever E. Under expert-TP > 1 (a condition's merge
  needs every rank's input columns) the experts are all-gathered instead
  (:meth:`full_weights`; the backward sums each shard's gradient from every rank) and merged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.mappings import (
    gather_from_sequence_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_uni.moe.grouped import add_expert_bias, expert_matmul, merge_chosen
from megatron_uni.parallel.autograd_collectives import all_gather_with_grad


class ExpertLinears(MegatronModule):
    """This rank's shard of E expert linear maps ``in_features -> out_features``."""

    def __init__(
        self,
        config: TransformerConfig,
        num_experts: int,
        in_features: int,
        out_features: int,
        bias: bool,
        init_std: float,
        pg_collection: Any,
    ) -> None:
        super().__init__(config=config)
        self.ep_group, self.etp_group = pg_collection.ep, pg_collection.expt_tp
        self.tp_ep_group = pg_collection.tp_ep
        ep, etp = self.ep_group.size(), self.etp_group.size()
        self.ep_rank, self.etp_rank = self.ep_group.rank(), self.etp_group.rank()
        if etp > 1 and etp != pg_collection.tp.size():
            # The bias replicas stay equal through megatron's TP all-reduce (see below), which
            # is the expert-TP group only when both have the same size.
            raise ValueError(f"expert-TP {etp} must be 1 or equal to TP {pg_collection.tp.size()}"
                             f"; set parallel.etp=1 or parallel.etp=null")
        if num_experts % ep or in_features % etp:
            raise ValueError(f"{num_experts} experts / {in_features} inputs do not split over "
                             f"EP={ep} / expert-TP={etp}")
        self.num_experts, self.num_local = num_experts, num_experts // ep
        self.in_features, self.out_features = in_features, out_features
        self.in_shard = in_features // etp
        self.local_indices = list(range(self.ep_rank * self.num_local,
                                        (self.ep_rank + 1) * self.num_local))
        weight = torch.empty(num_experts, out_features, in_features)
        torch.nn.init.normal_(weight, std=init_std)  # the same full draw on every rank
        cols = slice(self.etp_rank * self.in_shard, (self.etp_rank + 1) * self.in_shard)
        self.weight = torch.nn.Parameter(weight[self.local_indices, :, cols].contiguous())
        self.bias = torch.nn.Parameter(torch.zeros(self.num_local, out_features)) if bias else None
        for param in self.parameters():
            param.allreduce = False  # megatron: an expert param, reduced over expert-DP only
        # Every weight shard is unique in the TP x EP group (other experts or other columns):
        # megatron's grad-norm then counts it once, as it does for its own expert linears.
        set_tensor_model_parallel_attributes(self.weight, is_parallel=True, dim=2, stride=1)
        if self.bias is not None and etp == 1:
            # Whole experts per rank: unique too. (With expert-TP = TP the ETP replicas are TP
            # duplicates, which the norm counts on TP rank 0 only - also exactly once.)
            set_tensor_model_parallel_attributes(self.bias, is_parallel=True, dim=0, stride=1)
        if self.bias is not None and etp > 1:
            # Only ETP rank 0 adds the bias; flagged like a sequence-parallel parameter,
            # finalize_model_grads all-reduces its gradient over the (identical) TP group so the
            # replicas stay equal.
            self.bias.sequence_parallel = True
        self._layout = None

    @property
    def group_size(self) -> int:
        """Ranks of the TP x EP group that the grouped path gathers expert shards from."""
        return self.tp_ep_group.size() if dist.is_initialized() else 1

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None
    ) -> dict:
        """Checkpoint view: global ``[E, o, i]`` weight and ``[E, o]`` bias, so a save under one
        EP / expert-TP layout loads under another."""
        from megatron.core import parallel_state  # noqa: PLC0415
        from megatron.core.dist_checkpointing.mapping import ShardedTensor  # noqa: PLC0415

        prepend = len(sharded_offsets)
        ep, etp = self.ep_group.size(), self.etp_group.size()
        edp_rank = parallel_state.get_expert_data_parallel_rank()
        out = {
            f"{prefix}weight": ShardedTensor.from_rank_offsets(
                f"{prefix}weight", self.weight, *sharded_offsets,
                (prepend, self.ep_rank, ep), (prepend + 2, self.etp_rank, etp),
                replica_id=(0, 0, edp_rank), prepend_axis_num=prepend,
            )
        }
        if self.bias is not None:
            out[f"{prefix}bias"] = ShardedTensor.from_rank_offsets(
                f"{prefix}bias", self.bias, *sharded_offsets, (prepend, self.ep_rank, ep),
                replica_id=(0, self.etp_rank, edp_rank), prepend_axis_num=prepend,
            )
        return out

    # ------------------------------------------------------------------ dispatched tokens
    def forward_dispatched(
        self, tokens: torch.Tensor, tokens_per_expert: torch.Tensor, probs: torch.Tensor
    ) -> torch.Tensor:
        """tokens [m, i] grouped by local expert -> gate-weighted outputs [m, o] (partial over
        ETP), one grouped GEMM over the local experts."""
        cols = slice(self.etp_rank * self.in_shard, (self.etp_rank + 1) * self.in_shard)
        out = expert_matmul(tokens[:, cols].contiguous(), tokens_per_expert, self.weight)
        if self.bias is not None and self.etp_rank == 0:
            out = add_expert_bias(out, self.bias, tokens_per_expert)
        return out * probs.unsqueeze(-1).to(out.dtype)

    # ------------------------------------------------------------------ all experts, merged
    def _member_layout(self) -> list[tuple[int, int]]:
        """(ep rank, etp rank) of every member of the TP x EP group, in group order."""
        if self._layout is None:
            # on the weights' device: the group may be an NCCL one
            mine = torch.tensor([[self.ep_rank, self.etp_rank]], device=self.weight.device)
            self._layout = [tuple(row) for row in
                            all_gather_with_grad(mine, self.tp_ep_group).tolist()]
        return self._layout

    def full_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """All experts, whole: weight [E, o, i], bias [E, o] (autograd through the gather)."""
        if self.group_size == 1:
            return self.weight, self.bias
        shards = all_gather_with_grad(self.weight.reshape(1, -1), self.tp_ep_group)
        etp = self.etp_group.size()
        blocks: dict[tuple[int, int], torch.Tensor] = {
            member: shards[g].view(self.num_local, self.out_features, self.in_shard)
            for g, member in enumerate(self._member_layout())
        }
        ep = self.num_experts // self.num_local
        weight = torch.cat(
            [torch.cat([blocks[(r, t)] for t in range(etp)], dim=2) for r in range(ep)], dim=0
        )
        bias = None
        if self.bias is not None:
            biases = all_gather_with_grad(self.bias.reshape(1, -1), self.tp_ep_group)
            per_member = {m: biases[g].view(self.num_local, -1)
                          for g, m in enumerate(self._member_layout())}
            # ETP rank 0's copy is the one in use (see __init__).
            bias = torch.cat([per_member[(r, 0)] for r in range(ep)], dim=0)
        return weight, bias

    def exchanges_merges(self) -> bool:
        """Whether :meth:`merged_weights` exchanges partial merges (module docstring): more than
        one rank in the group and whole experts per rank."""
        return self.group_size > 1 and self.etp_group.size() == 1

    def plan_exchange(self, index: torch.Tensor, gates: torch.Tensor) -> "MergeExchange":
        """Every rank's conditions, for :meth:`merged_weights` under EP: built once per routing
        decision and shared by the linears that use it (module docstring)."""
        group, size = self.tp_ep_group, self.group_size
        conditions, k = index.shape
        counts = index.new_empty(size)
        dist.all_gather_into_tensor(counts, index.new_full((1,), conditions), group=group)
        # The one host read: the group's largest table sets the exchanged shapes (on a GPU a
        # synchronisation, as the split sizes of megatron's all-to-all dispatcher are).
        bound = int(counts.max())
        if bound > conditions:  # padding rows choose expert 0 with gate 0: they add nothing
            index = torch.nn.functional.pad(index, (0, 0, 0, bound - conditions))
            gates = torch.nn.functional.pad(gates, (0, 0, 0, bound - conditions))
        every_index = index.new_empty(size * bound, k)
        dist.all_gather_into_tensor(every_index, index.contiguous(), group=group)
        # [G B, k]; the backward reduce-scatters the gates' gradients back to their ranks
        every_gate = gather_from_sequence_parallel_region(gates.contiguous(), group=group)
        first = self.ep_rank * self.num_local
        local = (every_index >= first) & (every_index < first + self.num_local)
        return MergeExchange(torch.where(local, every_index - first, 0),
                             torch.where(local, every_gate, torch.zeros_like(every_gate)),
                             bound, conditions, self.ep_rank, self.num_local)

    def merged_weights(self, index: torch.Tensor, gates: torch.Tensor,
                       exchange: "MergeExchange | None" = None
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per condition, the gate-weighted sum of its k chosen experts: index / gates [A, k]
        -> weight [A, o, i], bias [A, o]. Only the chosen experts enter the sum and get
        gradients (``moe.grouped.merge_chosen``). Under EP with whole experts per rank the
        ranks exchange partial merges (``exchange``: :meth:`plan_exchange` of this decision,
        made here when not given); otherwise the experts are all-gathered."""
        if self.exchanges_merges():
            if exchange is None:
                exchange = self.plan_exchange(index, gates)
            if (exchange.ep_rank, exchange.num_local) != (self.ep_rank, self.num_local):
                raise ValueError("a merge exchange planned for another expert layout")
            return exchange.merge(self.weight, self.tp_ep_group), (
                None if self.bias is None else exchange.merge(self.bias, self.tp_ep_group))
        weight, bias = self.full_weights()
        merged = merge_chosen(weight, index, gates)
        return merged, None if bias is None else merge_chosen(bias, index, gates)


@dataclass(frozen=True)
class MergeExchange:
    """Every rank's conditions seen from this rank, for one routing decision: per term of each
    of the G x B rows (B = the group's largest table, each rank's padded to it), the local
    expert and its gate, both 0 where the expert is another rank's (or the row is padding);
    ``conditions`` A this rank's own rows."""

    local_index: torch.Tensor  # [G B, k]
    local_gates: torch.Tensor  # [G B, k], autograd back to every rank's gates
    bound: int  # B
    conditions: int  # A
    ep_rank: int
    num_local: int

    def merge(self, experts: torch.Tensor, group: Any) -> torch.Tensor:
        """This rank's experts [El, ...] -> its conditions' merged experts [A, ...]: the partial
        merges of every rank's conditions, reduce-scattered over ``group``."""
        partial = merge_chosen(experts, self.local_index, self.local_gates)  # [G B, ...]
        mine = reduce_scatter_to_sequence_parallel_region(
            partial.reshape(partial.shape[0], -1), group=group)
        mine = mine.view(self.bound, *experts.shape[1:])
        # not a view of the padded buffer: what the backward keeps is the real conditions only
        return mine[: self.conditions].clone() if self.bound > self.conditions else mine


def expert_init_std(config: TransformerConfig, output_layer: bool) -> float:
    """megatron's init: std for input-side linears, scaled by 1/sqrt(2L) for output-side ones."""
    std = config.init_method_std
    return std / math.sqrt(2.0 * config.num_layers) if output_layer else std
