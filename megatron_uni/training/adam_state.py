"""Repairs megatron-core 0.16.1 needs around checkpoints of torch's Adam (no apex / Transformer
Engine installed); each touches only the optimizer passed in."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch


def _torch_adams(optimizer: Any) -> Iterator[tuple[Any, torch.optim.Optimizer]]:
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            yield opt, inner


def ensure_adam_state(optimizer: Any) -> None:
    """``DistributedOptimizer.state_dict()`` reads each parameter's ``step`` from torch's Adam
    state and fails before the first step (a save at step 0, a load into a fresh optimizer):
    create the state Adam would create lazily (zeros, step 0) -- only in an optimizer without
    any state, so that step counts never differ between parameters."""
    for _, inner in _torch_adams(optimizer):
        if len(inner.state) > 0:
            continue
        for param in (p for group in inner.param_groups for p in group["params"]):
            if not inner.state[param]:
                inner.state[param].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(param),
                                          exp_avg_sq=torch.zeros_like(param))


@contextlib.contextmanager
def loadable_adam(optimizer: Any) -> Iterator[None]:
    """Around ``optimizer.load_state_dict``: (1) megatron's ``_set_main_param_and_optimizer_
    states`` copies every key of the live Adam state, ``step`` included, from loaded tensors that
    never carry one (KeyError): hand it the live ``step`` (a no-op copy); (2) afterwards, give each
    parameter its own ``step`` tensor: megatron loads one shared by all, and torch's foreach Adam
    would add 1 to it once per parameter."""
    patched = []
    for opt, inner in _torch_adams(optimizer):
        setter = getattr(opt, "_set_main_param_and_optimizer_states", None)
        if setter is None or opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            continue

        def with_step(model_param: Any, tensors: dict, opt: Any = opt, setter: Any = setter,
                      inner: Any = inner) -> None:
            group, order = opt.model_param_group_index_map[model_param]
            live = inner.state[inner.param_groups[group]["params"][order]]
            setter(model_param, {"step": live["step"], **tensors} if "step" in live else tensors)

        opt._set_main_param_and_optimizer_states = with_step  # this instance, this load only
        patched.append(opt)
    try:
        yield
    finally:
        for opt in patched:
            del opt._set_main_param_and_optimizer_states
    for _, inner in _torch_adams(optimizer):
        for state in inner.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()
