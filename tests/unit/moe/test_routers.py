"""Each router alone: top-k, noise, renormalisation, losses against megatron's, unseen
attribute combinations, counting, and no host synchronisation in the forward."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.unit.models.test_generalist import _task_batch

HIDDEN = 16
E = 6


def _config():
    from megatron_uni.config import Config, apply_overrides
    from megatron_uni.config.to_mcore import transformer_config

    cfg = apply_overrides(Config(), ["parallel.device=cpu", "model.hidden_size=16",
                                     "model.num_attention_heads=2", "model.ffn_hidden_size=32",
                                     "model.num_layers=1"])
    return transformer_config(cfg, use_cpu=True)


def _router(kind: str, topk: int = 2, task_names: tuple = (), task_route=None, **moe_fields):
    from megatron_uni.config import MoEConfig
    from megatron_uni.moe.routers import router_class
    from megatron_uni.moe.tracker import RoutingTracker

    moe = MoEConfig(num_experts=E, topk=topk, router=kind, **moe_fields)
    cls = router_class(moe)
    extra = ({"num_tasks": 3, "task_names": task_names, "task_route": task_route}
             if kind in ("modality", "task", "attribute") else {})
    torch.manual_seed(0)
    return cls(_config(), moe, HIDDEN, RoutingTracker(), "layer0.attn", **extra)


def _conditions(task: str = "captioning"):
    from megatron_uni.moe.conditions import RoutingConditions

    return RoutingConditions.from_batch(_task_batch(task))


def _hidden(conditions, seed: int = 0) -> torch.Tensor:
    return torch.randn(conditions.num_local, HIDDEN, generator=torch.Generator().manual_seed(seed))


KINDS = ["token", "context", "modality", "task", "attribute"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("topk", [1, 2, 3])
def test_topk_gates(kind: str, topk: int) -> None:
    router = _router(kind, topk).eval()
    cond = _conditions()
    d = router(_hidden(cond), cond)
    n = cond.num_local
    assert d.probs.shape == d.routing_map.shape == (n, E)
    assert (d.routing_map.sum(-1) == topk).all()
    assert ((d.probs > 0) == d.routing_map).all()
    sums = d.probs.sum(-1)
    if topk == 1:
        # the top-1 gate is the softmax probability of the chosen expert, not 1
        assert (sums < 1).all() and (sums > 1 / E - 1e-6).all()
    else:
        torch.testing.assert_close(sums, torch.ones(n))  # renormalised over the k chosen
    if kind != "token":  # per-condition decisions: the table the grouped path reads
        assert d.table_index.shape[1] == topk
        per_token = torch.zeros(n, E).scatter(-1, d.table_index[d.rows], d.table_gates[d.rows])
        torch.testing.assert_close(per_token, d.probs)


@pytest.mark.parametrize("kind", KINDS)
def test_noise_in_training_only(kind: str) -> None:
    router = _router(kind, noise_std=1.0)
    cond = _conditions()
    hidden = _hidden(cond)
    router.eval()
    a, b = router(hidden, cond), router(hidden, cond)
    assert torch.equal(a.probs, b.probs)  # eval: deterministic
    router.train()
    noisy = [router(hidden, cond).probs for _ in range(4)]
    assert any(not torch.equal(p, a.probs) for p in noisy)
    if kind in ("modality", "task", "attribute"):
        # noise per condition keeps the routing segment-constant
        d = router(hidden, cond)
        assert torch.equal(d.probs, d.table_probs[d.rows])


def test_segment_constant_routers_ignore_content_and_route_unseen_attributes() -> None:
    router = _router("attribute").eval()
    cond = _conditions()
    a, b = router(_hidden(cond, 0), cond), router(_hidden(cond, 1) * 5, cond)
    assert torch.equal(a.probs, b.probs)
    novel = cond.attribute_table.clone()
    novel[0] = torch.tensor([0.0, 0, 1, 0, 1, 1, 1, 1])  # never among the reference vectors
    d = router(_hidden(cond), replace(cond, attribute_table=novel))
    assert torch.isfinite(d.probs).all() and (d.routing_map.sum(-1) == 2).all()
    # every token of one attribute row takes the same experts
    for row in range(novel.shape[0]):
        maps = d.routing_map[cond.attribute_index == row]
        assert (maps == maps[:1]).all()


def test_task_router_refuses_an_unknown_task() -> None:
    router = _router("task").eval()
    cond = replace(_conditions(), task_id=5)
    with pytest.raises(ValueError, match="unseen task"):
        router(_hidden(cond), cond)


def _held_out_cfg(*extra: str):
    from megatron_uni.config import Config, apply_overrides

    return apply_overrides(Config(), [
        "moe.num_experts=6", "moe.router=task",
        "data.tasks.seen.type=retrieval", "data.tasks.seen.weight=1.0",
        "data.tasks.other.type=mlm", "data.tasks.other.weight=1.0",
        "data.tasks.held_out.type=retrieval", "data.tasks.held_out.weight=0.0", *extra])


def test_task_router_refuses_a_task_that_never_trained_by_default() -> None:
    """The held-out task HAS a task id (weight 0): its table row never trained, so the router
    refuses it by name and points to the alternatives."""
    from megatron_uni.models.layer_spec import refused_task, task_route
    from megatron_uni.moe.routers import UnseenTaskError

    cfg = _held_out_cfg()
    assert task_route(cfg) == (0, 1, -1)
    router = _router("task", task_names=("seen", "other", "held_out"),
                     task_route=task_route(cfg)).eval()
    cond = _conditions()
    router(_hidden(cond), replace(cond, task_id=1))  # trained tasks route
    with pytest.raises(UnseenTaskError, match="'held_out' never trained") as err:
        router(_hidden(cond), replace(cond, task_id=2))
    assert "moe.unseen_task_route" in str(err.value) and "attribute" in str(err.value)
    assert refused_task(cfg, "held_out") == str(err.value)
    assert refused_task(cfg, "seen") is None
    # Other routers route every task.
    assert refused_task(_held_out_cfg("moe.router=attribute"), "held_out") is None


def test_unseen_task_route_routes_like_a_named_seen_task() -> None:
    from megatron_uni.config import ConfigError, validate
    from megatron_uni.models.layer_spec import refused_task, task_route

    cfg = _held_out_cfg("moe.unseen_task_route=seen")
    assert task_route(cfg) == (0, 1, 0) and refused_task(cfg, "held_out") is None
    routed = _router("task", task_route=task_route(cfg)).eval()
    cond = _conditions()
    held, seen = (routed(_hidden(cond), replace(cond, task_id=t)) for t in (2, 0))
    assert torch.equal(held.probs, seen.probs) and torch.equal(held.routing_map, seen.routing_map)
    for bad in ("held_out", "nope"):  # must name a trained task
        with pytest.raises(ConfigError, match="not a trained task"):
            validate(_held_out_cfg(f"moe.unseen_task_route={bad}"))


@pytest.mark.parametrize("kind", ["token", "attribute"])
def test_aux_and_z_losses_equal_megatrons(kind: str) -> None:
    from megatron.core.transformer.moe.moe_utils import switch_load_balancing_loss_func, z_loss_func

    aux_c, z_c = 0.3, 0.02
    router = _router(kind, aux_loss_coeff=aux_c, z_loss_coeff=z_c).eval()
    cond = _conditions()
    assert not cond.valid.all()  # padding present: it must not count
    hidden = _hidden(cond)
    d = router(hidden, cond)
    logged = router.tracker.losses()
    # megatron's functions on the valid tokens only
    if kind == "token":
        logits = router.logits_of(hidden)
    else:
        table, rows = router.table(cond)
        logits = router.logits_of(table)[rows]
    valid = cond.valid
    aux = switch_load_balancing_loss_func(
        probs=logits[valid].softmax(-1), tokens_per_expert=d.routing_map[valid].sum(0),
        total_num_tokens=int(valid.sum()), topk=2, num_experts=E, moe_aux_loss_coeff=aux_c)
    z = z_loss_func(logits[valid], z_c)
    assert logged["layer0.attn.aux"] == pytest.approx(float(aux.detach()), rel=1e-5)
    assert logged["layer0.attn.z"] == pytest.approx(float(z.detach()), rel=1e-5)
    # what rides on the output: both, scaled by the micro-batch's query count
    torch.testing.assert_close(d.aux_loss, (aux + z) * cond.num_queries)


def test_no_loss_computed_when_off() -> None:
    router = _router("token")
    cond = _conditions()
    d = router(_hidden(cond), cond)
    assert d.aux_loss is None and router.tracker.losses() == {}


def test_counts_once_per_forward_that_counts() -> None:
    router = _router("attribute").train()
    router.tracker.reset(collect_stats=True)
    cond = _conditions()
    hidden = _hidden(cond)
    with torch.no_grad():  # a checkpointed forward's first pass: training, autograd off
        router(hidden, cond)
    assert router.tracker.stats() == {}
    router(hidden, cond)  # the pass whose outputs are used
    stats = router.tracker.stats()
    tokens = {key: int(c.sum()) // 2 for (_, key), c in stats.items()}
    expected = {}
    for row, bits in enumerate(cond.attribute_table.tolist()):
        n = int(((cond.attribute_index == row) & cond.valid).sum())
        if n:
            expected["".join(str(int(b)) for b in bits)] = n
    assert tokens == expected


class _SyncDetector(TorchDispatchMode):
    """Records operators that force a device-to-host synchronisation on a GPU: reading a value
    (item / tolist / bool), data-dependent output shapes (nonzero, boolean indexing, unique,
    masked_select), host copies."""

    SYNCING = ("_local_scalar_dense", "nonzero", "masked_select", "_unique", "unique_",
               "unique_consecutive", "repeat_interleave.Tensor")

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if any(s in name for s in self.SYNCING):
            self.seen.append(name)
        if name.startswith("aten.index.Tensor") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None):
            self.seen.append(name + " (boolean mask)")
        return func(*args, **(kwargs or {}))


def _moe_layer_forward(router: str, execution: str, aux: float) -> list[str]:
    """Syncing ops seen in one MoE layer pair's forward + backward (expert linears + router)."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    from megatron_uni.config import MoEConfig
    from megatron_uni.moe.linear import MoEColumnLinear, MoERowLinear
    from megatron_uni.moe.routers import router_class
    from megatron_uni.moe.tracker import RoutingTracker

    config = _config()
    moe = MoEConfig(num_experts=E, topk=2, router=router, execution=execution,
                    aux_loss_coeff=aux, z_loss_coeff=aux)
    params = {"moe": moe, "hidden_size": HIDDEN, "tracker": RoutingTracker(), "name": "l0.mlp"}
    if router != "token":
        params["num_tasks"] = 3
    spec = ModuleSpec(module=router_class(moe), params=params)
    fc1 = MoEColumnLinear(HIDDEN, 32, config=config, bias=True, moe=moe, router=spec, name="l0")
    fc2 = MoERowLinear(32, HIDDEN, config=config, bias=True, moe=moe, router=None, name="l0")
    cond = _conditions()
    x = _hidden(cond).view(-1, cond.rows, HIDDEN).requires_grad_()
    detector = _SyncDetector()
    with detector:
        h, _, decision = fc1(x, cond)
        y, _, _ = fc2(torch.nn.functional.gelu(h), cond, decision)
        y.square().sum().backward()
    return detector.seen


def _no_sync_case(rank: int, world: int, router: str, aux: float) -> list[str]:
    from megatron_uni.config import Config, apply_overrides
    from megatron_uni.parallel.initialize import initialize

    initialize(apply_overrides(Config(), ["parallel.device=cpu"]))  # in a rank process: the
    return _moe_layer_forward(router, "grouped", aux)  # CPU backend is process-wide


@pytest.mark.parametrize("router", ["modality", "task", "attribute"])
@pytest.mark.parametrize("aux", [0.0, 0.01])
def test_grouped_path_and_table_routers_make_no_host_sync(router: str, aux: float) -> None:
    from tests.multirank import run_ranks

    assert run_ranks(_no_sync_case, 1, args=(router, aux), timeout=120) == [[]]


@pytest.mark.parametrize("kind,source", [("token", "spe"), ("context", "spe"), ("context", "mean")])
def test_token_and_context_routers_make_no_host_sync(kind: str, source: str) -> None:
    from megatron_uni.moe.conditions import RoutingConditions

    router = _router(kind, aux_loss_coeff=0.01, z_loss_coeff=0.01, context_source=source)
    batch = _task_batch("captioning")
    detector = _SyncDetector()
    with detector:
        cond = RoutingConditions.from_batch(batch)
        router(_hidden(cond), cond)
    assert detector.seen == []


def test_detector_sees_a_sync() -> None:
    detector = _SyncDetector()
    with detector:
        t = torch.arange(4)
        t[t > 1].sum().item()
    assert any("_local_scalar_dense" in s for s in detector.seen)
    assert any("boolean" in s or "nonzero" in s for s in detector.seen)
