"""inspect: summary (layout, step, tensors, parameter counts) and --compare; clear errors for a
wrong path, a non-checkpoint directory and truncated files, for every tool's CLI."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from checkpoints_utils.inspect import compare, main, summary
from tests.multirank import run_ranks

REPO = Path(__file__).resolve().parents[3]
MOE = ["moe.num_experts=4", "moe.layers=all", "parallel.distributed_optimizer=true"]


def _two_steps(rank: int, world: int, root: str) -> None:
    from megatron_uni.parallel.initialize import initialize
    from megatron_uni.training.checkpoint import save_checkpoint
    from tests.unit.training.test_checkpoint import build, make_cfg, train_step

    cfg = make_cfg(*MOE)
    initialize(cfg)
    chunks, optimizer, scheduler = build(cfg)
    for step in (1, 2):
        train_step(chunks, optimizer, scheduler, step)
        save_checkpoint(Path(root), step, chunks, optimizer, scheduler, None, cfg, keep_last=0)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("inspect") / "ckpt"
    run_ranks(_two_steps, 1, args=(str(root),), timeout=120)
    return root


def test_summary(root: Path) -> None:
    info = summary(root)  # a save root: its latest
    assert info["step"] == 2 and info["path"].endswith("iter_0000002")
    assert info["layout"]["tp"] == 1 and info["optimizer"] == "distributed"
    assert info["config"]["moe"]["num_experts"] == 4
    qkv = info["tensors"]["encoder.layers.0.self_attention.linear_qkv.experts.weight"]
    assert qkv == {"shape": [4, 3 * 64, 64], "dtype": "float32"}
    weights = {k: v for k, v in info["tensors"].items() if not k.startswith("optimizer.")}
    assert {f"optimizer.state.exp_avg.{k}" for k in weights} <= set(info["tensors"])
    p = info["parameters"]
    assert p["total"] == sum(math.prod(v["shape"]) for v in weights.values())
    # per expert, per layer: qkv (3h*h + 3h) + proj (h*h + h) + fc1 (4h*h + 4h) + fc2 (4h*h + h)
    h = 64
    assert p["per_expert"] == 2 * (3 * h * h + 3 * h + h * h + h + 4 * h * h + 4 * h
                                   + 4 * h * h + h)
    assert p["experts"] == 4 * p["per_expert"] and p["shared"] == p["total"] - p["experts"]
    assert info["scalars"]["optimizer.param_group_steps"] == [2.0]


def test_compare(root: Path, capsys: pytest.CaptureFixture) -> None:
    same = compare(root / "iter_0000001", root / "iter_0000001")
    assert max(same["diff"].values()) == 0.0 and not same["scalars"]
    other = compare(root / "iter_0000001", root / "iter_0000002")
    assert other["diff"]["optimizer.state.exp_avg.head.proj.weight"] > 0
    assert other["scalars"]["step"] == (1, 2)
    assert main([str(root / "iter_0000001"), "--compare", str(root / "iter_0000001")]) == 0
    assert main([str(root / "iter_0000001"), "--compare", str(root / "iter_0000002")]) == 1
    assert "DIFFERS" in capsys.readouterr().out


TOOLS = {"inspect": ["{}"], "reshard": ["--load", "{}", "--save", "{out}"],
         "export_deploy": ["--load", "{}", "--save", "{out}/m.safetensors"]}


def _cli(tool: str, path: Path, out: Path) -> subprocess.CompletedProcess:
    args = [a.format(path, out=out) for a in TOOLS[tool]]
    return subprocess.run([sys.executable, "-m", f"checkpoints_utils.{tool}", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("tool", list(TOOLS))
def test_clear_errors(root: Path, tmp_path: Path, tool: str) -> None:
    if not (REPO / "checkpoints_utils" / f"{tool}.py").exists():
        pytest.skip(f"{tool} not written yet")
    bad = tmp_path / "bad"
    shutil.copytree(root / "iter_0000001", bad / "iter_0000001")
    for f in (bad / "iter_0000001").glob("*.distcp"):
        f.write_bytes(f.read_bytes()[:100])  # truncated shard file
    cases = {tmp_path / "missing": "does not exist",
             REPO / "configs": "is not a megatron-uni checkpoint",
             bad / "iter_0000001": "truncated or corrupt"}
    for path, message in cases.items():
        out = _cli(tool, path, tmp_path / f"out_{tool}")
        assert out.returncode == 2, (path, out.stderr[-2000:])
        last = out.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and message in last, (path, last)
        assert "Traceback" not in out.stderr
