"""The data position in checkpoints: one object per global micro-batch slot.

The training data order is a function of the step and of the global micro-batch slot
(:mod:`megatron_uni.data.loader`), not of the data-parallel size. So is its saved position:
``MultiTaskLoader.state_dict()`` holds the slots a rank reads, and the checkpoint stores one
``ShardedObject`` per slot (key ``loader_slots``, global shape ``[G]``, written by the slot's
data-parallel rank and replicated over its TP/PP/CP peers). At load each rank requests the slots
it reads now (:class:`DataSlots`), whatever data-parallel size saved them; ``meta.json`` records G
(``loader_slots``) so that another slot count is known before reading. With another G, or from a
checkpoint of the older per-data-parallel-rank format (``loader_state`` without
``loader_slots``), the data order restarts at the saved step by fast-forward, with a warning.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import torch.distributed as dist

log = logging.getLogger(__name__)


class DataSlots(NamedTuple):
    """Which data position a rank loads: ``total`` global micro-batch slots per step in this
    run, of which this rank reads ``mine`` (``MultiTaskLoader.num_slots`` / ``.slots``)."""

    total: int
    mine: range


def slot_objects(loader: dict | DataSlots) -> list[Any]:
    """One ShardedObject per global micro-batch slot: to save (``loader``: a
    ``MultiTaskLoader.state_dict()``, each object holds its common fields and its slot's entry) or
    to request (``loader``: the slots to load). A slot's TP/PP/CP peers hold replicas."""
    from megatron.core import parallel_state as ps  # noqa: PLC0415
    from megatron.core.dist_checkpointing import ShardedObject  # noqa: PLC0415

    replica = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
               ps.get_context_parallel_rank())
    if isinstance(loader, DataSlots):
        total, items = loader.total, [(g, None) for g in loader.mine]
    else:
        if "num_slots" not in loader or "slots" not in loader:
            raise ValueError("loader_state must be a MultiTaskLoader.state_dict() (with "
                             f"num_slots and slots); got keys {sorted(loader)}")
        total = int(loader["num_slots"])
        common = {k: v for k, v in loader.items() if k != "slots"}
        items = [(int(e["slot"]), {**common, "slots": [e]}) for e in loader["slots"]]
    return [ShardedObject("loader_slots", data, (total,), (g,), replica_id=replica)
            for g, data in items]


def join_slots(parts: list[dict]) -> dict:
    """The per-slot objects loaded back into one loader state (common fields of the first)."""
    return {**parts[0], "slots": [e for part in parts for e in part["slots"]]}


def data_position_usable(meta: dict, data_slots: DataSlots | None, step: int) -> bool:
    """Whether the saved data position can be loaded for ``data_slots``; says why not (once)."""
    if data_slots is None or not meta.get("loader_state"):
        return False
    saved = meta.get("loader_slots")
    if saved == data_slots.total:
        return True
    if not dist.is_initialized() or dist.get_rank() == 0:
        if saved is None:
            log.warning("the checkpoint's data position is in the older per-data-parallel-rank "
                        "format, which this version's data order cannot continue: the data "
                        "order restarts at step %d (fast-forward)", step)
        else:
            log.warning("the checkpoint's data position has %d global micro-batch slots per "
                        "step, this run %d (train.global_batch_size / train.micro_batch_size "
                        "changed): the data order restarts at step %d (fast-forward)",
                        saved, data_slots.total, step)
    return False
