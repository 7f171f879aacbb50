"""launch.slurm --plan: the planner's verdict for the rendered job; a layout that cannot fit is
refused with the reason and the planner's best alternative."""

from __future__ import annotations

import pytest

from launch.slurm import main

JOB = ["--config", "configs/models/moe_30b.yaml", "--nodes", "1", "--gpus-per-node", "8",
       "--dry-run", "--plan", "train.micro_batch_size=16"]


def test_plan_refuses_a_layout_that_cannot_fit(capsys: pytest.CaptureFixture) -> None:
    assert main(JOB) == 2
    err = capsys.readouterr().err
    assert "tp1 pp1 ep1 dp8" in err and "does NOT fit" in err
    assert "best layout that fits" in err and "parallel.pp=" in err
    assert "#!/bin/bash" not in err


def test_plan_prints_the_verdict_and_renders(capsys: pytest.CaptureFixture) -> None:
    assert main([*JOB, "parallel.pp=8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("plan: tp1 pp8 ep1 dp1") and "-> fits" in out
    assert "#!/bin/bash" in out
