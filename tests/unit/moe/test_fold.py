"""Deploy folding: the folded model computes what the MoE model computes in eval, condition by
condition, with one dense weight per condition and the parameter count the arithmetic says.

All model checks run in one single-rank child process (building megatron modules needs process
groups); the tests below read its results.
"""

from __future__ import annotations

import pytest
import torch

from megatron_uni.config import Config, apply_overrides
from tests.multirank import run_ranks

OVERRIDES = [
    "moe.num_experts=4", "moe.topk=2", "moe.layers=all",
    # large LayerScale and init: the layers change the outputs, so a wrong fold shows
    "model.layer_scale_init=1.0", "model.init_method_std=0.2",
]
TASKS = ["captioning", "image_classification", "retrieval", "mlm"]
TOL = 1e-5


def _run(model, batches) -> list[tuple[torch.Tensor, float]]:
    with torch.no_grad():
        out = []
        for batch in batches:
            hidden = model(batch)
            loss_sum, count, _ = model.loss(batch, hidden)
            out.append((hidden, float(loss_sum / count)))
        return out


def _moe_model(router: str, extra: list[str] = ()):
    """A tiny MoE model in eval mode; expert biases random (they start at 0, which would hide a
    wrongly folded bias)."""
    from megatron_uni.moe.experts import ExpertLinears
    from tests.unit.models.test_generalist import _model

    model = _model(OVERRIDES + [f"moe.router={router}", *extra])
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, ExpertLinears) and module.bias is not None:
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.2)
    return model.eval()


def _per_condition_diff(batches, before, after, key_of) -> dict[str, float]:
    """Largest |difference| of encoder outputs over the (non-padding) tokens of each condition."""
    diffs: dict[str, float] = {}
    for batch, (h0, _), (h1, _) in zip(batches, before, after):
        keys = key_of(batch).t()  # [S, R], the encoder's order
        valid = batch.seq_id.t() >= 0
        err = (h0 - h1).abs().amax(-1)  # [S, R]
        for key in {k for k in keys[valid].tolist()}:
            where = valid & (keys == key)
            name = str(key)
            diffs[name] = max(diffs.get(name, 0.0), float(err[where].max()))
    return diffs


def _checks(rank: int, world: int) -> dict:
    from dataclasses import replace

    from megatron_uni.batch import ATTRIBUTES
    from megatron_uni.moe.experts import ExpertLinears
    from megatron_uni.moe.fold import FoldedLinear, UnfoldedConditionError, fold_model
    from megatron_uni.moe.routers import Router
    from tests.unit.models.test_generalist import _task_batch

    res: dict = {}
    batches = [_task_batch(t) for t in TASKS]
    bits = lambda b: torch.tensor([int("".join(str(int(v)) for v in row), 2)  # noqa: E731
                                   for row in b.attributes])[b.attribute]

    # --- attribute routing, the six reference vectors
    model = _moe_model("attribute")
    before = _run(model, batches)
    report = fold_model(model)
    after = _run(model, batches)
    res["attr_diff"] = _per_condition_diff(batches, before, after, bits)
    res["attr_loss"] = [(a[1], b[1]) for a, b in zip(before, after)]
    res["attr_report"] = report
    res["attr_text"] = report.format()
    res["attr_leftover"] = [n for n, m in model.named_modules()
                            if isinstance(m, (Router, ExpertLinears))]
    res["attr_folded"] = {n: tuple(m.weight.shape) for n, m in model.named_modules()
                          if isinstance(m, FoldedLinear)}
    # a batch whose attribute table holds a vector nobody folded
    odd = batches[1]
    odd = replace(odd, attributes=odd.attributes.clone())
    odd.attributes[0] = torch.tensor([0, 1, 1, 0, 0, 0, 0, 0.0])
    try:
        _run(model, [odd])
        res["attr_unknown"] = None
    except UnfoldedConditionError as err:
        res["attr_unknown"] = str(err)

    # --- a deploy copy for the two image-text conditions only
    model = _moe_model("attribute")
    two = ["visual_input", "text_target"]
    subset = batches[1:3]  # classification, retrieval: these two conditions only
    before = _run(model, subset)
    res["two_report"] = fold_model(model, conditions=two)
    after = _run(model, subset)
    res["two_diff"] = _per_condition_diff(subset, before, after, bits)
    try:
        _run(model, batches[:1])  # captioning needs caption_visual, caption_text, vocab_target
        res["two_unknown"] = None
    except UnfoldedConditionError as err:
        res["two_unknown"] = str(err)
    res["attr_keys"] = {name: int("".join(map(str, v)), 2) for name, v in ATTRIBUTES.items()}

    # --- modality (token-dispatch execution in the MoE model) and task routing
    for router, extra in (("modality", ["moe.execution=dispatch"]), ("task", [])):
        model = _moe_model(router, extra)
        before = _run(model, batches)
        rep = fold_model(model)
        after = _run(model, batches)
        key_of = (lambda b: b.modality) if router == "modality" else (
            lambda b: torch.full_like(b.modality, b.task_id))
        res[f"{router}_diff"] = _per_condition_diff(batches, before, after, key_of)
        res[f"{router}_loss"] = [(a[1], b[1]) for a, b in zip(before, after)]
        res[f"{router}_report"] = rep

    # --- content-dependent routing cannot fold
    model = _moe_model("token")
    try:
        fold_model(model)
        res["token_error"] = None
    except ValueError as err:
        res["token_error"] = str(err)
    return res


@pytest.fixture(scope="module")
def results() -> dict:
    (res,) = run_ranks(_checks, 1, timeout=120)
    return res


def _counts() -> dict[str, int]:
    """Arithmetic: the dense model, one MoE layer's linears, one attribute / modality router."""
    from tools.param_count import arithmetic_count

    cfg = apply_overrides(Config(), ["model.drop_path_rate=0.0"])
    h, f, e = cfg.model.hidden_size, cfg.model.ffn_hidden_size, 4
    linears = (3 * h * h + 3 * h) + (h * h + h) + (f * h + f) + (h * f + h)  # qkv, out, fc1, fc2
    router = lambda width: width * h + h + 2 * h + h * e  # noqa: E731 - embed, LayerNorm, gate
    return {
        "dense": sum(arithmetic_count(cfg).values()),
        "layers": cfg.model.num_layers, "experts": e, "linears": linears,
        "attribute_router": router(8), "modality_router": router(3), "task_router": router(1),
    }


def test_attribute_fold_matches_moe_eval_for_every_condition(results: dict) -> None:
    diff, keys = results["attr_diff"], results["attr_keys"]
    # every reference condition occurs in the four task batches, and each matches
    assert set(diff) == {str(k) for k in keys.values()}
    assert max(diff.values()) < TOL, diff
    for moe_loss, folded_loss in results["attr_loss"]:
        assert abs(moe_loss - folded_loss) < TOL
    # routers and experts are gone; 2 layers x 4 linears, each [6 conditions, out, in]
    assert results["attr_leftover"] == []
    shapes = results["attr_folded"]
    assert len(shapes) == 8 and {s[0] for s in shapes.values()} == {6}
    assert shapes["encoder.layers.0.self_attention.linear_qkv"] == (6, 192, 64)
    assert shapes["encoder.layers.1.mlp.linear_fc2"] == (6, 64, 256)


def test_fold_report_routes_and_unused_experts(results: dict) -> None:
    report = results["attr_report"]
    assert report.strategy == "attribute" and len(report.conditions) == 6
    assert report.conditions[0] == "visual_input 10011000"
    for lin in report.linears:
        for experts, gates in zip(lin.experts, lin.gates):
            assert len(set(experts)) == 2 and abs(sum(gates) - 1.0) < 1e-5
        used = {e for experts in lin.experts for e in experts}
        assert sorted(set(range(4)) - used) == lin.unused_experts
    # the pair shares one decision: out repeats qkv's routes, fc2 repeats fc1's
    routes = report.routes("caption_text 11010101")
    assert routes["encoder.layers.0.self_attention.linear_qkv"] == \
        routes["encoder.layers.0.self_attention.linear_proj"]
    assert routes["encoder.layers.1.mlp.linear_fc1"] == routes["encoder.layers.1.mlp.linear_fc2"]
    assert "layer0.attn:" in results["attr_text"] and "parameters:" in results["attr_text"]


def test_parameter_counts_follow_the_arithmetic(results: dict) -> None:
    c = _counts()
    extra_experts = c["layers"] * (c["experts"] - 1) * c["linears"]
    routers = 2 * c["layers"]  # one per pair (attn, mlp) per layer
    for router in ("attr", "modality", "task"):
        report = results[f"{router}_report"]
        width = {"attr": "attribute", "modality": "modality", "task": "task"}[router]
        # one condition's deploy copy is exactly the dense model
        assert report.params_per_condition == c["dense"]
        assert report.moe_params == c["dense"] + extra_experts + routers * c[f"{width}_router"]
        num = len(report.conditions)
        assert report.folded_params == c["dense"] + (num - 1) * c["layers"] * c["linears"]
    two = results["two_report"]
    assert two.folded_params == two.deploy_params(2) == c["dense"] + c["layers"] * c["linears"]


def test_two_condition_deploy_copy_and_unknown_conditions(results: dict) -> None:
    keys = results["attr_keys"]
    assert set(results["two_diff"]) == {str(keys["visual_input"]), str(keys["text_target"])}
    assert max(results["two_diff"].values()) < TOL
    err = results["two_unknown"]
    assert err is not None and "caption_visual 11011000" in err
    assert "visual_input 10011000, text_target 10010110" in err
    err = results["attr_unknown"]
    assert err is not None and "01100000" in err and "not among the folded conditions" in err


@pytest.mark.parametrize("router", ["modality", "task"])
def test_modality_and_task_routing_fold(results: dict, router: str) -> None:
    diff = results[f"{router}_diff"]
    assert diff and max(diff.values()) < TOL, diff
    if router == "modality":
        assert set(diff) == {"0", "1"}  # text and image tokens in these batches
        assert results["modality_report"].conditions == ["text", "image", "video"]
    for moe_loss, folded_loss in results[f"{router}_loss"]:
        assert abs(moe_loss - folded_loss) < TOL


def test_token_routing_refuses_to_fold(results: dict) -> None:
    assert "segment-constant" in results["token_error"]
    assert "['token']" in results["token_error"]


def test_bad_condition_lists_are_refused() -> None:
    from megatron_uni.moe.fold import _resolve_conditions

    with pytest.raises(ValueError, match="unknown attribute name 'pixels'"):
        _resolve_conditions("attribute", ["pixels"], 8, 1)
    with pytest.raises(ValueError, match="8-bit"):
        _resolve_conditions("attribute", [(1, 0, 1)], 8, 1)
    with pytest.raises(ValueError, match="listed twice"):
        _resolve_conditions("attribute", ["text_input", (0, 1, 0, 1, 0, 1, 0, 0)], 8, 1)
    with pytest.raises(ValueError, match="knows 2 tasks"):
        _resolve_conditions("task", [0, 2], 8, 2)
    keys, labels, table = _resolve_conditions("modality", ["image", 2], 8, 1)
    assert keys == [1, 2] and labels == ["image", "video"] and table.tolist()[0] == [0, 1, 0]
