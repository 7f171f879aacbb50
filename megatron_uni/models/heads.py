"""The one head every task shares: SPE feature -> LayerNorm -> projection -> L2 norm, cosine
similarity with candidate targets times a learnable logit scale (one per task family).

Shape legend: s rows' tokens per TP shard, R rows, S row length, h hidden, Q queries,
K targets (this rank), G targets after the data-parallel gather, B retrieval pairs per rank.

Losses are returned as a SUM over this rank's queries with the query count, megatron-core's
per-token convention (``calculate_per_token_loss``): the schedule adds the sums and counts of
all micro-batches and data-parallel ranks and divides once, so any layout averages over exactly
the same queries as a single process.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_uni.config import ModelConfig
from megatron_uni.batch import IGNORE_INDEX, TASK_FAMILIES, LossSpec, PackedBatch
from megatron_uni.parallel.autograd_collectives import all_gather_with_grad


class MatchingHead(MegatronModule):
    """Features, logits and losses for every task family."""

    def __init__(self, config: TransformerConfig, model: ModelConfig, dp_group: Any) -> None:
        super().__init__(config=config)
        self.norm = torch.nn.LayerNorm(model.hidden_size, eps=model.layernorm_epsilon)
        self.proj = torch.nn.Linear(model.hidden_size, model.hidden_size)
        torch.nn.init.normal_(self.proj.weight, std=model.init_method_std)
        torch.nn.init.zeros_(self.proj.bias)
        # log-parameterised like CLIP; exp() is clamped to logit_scale_max.
        self.logit_scale = torch.nn.Parameter(
            torch.full((len(TASK_FAMILIES),), math.log(model.logit_scale_init))
        )
        self.max_log_scale = math.log(model.logit_scale_max)
        self.dp_group = dp_group

    def scale(self, family: str) -> torch.Tensor:
        return self.logit_scale[TASK_FAMILIES.index(family)].clamp(max=self.max_log_scale).exp()

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[n, h]`` encoder outputs -> ``[n, h]`` unit-norm matching features (fp32)."""
        # Under bf16/fp16 megatron's Float16Module hands the last stage's output back in fp32;
        # the head's weights are in the model's precision.
        tokens = tokens.to(self.proj.weight.dtype)
        return F.normalize(self.proj(self.norm(tokens)).float(), dim=-1)

    def flat_tokens(self, hidden: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        """Encoder output ``[s, R, h]`` -> ``[R * S, h]`` in the batch's flat token order."""
        if self.config.sequence_parallel:
            # Every TP rank computes the same loss from the full sequence, so the backward of
            # the gather just takes this rank's slice (no sum over TP ranks).
            hidden = tensor_parallel.gather_from_sequence_parallel_region(
                hidden, tensor_parallel_output_grad=False
            )
        return hidden.transpose(0, 1).reshape(batch.num_rows * batch.seq_len, -1)

    def forward(
        self, hidden: torch.Tensor, batch: PackedBatch
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Loss sum, query count and metrics (sums) of one micro-batch."""
        spec = batch.loss
        tokens = self.flat_tokens(hidden, batch)
        queries = self.features(tokens[spec.query_index])
        anchor = None
        if spec.shared_sizes:
            gathered, anchor = self._shared_targets(tokens, spec)
        if spec.family == "retrieval":
            targets = self.features(tokens[spec.target_index])
            loss_sum, correct, count = self._retrieval(queries, targets, spec)
        elif spec.own_shared >= 0:
            loss_sum, correct, count = self._matching(queries, gathered[spec.own_shared], spec,
                                                      gathered=True)
        else:
            targets = self.features(tokens[spec.target_index])
            loss_sum, correct, count = self._matching(queries, targets, spec)
        if anchor is not None:
            # Every rank's backward must run the shared gather's backward (its all-reduce), also
            # where this rank's loss reads none of the sets (retrieval).
            loss_sum = loss_sum + anchor
        metrics = {  # the task's own loss, before its weight in the multi-task objective
            "loss": torch.stack([loss_sum.detach(), count.float()]),
            "accuracy": torch.stack([correct.float(), count.float()]),
        }
        return loss_sum * spec.loss_weight, count, metrics

    def _shared_targets(
        self, tokens: torch.Tensor, spec: LossSpec
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Per-rank mixing: every shared target set, gathered over the data-parallel group in
        ONE all-gather (a set per gather could run the backward all-reduces in a different
        order on ranks in different tasks), cut to each set's length; and a zero that ties the
        gather into the loss. Set i of rank d is rows [off_i, off_i + K_i) of rank d's block."""
        local = self.features(tokens[spec.shared_index])  # [sum K_i, h]
        everything = all_gather_with_grad(local, self.dp_group)  # [D * sum K_i, h]
        blocks = everything.view(-1, local.shape[0], local.shape[1])  # [D, sum K_i, h]
        gathered, offset = [], 0
        for size, total in zip(spec.shared_sizes, spec.shared_num_targets):
            gathered.append(blocks[:, offset : offset + size].reshape(-1, local.shape[1])[:total])
            offset += size
        return gathered, 0.0 * everything.sum()

    def _matching(
        self, queries: torch.Tensor, targets: torch.Tensor, spec: LossSpec,
        gathered: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if spec.split_targets and not gathered:
            targets = all_gather_with_grad(targets, self.dp_group)
        if spec.num_targets >= 0:
            targets = targets[: spec.num_targets]  # drop the padding of the last shard
        logits = self.scale(spec.family) * queries @ targets.t()  # [Q, G]
        valid = spec.labels != IGNORE_INDEX
        count = query_count(spec)
        if spec.soft_labels is not None:
            per_query = -(spec.soft_labels * logits.log_softmax(-1)).sum(-1)
            loss_sum = (per_query * valid).sum()
        else:
            loss_sum = F.cross_entropy(
                logits, spec.labels, ignore_index=IGNORE_INDEX,
                label_smoothing=spec.label_smoothing, reduction="sum",
            )
        hard = spec.labels if spec.soft_labels is None else spec.soft_labels.argmax(-1)
        correct = ((logits.argmax(-1) == hard) & valid).sum()
        return loss_sum, correct, count

    def _retrieval(
        self, queries: torch.Tensor, targets: torch.Tensor, spec: LossSpec
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # Negatives from every data-parallel rank: gather both sides with gradients; under
        # per-rank mixing only this rank's (the others may train other tasks).
        group = None if spec.local_negatives else self.dp_group
        all_queries = all_gather_with_grad(queries, group)  # [G, h]
        all_targets = all_gather_with_grad(targets, group)
        pairs = queries.shape[0]
        rank = _group_rank(group) if all_queries.shape[0] != pairs else 0
        labels = torch.arange(pairs, device=queries.device) + rank * pairs
        scale = self.scale(spec.family)
        i2t = scale * queries @ all_targets.t()  # [B, G]
        t2i = scale * targets @ all_queries.t()
        smooth = spec.label_smoothing
        loss_sum = 0.5 * (
            F.cross_entropy(i2t, labels, label_smoothing=smooth, reduction="sum")
            + F.cross_entropy(t2i, labels, label_smoothing=smooth, reduction="sum")
        )
        correct = (i2t.argmax(-1) == labels).sum()
        return loss_sum, correct, query_count(spec)


def query_count(spec: LossSpec) -> torch.Tensor:
    """[] long: the queries a micro-batch's loss sums over (the count the head returns):
    retrieval, its pairs; every other family, its labelled queries."""
    if spec.family == "retrieval":
        return torch.tensor(spec.query_index.shape[0], device=spec.query_index.device)
    return (spec.labels != IGNORE_INDEX).sum()


def _group_rank(group: Any) -> int:
    import torch.distributed as dist  # noqa: PLC0415

    return dist.get_rank(group=group)
