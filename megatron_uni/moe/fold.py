"""Deployment folding for segment-constant routing: one dense weight per condition.

Shape legend: C folded conditions, E experts, o/i out/in features, n tokens, D condition width.

A modality / task / attribute router ignores token content, so at inference every token of one
condition takes the same experts with the same gates, and since each expert is a linear map,
``sum_e g_ce (W_e x + b_e) = (sum_e g_ce W_e) x + sum_e g_ce b_e``. :func:`fold_model` computes
the noise-free gates of every MoE linear for a list of conditions, merges the gated experts into
one ``[C, o, i]`` weight and ``[C, o]`` bias, and swaps each :class:`MoEColumnLinear` /
:class:`MoERowLinear` for a :class:`FoldedLinear` that picks its condition's weight per token.
Routers, expert tensors and unused experts leave the model; the routing conditions each forward
passes down (built from the batch, as before) tell each token's condition. A deploy copy for one condition is as
large as the dense model (``FoldReport.params_per_condition``); for k conditions it needs the
shared parameters once and the folded linears k times (``FoldReport.deploy_params(k)``: the
reference's 167M for MoE-B with the two image-text conditions).

    model.eval()
    report = fold_model(model)  # attribute routing: the six reference vectors by default
    print(report.format())

Folding works on one pipeline stage with TP = EP = expert-TP = 1 (single-process deployment);
it changes the model in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

from megatron_uni.batch import ATTRIBUTES, Modality
from megatron_uni.moe.conditions import RoutingConditions
from megatron_uni.moe.grouped import grouped_matmul
from megatron_uni.moe.linear import MoEColumnLinear, MoERowLinear
from megatron_uni.moe.routers import SEGMENT_CONSTANT, TableRouter

Condition = Any  # attribute: name or D bits; modality: Modality / int / name; task: int


class UnfoldedConditionError(ValueError):
    """A batch carries a condition the model was not folded for."""


def attribute_label(bits: Sequence[float]) -> str:
    """``"visual_input 10011000"`` for a reference vector, else just the bits."""
    key = "".join(str(int(b)) for b in bits)
    names = [name for name, vec in ATTRIBUTES.items() if tuple(int(b) for b in bits) == vec]
    return f"{names[0]} {key}" if names else key


class ConditionLookup:
    """Maps the tokens of a micro-batch (its :class:`RoutingConditions`) to folded conditions.
    Shared by every :class:`FoldedLinear` of a model; holds only the folded keys."""

    def __init__(self, strategy: str, keys: list, labels: list[str]) -> None:
        self.strategy = strategy
        self.keys, self.labels = keys, labels  # attribute: tuples of bits; else ints

    def per_token(self, conditions: RoutingConditions) -> torch.Tensor:
        """[n] long: the folded condition of each of this rank's tokens (megatron order)."""
        if conditions is None:
            raise RuntimeError("a folded model needs the routing conditions: run the model on a "
                               "batch rather than a bare encoder")
        if self.strategy == "attribute":
            table = conditions.attribute_table.float()  # [A, D]
            known = torch.tensor(self.keys, dtype=table.dtype, device=table.device)  # [C, D]
            match = (table[:, None, :] == known[None]).all(-1)  # [A, C]
            of_row = torch.where(match.any(-1), match.float().argmax(-1), -1)
            raw = conditions.attribute_index
            index = of_row[raw]
        else:
            if self.strategy == "modality":
                raw = conditions.modality
                size = len(Modality)
            else:
                raw = torch.full_like(conditions.modality, conditions.task_id)
                size = max(conditions.task_id + 1, max(self.keys) + 1)
            of_value = torch.full((size,), -1, dtype=torch.long, device=raw.device)
            of_value[torch.tensor(self.keys, device=raw.device)] = torch.arange(
                len(self.keys), device=raw.device)
            index = of_value[raw]
        missing = (index < 0) & conditions.valid
        if bool(missing.any()):  # deployment check: one host sync per linear call
            value = raw[int(missing.nonzero()[0, 0])]
            raise UnfoldedConditionError(
                f"{self.strategy} condition {self._label(conditions, value)} is not among the "
                f"folded conditions ({', '.join(self.labels)}); fold the MoE model again with it "
                f"in `conditions`"
            )
        return index.clamp(min=0)  # padding tokens with an unfolded condition: never read

    def _label(self, conditions: RoutingConditions, value: torch.Tensor) -> str:
        """A readable name of one token's raw condition (attribute row, modality, task)."""
        if self.strategy == "attribute":
            return attribute_label(conditions.attribute_table[int(value)].tolist())
        if self.strategy == "modality":
            return Modality(int(value)).name.lower()
        return f"task {int(value)}"


class FoldedLinear(MegatronModule):
    """A folded expert linear: ``[s, b, i] -> ([s, b, o], None, decision)``, the interface of
    the MoE linear it replaces (TP = 1, so column and row layouts coincide). ``weight``
    [C, o, i], ``bias`` [C, o] or None; each token uses its condition's row."""

    def __init__(self, config: Any, weight: torch.Tensor, bias: torch.Tensor | None,
                 lookup: ConditionLookup, name: str) -> None:
        super().__init__(config=config)
        self.weight = torch.nn.Parameter(weight)
        self.bias = torch.nn.Parameter(bias) if bias is not None else None
        self.lookup = lookup  # not a module: shared, holds no parameters
        self.name = name

    def forward(self, x: torch.Tensor, conditions: RoutingConditions, decision: Any = None
                ) -> tuple[torch.Tensor, None, Any]:
        tokens = x.reshape(-1, x.shape[-1])  # [n, i]
        cond = self.lookup.per_token(conditions)
        if cond.shape[0] != tokens.shape[0]:
            raise RuntimeError(f"{self.name}: {tokens.shape[0]} tokens but the routing "
                               f"conditions describe {cond.shape[0]}")
        out = grouped_matmul(tokens, cond, self.weight, self.bias)
        return out.view(*x.shape[:-1], -1), None, decision


@dataclass
class LinearFold:
    """One folded linear: per condition the chosen experts and their gates."""

    name: str  # module path in the model
    router: str  # the routing decision it used (e.g. "layer0.attn")
    num_experts: int
    experts: list[list[int]]  # [C][k]
    gates: list[list[float]]  # [C][k]
    unused_experts: list[int]  # chosen by no folded condition: dropped
    params_per_condition: int  # o * i + o


@dataclass
class FoldReport:
    """What :func:`fold_model` did, and what deployment costs (parameters of this stage)."""

    strategy: str
    conditions: list[str]
    linears: list[LinearFold] = field(default_factory=list)
    moe_params: int = 0  # the MoE model: shared + all experts + routers
    folded_params: int = 0  # the folded model: shared + C folded copies of each linear
    shared_params: int = 0  # everything but the folded linears

    @property
    def folded_linear_params(self) -> int:
        """One condition's folded linears together."""
        return sum(f.params_per_condition for f in self.linears)

    @property
    def params_per_condition(self) -> int:
        """A deploy copy for one condition: the dense-equivalent parameter count."""
        return self.deploy_params(1)

    def deploy_params(self, num_conditions: int) -> int:
        """A deploy copy that serves ``num_conditions`` conditions."""
        return self.shared_params + num_conditions * self.folded_linear_params

    def routes(self, condition: str) -> dict[str, list[tuple[int, float]]]:
        """linear name -> [(expert, gate)] for one condition (a label of ``conditions``)."""
        c = self.conditions.index(condition)
        return {f.name: list(zip(f.experts[c], f.gates[c])) for f in self.linears}

    def format(self) -> str:
        """A readable table: routes per condition, unused experts, parameter counts."""
        lines = [f"folded {len(self.linears)} expert linears for {len(self.conditions)} "
                 f"{self.strategy} conditions"]
        seen = set()
        for f in self.linears:
            if f.router in seen:
                continue  # the paired linear repeats its owner's routes
            seen.add(f.router)
            lines.append(f"  {f.router}:")
            for label, experts, gates in zip(self.conditions, f.experts, f.gates):
                route = ", ".join(f"e{e}:{g:.3f}" for e, g in zip(experts, gates))
                lines.append(f"    {label:<26} {route}")
            if f.unused_experts:
                lines.append(f"    unused (dropped): {f.unused_experts}")
        lines += [
            f"parameters: MoE model {self.moe_params:,}; one condition's deploy copy "
            f"{self.params_per_condition:,}; all {len(self.conditions)} conditions "
            f"{self.folded_params:,}",
        ]
        return "\n".join(lines)


def _resolve_conditions(strategy: str, conditions: Sequence[Condition] | None, width: int,
                        num_tasks: int) -> tuple[list, list[str], torch.Tensor]:
    """(keys, labels, gate input table [C, D]) of the conditions to fold."""
    if strategy == "attribute":
        given = list(ATTRIBUTES.values()) if conditions is None else list(conditions)
        keys = []
        for c in given:
            if isinstance(c, str):
                if c not in ATTRIBUTES:
                    raise ValueError(f"unknown attribute name {c!r}; known: "
                                     f"{', '.join(ATTRIBUTES)}")
                c = ATTRIBUTES[c]
            bits = tuple(int(b) for b in c)
            if len(bits) != width or any(b not in (0, 1) for b in bits):
                raise ValueError(f"attribute condition {c} is not a {width}-bit 0/1 vector")
            keys.append(bits)
        labels = [attribute_label(k) for k in keys]
        table = torch.tensor(keys, dtype=torch.float32).reshape(len(keys), width)
    elif strategy == "modality":
        given = list(Modality) if conditions is None else list(conditions)
        keys = [int(Modality[c.upper()]) if isinstance(c, str) else int(c) for c in given]
        if any(not 0 <= k < len(Modality) for k in keys):
            raise ValueError(f"modality conditions must lie in 0..{len(Modality) - 1}: {keys}")
        labels = [Modality(k).name.lower() for k in keys]
        table = torch.eye(len(Modality))[keys]
    else:
        keys = list(range(num_tasks)) if conditions is None else [int(c) for c in conditions]
        if any(not 0 <= k < num_tasks for k in keys):
            raise ValueError(f"task conditions must lie in 0..{num_tasks - 1} (the task router "
                             f"knows {num_tasks} tasks): {keys}")
        labels = [f"task {k}" for k in keys]
        table = torch.eye(num_tasks)[keys]
    if not keys:
        raise ValueError("fold_model needs at least one condition")
    if len(set(keys)) != len(keys):
        raise ValueError(f"conditions listed twice: {labels}")
    return keys, labels, table


def _check_layout(name: str, linear: MoEColumnLinear | MoERowLinear) -> None:
    experts = linear.experts
    sizes = {"TP": linear.tp, "EP": experts.ep_group.size(), "expert-TP": experts.etp_group.size()}
    wide = {k: v for k, v in sizes.items() if v > 1}
    if wide:
        raise ValueError(f"{name}: folding runs with TP = EP = expert-TP = 1 (single-process "
                         f"deployment), not {wide}; load the checkpoint in that layout first")


def _parent(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    path, _, child = name.rpartition(".")
    return (model.get_submodule(path) if path else model), child


def fold_model(model: torch.nn.Module, conditions: Sequence[Condition] | None = None
               ) -> FoldReport:
    """Fold every MoE linear of ``model`` (one stage of a UniPerceiver) for ``conditions``.

    ``conditions``: attribute routing: names of ``ATTRIBUTES`` or 0/1 vectors (default: the six
    reference vectors); modality: ``Modality`` members, ints or names (default: all three); task:
    task ids (default: every task the router knows). Gates are the eval-mode ones (no noise).
    Changes ``model`` in place; a batch with a condition outside the list raises
    :class:`UnfoldedConditionError`.
    """
    moe = [(n, m) for n, m in model.named_modules()
           if isinstance(m, (MoEColumnLinear, MoERowLinear))]
    if not moe:
        raise ValueError("the model has no expert linears to fold (dense model, or folded already)")
    # A pair's second linear (out / fc2) follows the router of the first one before it.
    owners: dict[str, TableRouter] = {}
    router_of: dict[str, Any] = {}
    for name, m in moe:
        if m.router is not None:
            owners[m.name] = m.router
        router_of[name] = m.name
    strategies = {r.strategy for r in owners.values()}
    if len(strategies) != 1 or not strategies <= set(SEGMENT_CONSTANT):
        raise ValueError(f"folding needs segment-constant routing ({', '.join(SEGMENT_CONSTANT)}): "
                         f"routes that read token content cannot be fixed ahead of time; this "
                         f"model routes by {sorted(strategies)}")
    for name, linear in moe:
        _check_layout(name, linear)
    (strategy,) = strategies
    first: TableRouter = next(iter(owners.values()))
    width = first.embed.in_features
    keys, labels, table = _resolve_conditions(strategy, conditions, width, first.num_tasks)
    lookup = ConditionLookup(strategy, keys, labels)
    report = FoldReport(strategy, labels, moe_params=sum(p.numel() for p in model.parameters()))

    with torch.no_grad():
        gates: dict[str, torch.Tensor] = {}  # per decision: [C, E] noise-free gates
        for slot, router in owners.items():
            feats = table.to(router.gate.weight.device)
            gates[slot] = router.clean_gates(feats)
        for name, linear in moe:
            probs = gates[router_of[name]]
            weight, bias = linear.experts.full_weights()  # [E, o, i], [E, o]
            # Fold in fp32 whatever the training precision, then store in the weights' dtype.
            merged = torch.einsum("ce,eoi->coi", probs, weight.float()).to(weight.dtype)
            merged_bias = None if bias is None else (probs @ bias.float()).to(bias.dtype)
            router = owners[router_of[name]]
            chosen = probs > 0
            top = probs.topk(router.topk, dim=-1)
            report.linears.append(LinearFold(
                name=name,
                router=router.name,
                num_experts=probs.shape[1],
                experts=top.indices.tolist(),
                gates=[[round(g, 6) for g in row] for row in top.values.tolist()],
                unused_experts=(~chosen.any(0)).nonzero().flatten().tolist(),
                params_per_condition=merged[0].numel() + (0 if bias is None else bias.shape[1]),
            ))
            folded = FoldedLinear(linear.config, merged.contiguous(), merged_bias, lookup, name)
            folded.train(linear.training)
            parent, child = _parent(model, name)
            setattr(parent, child, folded)

    report.folded_params = sum(p.numel() for p in model.parameters())
    folded_total = sum(f.params_per_condition for f in report.linears) * len(keys)
    report.shared_params = report.folded_params - folded_total
    return report
