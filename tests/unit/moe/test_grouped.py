"""The grouped products and the k-term expert merge against plain references."""

from __future__ import annotations

import pytest
import torch

from megatron_uni.moe import grouped
from megatron_uni.moe.grouped import expert_matmul, grouped_matmul, merge_chosen
from tests.multirank import run_ranks


@pytest.mark.parametrize("host", [True, False])
@pytest.mark.parametrize("kernels", [True, False])
def test_merge_chosen_gradients_and_main_grad(kernels: bool, host: bool, monkeypatch) -> None:
    """Gradients against autograd's gather; ``kernels=False``: the device lacks embedding_bag
    and its per-sample-weight gradient, so both fallbacks run; ``host=False``: the device
    formulation of the backward (no host reads), which a GPU runs, here on the CPU."""
    if not host:
        monkeypatch.setattr(grouped, "host_values_free", lambda x: False)
    if not kernels:
        def refuse(*args, **kwargs):
            raise NotImplementedError("no kernel here")

        monkeypatch.setattr(torch.nn.functional, "embedding_bag", refuse)
        monkeypatch.setattr(torch.ops.aten, "_embedding_bag_per_sample_weights_backward", refuse)
    torch.manual_seed(0)
    experts = torch.randn(5, 4, 3, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([[0, 3], [3, 1], [4, 0]])
    gates = torch.rand(3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w, g: merge_chosen(w, index, g), (experts, gates))
    upstream = torch.randn(3, 4, 3, dtype=torch.float64)
    reference = (gates[:, :, None, None] * experts[index]).sum(1)
    (reference * upstream).sum().backward()
    want_w, want_g = experts.grad.clone(), gates.grad.clone()
    experts.grad = gates.grad = None
    # megatron DDP's buffer: the chosen slices are added there, no dense gradient is made
    experts.main_grad = torch.ones_like(experts)
    (merge_chosen(experts, index, gates) * upstream).sum().backward()
    assert experts.grad is None
    torch.testing.assert_close(experts.main_grad, 1 + want_w)
    torch.testing.assert_close(gates.grad, want_g)
    unchosen = [e for e in range(5) if e not in index]
    assert (experts.main_grad[unchosen] == 1).all()


@pytest.mark.parametrize("host", [True, False])
@pytest.mark.parametrize("refuse", [False, True])
def test_grouped_matmul_matches_per_token_weights(refuse: bool, host: bool, monkeypatch
                                                  ) -> None:
    """Both the grouped kernel and the sync-free fallback (kernel refused) give
    out[t] = W[rows[t]] x[t] + b[rows[t]], with gradients; the bias per block over host ends
    (``host``) and as the device's one-hot product."""
    if not host:
        monkeypatch.setattr(grouped, "host_values_free", lambda x: False)
    assert (grouped.Grouping.of(torch.tensor([1, 0]), 2).spans is not None) == host
    if refuse:
        monkeypatch.setattr(grouped, "_try_grouped_mm", lambda *a: None)
    torch.manual_seed(1)
    n, i, o, a = 37, 8, 4, 4  # rows of 16 / 32 bytes: the kernel's alignment
    x = torch.randn(n, i, requires_grad=True)
    rows = torch.tensor([3, 0, 0, 2] * 9 + [2])  # group 1 empty, unsorted
    weight = torch.randn(a, o, i, requires_grad=True)
    bias = torch.randn(a, o, requires_grad=True)
    out = grouped_matmul(x, rows, weight, bias)
    want = torch.einsum("noi,ni->no", weight[rows], x) + bias[rows]
    torch.testing.assert_close(out, want)
    grads = torch.autograd.grad(out.square().sum(), (x, weight, bias))
    refs = torch.autograd.grad(want.square().sum(), (x, weight, bias))
    for got, ref in zip(grads, refs):
        torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("refuse", [False, True])
@pytest.mark.parametrize("sorted_in,sorted_out", [(True, False), (False, True), (True, True)])
def test_grouped_matmul_in_group_order(sorted_in: bool, sorted_out: bool, refuse: bool,
                                       monkeypatch) -> None:
    """Tokens given / output returned in the grouping's sorted order: the same products as in
    token order, permuted, with gradients (the permutation's backward is a gather)."""
    if refuse:
        monkeypatch.setattr(grouped, "_try_grouped_mm", lambda *a: None)
    torch.manual_seed(3)
    n, i, o, a = 29, 4, 8, 3
    rows = torch.tensor([2, 0, 2, 1] * 7 + [0])
    x = torch.randn(n, i, requires_grad=True)
    weight = torch.randn(a, o, i, requires_grad=True)
    bias = torch.randn(a, o, requires_grad=True)
    g = grouped.Grouping.of(rows, a)
    assert torch.equal(rows[g.order], g.sorted_rows) and torch.equal(g.order[g.inverse],
                                                                     torch.arange(n))
    assert g.ends.tolist() == [int((rows <= r).sum()) for r in range(a)]
    given = x[g.order] if sorted_in else x
    out = grouped_matmul(given, rows, weight, bias, g, sorted_in=sorted_in, sorted_out=sorted_out)
    want = torch.einsum("noi,ni->no", weight[rows], x) + bias[rows]
    if sorted_out:
        want = want[g.order]
    torch.testing.assert_close(out, want)
    upstream = torch.randn_like(want)
    grads = torch.autograd.grad((out * upstream).sum(), (x, weight, bias))
    refs = torch.autograd.grad((want * upstream).sum(), (x, weight, bias))
    for got, ref in zip(grads, refs):
        torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("out_features", [8, 6])
def test_expert_matmul_matches_loop(out_features: int) -> None:
    """The kernel (8 outputs: 32-byte rows) and the loop (6: unaligned) against per-expert
    products; an unaligned shape takes the loop without turning the kernel off for the next."""
    torch.manual_seed(2)
    counts = torch.tensor([3, 0, 5])
    tokens = torch.randn(8, 4)
    weight = torch.randn(3, out_features, 4)
    out = expert_matmul(tokens, counts, weight)
    want = torch.cat([c @ weight[e].t() for e, c in enumerate(torch.split(tokens, [3, 0, 5]))])
    torch.testing.assert_close(out, want)
    ends = torch.tensor([3, 3, 8])
    assert (grouped._try_grouped_mm(tokens, weight.transpose(1, 2), ends) is None) == (
        out_features == 6)
    if hasattr(torch, "_grouped_mm"):
        assert grouped._try_grouped_mm(tokens, torch.randn(3, 4, 8), ends) is not None


@pytest.mark.parametrize("host", [True, False])
def test_expert_bias_per_block_matches_a_gather(host: bool, monkeypatch) -> None:  # noqa: ANN001
    """Rows grouped by expert (an empty expert among them) get their expert's bias, and the bias
    gradient is each block's sum: per block over host ends (``host``) or by the device's gather."""
    if not host:
        monkeypatch.setattr(grouped, "host_values_free", lambda x: False)
    torch.manual_seed(3)
    counts = torch.tensor([2, 0, 3, 1])
    base = torch.randn(6, 5, requires_grad=True)
    bias = torch.randn(4, 5, requires_grad=True)
    upstream = torch.randn(6, 5)
    out = grouped.add_expert_bias(base * 1.0, bias, counts)  # in place on a non-leaf
    grads = torch.autograd.grad((out * upstream).sum(), (base, bias))
    want = base + bias[torch.tensor([0, 0, 2, 2, 2, 3])]
    refs = torch.autograd.grad((want * upstream).sum(), (base, bias))
    torch.testing.assert_close(out, want)
    for got, ref in zip(grads, refs):
        torch.testing.assert_close(got, ref)
    assert grads[1][1].abs().sum() == 0  # the empty expert's bias gets no gradient


def _exchange(rank: int, world: int) -> dict:
    """EP=2, 4 experts: each rank's conditions merged by exchanging partial merges, against the
    all-gather of every expert, tables of different sizes on the two ranks."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_uni.config import Config, apply_overrides
    from megatron_uni.moe.experts import ExpertLinears
    from megatron_uni.parallel.initialize import initialize

    initialize(apply_overrides(Config(), ["parallel.device=cpu", "parallel.ep=2",
                                          "moe.num_experts=4"]))
    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1)
    torch.manual_seed(0)
    experts = ExpertLinears(config, 4, 6, 5, True, 0.5,
                            ProcessGroupCollection.use_mpu_process_groups())
    for p in experts.parameters():
        p.data.normal_(generator=torch.Generator().manual_seed(rank + 7))
    gen = torch.Generator().manual_seed(100 + rank)
    conditions = (2, 4)[rank]  # rank 0 pads its table to rank 1's
    index = torch.stack([torch.randperm(4, generator=gen)[:2] for _ in range(conditions)])
    probe = (torch.randn(conditions, 5, 6, generator=gen), torch.randn(conditions, 5, generator=gen))
    out = {"exchanges": experts.exchanges_merges()}
    for name in ("exchanged", "gathered"):
        gates = torch.rand(conditions, 2, generator=torch.Generator().manual_seed(rank)
                           ).requires_grad_()
        for p in experts.parameters():
            p.grad = None
        if name == "exchanged":
            plan = experts.plan_exchange(index, gates)
            out["bound"] = plan.bound
            weight, bias = experts.merged_weights(index, gates, plan)
        else:
            full_w, full_b = experts.full_weights()
            weight, bias = merge_chosen(full_w, index, gates), merge_chosen(full_b, index, gates)
        ((weight * probe[0]).sum() + (bias * probe[1]).sum()).backward()
        out[name] = [weight.detach(), bias.detach(), gates.grad, experts.weight.grad.clone(),
                     experts.bias.grad.clone()]
    return out


def test_ep_ranks_exchange_merges_not_experts() -> None:
    """Merged weights, and the gradients of the gates and of every local expert, equal those of
    gathering every expert, with tables of different sizes on the ranks (padded to the largest)."""
    for res in run_ranks(_exchange, 2, timeout=120):
        assert res["exchanges"] and res["bound"] == 4
        for got, want in zip(res["exchanged"], res["gathered"]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
