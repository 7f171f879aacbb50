"""One typed configuration tree: YAML with includes, dotted overrides, validation.

    cfg = load_config("configs/models/debug.yaml", ["moe.num_experts=8", "parallel.ep=2"])
    validate(cfg, world_size=8)          # once the launcher knows the world size

`megatron_uni.config.to_mcore.transformer_config` is the only builder of megatron-core's
`TransformerConfig`; it is not imported here so that reading a config never imports megatron.
"""

from megatron_uni.config.loader import apply_overrides, dump_yaml, load_config, to_dict
from megatron_uni.config.schema import (
    CheckpointConfig,
    Config,
    ConfigError,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    MoEConfig,
    OptimConfig,
    ParallelConfig,
    TaskConfig,
    TrainConfig,
)
from megatron_uni.config.validate import validate

__all__ = [
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "LoggingConfig",
    "ModelConfig",
    "MoEConfig",
    "OptimConfig",
    "ParallelConfig",
    "TaskConfig",
    "TrainConfig",
    "apply_overrides",
    "dump_yaml",
    "load_config",
    "to_dict",
    "validate",
]
