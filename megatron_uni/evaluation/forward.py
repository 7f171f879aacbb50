"""Forward-only passes through megatron-core's pipeline schedule, collecting features.

Shape legend: R rows, S row length, h hidden, n items an extractor reads from one micro-batch.

    runner = ForwardRunner(model_chunks, device)
    outputs = runner(batches, extract)   # last stage: extract(...) of every batch; else None

The schedule (``forward_only=True``, ``collect_non_loss_data=True``) runs the micro-batches
through every pipeline stage and hands the last stage's encoder output to a "loss function"
that returns, instead of a loss, whatever ``extract(head, batch, tokens)`` computes from the
flat encoder output ``tokens [R*S, h]`` (gathered over sequence parallelism): features, argmax
predictions. The same code serves any TP / PP / EP layout.

Lockstep. Ranks that share an expert-parallel group exchange tokens in every MoE layer, and the
schedule moves activations between stages, so every rank must run the same number of schedule
calls with the same number of micro-batches; but data-parallel ranks may hold different numbers
of samples. :func:`lockstep` cuts a rank's micro-batches into calls and agrees on each call's
size over all ranks; a rank with fewer pads with dummy micro-batches whose outputs it drops.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from typing import Any, TypeVar

import torch

from megatron_uni.batch import PackedBatch
from megatron_uni.evaluation.distributed import is_last_stage, world_max
from megatron_uni.training.step import unwrap

T = TypeVar("T")

# extract(head, batch, tokens [R*S, h]) -> anything (tensors on the model's device)
Extract = Callable[[Any, PackedBatch, torch.Tensor], Any]


def lockstep(items: Iterable[T], per_call: int, device: torch.device
             ) -> Iterator[tuple[list[T], int]]:
    """``(this rank's next items, number every rank runs)`` until every rank is out of items;
    the number is the largest count over all ranks (a collective per call)."""
    if per_call < 1:
        raise ValueError(f"per_call must be >= 1, got {per_call}")
    it = iter(items)
    while True:
        chunk = list(itertools.islice(it, per_call))
        total = world_max(len(chunk), device)
        if total == 0:
            return
        yield chunk, total


def _collect(extract: Extract, model: Any, batch: PackedBatch, hidden: torch.Tensor,
             non_loss_data: bool = False) -> Any:
    head = model.head
    tokens = head.flat_tokens(hidden, batch)
    # Under a Float16Module the last stage's output comes back in fp32 while the head runs in
    # the model's dtype.
    return extract(head, batch, tokens.to(head.norm.weight.dtype))


class ForwardRunner:
    """Run this rank's stage of the model over micro-batches, forward only, in eval mode."""

    def __init__(self, model_chunks: Sequence[Any], device: torch.device) -> None:
        self.model = list(model_chunks)
        self.device = device

    @property
    def is_last_stage(self) -> bool:
        return is_last_stage()

    def _step(self, extract: Extract, batches: Iterator[PackedBatch], model: Any
              ) -> tuple[torch.Tensor, Any]:
        batch = next(batches).to(self.device)
        hidden = model(batch)
        return hidden, partial(_collect, extract, unwrap(model), batch)

    def __call__(self, batches: Sequence[PackedBatch], extract: Extract) -> list[Any] | None:
        """One schedule call over ``batches`` (one shape [R, S]); on the last pipeline stage the
        extracts of every batch in order, elsewhere None. Every rank of the pipeline (and of the
        expert-parallel group) must call with the same number of batches of the same shape."""
        from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: PLC0415

        if not batches:
            return [] if self.is_last_stage else None
        shapes = {(b.num_rows, b.seq_len) for b in batches}
        if len(shapes) != 1:
            raise ValueError(f"micro-batches of one call must share [rows, seq_len]; got {shapes}")
        ((rows, seq_len),) = shapes
        for chunk in self.model:
            chunk.eval()  # no DropPath, no gate noise
        with torch.no_grad():
            out = get_forward_backward_func()(
                forward_step_func=partial(self._step, extract),
                data_iterator=iter(batches),
                model=self.model,
                num_microbatches=len(batches),
                seq_length=seq_len,
                micro_batch_size=rows,
                forward_only=True,
                collect_non_loss_data=True,
            )
        if not self.is_last_stage:
            return None
        if len(out) != len(batches):
            raise RuntimeError(f"the schedule returned {len(out)} outputs for {len(batches)} "
                               "micro-batches")
        return list(out)
