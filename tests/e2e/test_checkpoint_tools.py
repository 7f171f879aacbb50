"""The checkpoint tools as a user runs them: export_deploy of a tiny attribute-routed MoE
checkpoint; the deploy file's model computes the MoE model's eval outputs per condition, and its
parameter counts follow the arithmetic."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from checkpoints_utils.inspect import summary
from tests.multirank import run_ranks

REPO = Path(__file__).resolve().parents[2]
MOE = ["moe.num_experts=4", "moe.topk=2", "moe.layers=all", "moe.router=attribute",
       "model.layer_scale_init=1.0", "model.init_method_std=0.2"]
TASKS = ["captioning", "image_classification", "retrieval", "mlm"]


def make_cfg(*overrides: str):
    """The tiny default model (its vocabulary fits tests.unit.models' task batches)."""
    from megatron_uni.config import Config, apply_overrides

    return apply_overrides(Config(), ["parallel.device=cpu", "model.drop_path_rate=0.0",
                                      *overrides])


def _save(rank: int, world: int, root: str) -> None:
    from megatron_uni.moe.experts import ExpertLinears
    from megatron_uni.parallel.initialize import initialize
    from megatron_uni.training.checkpoint import save_checkpoint
    from tests.unit.training.test_checkpoint import build

    cfg = make_cfg(*MOE)
    initialize(cfg)
    chunks, optimizer, scheduler = build(cfg)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random expert biases: a wrongly folded bias shows
        for module in chunks[0].module.modules():
            if isinstance(module, ExpertLinears) and module.bias is not None:
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.2)
    save_checkpoint(Path(root), 0, chunks, None, None, None, cfg, keep_last=0)


def _compare(rank: int, world: int, root: str, file: str) -> dict:
    from checkpoints_utils.export_deploy import load_deploy
    from megatron_uni.models.generalist import build_model
    from megatron_uni.training.checkpoint import load_checkpoint
    from tests.unit.models.test_generalist import _task_batch

    deploy, meta = load_deploy(file)  # starts the one-rank group
    cfg = make_cfg(*MOE)
    moe = build_model(cfg, use_cpu=True)
    load_checkpoint(Path(root), [moe], None, None, cfg)
    moe.eval()
    diffs, losses = [], []
    with torch.no_grad():
        for task in TASKS:
            batch = _task_batch(task)
            h0, h1 = moe(batch), deploy(batch)
            diffs.append(float((h0 - h1).abs().max()))
            l0, c0, _ = moe.loss(batch, h0)
            l1, c1, _ = deploy.loss(batch, h1)
            losses.append((float(l0 / c0), float(l1 / c1)))
    return {"diffs": diffs, "losses": losses, "meta": meta,
            "deploy_params": sum(p.numel() for p in deploy.parameters())}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tools") / "ckpt"
    run_ranks(_save, 1, args=(str(root),), timeout=120)
    return root


def test_export_deploy_matches_moe_eval(saved: Path, tmp_path: Path) -> None:
    file = tmp_path / "deploy" / "model.safetensors"
    out = subprocess.run([sys.executable, "-m", "checkpoints_utils.export_deploy", "--load",
                          str(saved), "--save", str(file)], cwd=REPO, capture_output=True,
                         text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "per condition" in out.stdout and file.is_file()
    (res,) = run_ranks(_compare, 1, args=(str(saved), str(file)), timeout=120)
    assert max(res["diffs"]) < 1e-5, res["diffs"]
    for moe_loss, deploy_loss in res["losses"]:
        assert abs(moe_loss - deploy_loss) < 1e-5
    labels, params = res["meta"]["labels"], res["meta"]["params"]
    assert len(labels) == 6  # the six reference attribute vectors
    # arithmetic from the checkpoint's tensor shapes: one condition's copy = the weights that are
    # neither experts nor routers + one expert's worth of every expert linear
    info = summary(saved)
    routers = sum(math.prod(t["shape"]) for k, t in info["tensors"].items()
                  if ".router." in k and not k.startswith("optimizer."))
    dense = info["parameters"]["shared"] - routers
    assert params["per_condition"] == dense + info["parameters"]["per_expert"]
    assert params["moe_model"] == info["parameters"]["total"]
    assert params["deploy_model"] == res["deploy_params"] == (
        dense + len(labels) * info["parameters"]["per_expert"])


def test_export_two_conditions(saved: Path, tmp_path: Path) -> None:
    def export(*conditions: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "checkpoints_utils.export_deploy", "--load",
                               str(saved), "--save", str(tmp_path / "two.safetensors"),
                               "--conditions", *conditions], cwd=REPO, capture_output=True,
                              text=True, timeout=180)

    out = export("visual_input", "01010100")  # a name and text_input's bits
    assert out.returncode == 0, out.stderr[-3000:]
    assert "visual_input 10011000" in out.stdout and "text_input 01010100" in out.stdout
    assert "(2 condition(s))" in out.stdout
    out = export("visual_input", "10011000")  # the same condition twice
    assert out.returncode == 2 and "listed twice" in out.stderr
    assert "Traceback" not in out.stderr
