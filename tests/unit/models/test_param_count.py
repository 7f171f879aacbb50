"""Parameter counts of the Base and Large dense configs: the tool vs an independent count.

The independent count below lists every parameter tensor of the reference architecture by shape
(section 1 of the method facts), in a different form from the tool's arithmetic.
"""

from __future__ import annotations

import subprocess
import sys
from math import prod

import pytest



def _shapes(layers: int, h: int, heads: int, f: int) -> list[tuple[int, ...]]:
    vocab = 49536  # 49,411 CLIP BPE + specials, padded to a multiple of 128
    per_layer = [(h,), (h,), (3 * h, h), (3 * h,), (h, h), (h,), (h,),  # LN1, QKV, out, gamma1
                 (h,), (h,), (f, h), (f,), (h, f), (h,), (h,)]  # LN2, fc1, fc2, gamma2
    tokenizer = [(h, 3, 16, 16), (h,), (8, h), (vocab, h), (512, h), (h,), (h,), (h,)]
    head = [(h,), (h,), (h, h), (h,), (4,)]  # LN, projection, 4 logit scales
    return tokenizer + per_layer * layers + head


@pytest.mark.parametrize(
    "name,sizes,published",
    [("base", (12, 768, 12, 3072), 124e6), ("large", (24, 1024, 16, 4096), 354e6)],
)
def test_tool_matches_independent_count(name: str, sizes: tuple, published: float) -> None:
    expected = sum(prod(s) for s in _shapes(*sizes))
    out = subprocess.run(
        [sys.executable, "-m", "tools.param_count", "--config",
         f"configs/models/uniperceiver_{name}.yaml"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    total_line = next(line for line in out.stdout.splitlines() if line.startswith("total"))
    built, arithmetic = (int(x.replace(",", "")) for x in total_line.split()[1:3])
    assert built == arithmetic == expected
    # The paper's dense sizes (124M, 354M; it truncates to whole millions) within 1 %.
    assert abs(expected - published) / published < 1e-2


def test_tool_reports_config_errors() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "tools.param_count", "--config",
         "configs/models/uniperceiver_base.yaml", "model.hiden_size=8"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 2 and "did you mean 'model.hidden_size'" in out.stderr
