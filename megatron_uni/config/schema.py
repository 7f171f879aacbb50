"""The configuration tree: one dataclass per section, defaults, per-field help, and the
rules that turn plain YAML values into typed fields.

`Config()` is a valid single-process CPU debug configuration. Choices are written once, as
`Literal[...]` annotations; `coerce` (used by the loader to build the tree and by `validate`
to re-check a tree edited in code) reads them, so a choice list never appears twice.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

# --------------------------------------------------------------------------- choices
RouterKind = Literal["token", "context", "modality", "task", "attribute"]
MoELayerPattern = Literal["all", "every_other", "none"]
MoELinear = Literal["qkv", "out", "fc1", "fc2"]
MoEExecution = Literal["auto", "dispatch", "grouped"]
TokenDispatcher = Literal["allgather", "alltoall"]
ContextSource = Literal["spe", "mean"]
Device = Literal["auto", "cpu", "cuda"]
Backend = Literal["auto", "nccl", "gloo"]
TaskSampling = Literal["per_step", "per_rank"]
TaskType = Literal["image_classification", "video_classification", "mlm", "captioning", "retrieval"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
DecayStyle = Literal["cosine", "linear", "constant"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]


class ConfigError(ValueError):
    """One configuration problem: which field, what is wrong, and how to fix it.

    `str()` reads `parallel.tp=3: <what is wrong>. Fix: <what to do>.`; the `field=value`
    prefix is left out when the error is not about one value (a missing file, say).
    """

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        value: Any = dataclasses.MISSING,
        fix: str | None = None,
    ) -> None:
        self.message = message
        self.field = field
        self.value = value
        self.fix = fix
        super().__init__(str(self))

    def __str__(self) -> str:
        text = self.message
        if self.field is not None and self.value is not dataclasses.MISSING:
            text = f"{self.field}={format_value(self.value)}: {text}"
        if self.fix:
            text = f"{_end_sentence(text)} Fix: {_end_sentence(self.fix)}"
        return text


def _end_sentence(text: str) -> str:
    return text if text.endswith((".", "?", "!")) else text + "."


def format_value(value: Any) -> str:
    """Render a value the way it would be written in YAML or an override."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    return str(value)


def _f(default: Any = dataclasses.MISSING, *, help: str, factory: Any = None) -> Any:
    """A dataclass field with its help text kept in `metadata["help"]`."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


# --------------------------------------------------------------------------- sections
@dataclass
class ModelConfig:
    """Encoder size and the fixed facts of Uni-Perceiver's tokenizers and scoring."""

    name: str = _f("debug", help="model name, recorded in the run dir")
    num_layers: int = _f(2, help="Transformer encoder layers")
    hidden_size: int = _f(64, help="width of every token")
    num_attention_heads: int = _f(4, help="attention heads; must divide hidden_size")
    ffn_hidden_size: int = _f(256, help="FFN inner width")
    patch_size: int = _f(16, help="conv patch embedding kernel and stride (pixels)")
    image_size: int = _f(32, help="largest image side the spatial position grid covers")
    spatial_position_scale: float = _f(
        1.0,
        help="patch coordinates are multiplied by this in the 2-D sin-cos spatial embedding (the "
        "reference's MODEL.POSEMBED_SCALE: 1.0 by default and in its 160 px stage 1; its 224 px "
        "stage 2 and fine-tuning configs use 160/224 = 0.714286, so a 14x14 grid spans the "
        "10x10 grid's positions); set it to the value of the checkpoint you import",
    )
    max_frames: int = _f(8, help="learned temporal embeddings (video frames)")
    frame_difference: bool = _f(
        False,
        help="video: add a patch embedding of each frame minus the previous one to that frame's "
        "tokens (an RGB-difference stream as in TSN; not in the reference model)",
    )
    vocab_size: int = _f(49411, help="CLIP BPE 49,408 + <|mask|>, <|gen|>, <|spe|>")
    max_text_positions: int = _f(512, help="learned text position embeddings")
    layernorm_epsilon: float = _f(1e-5, help="LayerNorm eps")
    layer_scale_init: float = _f(1e-3, help="LayerScale gamma init (kept in fp32)")
    drop_path_rate: float = _f(0.1, help="DropPath probability in every layer, in [0, 1)")
    init_method_std: float = _f(0.02, help="std of the normal weight init")
    logit_scale_init: float = _f(14.285714, help="initial logit scale (1/0.07)")
    logit_scale_max: float = _f(100.0, help="logit scale clamp")


@dataclass
class MoEConfig:
    """Conditional Mixture-of-Experts: which layers and linears are experts, and the router."""

    num_experts: int = _f(0, help="experts per MoE linear; 0 = dense model")
    topk: int = _f(2, help="experts chosen per routing decision")
    router: RouterKind = _f("attribute", help="what the gate reads")
    layers: MoELayerPattern | list[int] = _f(
        "every_other", help="MoE layers: all, every_other (0, 2, ...), none, or layer indices"
    )
    linears: list[MoELinear] = _f(
        help="linears that are MoE; out reuses qkv's decision, fc2 reuses fc1's",
        factory=lambda: ["qkv", "out", "fc1", "fc2"],
    )
    noise_std: float | None = _f(None, help="gate noise std in training; null = 1/num_experts")
    aux_loss_coeff: float = _f(0.0, help="load-balancing loss weight; 0 = off")
    z_loss_coeff: float = _f(0.0, help="router z-loss weight; 0 = off")
    execution: MoEExecution = _f(
        "auto", help="dispatch (token dispatch), grouped (per-condition merged experts), or auto: "
        "the cheaper of the two per layer and micro-batch by a FLOPs + bytes cost model "
        "(moe/linear.py choose_execution; dispatch for token/context routers)")
    auto_flops_per_byte: float | None = _f(
        None, help="auto's exchange rate: FLOPs that one byte of collective traffic costs; null = "
        "the device's default (cuda 2000, cpu 100)")
    unseen_task_route: str = _f(
        "refuse", help="task router on a task that never trained (weight 0): refuse (an error), "
        "or the name of a trained task whose route it takes"
    )
    token_dispatcher: TokenDispatcher = _f("allgather", help="megatron token dispatcher")
    context_source: ContextSource = _f("spe", help="context router input: SPE token or mean")

    @property
    def enabled(self) -> bool:
        """True when the model has experts at all."""
        return self.num_experts > 0

    def layer_indices(self, num_layers: int) -> list[int]:
        """Indices of the MoE layers for a model of `num_layers` layers."""
        if isinstance(self.layers, list):
            return sorted(self.layers)
        step = {"all": 1, "every_other": 2, "none": 0}[self.layers]
        return list(range(0, num_layers, step)) if step else []

    def resolved_noise_std(self) -> float:
        """Gate noise std; the reference uses 1/E when unset."""
        if self.noise_std is not None:
            return self.noise_std
        return 1.0 / self.num_experts if self.num_experts > 0 else 0.0


@dataclass
class ParallelConfig:
    """Parallel layout; data parallelism is whatever the world size leaves over."""

    tp: int = _f(1, help="tensor-parallel size")
    pp: int = _f(1, help="pipeline-parallel size (uniform stages)")
    ep: int = _f(1, help="expert-parallel size")
    etp: int | None = _f(None, help="expert tensor-parallel size; null = same as tp")
    cp: int = _f(1, help="context-parallel size (not supported yet; must be 1)")
    vpp: int | None = _f(None, help="virtual pipeline stages per rank (>= 2), null = off")
    sequence_parallel: bool | None = _f(
        None, help="null = on when tp > 1; MoE with tp > 1 requires it"
    )
    device: Device = _f("auto", help="auto = cuda when available, else cpu")
    backend: Backend = _f("auto", help="auto = nccl on cuda, gloo on cpu")
    distributed_optimizer: bool = _f(True, help="shard optimizer state over data parallel")
    timeout_minutes: int = _f(30, help="collective timeout")

    def expert_tp(self) -> int:
        """Effective expert tensor-parallel size (megatron's default: same as tp)."""
        return self.tp if self.etp is None else self.etp

    def sequence_parallel_enabled(self) -> bool:
        """Resolved sequence parallelism: explicit value, else on exactly when tp > 1."""
        return self.tp > 1 if self.sequence_parallel is None else self.sequence_parallel

    def dp(self, world_size: int) -> int:
        """Data-parallel size for dense parameters."""
        return world_size // (self.tp * self.pp * self.cp)

    def expert_dp(self, world_size: int) -> int:
        """Data-parallel size for expert parameters (megatron's expert layout)."""
        return world_size // (self.expert_tp() * self.ep * self.pp)


@dataclass
class TaskConfig:
    """One training task: its data, sampling weight, loss weight and batch shape."""

    type: TaskType = _f(help="task formulation")
    shards: str = _f("", help="webdataset shard pattern, relative to data.root")
    weight: float = _f(1.0, help="sampling weight (per-rank task draw)")
    loss_weight: float = _f(1.0, help="multiplier on this task's loss")
    micro_batch_size: int = _f(4, help="samples per micro-batch for this task")
    seq_len: int = _f(64, help="packed row length (tokens)")
    image_size: int = _f(32, help="input image side (pixels)")
    num_frames: int = _f(1, help="video frames per sample (1 = image)")
    target_set: str = _f("", help="shared candidate set (class names, vocab); '' = none")
    split_target_set: bool = _f(False, help="encode the target set split across DP ranks")
    label_smoothing: float = _f(0.0, help="label smoothing in [0, 1)")
    mixup: float = _f(0.0, help="mixup alpha; 0 = off (classification only)")
    cutmix: float = _f(0.0, help="cutmix alpha; 0 = off (classification only)")
    eval_shards: str = _f("", help="evaluation shard pattern; '' = no evaluation")
    video: bool | None = _f(
        None, help="inputs are videos (frame members); null = video_classification or frames > 1"
    )
    num_rows: int | None = _f(
        None, help="rows R of every micro-batch; null = worst case of the batch and target set"
    )
    max_text_len: int | None = _f(
        None, help="text tokens kept per MLM text or caption; null = as many as fit seq_len"
    )
    mask_prob: float = _f(
        0.15,
        help="MLM: fraction of words masked (80% <|spe|> as in the reference, 10% random, 10% "
        "kept)",
    )
    crop_scale: tuple[float, float] = _f(
        (0.08, 1.0), help="training random-resized-crop area range, written [lo, hi]"
    )
    hflip: float = _f(0.0, help="training horizontal-flip probability")
    rand_augment: str = _f("", help="timm RandAugment spec (e.g. rand-m9-mstd0.5-inc1); '' = off")
    crop_pct: float = _f(0.875, help="evaluation centre crop: resize to image_size / crop_pct first")


@dataclass
class DataConfig:
    """Where data lives and which tasks are trained."""

    root: str = _f("data/demo", help="directory shard patterns are relative to")
    num_workers: int = _f(0, help="DataLoader worker processes")
    seed: int = _f(1234, help="data order seed")
    max_bad_samples: int = _f(100, help="undecodable samples tolerated before failing")
    reader_streams: int = _f(
        4, help="shard streams per data-parallel rank; num_workers must divide it"
    )
    shuffle_buffer: int = _f(64, help="samples shuffled together within a shard (1 = file order)")
    prefetch_factor: int = _f(2, help="steps each loader worker prepares ahead")
    task_sampling: TaskSampling = _f(
        "per_rank", help="per_rank: each data-parallel replica (with the replicas one "
        "expert-parallel token exchange spans) draws its own task per step, as the reference's "
        "WeightedBatchSampler (better than per_step on the demo at 100-300 steps, README); "
        "per_step: one task per step for the whole global batch (data order independent of the "
        "data-parallel size)"
    )
    tasks: dict[str, TaskConfig] = _f(help="task name -> task", factory=dict)


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule."""

    lr: float = _f(1e-3, help="peak learning rate")
    min_lr: float = _f(0.0, help="learning rate at the end of decay")
    weight_decay: float = _f(0.2, help="AdamW weight decay (not on norms, biases, ...)")
    betas: tuple[float, float] = _f((0.9, 0.95), help="AdamW betas, written [b1, b2] in YAML")
    eps: float = _f(1e-6, help="AdamW eps")
    clip_grad: float = _f(0.1, help="gradient-norm clip; 0 = off")
    warmup_steps: int = _f(10, help="linear warmup steps")
    decay_style: DecayStyle = _f("cosine", help="decay after warmup")


@dataclass
class TrainConfig:
    """Loop length, batch sizes, precision."""

    run_dir: str = _f("runs/debug", help="run directory (config, logs, checkpoints)")
    steps: int = _f(100, help="optimizer steps")
    global_batch_size: int | None = _f(
        None, help="null = micro_batch_size * dp (no gradient accumulation)"
    )
    micro_batch_size: int = _f(4, help="samples per micro-batch per rank")
    seed: int = _f(1234, help="model init / dropout seed")
    precision: Precision = _f(
        "auto", help="auto = fp32 on CPU, bf16 on GPU; an explicit bf16/fp16 on CPU runs the "
        "mixed-precision path slowly (for testing it)"
    )
    recompute: bool = _f(False, help="full activation recomputation, one layer at a time")
    stop_at_step: int | None = _f(
        None, help="save and stop at this step (the LR schedule still spans train.steps); "
        "null = run to train.steps. For time-limited jobs and resume tests"
    )


@dataclass
class CheckpointConfig:
    """Saving and resuming."""

    save: str | None = _f(None, help="checkpoint dir; null = <run_dir>/checkpoints")
    load: str | None = _f(None, help="checkpoint to initialise a fresh run from (the run "
                          "dir's own newest checkpoint wins when there is one); null = none")
    load_optimizer: bool = _f(
        True, help="also restore optimizer state from checkpoint.load (false: weights only, "
        "e.g. after switching between the distributed and the plain optimizer); the run's own "
        "checkpoints restore it whenever they hold this optimizer's kind"
    )
    finetune: bool = _f(
        False, help="initialising from checkpoint.load: take its weights only and start at step "
        "0 with a fresh optimizer, schedule and data order (megatron's --finetune; e.g. "
        "pre-training stage 2 from stage 1). The run's own checkpoints still resume normally"
    )
    keep_saved_schedule: bool = _f(
        False, help="on resume, keep the checkpoint's lr schedule and optimizer settings (lr, "
        "min_lr, warmup, decay, weight decay, steps, Adam betas/eps); false: this run's config "
        "wins and the log lists what changed"
    )
    save_interval: int = _f(0, help="steps between saves; 0 = only at the end")
    keep_last: int = _f(2, help="checkpoints kept; 0 = keep all")


@dataclass
class LoggingConfig:
    """Console and TensorBoard logging."""

    log_interval: int = _f(10, help="steps between log lines")
    tensorboard: bool = _f(True, help="write TensorBoard events to the run dir")
    progress_bar: bool = _f(True, help="show a progress bar on rank 0")
    level: LogLevel = _f("INFO", help="Python logging level")


@dataclass
class Config:
    """The whole run configuration."""

    model: ModelConfig = _f(help="encoder", factory=ModelConfig)
    moe: MoEConfig = _f(help="conditional MoE", factory=MoEConfig)
    parallel: ParallelConfig = _f(help="parallel layout", factory=ParallelConfig)
    data: DataConfig = _f(help="data and tasks", factory=DataConfig)
    optim: OptimConfig = _f(help="optimizer", factory=OptimConfig)
    train: TrainConfig = _f(help="training loop", factory=TrainConfig)
    checkpoint: CheckpointConfig = _f(help="checkpoints", factory=CheckpointConfig)
    logging: LoggingConfig = _f(help="logging", factory=LoggingConfig)

    def save_dir(self) -> str:
        """Resolved checkpoint directory."""
        if self.checkpoint.save is not None:
            return self.checkpoint.save
        return f"{self.train.run_dir.rstrip('/')}/checkpoints"


# --------------------------------------------------------------------------- typed values
_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def join(path: str, key: str) -> str:
    """Dotted path of `key` under `path` ('' is the top level)."""
    return f"{path}.{key}" if path else key


# Keys that existed once and did nothing: a config naming one gets the reason, not a guess.
REMOVED_KEYS = {
    "model.activation": "the encoder's FFN always uses exact (erf) GELU, as the reference",
    "model.attention_backend": "core attention is always torch's scaled_dot_product_attention, "
    "which picks the fastest kernel for the packed mask",
    "moe.attribute_dim": "the attribute router's input width is the attribute table's (8 bits, "
    "megatron_uni.batch.ATTRIBUTES)",
    "train.eval_interval": "evaluation runs as its own entry point (python -m "
    "megatron_uni.evaluate) on a saved checkpoint",
    "checkpoint.async_save": "checkpoints are written synchronously",
}


def unknown_key_error(path: str, key: Any, valid: list[str]) -> ConfigError:
    """The error for a key that is not a field, suggesting the nearest valid one."""
    dotted = join(path, str(key))
    if dotted in REMOVED_KEYS:
        return ConfigError(f"'{dotted}' was removed: {REMOVED_KEYS[dotted]}", field=dotted,
                           fix="delete it from the config")
    close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
    if close:
        hint = join(path, close[0])
        return ConfigError(
            f"unknown key '{dotted}'; did you mean '{hint}'?", field=dotted, fix=f"use '{hint}'"
        )
    where = f"'{path}'" if path else "the top level"
    return ConfigError(
        f"unknown key '{dotted}'; valid keys under {where}: {', '.join(valid)}",
        field=dotted,
        fix="remove it or use one of the valid keys",
    )


def field_types(cls: type) -> dict[str, Any]:
    """Resolved annotations of a config dataclass (annotations are strings here)."""
    return typing.get_type_hints(cls)


_PLURALS = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}


def describe(annotation: Any) -> str:
    """Human words for a type annotation, used in error messages."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin is list:
        return f"a list of {_PLURALS.get(args[0], 'items, each ' + describe(args[0]))}"
    if origin is tuple:
        items = {_PLURALS.get(a, "values") for a in args if a is not Ellipsis}
        count = "" if Ellipsis in args else f"{len(args)} "
        return f"a list of {count}{items.pop() if len(items) == 1 else 'values'}"
    if origin is dict:
        inner = "settings" if dataclasses.is_dataclass(args[1]) else describe(args[1])
        return f"a mapping of name -> {inner}"
    if dataclasses.is_dataclass(annotation):
        return "a mapping of settings"
    names = {int: "an integer", float: "a number", bool: "true/false", str: "a string"}
    return names.get(annotation, "null" if annotation is type(None) else str(annotation))


def _type_error(value: Any, annotation: Any, path: str) -> ConfigError:
    got = type(value).__name__ if value is not None else "null"
    message = f"expected {describe(annotation)}, got {got}"
    fix = f"give {path} {describe(annotation)}"
    if typing.get_origin(annotation) is Literal:
        message = f"must be {describe(annotation)}"
        fix = f"set {path} to one of {', '.join(str(a) for a in typing.get_args(annotation))}"
    elif annotation is str and value is not None:
        fix += " (quote it, e.g. '\"" + format_value(value) + "\"')"
    return ConfigError(message, field=path, value=value, fix=fix)


def coerce(value: Any, annotation: Any, path: str) -> Any:
    """Check `value` against `annotation` and return it in the annotated type.

    Strict on purpose: an int field refuses 2.5 and "2", a bool field refuses 1. The only
    conversions are int -> float, list -> tuple, mapping -> dataclass, and numeric strings
    -> float, because PyYAML (YAML 1.1) reads `1e-5` as a string.
    """
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        arms = [a for a in args if a is not type(None)]
        errors: list[ConfigError] = []
        for arm in arms:
            try:
                return coerce(value, arm, path)
            except ConfigError as arm_error:
                errors.append(arm_error)
        # A list value is meant for the list arm: its error points at the bad element.
        for arm, error in zip(arms, errors, strict=True):
            if isinstance(value, (list, tuple)) and typing.get_origin(arm) in (list, tuple):
                raise error
        raise _type_error(value, annotation, path)
    if origin is Literal:
        # `type(...) is` so that True does not pass for a choice of 1.
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise _type_error(value, annotation, path)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _type_error(value, annotation, path)
        return [coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _type_error(value, annotation, path)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(
                f"expected {len(args)} values, got {len(value)}", field=path, value=value,
                fix=f"give {path} {describe(annotation)}",
            )
        pairs = enumerate(zip(value, args, strict=True))
        return tuple(coerce(v, a, f"{path}[{i}]") for i, (v, a) in pairs)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _type_error(value, annotation, path)
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ConfigError(
                    f"keys under {path} must be names (strings), got {key!r}",
                    field=join(path, str(key)),
                    fix="quote the key",
                )
            out[key] = coerce(item, args[1], join(path, key))
        return out
    if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        return _coerce_dataclass(value, annotation, path)
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            return float(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"config schema uses an unsupported annotation at {path}: {annotation}")
    raise _type_error(value, annotation, path)


def _coerce_dataclass(value: Any, cls: type, path: str) -> Any:
    """Build `cls` from a mapping (or re-check an instance), rejecting unknown keys."""
    if value is None:
        # An empty YAML section (`moe:` with every key commented out) means "all defaults".
        value = {}
    if isinstance(value, cls):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(cls)}
    if not isinstance(value, Mapping):
        raise _type_error(value, cls, path)
    hints = field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in value:
        if key not in hints:
            raise unknown_key_error(path, key, names)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in value:
            kwargs[f.name] = coerce(value[f.name], hints[f.name], join(path, f.name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            dotted = join(path, f.name)
            raise ConfigError(
                f"missing required key '{dotted}'",
                field=dotted,
                fix=f"set {dotted} to {describe(hints[f.name])}",
            )
    return cls(**kwargs)
