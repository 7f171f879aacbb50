"""Row gradients straight into megatron DDP's main_grad: the same numbers as autograd's dense
gradient, no dense gradient made."""

from __future__ import annotations

import torch

from megatron_uni.parallel.main_grad import add_rows, lookup


def test_lookup_matches_embedding_with_and_without_main_grad() -> None:
    torch.manual_seed(0)
    weight = torch.randn(11, 4, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[1, 3, 3], [10, 0, 1]])
    upstream = torch.randn(2, 3, 4, dtype=torch.float64)
    want_out = torch.nn.functional.embedding(ids, weight)
    (want,) = torch.autograd.grad((want_out * upstream).sum(), weight)
    out = lookup(ids, weight)
    torch.testing.assert_close(out, want_out)
    (out * upstream).sum().backward()  # a bare parameter: the dense gradient
    torch.testing.assert_close(weight.grad, want)
    weight.grad = None
    weight.main_grad = torch.full((11, 4), 0.5)  # fp32 buffer beside an fp64 parameter
    (lookup(ids, weight) * upstream).sum().backward()
    assert weight.grad is None
    torch.testing.assert_close(weight.main_grad, (0.5 + want).float())
    untouched = [r for r in range(11) if r not in ids]
    assert (weight.main_grad[untouched] == 0.5).all()


def test_add_rows_repeats_accumulate() -> None:
    param = torch.zeros(3, 2)
    grad = add_rows(param, torch.tensor([2, 2, 0]), torch.ones(3, 2))
    assert grad.tolist() == [[1, 1], [0, 0], [2, 2]]
