"""Conditional routers: a small class family, one chosen per MoE layer by its spec.

Shape legend: n tokens on this rank (the local sequence-parallel shard, megatron's s-major
order), N all tokens of the micro-batch, h hidden, E experts, k top-k, A distinct conditions
(rows of a condition table), D condition width, Nq sequences.

Every router maps (this rank's tokens [n, h], the micro-batch's :class:`RoutingConditions`) to an
immutable :class:`Decision`, which the pair of expert linears it serves (qkv then out, fc1 then
fc2) both apply; nothing is stored on the module between calls.

- :class:`TokenRouter`: logits = W h_t (the classic MoE gate on the token's own hidden state).
- :class:`ContextRouter`: one decision per sequence from its pooled representation (its SPE
  token's hidden state, or the mean over its tokens).
- :class:`TableRouter` (modality / task / attribute: segment-constant): the gate reads a one-hot
  modality, a one-hot task id, or the token's 8-bit attribute vector:
  h = LayerNorm(Linear(D -> hidden)(c)), logits = Linear(hidden -> E, no bias)(h), in fp32 (the
  reference's attribute gate). Gates are computed for the A distinct conditions of the
  micro-batch and looked up per token, so every token of one condition takes the same experts:
  the grouped execution path relies on it, and routes can be computed ahead of time.

Training adds Gaussian noise (std ``moe.noise_std``, default 1/E) to the logits: per token for
``token``, per sequence for ``context``, per condition for the table routers (which keeps them
segment-constant); eval adds none. Top-k for any k: for k >= 2 the chosen experts' gates are
renormalised (softmax over the k chosen logits = softmax then renormalise); for k = 1 the gate is
the softmax probability of the chosen expert (renormalising would make it 1 and the router would
learn nothing). The load-balancing (Switch) and z losses count non-padding tokens only; they are
computed only when their coefficient is > 0 and ride on the first linear's output through
megatron's ``MoEAuxLossAutoScaler``. Losses and expert counts go to the model's
:class:`RoutingTracker`.

No host synchronisation in any router's forward: tables and indices live on the batch's device,
padding is masked arithmetically (no boolean indexing), counts stay tensors. With statistics on,
the tracker converts its tensors once per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_uni.batch import ATTRIBUTES, Modality
from megatron_uni.config import MoEConfig
from megatron_uni.moe.conditions import RoutingConditions
from megatron_uni.moe.grouped import Grouping
from megatron_uni.moe.tracker import RoutingTracker, records_now

SEGMENT_CONSTANT = ("modality", "task", "attribute")
ATTRIBUTE_BITS = len(next(iter(ATTRIBUTES.values())))


@dataclass(frozen=True)
class Decision:
    """Where each local token goes.

    ``probs`` [n, E] sparse gates and ``routing_map`` [n, E] (the dispatch path's input);
    ``rows`` [n] the condition (table row, or sequence) of each token, ``table_probs`` [A, E],
    ``table_index`` / ``table_gates`` [A, k] the chosen experts and their gates per condition
    (routers whose decision is constant per condition: the grouped path's input) and
    ``grouping`` the tokens sorted by condition (made by the first linear of the pair that needs
    it: the grouped path, or hidden states in group order; the encoder block's
    ``conditions.stream_order`` where it keeps the stream in that order); ``aux_loss`` [] the
    coefficient-weighted router losses to attach, or None;
    ``in_group_order``: the activations handed from the first linear of the pair to the second
    are in ``grouping``'s sorted order; ``exchange``: under expert parallelism, every rank's
    conditions for the grouped path (``moe.experts.MergeExchange``), made by the first linear
    of the pair that needs it and handed on with the decision.
    """

    probs: torch.Tensor
    routing_map: torch.Tensor
    rows: Optional[torch.Tensor] = None
    table_probs: Optional[torch.Tensor] = None
    table_index: Optional[torch.Tensor] = None
    table_gates: Optional[torch.Tensor] = None
    aux_loss: Optional[torch.Tensor] = None
    grouping: Optional[Grouping] = None
    in_group_order: bool = False  # the hidden states handed on with it are in grouping's order
    exchange: Optional[Any] = None


def select_topk(logits: torch.Tensor, topk: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [m, E] -> (sparse gates [m, E], routing map [m, E], top indices [m, k], gates
    [m, k]); see the module docstring for k = 1."""
    top_logits, top_idx = logits.topk(topk, dim=-1)
    if topk == 1:
        gates = logits.softmax(-1).gather(-1, top_idx)
    else:
        gates = top_logits.softmax(-1)
    probs = torch.zeros_like(logits).scatter(-1, top_idx, gates)
    routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, top_idx, True)
    return probs, routing_map, top_idx, gates


def masked_aux_loss(probs: torch.Tensor, routing_map: torch.Tensor, valid: torch.Tensor,
                    topk: int, coeff: float) -> torch.Tensor:
    """Switch load balancing over the valid tokens: E * coeff / k * sum_e f_e P_e, with f_e the
    fraction of routed token copies and P_e the mean router probability (megatron's
    ``switch_load_balancing_loss_func`` on the valid rows, without indexing them)."""
    keep = valid[:, None].to(probs.dtype)
    count = keep.sum().clamp(min=1)
    tokens_per_expert = (routing_map.to(probs.dtype) * keep).sum(0)
    probs_per_expert = (probs * keep).sum(0)
    num_experts = probs.shape[-1]
    return (probs_per_expert * tokens_per_expert).sum() * (num_experts * coeff / (topk * count * count))


def masked_z_loss(logits: torch.Tensor, valid: torch.Tensor, coeff: float) -> torch.Tensor:
    """coeff * mean over valid tokens of logsumexp(logits)^2 (megatron's ``z_loss_func``)."""
    keep = valid.to(logits.dtype)
    return (torch.logsumexp(logits, dim=-1).square() * keep).sum() / keep.sum().clamp(min=1) * coeff


class Router(MegatronModule):
    """Shared gate, noise, top-k and losses; subclasses say what the gate reads."""

    strategy = ""

    def __init__(self, config: TransformerConfig, moe: MoEConfig, hidden_size: int,
                 tracker: RoutingTracker, name: str, condition_width: int = 0) -> None:
        super().__init__(config=config)
        self.num_experts = moe.num_experts
        self.topk = moe.topk
        self.noise_std = moe.resolved_noise_std()
        self.aux_coeff = moe.aux_loss_coeff
        self.z_coeff = moe.z_loss_coeff
        self.tracker = tracker
        self.name = name
        if condition_width:  # table routers: condition vector -> gate input
            self.embed = torch.nn.Linear(condition_width, hidden_size)
            self.norm = torch.nn.LayerNorm(hidden_size)
        self.gate = torch.nn.Linear(hidden_size, self.num_experts, bias=False)
        torch.nn.init.normal_(self.gate.weight, std=config.init_method_std)
        # Under sequence parallelism each TP rank routes its own tokens: the gradients are
        # partial sums, all-reduced over TP by megatron for parameters flagged like this.
        for param in self.parameters():
            param.sequence_parallel = config.sequence_parallel

    def logits_of(self, features: torch.Tensor) -> torch.Tensor:
        """Clean gate logits [m, E] in fp32 for gate inputs [m, h]."""
        return F.linear(features.float(), self.gate.weight.float())

    def _noisy(self, logits: torch.Tensor) -> torch.Tensor:
        if self.training and self.noise_std > 0:
            return logits + torch.randn_like(logits) * self.noise_std
        return logits

    def _finish(self, unit_logits: torch.Tensor, rows: Optional[torch.Tensor],
                conditions: RoutingConditions, constant_per_row: bool) -> Decision:
        """Top-k over per-unit logits [m, E] (a unit: token, sequence or condition), looked up
        per token through ``rows`` [n] (None: units are the tokens); losses and counts."""
        probs, routing_map, index, gates = select_topk(self._noisy(unit_logits), self.topk)
        token_logits = unit_logits
        table = None
        if rows is not None:
            table = (probs, index, gates) if constant_per_row else None
            probs, routing_map, token_logits = (t.index_select(0, rows)
                                                for t in (probs, routing_map, unit_logits))
        valid = conditions.valid
        aux = None
        record = records_now(self.training)
        if self.aux_coeff > 0 or self.z_coeff > 0:
            aux = torch.zeros((), device=unit_logits.device)
            if self.aux_coeff > 0:
                value = masked_aux_loss(token_logits.softmax(-1), routing_map, valid, self.topk,
                                        self.aux_coeff)
                if record:
                    self.tracker.record_loss(f"{self.name}.aux", value)
                aux = aux + value
            if self.z_coeff > 0:
                value = masked_z_loss(token_logits, valid, self.z_coeff)
                if record:
                    self.tracker.record_loss(f"{self.name}.z", value)
                aux = aux + value
            # Our task losses are sums over queries divided later by the global query count;
            # scale by this micro-batch's queries so the coefficient means "per query".
            aux = aux * conditions.num_queries
        if record and self.tracker.collect_stats:
            chosen = routing_map.float() * valid[:, None].float()
            table_rows = conditions.attribute_table.shape[0]
            counts = chosen.new_zeros(table_rows, self.num_experts).index_add(
                0, conditions.attribute_index, chosen)
            self.tracker.record_counts(self.name, conditions.attribute_table, counts)
        if table is None:
            return Decision(probs, routing_map, rows, aux_loss=aux)
        return Decision(probs, routing_map, rows, table[0], table[1], table[2], aux_loss=aux)

    def forward(self, hidden: torch.Tensor, conditions: RoutingConditions) -> Decision:
        """hidden [n, h] (this rank's tokens) -> the decision for them."""
        raise NotImplementedError


class TokenRouter(Router):
    """Gate on each token's own hidden state."""

    strategy = "token"

    def forward(self, hidden: torch.Tensor, conditions: RoutingConditions) -> Decision:
        return self._finish(self.logits_of(hidden), None, conditions, constant_per_row=False)


class ContextRouter(Router):
    """One decision per sequence, from its SPE token's state or its mean state."""

    strategy = "context"

    def __init__(self, config: TransformerConfig, moe: MoEConfig, hidden_size: int,
                 tracker: RoutingTracker, name: str) -> None:
        super().__init__(config, moe, hidden_size, tracker, name)
        self.context_source = moe.context_source

    def forward(self, hidden: torch.Tensor, conditions: RoutingConditions) -> Decision:
        full = hidden
        if conditions.sp_size > 1:  # pooling needs the whole sequence: gather the shards
            full = tensor_parallel.gather_from_sequence_parallel_region(
                hidden.view(-1, conditions.rows, hidden.shape[-1])
            ).reshape(-1, hidden.shape[-1])
        if self.context_source == "spe":
            pooled = full[conditions.spe_index]  # [Nq, h]
        else:
            seq = conditions.sequence_full
            keep = (seq >= 0).to(full.dtype)
            index = seq.clamp(min=0)
            pooled = full.new_zeros(conditions.num_sequences, full.shape[-1]).index_add(
                0, index, full * keep[:, None])
            counts = keep.new_zeros(conditions.num_sequences).index_add(0, index, keep)
            pooled = pooled / counts.clamp(min=1)[:, None]
        # Padding tokens borrow sequence 0's route (conditions.sequence clamps them); their
        # outputs are never read.
        return self._finish(self.logits_of(pooled), conditions.sequence, conditions,
                            constant_per_row=True)


class UnseenTaskError(ValueError):
    """The task router met a task that never trained and ``moe.unseen_task_route=refuse``."""


def unseen_task_message(name: str) -> str:
    """Why the task router refuses task ``name``, and the alternatives."""
    return (f"task {name!r} never trained (weight 0 in data.tasks), so the task router has no "
            f"trained gate for it: task routing cannot route a new task. Route it like a trained "
            f"task with moe.unseen_task_route=<task name>, or use a router that generalises "
            f"(moe.router=attribute, modality, token or context)")


class TableRouter(Router):
    """Segment-constant routing by modality, task or attribute: gates per distinct condition."""

    def __init__(self, config: TransformerConfig, moe: MoEConfig, hidden_size: int,
                 tracker: RoutingTracker, name: str, num_tasks: int = 1,
                 task_names: tuple[str, ...] = (),
                 task_route: tuple[int, ...] | None = None) -> None:
        """``task_route[t]``: the task whose gate row task ``t`` uses (itself when it trained;
        another trained task under ``moe.unseen_task_route``; -1 = never trained, refused)."""
        if moe.router not in SEGMENT_CONSTANT:
            raise ValueError(f"TableRouter routes by {', '.join(SEGMENT_CONSTANT)}, not "
                             f"{moe.router!r}")
        num_tasks = max(num_tasks, 1)
        width = {"modality": len(Modality), "task": num_tasks, "attribute": ATTRIBUTE_BITS}
        super().__init__(config, moe, hidden_size, tracker, name, width[moe.router])
        self.strategy = moe.router
        self.num_tasks = num_tasks
        self.task_names = tuple(task_names)
        route = tuple(task_route or ())  # tasks it does not list route by their own row
        self.task_route = route + tuple(range(len(route), num_tasks))

    def logits_of(self, features: torch.Tensor) -> torch.Tensor:
        """features: condition vectors [A, D] (0/1 attribute bits, one-hot modality / task)."""
        hidden = self.norm(self.embed(features.to(self.embed.weight.dtype)))
        return super().logits_of(hidden)

    def table(self, conditions: RoutingConditions) -> tuple[torch.Tensor, torch.Tensor]:
        """(condition vectors [A, D], row per local token [n]) on the batch's device."""
        device = conditions.modality.device
        if self.strategy == "attribute":
            return conditions.attribute_table, conditions.attribute_index
        if self.strategy == "modality":
            return torch.eye(len(Modality), device=device), conditions.modality
        if conditions.task_id >= self.num_tasks:
            raise ValueError(f"task id {conditions.task_id} but the task router knows "
                             f"{self.num_tasks} tasks: task routing cannot route an unseen task")
        task = self.task_route[conditions.task_id]  # host ints: no device read
        if task < 0:
            name = (self.task_names[conditions.task_id]
                    if conditions.task_id < len(self.task_names) else f"#{conditions.task_id}")
            raise UnseenTaskError(unseen_task_message(name))
        one_hot = torch.eye(self.num_tasks, device=device)[task : task + 1]
        return one_hot, torch.zeros_like(conditions.modality)

    @property
    def groups_tokens(self) -> bool:
        """Whether its decisions group the tokens of a micro-batch by more than one condition
        (attribute and modality routing; task routing has one condition per micro-batch)."""
        return self.strategy != "task"

    def grouping(self, conditions: RoutingConditions) -> Grouping:
        """This rank's tokens sorted by the condition that routes them: the grouping of every
        decision this router (or any router of the same strategy) makes for ``conditions``."""
        table, rows = self.table(conditions)
        return Grouping.of(rows, table.shape[0])

    def clean_gates(self, table: torch.Tensor) -> torch.Tensor:
        """Noise-free sparse gates [A, E] for condition vectors [A, D]: what eval routing gives
        every token of each condition (used by folding)."""
        return select_topk(self.logits_of(table), self.topk)[0]

    def forward(self, hidden: torch.Tensor, conditions: RoutingConditions) -> Decision:
        table, rows = self.table(conditions)
        return self._finish(self.logits_of(table), rows, conditions, constant_per_row=True)


def router_class(moe: MoEConfig) -> type[Router]:
    """The router of ``moe.router``: the spec's choice (layer_spec.py)."""
    if moe.router in SEGMENT_CONSTANT:
        return TableRouter
    return {"token": TokenRouter, "context": ContextRouter}[moe.router]
