"""A crafted checkpoint runs no code in any tool that reads checkpoints.

A 2-step demo run saves a real checkpoint; each test copies it and plants a pickle whose
``__reduce__`` would create a marker file (``os.system("touch MARKER")``) in one place:
- ``metadata``: the whole ``.metadata`` (torch DCP's tensor index, unpickled by torch);
- ``common``: ``common.pt`` (megatron's common state, ``torch.load``);
- ``objects``: the saved RNG state and data position (DCP byte objects, which torch's default
  planner loads with ``torch.load(weights_only=False)``): a legitimate ``.metadata`` points them
  at a file holding the payload.
Then the tool runs: training resume (from its own run dir), ``megatron_uni.evaluate``,
``checkpoints_utils.inspect`` (and ``--compare``), ``reshard``, ``export_deploy``. Each must stop
with ``error: ...`` naming the file and the refused global, exit 2, and the marker must not
exist. inspect reads no saved objects (only the index, tensors and common.pt), so ``objects``
is not a case for it.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from checkpoints_utils import export_deploy, inspect, reshard
from checkpoints_utils.common import run_cli
from tests.e2e.entry import demo_args, run_entry

STEP_DIR = "iter_0000002"


class _Plant:
    """Unpickling this runs ``touch MARKER``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def trained(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run dir with checkpoints/iter_0000002 (the demo model, one rank)."""
    run = tmp_path_factory.mktemp("unsafe") / "run"
    code, text = run_entry("megatron_uni.train", demo_args(demo_root, run, "train.steps=2"))
    assert code == 0, text[-3000:]
    return run


def plant(ckpt: Path, where: str, marker: Path) -> str:
    """Put the payload into ``ckpt`` at ``where``; returns the name the error must show."""
    payload = io.BytesIO()
    torch.save(_Plant(marker), payload)
    if where == "metadata":
        (ckpt / ".metadata").write_bytes(pickle.dumps(_Plant(marker)))
        return ".metadata"
    if where == "common":
        torch.save({"step": _Plant(marker)}, ckpt / "common.pt")
        return "common.pt"
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    from megatron_uni.training.safe_load import read_dcp_metadata

    md = read_dcp_metadata(ckpt)
    (ckpt / "planted.distcp").write_bytes(payload.getvalue())
    for index in md.storage_data:
        if index.fqn.startswith(("rng_state/", "loader_slots/")):
            md.storage_data[index] = _StorageInfo("planted.distcp", 0, len(payload.getvalue()))
    with open(ckpt / ".metadata", "wb") as f:
        pickle.dump(md, f)
    return "saved object"


def _tool(tool: str, root: Path, run: Path, ckpt: Path, tmp: Path,
          capsys: pytest.CaptureFixture) -> tuple[int, str]:
    if tool == "train":  # resume from the run dir's own latest checkpoint
        return run_entry("megatron_uni.train", demo_args(root, run, "train.steps=3"))
    if tool == "evaluate":
        return run_entry("megatron_uni.evaluate", [
            *demo_args(root, tmp / "eval", f"checkpoint.load={ckpt}"), "--tasks", "image_cls"])
    main, argv = {
        "inspect": (inspect.main, [str(ckpt)]),
        "compare": (inspect.main, [str(tmp / "good"), "--compare", str(ckpt)]),
        "reshard": (reshard.main, ["--load", str(ckpt), "--save", str(tmp / "resharded"),
                                   "--tp", "1", "--pp", "1", "--ep", "1"]),
        "export": (export_deploy.main, ["--load", str(ckpt), "--save",
                                        str(tmp / "deploy.safetensors")]),
    }[tool]
    capsys.readouterr()
    code = run_cli(main, argv)
    return code, capsys.readouterr().err


CASES = [(where, tool) for where in ("metadata", "common", "objects")
         for tool in ("train", "evaluate", "inspect", "compare", "reshard", "export")
         if not (where == "objects" and tool in ("inspect", "compare"))]


@pytest.mark.parametrize(("where", "tool"), CASES, ids=[f"{w}-{t}" for w, t in CASES])
def test_crafted_payload_runs_nothing(trained: Path, demo_root: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture, where: str, tool: str
                                      ) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained / "checkpoints", run / "checkpoints")
    shutil.copytree(trained / "checkpoints" / STEP_DIR, tmp_path / "good")
    ckpt = run / "checkpoints" / STEP_DIR
    marker = tmp_path / "MARKER"
    name = plant(ckpt, where, marker)
    code, err = _tool(tool, demo_root, run, ckpt, tmp_path, capsys)
    assert not marker.exists(), f"{tool} executed the payload in {where}"
    assert code == 2, err[-3000:]
    assert "error: " in err and "refused to load" in err and name in err, err[-3000:]
    assert "posix.system" in err, err[-3000:]
    assert "Traceback" not in err, err[-3000:]


def test_the_untouched_checkpoint_still_loads(trained: Path, capsys: pytest.CaptureFixture
                                              ) -> None:
    """The safe readers accept what megatron-uni writes (inspect reads index and common.pt)."""
    assert run_cli(inspect.main, [str(trained / "checkpoints")]) == 0
    assert "step       2" in capsys.readouterr().out
