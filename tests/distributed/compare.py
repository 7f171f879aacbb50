"""Compare a sharded model's gradients with a single-process reference, layout-agnostically.

``dist_checkpointing``'s sharded state dict tells, for every local parameter, which slice of the
global tensor it holds (TP splits, EP expert offsets, PP layer numbers). The single process
records each parameter's full gradient under its checkpoint key; a sharded run slices the same
key at its offsets and compares.
"""

from __future__ import annotations

from pathlib import Path

import torch


def sharded_tensors(model) -> list:
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    return [v for v in nested_values(model.sharded_state_dict()) if isinstance(v, ShardedTensor)]


def global_slices(sh) -> tuple[slice, ...]:
    """Index of this shard inside the global tensor (prepended axes included)."""
    local = (1,) * sh.prepend_axis_num + tuple(sh.local_shape)
    return tuple(slice(off, off + size) for off, size in zip(sh.global_offset, local))


def _grad(param: torch.Tensor) -> torch.Tensor:
    grad = getattr(param, "main_grad", None)
    return param.grad if grad is None else grad


def save_full_grads(model, path: Path) -> dict[str, torch.Tensor]:
    """Single process: every parameter's gradient under its checkpoint key."""
    grads: dict[str, torch.Tensor] = {}
    for sh in sharded_tensors(model):
        full = grads.setdefault(sh.key, torch.zeros(sh.global_shape))
        full[global_slices(sh)] = _grad(sh.data).reshape(full[global_slices(sh)].shape)
    torch.save(grads, path)
    return grads


def check_grads(model, path: Path, rtol: float, rank: int) -> tuple[list[str], float]:
    """Sharded run: compare local gradients with the reference; returns keys and worst error.

    The error of a tensor is max |got - expected| relative to the larger of max |expected| of
    that tensor and 1e-5 of the largest gradient entry of the whole model: some gradients are
    pure cancellation (a bias feeding a LayerNorm gets ~1e-10 against weights' ~1e-3), and
    there a different but equally correct summation order changes every digit.
    """
    ref = torch.load(path)
    floor = 1e-5 * max(float(g.abs().max()) for g in ref.values())
    checked, worst = [], 0.0
    for sh in sharded_tensors(model):
        expected = ref[sh.key][global_slices(sh)].reshape(sh.data.shape)
        got = _grad(sh.data).reshape(sh.data.shape)
        scale = max(float(expected.abs().max()), floor)
        err = float((got - expected).abs().max()) / scale
        worst = max(worst, err)
        assert err <= rtol, f"rank {rank}: gradient of {sh.key} off by {err:.2e} (relative)"
        checked.append(sh.key)
    return checked, worst
