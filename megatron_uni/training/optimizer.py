"""AdamW with the reference's parameter groups, warmup + cosine schedule, on megatron-core.

Weight decay (reference: 0.2) applies to the weight matrices of linears and experts only: norms,
biases, embeddings (token, position, type, temporal), routers' gates, logit scales and LayerScale
get none. megatron-core's distributed optimizer shards the state over data-parallel ranks (experts
over expert-data-parallel ranks) and clips the global gradient norm.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist

from megatron_uni.config import Config, to_dict

log = logging.getLogger(__name__)

# What a resumed run takes from its own config (unless checkpoint.keep_saved_schedule).
SCHEDULE_FIELDS = (("optim", "lr"), ("optim", "min_lr"), ("optim", "warmup_steps"),
                   ("optim", "decay_style"), ("optim", "weight_decay"), ("optim", "clip_grad"),
                   ("optim", "betas"), ("optim", "eps"), ("train", "steps"))
# Per param group, set from the config at build time and overwritten by a checkpoint's groups.
_GROUP_SETTINGS = ("max_lr", "min_lr", "betas", "eps", "wd_mult", "lr_mult")

# Name fragments of parameters that never decay (besides every 1-D parameter and bias).
_NO_DECAY = ("embeddings", "embedding", "temporal", ".router.", "logit_scale", "gamma", "norm")


def no_weight_decay(param: torch.Tensor, name: str) -> bool:
    """True for parameters the reference excludes from weight decay."""
    return param.dim() <= 1 or name.endswith(".bias") or any(f in name for f in _NO_DECAY)


def build_optimizer(cfg: Config, model_chunks: list[Any], use_cpu: bool, precision: str) -> Any:
    """megatron's optimizer (distributed when ``parallel.distributed_optimizer``) for the chunks."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer  # noqa: PLC0415
    from megatron.core.optimizer.optimizer_config import (  # noqa: PLC0415
        ParamKey,
        ParamWithNamePredicate,
    )
    from megatron.core.optimizer_param_scheduler import ParamGroupOverride  # noqa: PLC0415

    o = cfg.optim
    config = OptimizerConfig(
        optimizer="adam",  # megatron's adam is AdamW (decoupled weight decay)
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.betas[0],
        adam_beta2=o.betas[1],
        adam_eps=o.eps,
        clip_grad=o.clip_grad,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        params_dtype=torch.float32,
    )
    skip = ParamKey(with_name_predicate=ParamWithNamePredicate(
        name="uniperceiver_no_wd", fn=no_weight_decay))
    overrides = {skip: ParamGroupOverride(wd_mult=0.0)}
    if precision != "fp32":
        # Parameters kept in fp32 under bf16/fp16 (LayerScale) get a group of their own:
        # megatron-core 0.16.1's distributed optimizer orders a group's main parameters fp32
        # first, but indexes them (model_param_group_index_map, used by every checkpoint save and
        # load) in buffer order, so a group mixing fp32 and 16-bit parameters saves one
        # parameter's state under another's name.
        fp32 = ParamKey(with_name_predicate=ParamWithNamePredicate(
            name="uniperceiver_fp32_in_mixed_precision",
            fn=lambda param, name: param.dtype == torch.float32))
        overrides[fp32] = ParamGroupOverride(kept_fp32=True)  # type: ignore[typeddict-unknown-key]
    return get_megatron_optimizer(
        config,
        model_chunks,
        config_overrides=overrides,
        use_gloo_process_groups=not use_cpu,
    )


def build_scheduler(cfg: Config, optimizer: Any) -> Any:
    """Linear warmup to ``optim.lr`` then ``optim.decay_style`` decay to ``optim.min_lr`` at
    ``train.steps``; constant weight decay."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler  # noqa: PLC0415

    o = cfg.optim
    steps = cfg.train.steps
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=min(o.warmup_steps, max(steps - 1, 0)),
        lr_decay_steps=max(steps, 1),
        lr_decay_style=o.decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=max(steps, 1),
        wd_incr_style="constant",
        # A resumed run follows the current config (e.g. a longer train.steps), not the saved
        # one (checkpoint.keep_saved_schedule switches to the saved one: keep_saved_schedule()).
        override_opt_param_scheduler=True,
        use_checkpoint_opt_param_scheduler=False,
    )


def schedule_changes(saved_config: dict[str, Any], cfg: Config) -> list[str]:
    """``section.field old -> new`` for each of :data:`SCHEDULE_FIELDS` that differs between a
    checkpoint's config (its meta.json) and ``cfg``."""
    now = to_dict(cfg)
    out = []
    for section, name in SCHEDULE_FIELDS:
        old = saved_config.get(section, {}).get(name, now[section][name])
        new = now[section][name]
        if (list(old) if isinstance(old, (list, tuple)) else old) != (
                list(new) if isinstance(new, (list, tuple)) else new):
            out.append(f"{section}.{name} {old!r} -> {new!r}")
    return out


def group_settings(optimizer: Any) -> list[dict[str, Any]]:
    """The config-derived settings of every param group (take before loading a checkpoint)."""
    return [{k: g[k] for k in _GROUP_SETTINGS if k in g} for g in optimizer.param_groups]


def restore_group_settings(optimizer: Any, settings: list[dict[str, Any]]) -> None:
    """Put :func:`group_settings` back after ``optimizer.load_state_dict`` replaced the groups
    (the scheduler reads each group's max_lr / min_lr: without this the saved lr would win)."""
    groups = optimizer.param_groups
    if len(groups) != len(settings):
        raise ValueError(f"the checkpoint has {len(groups)} parameter groups, this run "
                         f"{len(settings)}")
    for group, values in zip(groups, settings):
        group.update(values)


def keep_saved_schedule(scheduler: Any) -> None:
    """Make ``scheduler.load_state_dict`` take the checkpoint's schedule (megatron's
    use_checkpoint_opt_param_scheduler)."""
    scheduler.override_opt_param_scheduler = False
    scheduler.use_checkpoint_opt_param_scheduler = True


def log_schedule_changes(saved_config: dict[str, Any], cfg: Config, keep: bool) -> None:
    """Rank 0 logs :func:`schedule_changes` of a resume, and which side wins."""
    changes = schedule_changes(saved_config, cfg)
    if not changes or (dist.is_initialized() and dist.get_rank() != 0):
        return
    if keep:
        log.warning("checkpoint.keep_saved_schedule=true: the checkpoint's schedule and optimizer "
                    "settings are kept, not this run's: %s (optim.clip_grad is not saved: this "
                    "run's applies)", "; ".join(changes))
    else:
        log.info("resumed with changed schedule / optimizer settings (this run's config wins): "
                 "%s", "; ".join(changes))
