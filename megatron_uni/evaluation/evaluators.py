"""Per-family evaluation of one task: classification, retrieval, MLM, captioning.

Shape legend: N samples, K targets, h hidden, I images/videos, T texts.

Each evaluator reads this data-parallel rank's share of the eval set, runs it through
:class:`ForwardRunner` in lockstep calls, and combines the shares over the data-parallel group
(sums of counts, or a gather of features put back in sample order), so every layout reports the
same numbers for the same weights:

- classification: zero-shot top-1 / top-5 of each clip against the class-name target set;
- retrieval: R@1/5/10 image->text and text->image over the whole eval set (every caption of
  every sample is a text);
- MLM: accuracy of the masked-token predictions against the vocabulary target set;
- captioning: greedy decoding (:mod:`~megatron_uni.evaluation.decoding`), corpus BLEU-4 against
  every reference caption.

Target sets are encoded once per task, split over the data-parallel ranks and gathered.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from megatron_uni.config import Config
from megatron_uni.data.task_plan import TaskPlan
from megatron_uni.data.tasks import target_shard
from megatron_uni.evaluation import inputs
from megatron_uni.evaluation.decoding import greedy_decode
from megatron_uni.evaluation.distributed import (
    all_gather_rows,
    all_sum,
    dp_group,
    share_from_last_stage,
)
from megatron_uni.evaluation.forward import ForwardRunner, lockstep
from megatron_uni.evaluation.inputs import EvalSample
from megatron_uni.evaluation.metrics import (
    bleu_from_statistics,
    bleu_statistics,
    cider_d,
    recall_at_k,
    topk_correct,
    words,
)
from megatron_uni.data.text_tokenizer import ClipTokenizer

logger = logging.getLogger(__name__)


@dataclass
class EvalContext:
    """What every evaluator needs: the model runner and this rank's place."""

    cfg: Config
    runner: ForwardRunner
    tokenizer: ClipTokenizer
    dp_rank: int
    dp_size: int
    microbatches_per_call: int = 8

    @property
    def device(self) -> torch.device:
        return self.runner.device

    @property
    def last(self) -> bool:
        return self.runner.is_last_stage


@dataclass
class TaskResult:
    """Metrics (fractions in [0, 1]) of one task, its sample count, and a few examples."""

    metrics: dict[str, float]
    num_samples: int
    examples: list[dict[str, Any]] = field(default_factory=list)
    # MoE models: per layer and condition, the share of tokens per expert (moe/stats.py)
    routing: dict[str, Any] = field(default_factory=dict)
    # Set when the model cannot run the task (task routing on a task that never trained): why
    refused: str | None = None


# --------------------------------------------------------------------------- helpers
def _features_at(index_of: Callable[[Any], torch.Tensor]):
    """An extractor: unit-norm features of the tokens ``index_of(batch)`` names."""

    def extract(head, batch, tokens):  # noqa: ANN001, ANN202
        return head.features(tokens[index_of(batch)])

    return extract


def _queries(batch) -> torch.Tensor:  # noqa: ANN001
    return batch.loss.query_index


def _targets(batch) -> torch.Tensor:  # noqa: ANN001
    return batch.loss.target_index


def _padded(groups: list[list[EvalSample]], total: int, dummy: EvalSample
            ) -> list[list[EvalSample]]:
    return groups + [[dummy]] * (total - len(groups))


def encode_texts(ctx: EvalContext, plan: TaskPlan, texts: Sequence[Sequence[int]], vocab: bool
                 ) -> torch.Tensor | None:
    """Features ``[len(texts), h]`` of this rank's "[SPE] text" sequences (last stage; None
    elsewhere). A collective: every rank calls, with its own texts (possibly none)."""
    rows = plan.num_rows  # every batch [rows, S]; how many texts fit may differ by rank
    longest = max((len(t) for t in texts), default=1)
    per_batch = inputs.texts_per_batch(plan, rows, longest)
    chunks = [list(texts[i : i + per_batch]) for i in range(0, len(texts), per_batch)]
    dummy = [(ctx.tokenizer.eot_id,)]
    found: list[torch.Tensor] = []
    for mine, total in lockstep(chunks, ctx.microbatches_per_call, ctx.device):
        batches = [inputs.text_batch(plan, t, vocab, rows)
                   for t in mine + [dummy] * (total - len(mine))]
        out = ctx.runner(batches, _features_at(_targets))
        if out is not None:
            found.extend(o.float().cpu() for o in out[: len(mine)])
    if not ctx.last:
        return None
    return torch.cat(found) if found else torch.zeros(0, ctx.cfg.model.hidden_size)


def encode_target_set(ctx: EvalContext, plan: TaskPlan, texts: Sequence[Sequence[int]],
                      vocab: bool) -> torch.Tensor | None:
    """Features ``[K, h]`` of a whole target set, in its order, on the last stage: each
    data-parallel rank encodes an equal shard, then the shards are gathered."""
    num = len(texts)
    shard = target_shard(num, ctx.dp_rank, ctx.dp_size)
    mine = [texts[min(i, num - 1)] for i in shard]  # the last shard is padded with repeats
    features = encode_texts(ctx, plan, mine, vocab)
    if features is None:
        return None
    return all_gather_rows(features, dp_group(), ctx.device)[:num].to(ctx.device)


def _input_calls(ctx: EvalContext, plan: TaskPlan):
    """``(real groups, padded groups)`` per lockstep call over this rank's micro-batches."""
    samples = inputs.eval_samples(ctx.cfg, plan, ctx.tokenizer, ctx.dp_rank, ctx.dp_size)
    groups = inputs.micro_batches(samples, plan.cfg.micro_batch_size)
    dummy = inputs.dummy_sample(plan, ctx.tokenizer)
    for mine, total in lockstep(groups, ctx.microbatches_per_call, ctx.device):
        yield mine, _padded(mine, total, dummy)


def _count(ctx: EvalContext, n: int) -> int:
    return int(all_sum(torch.tensor([n]), dp_group(), ctx.device)[0])


# --------------------------------------------------------------------------- families
def evaluate_classification(ctx: EvalContext, plan: TaskPlan) -> TaskResult:
    """Zero-shot top-1 / top-5 against the class names."""
    bank = encode_target_set(ctx, plan, plan.class_names, vocab=False)
    ks = (1, 5)
    sums = torch.zeros(3, dtype=torch.float64)  # top1, top5, labelled samples
    n = 0
    for mine, padded in _input_calls(ctx, plan):
        n += sum(len(g) for g in mine)
        out = ctx.runner([inputs.clip_batch(plan, g) for g in padded], _features_at(_queries))
        if out is None:
            continue
        for group, features in zip(mine, out):
            labels = torch.tensor([s.example.label for s in group], device=features.device)
            correct, count = topk_correct(features @ bank.t(), labels, ks)
            sums += torch.tensor([correct[1], correct[5], count], dtype=torch.float64)
    n = _count(ctx, n)
    metrics = None
    if ctx.last:
        sums = all_sum(sums, dp_group(), ctx.device)
        metrics = {f"top{k}": float(sums[i] / sums[2]) if sums[2] else float("nan")
                   for i, k in enumerate(ks)}
    return TaskResult(share_from_last_stage(metrics, ctx.device), n)


def evaluate_retrieval(ctx: EvalContext, plan: TaskPlan) -> TaskResult:
    """R@1/5/10 in both directions over the whole eval set."""
    image_features, image_index = [], []
    n = 0
    text_ids: list[tuple[int, ...]] = []
    text_key: list[tuple[int, int]] = []  # (sample index, caption number)
    for mine, padded in _input_calls(ctx, plan):
        for group in mine:
            n += len(group)
            for s in group:
                for k, caption in enumerate(s.references):
                    ids = tuple(ctx.tokenizer.encode(caption)[: plan.max_text_len])
                    if ids:
                        text_ids.append(ids)
                        text_key.append((s.index, k))
        out = ctx.runner([inputs.clip_batch(plan, g) for g in padded], _features_at(_queries))
        if out is not None:
            for group, features in zip(mine, out):
                image_features.append(features.float().cpu())
                image_index.extend(s.index for s in group)
    texts = encode_texts(ctx, plan, text_ids, vocab=False)
    n = _count(ctx, n)
    metrics = None
    if ctx.last:
        group = dp_group()
        width = ctx.cfg.model.hidden_size
        images = torch.cat(image_features) if image_features else torch.zeros(0, width)
        images = all_gather_rows(images, group, ctx.device)
        index = all_gather_rows(torch.tensor(image_index, dtype=torch.long), group, ctx.device)
        texts = all_gather_rows(texts, group, ctx.device)
        keys = all_gather_rows(torch.tensor(text_key, dtype=torch.long).reshape(-1, 2), group,
                               ctx.device)
        images, index = images[index.argsort()], index.sort().values
        per_sample = int(keys[:, 1].max()) + 1 if len(keys) else 1
        order = torch.argsort(keys[:, 0] * per_sample + keys[:, 1])  # (sample, caption) order
        texts, keys = texts[order], keys[order]
        owner = torch.searchsorted(index, keys[:, 0].contiguous())  # image row of each text
        has_text = torch.zeros(len(index), dtype=torch.bool)
        has_text[owner] = True
        if not bool(has_text.all()):
            logger.warning("task %s: %d samples without a usable caption are left out",
                           plan.name, int((~has_text).sum()))
            keep = has_text.nonzero().flatten()
            images = images[keep]
            owner = torch.searchsorted(keep, owner)
        sim = images.to(ctx.device) @ texts.to(ctx.device).t()
        metrics = recall_at_k(sim, owner)
    return TaskResult(share_from_last_stage(metrics, ctx.device), n)


def evaluate_mlm(ctx: EvalContext, plan: TaskPlan) -> TaskResult:
    """Accuracy of the masked-token predictions against the vocabulary."""
    bank = encode_target_set(ctx, plan, [(t,) for t in plan.vocab], vocab=True)
    sums = torch.zeros(2, dtype=torch.float64)  # correct, masked tokens with a label
    n = 0
    for mine, padded in _input_calls(ctx, plan):
        n += sum(len(g) for g in mine)
        batches = [inputs.mlm_input_batch(plan, g) for g in padded]
        out = ctx.runner(batches, _features_at(_queries))
        if out is None:
            continue
        for batch, features in zip(batches, out):
            correct, count = topk_correct(features @ bank.t(), batch.loss.labels.to(bank.device),
                                          (1,))
            sums += torch.tensor([correct[1], count], dtype=torch.float64)
    n = _count(ctx, n)
    metrics = None
    if ctx.last:
        sums = all_sum(sums, dp_group(), ctx.device)
        metrics = {"accuracy": float(sums[0] / sums[1]) if sums[1] else float("nan")}
    return TaskResult(share_from_last_stage(metrics, ctx.device), n)


def evaluate_captioning(ctx: EvalContext, plan: TaskPlan, num_examples: int = 3) -> TaskResult:
    """Greedy captions, corpus BLEU-4 and CIDEr-D against every reference caption.

    CIDEr-D's document frequencies span the whole evaluation set, so the word lists of every
    data-parallel rank are gathered (every rank then computes the same score)."""
    bank = encode_target_set(ctx, plan, [(t,) for t in plan.vocab], vocab=True)
    tok = ctx.tokenizer
    stats = torch.zeros(10, dtype=torch.float64)
    n = 0
    examples: list[dict[str, Any]] = []
    pairs: list[tuple[list[str], list[list[str]]]] = []
    for mine, padded in _input_calls(ctx, plan):
        clips = [inputs.clips_of(g) for g in padded]
        decoded = greedy_decode(ctx.runner, plan, clips, bank, eot_id=tok.eot_id)
        for group, captions in zip(mine, decoded):
            for s, ids in zip(group, captions):
                n += 1
                hypothesis = tok.decode(ids)
                # References go through the tokenizer too: the same cleaning as the hypotheses.
                refs = [tok.decode(tok.encode(r)) for r in s.references]
                pairs.append((words(hypothesis), [words(r) for r in refs]))
                stats += torch.tensor(bleu_statistics(*pairs[-1]), dtype=torch.float64)
                if len(examples) < num_examples:
                    examples.append({"sample": s.index, "caption": hypothesis, "references": refs})
    stats = all_sum(stats, dp_group(), ctx.device)  # every stage knows the decoded captions
    n = _count(ctx, n)
    everyone = _gather_objects(pairs, dp_group())
    cider, _ = cider_d([h for h, _ in everyone], [r for _, r in everyone])
    return TaskResult({"bleu4": bleu_from_statistics(stats.tolist()), "cider": cider}, n,
                      examples)


def _gather_objects(items: list[Any], group: Any) -> list[Any]:
    """Concatenation of every rank's ``items`` over ``group`` (group-rank order)."""
    import torch.distributed as dist  # noqa: PLC0415

    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return list(items)
    parts: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, items, group=group)
    return [item for part in parts for item in part]


EVALUATORS: dict[str, Callable[[EvalContext, TaskPlan], TaskResult]] = {
    "classification": evaluate_classification,
    "retrieval": evaluate_retrieval,
    "mlm": evaluate_mlm,
    "captioning": evaluate_captioning,
}


def evaluate_plan(ctx: EvalContext, plan: TaskPlan) -> TaskResult:
    """Evaluate one planned task (a collective over all ranks)."""
    return EVALUATORS[plan.family](ctx, plan)


def evaluation_tasks(cfg: Config, only: Iterable[str] | None = None) -> list[str]:
    """Tasks with ``eval_shards`` (held-out zero-shot tasks of weight 0 included), in config
    order; ``only`` narrows them down (an unknown or unevaluable name is an error)."""
    names = [n for n, t in cfg.data.tasks.items() if t.eval_shards]
    if only is None:
        return names
    wanted = list(only)
    for name in wanted:
        if name not in cfg.data.tasks:
            raise ValueError(f"no task {name!r} in data.tasks ({', '.join(cfg.data.tasks)})")
        if name not in names:
            raise ValueError(f"task {name!r} has no eval_shards to evaluate")
    return [n for n in names if n in wanted]
