"""Conditional routers: token, context, modality, task and attribute, one interface.

Shape legend: n tokens on this rank (the local sequence-parallel shard, flattened s-major like
megatron's ``[s, b, h].view(-1, h)``), N all tokens of the micro-batch, h hidden, E experts,
A distinct conditions in the micro-batch, D condition width.

Conditions reach the routers through a :class:`RoutingContext`, a side channel the model fills
from the batch metadata before its encoder runs (megatron's layers only pass hidden states);
each stage's model owns one and hands it to its MoE layers at construction.

- ``token``: logits = W h_t (the classic MoE gate on the token's own hidden state).
- ``context``: one decision per sequence from its pooled representation (its SPE token's hidden
  state, or the mean over its tokens).
- ``modality`` / ``task`` / ``attribute`` (segment-constant): the gate reads a one-hot modality,
  a one-hot task id, or the token's 8-bit attribute vector: h = LayerNorm(Linear(D -> hidden)(c)),
  logits = Linear(hidden -> E, no bias)(h), in fp32 (the reference's attribute gate). Gates are
  computed for the A distinct conditions of the micro-batch and looked up per token, so every
  token of one condition takes the same experts: the grouped execution path relies on it, and
  routes can be computed ahead of time (the gate ignores content).

Training adds Gaussian noise (std ``moe.noise_std``, default 1/E) to the logits: per token for
``token``, per sequence for ``context``, per condition for the segment-constant routers (which
keeps them segment-constant); eval adds none. Top-k for any k: for k >= 2 the chosen experts'
gates are renormalised (softmax over the k chosen logits = softmax then renormalise); for k = 1
the gate is the softmax probability of the chosen expert (renormalising would make it 1 and the
router would learn nothing). Optional load-balancing (Switch) and z losses attach their gradients
through megatron's ``MoEAuxLossAutoScaler`` and cost nothing when their coefficient is 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_utils import (
    MoEAuxLossAutoScaler,
    switch_load_balancing_loss_func,
    z_loss_func,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_uni.config import MoEConfig
from megatron_uni.batch import ATTRIBUTES, Modality, PackedBatch

SEGMENT_CONSTANT = ("modality", "task", "attribute")


@dataclass
class RoutingContext:
    """The conditions of the current micro-batch, in megatron's token order (s-major)."""

    num_tasks: int = 1
    sp_rank: int = 0
    sp_size: int = 1
    collect_stats: bool = False
    # filled by update()
    rows: int = 0
    seq_len: int = 0
    attribute_table: torch.Tensor | None = None  # [A, 8]
    attribute_index: torch.Tensor | None = None  # [N]
    modality: torch.Tensor | None = None  # [N]
    seq_id: torch.Tensor | None = None  # [N]
    task_id: int = 0
    num_queries: int = 0
    # per (layer name, condition key): tokens per expert, accumulated while collect_stats
    stats: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)
    # per layer name: last aux / z loss values (detached), for logging
    losses: dict[str, float] = field(default_factory=dict)

    def update(self, batch: PackedBatch) -> None:
        def flat(t: torch.Tensor) -> torch.Tensor:
            return t.t().reshape(-1)  # [R, S] -> [S * R], megatron's order

        self.rows, self.seq_len = batch.num_rows, batch.seq_len
        self.attribute_table = batch.attributes
        self.attribute_index = flat(batch.attribute)
        self.modality = flat(batch.modality)
        self.seq_id = flat(batch.seq_id)
        self.task_id = batch.task_id
        self.num_queries = int((batch.loss.labels != -100).sum()) or 1

    def local(self, per_token: torch.Tensor) -> torch.Tensor:
        """This sequence-parallel rank's slice of a per-token tensor in megatron order."""
        if self.sp_size == 1:
            return per_token
        per_rank = per_token.shape[0] // self.sp_size
        return per_token[self.sp_rank * per_rank : (self.sp_rank + 1) * per_rank]

    def condition_keys(self) -> list[str]:
        """A readable key per attribute-table row ("10011000"), for statistics."""
        assert self.attribute_table is not None
        return ["".join(str(int(v)) for v in row) for row in self.attribute_table]


@dataclass
class Decision:
    """Where each local token goes. ``probs``/``routing_map``: [n, E]. Segment-constant routers
    also give ``rows`` [n] (condition row per token) and ``table_probs`` [A, E] for the grouped
    path."""

    probs: torch.Tensor
    routing_map: torch.Tensor
    rows: torch.Tensor | None = None
    table_probs: torch.Tensor | None = None


class ConditionalRouter(MegatronModule):
    """One routing decision for a pair of expert linears (qkv+out or fc1+fc2)."""

    def __init__(
        self,
        config: TransformerConfig,
        moe: MoEConfig,
        hidden_size: int,
        context: RoutingContext,
        name: str,
    ) -> None:
        super().__init__(config=config)
        self.strategy = moe.router
        self.num_experts = moe.num_experts
        self.topk = moe.topk
        self.noise_std = moe.resolved_noise_std()
        self.aux_coeff = moe.aux_loss_coeff
        self.z_coeff = moe.z_loss_coeff
        self.context_source = moe.context_source
        self.ctx = context
        self.name = name
        widths = {"modality": len(Modality), "task": context.num_tasks, "attribute": len(next(iter(ATTRIBUTES.values())))}
        if self.strategy in SEGMENT_CONSTANT:
            self.embed = torch.nn.Linear(widths[self.strategy], hidden_size)
            self.norm = torch.nn.LayerNorm(hidden_size)
        self.gate = torch.nn.Linear(hidden_size, self.num_experts, bias=False)
        torch.nn.init.normal_(self.gate.weight, std=config.init_method_std)
        # Under sequence parallelism each TP rank routes its own tokens: the gradients are
        # partial sums, all-reduced over TP by megatron for parameters flagged like this.
        for param in self.parameters():
            param.sequence_parallel = config.sequence_parallel

    # ------------------------------------------------------------------ logits
    def _table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Segment-constant conditions: (table [A, D], per-token row index [N])."""
        ctx = self.ctx
        if self.strategy == "attribute":
            return ctx.attribute_table, ctx.attribute_index
        if self.strategy == "modality":
            return torch.eye(len(Modality)), ctx.modality
        if ctx.task_id >= ctx.num_tasks:
            raise ValueError(f"task id {ctx.task_id} but the task router knows {ctx.num_tasks} "
                             f"tasks: task routing cannot route an unseen task")
        index = torch.full_like(ctx.modality, ctx.task_id)
        return torch.eye(ctx.num_tasks), index

    def _gate(self, features: torch.Tensor) -> torch.Tensor:
        if self.strategy in SEGMENT_CONSTANT:
            features = self.norm(self.embed(features.to(self.embed.weight.dtype)))
        return F.linear(features.float(), self.gate.weight.float())

    def _noisy(self, logits: torch.Tensor) -> torch.Tensor:
        if self.training and self.noise_std > 0:
            return logits + torch.randn_like(logits) * self.noise_std
        return logits

    def _select(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """logits [m, E] -> (sparse gates [m, E], routing map [m, E])."""
        top_logits, top_idx = logits.topk(self.topk, dim=-1)
        if self.topk == 1:
            gates = logits.softmax(-1).gather(-1, top_idx)
        else:
            gates = top_logits.softmax(-1)
        probs = torch.zeros_like(logits).scatter(-1, top_idx, gates)
        routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, top_idx, True)
        return probs, routing_map

    def clean_gates(self, conditions: torch.Tensor) -> torch.Tensor:
        """Noise-free sparse gates [A, E] for condition vectors [A, D] (segment-constant
        routers): what eval routing gives every token of each condition (used by folding)."""
        return self._select(self._gate(conditions))[0]

    def forward(self, hidden: torch.Tensor) -> tuple[Decision, torch.Tensor]:
        """hidden [n, h] (this rank's tokens) -> (decision, per-token clean logits [n, E])."""
        ctx = self.ctx
        if self.strategy in SEGMENT_CONSTANT:
            table, index = self._table()
            table_logits = self._gate(table)  # [A, E]
            table_probs, table_map = self._select(self._noisy(table_logits))
            rows = ctx.local(index)
            decision = Decision(table_probs[rows], table_map[rows], rows, table_probs)
            return decision, table_logits[rows]
        if self.strategy == "token":
            logits = self._gate(hidden)
            probs, routing_map = self._select(self._noisy(logits))
            return Decision(probs, routing_map), logits
        return self._context_route(hidden)

    def _context_route(self, hidden: torch.Tensor) -> tuple[Decision, torch.Tensor]:
        ctx = self.ctx
        full = hidden
        if ctx.sp_size > 1:  # pooling needs the whole sequence: gather the shards
            full = tensor_parallel.gather_from_sequence_parallel_region(
                hidden.view(-1, ctx.rows, hidden.shape[-1])
            ).reshape(-1, hidden.shape[-1])
        seq = ctx.seq_id
        num_seq = int(seq.max()) + 1
        valid = seq >= 0
        if self.context_source == "spe":
            # The first token of each sequence (megatron order is s-major: min over positions).
            order = torch.arange(seq.shape[0], device=seq.device)
            first = torch.full((num_seq,), seq.shape[0], dtype=torch.long, device=seq.device)
            first = first.scatter_reduce(0, seq[valid], order[valid], reduce="amin")
            pooled = full[first]
        else:
            pooled = torch.zeros(num_seq, full.shape[-1], dtype=full.dtype, device=full.device)
            pooled = pooled.index_add(0, seq[valid], full[valid])
            counts = torch.bincount(seq[valid], minlength=num_seq).clamp(min=1)
            pooled = pooled / counts[:, None].to(full.dtype)
        seq_logits = self._gate(pooled)  # [num_seq, E]
        seq_probs, seq_map = self._select(self._noisy(seq_logits))
        # Padding tokens (seq -1) borrow sequence 0's route; their outputs are never read.
        rows = ctx.local(seq.clamp(min=0))
        return Decision(seq_probs[rows], seq_map[rows], rows, seq_probs), seq_logits[rows]

    # ------------------------------------------------------------------ losses, statistics
    def attach_losses(self, output: torch.Tensor, decision: Decision, logits: torch.Tensor
                      ) -> torch.Tensor:
        """Attach the aux / z losses' gradients to ``output`` (no-op when both are off)."""
        ctx = self.ctx
        valid = ctx.local(ctx.seq_id) >= 0
        if ctx.collect_stats:
            self._count(decision, valid)
        if self.aux_coeff <= 0 and self.z_coeff <= 0:
            return output
        logits = logits[valid]
        total = torch.zeros((), device=output.device)
        if self.aux_coeff > 0:
            aux = switch_load_balancing_loss_func(
                probs=logits.softmax(-1),
                tokens_per_expert=decision.routing_map[valid].sum(0),
                total_num_tokens=max(int(valid.sum()), 1),
                topk=self.topk,
                num_experts=self.num_experts,
                moe_aux_loss_coeff=self.aux_coeff,
            )
            ctx.losses[f"{self.name}.aux"] = float(aux.detach())
            total = total + aux
        if self.z_coeff > 0:
            z = z_loss_func(logits, self.z_coeff)
            ctx.losses[f"{self.name}.z"] = float(z.detach())
            total = total + z
        # Our task losses are sums over queries divided later by the global query count; scale
        # by this micro-batch's queries so the coefficient means "per query on average".
        return MoEAuxLossAutoScaler.apply(output, total * ctx.num_queries)

    def _count(self, decision: Decision, valid: torch.Tensor) -> None:
        ctx = self.ctx
        keys = ctx.condition_keys()
        attr = ctx.local(ctx.attribute_index)
        chosen = decision.routing_map.detach().float()
        for row, key in enumerate(keys):
            mask = valid & (attr == row)
            if bool(mask.any()):
                slot = (self.name, key)
                counts = chosen[mask].sum(0).cpu()
                ctx.stats[slot] = ctx.stats.get(slot, torch.zeros(self.num_experts)) + counts
