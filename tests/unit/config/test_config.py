"""Config tree: YAML + includes + overrides, strict types, validation rules, to_mcore mapping."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megatron_uni.config import (
    Config,
    ConfigError,
    TaskConfig,
    apply_overrides,
    dump_yaml,
    load_config,
    to_dict,
    to_mcore,
    validate,
)
from megatron_uni.config.to_mcore import resolved_precision, torch_dtype, transformer_config

REPO = Path(__file__).resolve().parents[3]
DEBUG_YAML = REPO / "configs" / "models" / "debug.yaml"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def error_of(overrides: list[str], world_size: int | None = None) -> ConfigError:
    """The ConfigError raised by defaults + overrides (+ world size rules)."""
    with pytest.raises(ConfigError) as info:
        cfg = apply_overrides(Config(), overrides)
        validate(cfg, world_size=world_size)
    return info.value


# --------------------------------------------------------------------------- defaults
def test_defaults_are_valid_and_match_load_without_file() -> None:
    cfg = Config()
    assert validate(cfg) is cfg
    validate(cfg, world_size=1)
    assert load_config(None) == cfg
    assert cfg.parallel.dp(8) == 8 and cfg.save_dir() == "runs/debug/checkpoints"


def test_debug_model_yaml() -> None:
    m = load_config(DEBUG_YAML).model
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.ffn_hidden_size) == (
        2, 64, 4, 256,
    )


def test_config_error_format() -> None:
    err = error_of(["parallel.tp=3"])
    assert err.field == "parallel.tp"
    assert str(err) == (
        "parallel.tp=3: tensor-parallel size must divide model.num_attention_heads (4). "
        "Fix: set parallel.tp to one of 1, 2, 4."
    )
    assert err.fix == "set parallel.tp to one of 1, 2, 4"
    assert isinstance(err, ValueError)


# --------------------------------------------------------------------------- YAML + overrides
def test_include_merge_and_overrides(tmp_path: Path) -> None:
    write(tmp_path / "models" / "base.yaml", f"include: {DEBUG_YAML}\nmoe:\n  num_experts: 4\n")
    write(tmp_path / "tasks.yaml", "data:\n  tasks:\n    coco_cap: {type: captioning}\n"
          "    in1k: {type: image_classification, weight: 2.0}\n")
    run = write(tmp_path / "runs" / "run.yaml", (
        "include: [../models/base.yaml, ../tasks.yaml]\n"
        "model: {num_layers: 4}\n"
        "moe: {topk: 1}\n"
        "checkpoint: {load: some/ckpt}\n"
    ))
    cfg = load_config(run, [
        "parallel.tp=2",
        "moe.layers=[0,2]",
        "checkpoint.load=null",
        "data.tasks.coco_cap.weight=0.5",
        "data.tasks.wiki.type=mlm",
        "optim.lr=1e-4",
        "optim.betas=[0.9,0.98]",
    ])
    assert cfg.model.hidden_size == 64 and cfg.model.num_layers == 4  # include, then own keys
    assert (cfg.moe.num_experts, cfg.moe.topk, cfg.moe.layers) == (4, 1, [0, 2])
    assert cfg.parallel.tp == 2 and isinstance(cfg.parallel.tp, int)
    assert cfg.checkpoint.load is None
    assert cfg.data.tasks["coco_cap"] == TaskConfig(type="captioning", weight=0.5)
    assert cfg.data.tasks["in1k"].weight == 2.0
    assert cfg.data.tasks["wiki"].type == "mlm"
    assert cfg.optim.lr == 1e-4 and cfg.optim.betas == (0.9, 0.98)


def test_later_include_wins_and_diamond_is_not_a_cycle(tmp_path: Path) -> None:
    write(tmp_path / "d.yaml", "train: {steps: 5}\n")
    write(tmp_path / "a.yaml", "include: d.yaml\ntrain: {seed: 1}\n")
    write(tmp_path / "b.yaml", "include: d.yaml\ntrain: {seed: 2}\n")
    cfg = load_config(write(tmp_path / "top.yaml", "include: [a.yaml, b.yaml]\n"))
    assert (cfg.train.steps, cfg.train.seed) == (5, 2)


def test_include_cycle(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "include: b.yaml\n")
    write(tmp_path / "b.yaml", "include: a.yaml\n")
    with pytest.raises(ConfigError, match="include cycle: .*a.yaml -> .*b.yaml -> .*a.yaml"):
        load_config(tmp_path / "a.yaml")


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not found: .*missing.yaml"):
        load_config(write(tmp_path / "inc.yaml", "include: missing.yaml\n"))
    bad = write(tmp_path / "bad.yaml", "model:\n  num_layers: 2\n  hidden_size: [64\n")
    with pytest.raises(ConfigError, match=r"YAML syntax error in .*bad.yaml, line \d+"):
        load_config(bad)
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(write(tmp_path / "list.yaml", "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="include"):
        load_config(write(tmp_path / "inc2.yaml", "include: {a: 1}\n"))


def test_round_trip(tmp_path: Path) -> None:
    cfg = apply_overrides(Config(), [
        "model.num_layers=4", "moe.num_experts=8", "moe.layers=[1,3]", "moe.noise_std=0.0",
        "parallel.etp=1", "parallel.sequence_parallel=false", "optim.betas=[0.8,0.9]",
        "data.tasks.cap.type=captioning", "data.tasks.cap.target_set=vocab",
        "checkpoint.save=/tmp/x", "train.global_batch_size=32",
    ])
    plain = to_dict(cfg)
    assert plain["optim"]["betas"] == [0.8, 0.9]  # tuples become YAML lists
    loaded = load_config(dump_yaml(cfg, tmp_path / "out" / "resolved.yaml"))
    assert loaded == cfg
    assert load_config(dump_yaml(Config(), tmp_path / "d.yaml")) == Config()


def test_apply_overrides_returns_new_config() -> None:
    cfg = Config()
    new = apply_overrides(cfg, ["train.steps=7"])
    assert new.train.steps == 7 and cfg.train.steps == 100


# --------------------------------------------------------------------------- unknown keys
def test_unknown_keys_in_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path / "a.yaml", "paralel: {tp: 2}\n"))
    assert info.value.field == "paralel"
    assert "did you mean 'parallel'?" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path / "b.yaml", "parallel: {tpp: 2}\n"))
    assert str(info.value).startswith("unknown key 'parallel.tpp'; did you mean 'parallel.tp'?")
    hint = "'data.tasks.x.wieght'; did you mean 'data.tasks.x.weight'"
    with pytest.raises(ConfigError, match=hint):
        load_config(write(tmp_path / "c.yaml", "data: {tasks: {x: {type: mlm, wieght: 1}}}\n"))


def test_unknown_keys_in_overrides() -> None:
    err = error_of(["parallel.tpp=2"])
    assert err.field == "parallel.tpp" and "did you mean 'parallel.tp'?" in str(err)
    err = error_of(["model.zzzzz=1"])
    assert "valid keys under 'model'" in str(err) and "num_layers" in str(err)
    assert "did you mean 'moe'" in str(error_of(["mooe.num_experts=2"]))
    assert "not a section" in str(error_of(["model.hidden_size.x=1"]))
    with pytest.raises(ConfigError, match="missing required key 'data.tasks.t.type'"):
        apply_overrides(Config(), ["data.tasks.t.weight=1"])


@pytest.mark.parametrize("override", ["model.activation=gelu", "model.attention_backend=sdpa",
                                      "moe.attribute_dim=4", "train.eval_interval=10",
                                      "checkpoint.async_save=true"])
def test_removed_keys_say_why(override: str) -> None:
    """Fields that did nothing are gone; naming one says why instead of guessing a near key
    (moe.attribute_dim=4 used to pass validation and crash at the first step)."""
    err = error_of([override])
    assert "was removed" in str(err) and err.field == override.split("=")[0]


@pytest.mark.parametrize("override", ["parallel.tp", "=3", "parallel..tp=2"])
def test_malformed_override(override: str) -> None:
    assert "key=value" in str(error_of([override]))


# --------------------------------------------------------------------------- types and choices
@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("parallel.tp=abc", "parallel.tp"),
        ("parallel.tp=2.5", "parallel.tp"),
        ("parallel.tp=true", "parallel.tp"),
        ("parallel.tp=null", "parallel.tp"),
        ("optim.lr=abc", "optim.lr"),
        ("logging.tensorboard=1", "logging.tensorboard"),
        ("model.name=123", "model.name"),
        ("optim.betas=[0.9]", "optim.betas"),
        ("moe.layers=[0,x]", "moe.layers[1]"),
        ("moe.layers=3", "moe.layers"),
        ("data.tasks=[1]", "data.tasks"),
        ("model=3", "model"),
    ],
)
def test_bad_types(override: str, field: str) -> None:
    assert error_of([override]).field == field


def test_lenient_conversions() -> None:
    cfg = apply_overrides(Config(), ["optim.lr=1", "model.layernorm_epsilon=1e-6",
                                     "parallel.etp=null", "moe.noise_std=0"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.model.layernorm_epsilon == 1e-6 and cfg.moe.noise_std == 0.0


@pytest.mark.parametrize(
    ("override", "field", "choices"),
    [
        ("parallel.device=tpu", "parallel.device", "'auto', 'cpu', 'cuda'"),
        ("moe.router=random", "moe.router", "'token', 'context', 'modality', 'task', 'attribute'"),
        ("moe.linears=[qkv,bogus]", "moe.linears[1]", "'qkv', 'out', 'fc1', 'fc2'"),
        ("moe.layers=sometimes", "moe.layers", "'all', 'every_other', 'none'"),
        ("train.precision=fp8", "train.precision", "'auto', 'fp32', 'bf16', 'fp16'"),
        ("data.tasks.t.type=vqa", "data.tasks.t.type", "'image_classification'"),
    ],
)
def test_bad_choices(override: str, field: str, choices: str) -> None:
    err = error_of([override])
    assert err.field == field and choices in str(err)


def test_validate_catches_edits_in_code() -> None:
    cfg = Config()
    cfg.parallel.device = "tpu"  # type: ignore[assignment]
    with pytest.raises(ConfigError, match="parallel.device=tpu"):
        validate(cfg)


# --------------------------------------------------------------------------- rules
MOE = ["moe.num_experts=4"]


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["model.num_layers=0"], "model.num_layers"),
        (["parallel.tp=0"], "parallel.tp"),
        (["optim.lr=-1"], "optim.lr"),
        (["model.drop_path_rate=1.0"], "model.drop_path_rate"),
        (["model.drop_path_rate=-0.1"], "model.drop_path_rate"),
        (["optim.betas=[0.9,1.0]"], "optim.betas[1]"),
        (["optim.min_lr=0.1"], "optim.min_lr"),
        (["model.hidden_size=66"], "model.hidden_size"),
        (["model.image_size=40"], "model.image_size"),
        (["parallel.tp=8"], "parallel.tp"),
        (["model.ffn_hidden_size=254", "parallel.tp=4"], "parallel.tp"),
        (["parallel.pp=3"], "parallel.pp"),
        (["parallel.pp=1", "parallel.vpp=2"], "parallel.vpp"),
        (["model.num_layers=4", "parallel.pp=2", "parallel.vpp=4"], "parallel.vpp"),
        (["model.num_layers=4", "parallel.pp=2", "parallel.vpp=1"], "parallel.vpp"),
        (["parallel.cp=2"], "parallel.cp"),
        (["moe.num_experts=6", "parallel.ep=4"], "parallel.ep"),
        ([*MOE, "moe.topk=5"], "moe.topk"),
        ([*MOE, "moe.topk=0"], "moe.topk"),
        ([*MOE, "parallel.etp=8"], "parallel.etp"),
        ([*MOE, "model.ffn_hidden_size=250", "parallel.etp=4"], "parallel.etp"),
        (["parallel.ep=2"], "parallel.ep"),
        (["parallel.etp=2"], "parallel.etp"),
        ([*MOE, "parallel.tp=2", "parallel.sequence_parallel=false"], "parallel.sequence_parallel"),
        (["parallel.sequence_parallel=true"], "parallel.sequence_parallel"),
        ([*MOE, "moe.layers=[0,2]"], "moe.layers[1]"),
        ([*MOE, "moe.layers=[-1]"], "moe.layers[0]"),
        ([*MOE, "moe.layers=[1,1]"], "moe.layers"),
        ([*MOE, "moe.linears=[fc1,fc1]"], "moe.linears"),
        (["data.tasks.a.type=mlm", "data.tasks.a.weight=0"], "data.tasks"),
        (["data.tasks.a.type=mlm", "data.tasks.a.weight=-1"], "data.tasks.a.weight"),
        (["data.tasks.a.type=mlm", "data.tasks.a.micro_batch_size=0"],
         "data.tasks.a.micro_batch_size"),
        (["data.tasks.v.type=video_classification", "data.tasks.v.num_frames=9"],
         "data.tasks.v.num_frames"),
        (["train.micro_batch_size=0"], "train.micro_batch_size"),
    ],
)
def test_rule_violations(overrides: list[str], field: str) -> None:
    err = error_of(overrides)
    assert err.field == field, str(err)
    assert err.fix


@pytest.mark.parametrize(
    "overrides",
    [
        ["optim.warmup_steps=1000", "train.steps=10"],
        [*MOE, "parallel.tp=2"],  # sequence parallel resolves on
        ["parallel.tp=2", "parallel.sequence_parallel=true"],
        ["parallel.tp=2", "parallel.etp=2"],  # dense: etp equal to tp is harmless
        ["model.num_layers=8", "parallel.pp=2", "parallel.vpp=2"],
        [*MOE, "moe.layers=none"],
        ["data.tasks.a.type=mlm", "data.tasks.a.weight=0", "data.tasks.b.type=mlm"],
        ["parallel.device=cuda", "train.precision=bf16"],
    ],
)
def test_valid_combinations(overrides: list[str]) -> None:
    validate(apply_overrides(Config(), overrides), world_size=8)


def test_world_size_rules() -> None:
    err = error_of(["parallel.tp=2"], world_size=3)
    assert err.field == "world_size" and "tp * pp * cp = 2" in str(err)
    assert "launch a multiple of 2 processes" in str(err)
    err = error_of(["moe.num_experts=4", "parallel.ep=4"], world_size=2)
    assert err.field == "world_size" and "etp * ep * pp = 4" in str(err)
    cfg = apply_overrides(Config(), ["parallel.tp=2", *MOE, "parallel.ep=2", "parallel.etp=1"])
    validate(cfg, world_size=4)
    assert cfg.parallel.dp(4) == 2 and cfg.parallel.expert_dp(4) == 2


def test_global_batch_rule() -> None:
    err = error_of(["train.global_batch_size=12", "train.micro_batch_size=4"], world_size=2)
    assert err.field == "train.global_batch_size" and "= 8" in str(err)
    validate(apply_overrides(Config(), ["train.global_batch_size=16"]), world_size=2)
    validate(apply_overrides(Config(), ["train.global_batch_size=12"]))  # unknowable yet


# --------------------------------------------------------------------------- to_mcore
def _no_warnings_build(cfg: Config, **kwargs: object):  # noqa: ANN202
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return transformer_config(cfg, **kwargs)  # type: ignore[arg-type]


def test_transformer_config_dense_cpu() -> None:
    tc = _no_warnings_build(Config(), use_cpu=True)
    assert (tc.num_layers, tc.hidden_size, tc.num_attention_heads, tc.ffn_hidden_size) == (
        2, 64, 4, 256,
    )
    assert tc.layernorm_epsilon == 1e-5 and tc.init_method_std == 0.02
    assert tc.add_bias_linear and tc.add_qkv_bias and tc.activation_func is F.gelu
    assert tc.hidden_dropout == 0.0 and tc.attention_dropout == 0.0
    assert tc.params_dtype == torch.float32 and not tc.bf16 and not tc.fp16
    assert tc.use_cpu_initialization
    for name in to_mcore._FUSIONS:
        assert getattr(tc, name) is False, name
    assert tc.num_moe_experts is None and tc.recompute_granularity is None
    assert not tc.sequence_parallel and tc.tensor_model_parallel_size == 1


def test_transformer_config_moe_tp_pp() -> None:
    cfg = apply_overrides(Config(), [
        "model.num_layers=4", "parallel.tp=2", "parallel.pp=2", "parallel.ep=2",
        "parallel.etp=1", "moe.num_experts=4", "moe.aux_loss_coeff=0.01",
        "moe.token_dispatcher=alltoall", "train.recompute=true",
    ])
    tc = _no_warnings_build(cfg, use_cpu=True)
    assert (tc.tensor_model_parallel_size, tc.pipeline_model_parallel_size) == (2, 2)
    assert (tc.expert_model_parallel_size, tc.expert_tensor_parallel_size) == (2, 1)
    assert tc.sequence_parallel and tc.pipeline_dtype == torch.float32
    assert (tc.num_moe_experts, tc.moe_router_topk, tc.moe_ffn_hidden_size) == (4, 2, 256)
    assert tc.moe_layer_freq == [1, 0, 1, 0] and not tc.moe_grouped_gemm
    assert tc.moe_token_dispatcher_type == "alltoall"
    assert tc.moe_router_load_balancing_type == "aux_loss" and tc.moe_aux_loss_coeff == 0.01
    assert tc.moe_z_loss_coeff is None  # 0 means off; megatron divides by the coeff
    assert (tc.recompute_granularity, tc.recompute_method, tc.recompute_num_layers) == (
        "full", "uniform", 1,
    )
    top1 = apply_overrides(cfg, ["moe.topk=1", "moe.aux_loss_coeff=0"])
    tc1 = _no_warnings_build(top1, use_cpu=True)
    assert tc1.moe_router_pre_softmax and tc1.moe_router_load_balancing_type == "none"


def test_transformer_config_biased_experts_need_etp1() -> None:
    cfg = apply_overrides(Config(), ["parallel.tp=2", *MOE])  # etp null -> 2
    with pytest.raises(ConfigError) as info:
        transformer_config(cfg, use_cpu=True)
    assert info.value.field == "parallel.etp" and "parallel.etp=1" in str(info.value)
    tc = transformer_config(cfg, use_cpu=True, add_bias_linear=False, add_qkv_bias=False)
    assert tc.expert_tensor_parallel_size == 2 and not tc.add_bias_linear


def test_transformer_config_gpu_precision_and_fusions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(to_mcore, "_installed", lambda name: False)
    tc = transformer_config(Config(), use_cpu=False)
    assert tc.bf16 and tc.params_dtype == torch.bfloat16 and not tc.use_cpu_initialization
    assert not any(getattr(tc, name) for name in to_mcore._FUSIONS)
    monkeypatch.setattr(to_mcore, "_installed", lambda name: True)
    tc = transformer_config(Config(), use_cpu=False)
    assert tc.bias_dropout_fusion and tc.bias_activation_fusion and tc.masked_softmax_fusion
    assert not tc.apply_rope_fusion
    tc = transformer_config(Config(), use_cpu=True)  # CPU: off whatever is installed
    assert not any(getattr(tc, name) for name in to_mcore._FUSIONS)


def test_precision_helpers() -> None:
    cfg = Config()
    assert resolved_precision(cfg, use_cpu=True) == "fp32"
    assert resolved_precision(cfg, use_cpu=False) == "bf16"
    fp16 = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision="fp16"))
    assert resolved_precision(fp16, use_cpu=False) == "fp16"
    assert resolved_precision(fp16, use_cpu=True) == "fp16"  # explicit: honoured on CPU
    assert torch_dtype("bf16") == torch.bfloat16 and torch_dtype("fp32") == torch.float32
    with pytest.raises(ConfigError):
        torch_dtype("auto")
