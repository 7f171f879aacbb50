"""Markers: `gpu` tests skip without CUDA (unless MEGATRON_UNI_GPU_DRY_RUN=1: they then run
their "GPU" side on the CPU, tools/gpu_check.sh --cpu-dry-run); `slow` tests skip unless
--run-slow is given.
Fixture: ``demo_root``, a small demo dataset written once per session (read-only for tests)."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_uni.data.demo import make_demo_data


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    make_demo_data(root, seed=0, num_train=96, num_eval=12, num_train_shards=4)
    return root


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--run-slow", action="store_true", default=False, help="also run tests marked slow"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import os

    import torch

    has_cuda = torch.cuda.is_available() or os.environ.get("MEGATRON_UNI_GPU_DRY_RUN") == "1"
    run_slow = config.getoption("--run-slow")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow: run with --run-slow"))
