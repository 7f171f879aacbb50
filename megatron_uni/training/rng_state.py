"""RNG states as plain data (tensors, numbers, strings, dicts): what a checkpoint can hold and
load with ``torch.load(weights_only=True)`` (no numpy arrays, no tuples of Python internals).

    state = rng_state()          # save: Python, numpy, torch, megatron's tracker (and CUDA)
    set_rng_state(state)         # load: also the tuple format older versions saved
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    """This process's RNG states as plain data."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker  # noqa: PLC0415

    from megatron_uni.parallel import cpu_backend  # noqa: PLC0415

    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64),
                   "gauss": gauss},
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "tracker": dict(get_cuda_rng_tracker().get_states()),
    }
    if torch.cuda.is_available() and not cpu_backend.is_enabled():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state` output (or the tuple format of older checkpoints)."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker  # noqa: PLC0415

    py, npy = state["python"], state["numpy"]
    if isinstance(py, dict):
        py = (py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"])
    random.setstate(py)
    if isinstance(npy, dict):
        npy = (npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
               npy["has_gauss"], npy["cached_gaussian"])
    np.random.set_state(npy)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])
