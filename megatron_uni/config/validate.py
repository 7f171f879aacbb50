"""Checks on a whole `Config`: types and choices, single-field ranges, cross-field rules.

`validate` raises one `ConfigError` for the first problem found, naming the field and the fix,
so a user fixes one thing at a time with a precise pointer. Rules that need the world size
run only when it is given (the launcher knows it; the YAML does not).

Decisions recorded here:
- `parallel.sequence_parallel=true` with `tp == 1` is an error, not silently dropped:
  megatron refuses it too, and an explicit request that cannot be honoured should be loud.
- `parallel.vpp`, when set, must be >= 2 (1 virtual stage is no interleaving: write null).
- `optim.warmup_steps > train.steps` is allowed (short debug runs).
- `data.num_workers` must divide `data.reader_streams`: worker w serves the shard streams
  w, w + W, ..., so batches do not depend on the number of workers.
- Data rules here check single tasks; shards and target sets on disk are checked when
  the loader starts (`megatron_uni/data/task_plan.py`), also as `ConfigError`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from megatron_uni.config.schema import Config, ConfigError, TaskConfig, coerce


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0] if n > 0 else [1]


def _common_divisors(*values: int) -> list[int]:
    return _divisors(math.gcd(*values))


def _one_of(values: list[int]) -> str:
    return ", ".join(str(v) for v in values)


def _get(cfg: Config, path: str) -> object:
    obj: object = cfg
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


# --------------------------------------------------------------------------- single field
# (dotted field, lowest allowed value, allowed to equal it). None values (optional) skip.
_LOWER_BOUNDS: list[tuple[str, float, bool]] = [
    ("model.num_layers", 1, True),
    ("model.hidden_size", 1, True),
    ("model.num_attention_heads", 1, True),
    ("model.ffn_hidden_size", 1, True),
    ("model.patch_size", 1, True),
    ("model.image_size", 1, True),
    ("model.spatial_position_scale", 0, False),
    ("model.max_frames", 1, True),
    ("model.vocab_size", 1, True),
    ("model.max_text_positions", 1, True),
    ("model.layernorm_epsilon", 0, False),
    ("model.layer_scale_init", 0, True),
    ("model.drop_path_rate", 0, True),
    ("model.init_method_std", 0, False),
    ("model.logit_scale_init", 0, False),
    ("moe.num_experts", 0, True),
    ("moe.topk", 1, True),
    ("moe.noise_std", 0, True),
    ("moe.aux_loss_coeff", 0, True),
    ("moe.z_loss_coeff", 0, True),
    ("moe.auto_flops_per_byte", 0, True),
    ("parallel.tp", 1, True),
    ("parallel.pp", 1, True),
    ("parallel.ep", 1, True),
    ("parallel.etp", 1, True),
    ("parallel.cp", 1, True),
    ("parallel.vpp", 2, True),
    ("parallel.timeout_minutes", 1, True),
    ("data.num_workers", 0, True),
    ("data.max_bad_samples", 0, True),
    ("data.reader_streams", 1, True),
    ("data.shuffle_buffer", 1, True),
    ("data.prefetch_factor", 1, True),
    ("optim.lr", 0, True),
    ("optim.min_lr", 0, True),
    ("optim.weight_decay", 0, True),
    ("optim.eps", 0, False),
    ("optim.clip_grad", 0, True),
    ("optim.warmup_steps", 0, True),
    ("train.steps", 1, True),
    ("train.global_batch_size", 1, True),
    ("train.micro_batch_size", 1, True),
    ("checkpoint.save_interval", 0, True),
    ("checkpoint.keep_last", 0, True),
    ("logging.log_interval", 1, True),
]

_TASK_LOWER_BOUNDS: list[tuple[str, float, bool]] = [
    ("weight", 0, True),
    ("loss_weight", 0, True),
    ("micro_batch_size", 1, True),
    ("seq_len", 1, True),
    ("image_size", 1, True),
    ("num_frames", 1, True),
    ("label_smoothing", 0, True),
    ("mixup", 0, True),
    ("cutmix", 0, True),
    ("num_rows", 1, True),
    ("max_text_len", 1, True),
    ("mask_prob", 0, False),
    ("hflip", 0, True),
    ("crop_pct", 0, False),
]

# (task field, what it is) for fields that must lie in [.., 1].
_TASK_AT_MOST_ONE = [("mask_prob", "a fraction"), ("hflip", "a probability"),
                     ("crop_pct", "a fraction")]


def _check_bound(path: str, value: object, low: float, inclusive: bool) -> None:
    if value is None:
        return
    assert isinstance(value, (int, float))
    if value > low or (inclusive and value == low):
        return
    relation = ">=" if inclusive else ">"
    raise ConfigError(
        f"must be {relation} {low:g}", field=path, value=value,
        fix=f"set {path} to a value {relation} {low:g}",
    )


def _check_ranges(cfg: Config) -> None:
    for path, low, inclusive in _LOWER_BOUNDS:
        _check_bound(path, _get(cfg, path), low, inclusive)
    for name, task in cfg.data.tasks.items():
        for key, low, inclusive in _TASK_LOWER_BOUNDS:
            _check_bound(f"data.tasks.{name}.{key}", getattr(task, key), low, inclusive)
        if task.label_smoothing >= 1:
            raise ConfigError(
                "label smoothing must be < 1", field=f"data.tasks.{name}.label_smoothing",
                value=task.label_smoothing, fix="use a value in [0, 1), e.g. 0.1",
            )
        for key, what in _TASK_AT_MOST_ONE:
            if getattr(task, key) > 1:
                raise ConfigError(
                    f"must be {what} (at most 1)", field=f"data.tasks.{name}.{key}",
                    value=getattr(task, key), fix="use a value in (0, 1]",
                )
        low, high = task.crop_scale
        if not 0 < low <= high <= 1:
            raise ConfigError(
                "crop area range must satisfy 0 < lo <= hi <= 1",
                field=f"data.tasks.{name}.crop_scale", value=task.crop_scale,
                fix="use e.g. [0.08, 1.0]",
            )
    if cfg.model.drop_path_rate >= 1:
        raise ConfigError(
            "drop-path rate must be < 1 (1 drops every residual branch)",
            field="model.drop_path_rate", value=cfg.model.drop_path_rate,
            fix="use a value in [0, 1), e.g. 0.1",
        )
    for i, beta in enumerate(cfg.optim.betas):
        if not 0 <= beta < 1:
            raise ConfigError(
                "AdamW betas must lie in [0, 1)", field=f"optim.betas[{i}]", value=beta,
                fix="use e.g. optim.betas=[0.9,0.95]",
            )


# --------------------------------------------------------------------------- cross field
def _check_model(cfg: Config) -> None:
    m = cfg.model
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError(
            f"hidden size must be divisible by model.num_attention_heads ({m.num_attention_heads})",
            field="model.hidden_size", value=m.hidden_size,
            fix=f"set model.hidden_size to a multiple of {m.num_attention_heads}, or "
            f"model.num_attention_heads to one of {_one_of(_divisors(m.hidden_size))}",
        )
    if m.image_size % m.patch_size:
        raise ConfigError(
            f"image size must be a multiple of model.patch_size ({m.patch_size}) so patches "
            "tile the image", field="model.image_size", value=m.image_size,
            fix=f"set model.image_size to a multiple of {m.patch_size}",
        )
    if m.logit_scale_init > m.logit_scale_max:
        raise ConfigError(
            f"initial logit scale exceeds model.logit_scale_max ({m.logit_scale_max:g})",
            field="model.logit_scale_init", value=m.logit_scale_init,
            fix="lower model.logit_scale_init or raise model.logit_scale_max",
        )


def _check_tensor_pipeline(cfg: Config) -> None:
    m, p = cfg.model, cfg.parallel
    tp_ok = _one_of(_common_divisors(m.num_attention_heads, m.ffn_hidden_size))
    if m.num_attention_heads % p.tp:
        raise ConfigError(
            f"tensor-parallel size must divide model.num_attention_heads ({m.num_attention_heads})",
            field="parallel.tp", value=p.tp, fix=f"set parallel.tp to one of {tp_ok}",
        )
    if m.ffn_hidden_size % p.tp:
        raise ConfigError(
            f"tensor-parallel size must divide model.ffn_hidden_size ({m.ffn_hidden_size})",
            field="parallel.tp", value=p.tp, fix=f"set parallel.tp to one of {tp_ok}",
        )
    if p.cp != 1:
        raise ConfigError(
            "context parallelism is not supported yet (the field is reserved)",
            field="parallel.cp", value=p.cp, fix="set parallel.cp=1",
        )
    if m.num_layers % p.pp:
        raise ConfigError(
            f"pipeline-parallel size must divide model.num_layers ({m.num_layers}): stages are "
            "uniform", field="parallel.pp", value=p.pp,
            fix=f"set parallel.pp to one of {_one_of(_divisors(m.num_layers))}",
        )
    if p.vpp is not None:
        if p.pp == 1:
            raise ConfigError(
                "virtual pipeline stages need pipeline parallelism (parallel.pp > 1)",
                field="parallel.vpp", value=p.vpp, fix="set parallel.vpp=null or parallel.pp > 1",
            )
        if m.num_layers % (p.pp * p.vpp):
            per_rank = m.num_layers // p.pp
            ok = [d for d in _divisors(per_rank) if d >= 2]
            fix = f"set parallel.vpp to one of {_one_of(ok)}" if ok else "set parallel.vpp=null"
            raise ConfigError(
                f"model.num_layers ({m.num_layers}) must be divisible by parallel.pp * "
                f"parallel.vpp ({p.pp} * {p.vpp})", field="parallel.vpp", value=p.vpp, fix=fix,
            )
    sp = p.sequence_parallel
    if sp is True and p.tp == 1:
        raise ConfigError(
            "sequence parallelism splits activations over tensor-parallel ranks and needs "
            "parallel.tp > 1", field="parallel.sequence_parallel", value=sp,
            fix="set parallel.sequence_parallel=null (auto) or raise parallel.tp",
        )
    if sp is False and p.tp > 1 and cfg.moe.enabled:
        raise ConfigError(
            "megatron-core requires sequence parallelism for MoE with tensor parallelism",
            field="parallel.sequence_parallel", value=sp,
            fix="set parallel.sequence_parallel=null (auto) or true",
        )


def _check_experts(cfg: Config) -> None:
    m, moe, p = cfg.model, cfg.moe, cfg.parallel
    if not moe.enabled:
        if p.ep != 1:
            raise ConfigError(
                "expert parallelism needs experts, but moe.num_experts=0 (dense model)",
                field="parallel.ep", value=p.ep,
                fix="set parallel.ep=1, or moe.num_experts to a multiple of it",
            )
        if p.etp not in (None, 1, p.tp):
            raise ConfigError(
                "expert tensor parallelism has no experts to shard in a dense model",
                field="parallel.etp", value=p.etp, fix="set parallel.etp=null",
            )
        return
    if moe.num_experts % p.ep:
        raise ConfigError(
            f"expert-parallel size must divide moe.num_experts ({moe.num_experts})",
            field="parallel.ep", value=p.ep,
            fix=f"set parallel.ep to one of {_one_of(_divisors(moe.num_experts))}",
        )
    if not 1 <= moe.topk <= moe.num_experts:
        raise ConfigError(
            f"top-k must lie in [1, moe.num_experts={moe.num_experts}]",
            field="moe.topk", value=moe.topk, fix=f"set moe.topk between 1 and {moe.num_experts}",
        )
    etp = p.expert_tp()
    if m.ffn_hidden_size % etp or m.num_attention_heads % etp:
        # Attention projections are experts too, so expert-TP splits heads as well as FFN.
        ok = _one_of(_common_divisors(m.ffn_hidden_size, m.num_attention_heads))
        raise ConfigError(
            f"expert tensor-parallel size ({etp}) must divide model.ffn_hidden_size "
            f"({m.ffn_hidden_size}) and model.num_attention_heads ({m.num_attention_heads})",
            field="parallel.etp", value=p.etp, fix=f"set parallel.etp to one of {ok}",
        )
    if len(set(moe.linears)) != len(moe.linears):
        raise ConfigError(
            "moe.linears lists a linear twice", field="moe.linears", value=moe.linears,
            fix="list each of qkv, out, fc1, fc2 at most once",
        )
    if not moe.linears:
        raise ConfigError(
            "an MoE model needs at least one expert linear", field="moe.linears",
            value=moe.linears, fix="set moe.linears=[qkv,out,fc1,fc2] or moe.num_experts=0",
        )
    if isinstance(moe.layers, list):
        for i, layer in enumerate(moe.layers):
            if not 0 <= layer < m.num_layers:
                raise ConfigError(
                    f"layer index out of range [0, {m.num_layers})", field=f"moe.layers[{i}]",
                    value=layer, fix=f"use layer indices from 0 to {m.num_layers - 1}",
                )
        if len(set(moe.layers)) != len(moe.layers):
            raise ConfigError(
                "moe.layers lists a layer twice", field="moe.layers", value=moe.layers,
                fix="list each layer index once",
            )


def _check_stop(cfg: Config) -> None:
    stop = cfg.train.stop_at_step
    if stop is not None and not 1 <= stop <= cfg.train.steps:
        raise ConfigError(
            f"the run stops at a step in 1..train.steps ({cfg.train.steps})",
            field="train.stop_at_step", value=stop,
            fix=f"set train.stop_at_step between 1 and {cfg.train.steps}, or null",
        )


def _check_data(cfg: Config) -> None:
    tasks, d = cfg.data.tasks, cfg.data
    if tasks and not any(t.weight > 0 for t in tasks.values()):
        raise ConfigError(
            "every task has weight 0, so no task can be sampled", field="data.tasks",
            fix="give at least one data.tasks.<name>.weight a value > 0",
        )
    if d.num_workers > 0 and d.reader_streams % d.num_workers:
        # Worker w serves the streams s with s % num_workers == w; batches then do not depend
        # on the number of workers (data/loader.py).
        ok = _one_of(_divisors(d.reader_streams))
        raise ConfigError(
            f"loader workers must divide data.reader_streams ({d.reader_streams})",
            field="data.num_workers", value=d.num_workers,
            fix=f"set data.num_workers to 0 or one of {ok}, or data.reader_streams to a "
            f"multiple of {d.num_workers}",
        )
    route = cfg.moe.unseen_task_route
    if route != "refuse" and tasks and (route not in tasks or tasks[route].weight <= 0):
        trained = [n for n, t in tasks.items() if t.weight > 0]
        raise ConfigError(
            f"moe.unseen_task_route names {route!r}, which is not a trained task",
            field="moe.unseen_task_route", value=route,
            fix=f"use refuse or one of {', '.join(trained)} (tasks with weight > 0)",
        )
    for name, task in tasks.items():
        _check_task(cfg, name, task)


def _check_task(cfg: Config, name: str, task: TaskConfig) -> None:
    path = f"data.tasks.{name}"
    if task.num_frames > cfg.model.max_frames:
        raise ConfigError(
            f"more frames than model.max_frames ({cfg.model.max_frames}) temporal embeddings",
            field=f"data.tasks.{name}.num_frames", value=task.num_frames,
            fix=f"use at most {cfg.model.max_frames} frames or raise model.max_frames",
        )
    if task.image_size % cfg.model.patch_size:
        raise ConfigError(
            f"image size must be a multiple of model.patch_size ({cfg.model.patch_size})",
            field=f"data.tasks.{name}.image_size", value=task.image_size,
            fix=f"use a multiple of {cfg.model.patch_size}",
        )
    classification = task.type in ("image_classification", "video_classification")
    for key in ("mixup", "cutmix"):
        if getattr(task, key) > 0 and not classification:
            raise ConfigError(
                f"{key} mixes images and their class labels, so it applies to classification "
                f"only, not {task.type}", field=f"{path}.{key}", value=getattr(task, key),
                fix=f"set {path}.{key}=0",
            )
    if task.type == "image_classification" and task.video:
        raise ConfigError(
            "image classification reads images, not videos", field=f"{path}.video",
            value=task.video, fix=f"set {path}.video=null or {path}.type=video_classification",
        )
    if task.video is False and (task.type == "video_classification" or task.num_frames > 1):
        raise ConfigError(
            "inputs with several frames (or video classification) are videos",
            field=f"{path}.video", value=task.video,
            fix=f"set {path}.video=null (or true), or {path}.num_frames=1",
        )
    if task.type == "image_classification" and task.num_frames > 1:
        raise ConfigError(
            "an image is one frame", field=f"{path}.num_frames", value=task.num_frames,
            fix=f"set {path}.num_frames=1 or {path}.type=video_classification",
        )
    if task.type == "retrieval" and (task.target_set or task.split_target_set):
        key = "target_set" if task.target_set else "split_target_set"
        raise ConfigError(
            "retrieval scores each input against the other captions of the batch; it has no "
            "shared target set", field=f"{path}.{key}", value=getattr(task, key),
            fix=f"remove {path}.{key}",
        )
    if task.rand_augment and not task.rand_augment.startswith("rand"):
        raise ConfigError(
            "not a timm RandAugment spec", field=f"{path}.rand_augment", value=task.rand_augment,
            fix="write e.g. rand-m9-mstd0.5-inc1, or '' for none",
        )


def _check_optim(cfg: Config) -> None:
    if cfg.optim.min_lr > cfg.optim.lr:
        raise ConfigError(
            f"minimum learning rate exceeds optim.lr ({cfg.optim.lr:g})", field="optim.min_lr",
            value=cfg.optim.min_lr, fix="set optim.min_lr <= optim.lr",
        )


def _check_world_size(cfg: Config, world_size: int) -> None:
    p = cfg.parallel
    if world_size < 1:
        raise ConfigError("world size must be >= 1", field="world_size", value=world_size)
    dense = p.tp * p.pp * p.cp
    expert = p.expert_tp() * p.ep * p.pp
    step = math.lcm(dense, expert)
    sizes = _one_of([step * k for k in (1, 2, 4)])
    for product, what in ((dense, "tp * pp * cp"), (expert, "etp * ep * pp")):
        if world_size % product:
            raise ConfigError(
                f"world size must be a multiple of {what} = {product} "
                f"(tp={p.tp}, pp={p.pp}, cp={p.cp}, etp={p.expert_tp()}, ep={p.ep})",
                field="world_size", value=world_size,
                fix=f"launch a multiple of {step} processes (e.g. {sizes}), or shrink the "
                f"parallel sizes so both products divide {world_size}",
            )
    gbs = cfg.train.global_batch_size
    if gbs is not None:
        per_step = cfg.train.micro_batch_size * p.dp(world_size)
        if gbs % per_step:
            lower, upper = max(per_step, gbs - gbs % per_step), (gbs // per_step + 1) * per_step
            raise ConfigError(
                f"global batch size must be a multiple of train.micro_batch_size * dp "
                f"({cfg.train.micro_batch_size} * {p.dp(world_size)} = {per_step})",
                field="train.global_batch_size", value=gbs,
                fix=f"set train.global_batch_size to e.g. {lower} or {upper} (or null)",
            )


_CHECKS: list[Callable[[Config], None]] = [
    _check_ranges,
    _check_model,
    _check_tensor_pipeline,
    _check_experts,
    _check_stop,
    _check_data,
    _check_optim,
]


def validate(cfg: Config, world_size: int | None = None) -> Config:
    """Check `cfg` and return it unchanged; raise `ConfigError` for the first problem.

    Types and choices are re-checked with the schema's own rules, so a tree edited in code
    (`cfg.parallel.device = "tpu"`) is caught as surely as a bad YAML value.
    """
    checked = coerce(cfg, Config, "")  # a typed copy: the rules below can trust the types
    for check in _CHECKS:
        check(checked)
    if world_size is not None:
        _check_world_size(checked, world_size)
    return cfg
