"""The planner's arithmetic: per-rank memory, FLOPs, communication and step time of one layout.

Shape legend: R rows and S row length of a micro-batch, n = R S tokens, h hidden, f FFN width,
E experts, k top-k, A distinct routing conditions per micro-batch, t = TP, G = ETP x EP (the
group the expert paths exchange within), M micro-batches per step, w / a bytes per weight /
activation element (4 fp32, 2 bf16).

Memory per rank (bytes), on the stage that needs the most:
- weights ``w P`` and gradients ``4 P`` (megatron DDP reduces gradients in fp32), P = this
  rank's parameters: dense linears and the vocabulary split over TP, experts over EP x ETP,
  norms, LayerScale, routers, patch embedding and head replicated;
- distributed optimizer: Adam's two fp32 moments ``8 P`` and, in bf16, fp32 main weights ``4 P``
  (fp32 runs step the parameters themselves), each sharded: dense parameters over DP, expert
  parameters over expert-DP (``parallel.distributed_optimizer=false``: not sharded);
- activations per micro-batch and layer, ``a n / t`` x (11 h + 2 f) elements under sequence
  parallelism (the residual stream and the two LayerNorms' inputs and outputs, q/k/v, the
  attention output and its copy, the GELU input and output, both LayerScale inputs), plus the
  layer's boolean attention mask ``R S^2`` (not split over TP); an MoE layer adds its path's
  buffers: grouped, per expert linear the permuted input and sorted output ``n (i + o) / t`` and
  the k selected expert copies and their merge ``(k + 1) A o i``, and under TP the whole
  sequence gather ``n o (1 - 1/t)`` behind the column output's slice (qkv, fc1); dispatch,
  the TP x EP group's gathered tokens and their routed copies
  ``(G n / t + k G n / (t EP)) (i + o)``;
- tokenizer and head: ``5 h n / t`` per micro-batch, half on stage 0, half on the last stage;
- full recompute: each layer keeps only its input ``h n / t``; the backward then holds one
  recomputed layer's activations and, as without recompute, one ``n (f + h) / t`` gradient
  pair in flight (the gradients are freed as the backward consumes them; counting as many
  gradient bytes as activations, 2 layers, overestimated the TP x PP x EP recompute layout's
  measured peak by 20 %);
- the grouped path's transient buffer of the largest expert linear (one at a time): under EP
  with expert-TP 1 the partial merges of every rank's conditions ``G A o i w``, else the
  gathered experts ``E o i w``;
- the pipeline (1F1B): stage s holds min(PP - s, M) micro-batches in flight, stage 0 the most.

FLOPs: ``megatron_uni.training.metrics.step_flops``, the training log's count (active experts
only). Time: FLOPs per rank at ``gpu_tflops`` (x 4/3 with recompute, x (1 + (PP - 1) / M) for
the 1F1B bubble) plus every collective at its link's bandwidth, none overlapped: a ring
all-gather or reduce-scatter of B gathered bytes over g ranks takes ``(g - 1) / g B / bw``; a
group within ``gpus_per_node`` consecutive ranks (megatron's order: TP innermost, then EP /
DP, PP outermost) uses the intra-node bandwidth, else the inter-node one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from megatron_uni.config import Config
from megatron_uni.moe.linear import FLOPS_PER_BYTE, choose_execution, resolve_execution
from megatron_uni.training.metrics import step_flops
from tools.param_count import LINEAR_SHAPES, layer_params, linear_shape

GIB = 2**30


@dataclass(frozen=True)
class Hardware:
    """The cluster: GPUs, memory per GPU, sustained matmul rate, link bandwidths (GB/s per GPU)."""

    gpus: int
    gpu_memory_gib: float = 141.0
    gpu_tflops: float = 400.0  # about half an H200's measured 790 bf16 ceiling
    intra_node_gbps: float = 400.0  # NVLink all-gather bandwidth per GPU
    inter_node_gbps: float = 50.0  # 400 Gb/s InfiniBand per GPU
    gpus_per_node: int = 8
    headroom: float = 0.9  # fraction of the memory a plan may use (allocator fragmentation)


@dataclass(frozen=True)
class Shape:
    """One micro-batch: rows x row length; routing conditions in it; micro-batches per step."""

    rows: int
    seq_len: int
    conditions: int = 2
    micro_batches: int = 1


@dataclass
class Plan:
    """Everything the planner says about one layout."""

    tp: int
    pp: int
    ep: int
    etp: int
    dp: int
    edp: int
    recompute: bool
    micro_batches: int
    memory: dict[str, float] = field(default_factory=dict)  # bytes per rank, worst stage
    comm: dict[str, float] = field(default_factory=dict)  # bytes per rank and step, per axis
    comm_s: dict[str, float] = field(default_factory=dict)
    comm_detail: dict[str, float] = field(default_factory=dict)  # the DP column's two parts
    execution: dict[str, str] = field(default_factory=dict)  # expert linear -> path
    flops: float = 0.0  # model FLOPs per step, all ranks (the training log's)
    compute_s: float = 0.0
    step_s: float = 0.0
    fits: bool = True

    @property
    def total_bytes(self) -> float:
        return sum(self.memory.values())

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["total_bytes"] = self.total_bytes
        return out


def _bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def _group_bw(hw: Hardware, span: int) -> float:
    """Bandwidth (bytes/s) of a group whose members lie within ``span`` consecutive ranks."""
    gbps = hw.intra_node_gbps if span <= hw.gpus_per_node else hw.inter_node_gbps
    return gbps * 1e9


def _ring(nbytes: float, group: int) -> float:
    """Bytes each rank sends in a ring all-gather / reduce-scatter of ``nbytes`` gathered."""
    return nbytes * (group - 1) / group if group > 1 else 0.0


def rank_params(cfg: Config, layers: range, first: bool, last: bool) -> dict[str, int]:
    """This rank's parameters on a stage of ``layers``: dense (sharded over DP) and expert
    (sharded over expert-DP) parameters."""
    from megatron_uni.batch import TASK_FAMILIES  # noqa: PLC0415
    from megatron_uni.models.embeddings import padded_vocab_size  # noqa: PLC0415

    m, p = cfg.model, cfg.parallel
    h, t, ep, etp = m.hidden_size, p.tp, p.ep, p.expert_tp()
    dense = 0
    expert = 0
    for layer in layers:
        parts = layer_params(cfg, layer)
        dense += parts["norms"] + parts["routers"]
        is_moe = parts["experts"] > 0
        for name in LINEAR_SHAPES:
            o, i = linear_shape(cfg, name)
            if is_moe and name in cfg.moe.linears:
                local = cfg.moe.num_experts // ep
                expert += local * (o * i // etp + o)
            else:  # column-parallel splits the bias too; a row-parallel bias is replicated
                dense += o * i // t + (o // t if name in ("qkv", "fc1") else o)
    if first:
        dense += (3 * m.patch_size**2 * h + h + m.max_frames * h
                  + (3 * m.patch_size**2 * h if m.frame_difference else 0)
                  + padded_vocab_size(m.vocab_size, t) * h // t + m.max_text_positions * h
                  + 3 * h)
    if last:
        dense += 2 * h + h * h + h + len(TASK_FAMILIES)
    return {"dense": dense, "expert": expert}


def layer_activations(cfg: Config, layer: int, shape: Shape, a: int, paths: dict[str, str]
                      ) -> tuple[float, float]:
    """(saved bytes of one micro-batch through ``layer`` on one rank, transient bytes while it
    runs: the grouped path's gathered experts)."""
    m, p = cfg.model, cfg.parallel
    h, f, t = m.hidden_size, m.ffn_hidden_size, p.tp
    n = shape.rows * shape.seq_len
    saved = a * n / t * (11 * h + 2 * f) + shape.rows * shape.seq_len**2
    transient = 0.0
    if not (cfg.moe.enabled and layer in cfg.moe.layer_indices(m.num_layers)):
        return saved, transient
    k, e, ep = cfg.moe.topk, cfg.moe.num_experts, p.ep
    group = p.expert_tp() * ep
    for name in cfg.moe.linears:
        o, i = linear_shape(cfg, name)
        if t > 1 and name in ("qkv", "fc1"):
            # the column layout is a slice of the sequence all-gather [S, b, o]: the slice that
            # attention / GELU saves keeps the whole gathered tensor alive
            saved += a * n * o * (1 - 1 / t)
        if paths[name] == "grouped":
            saved += a * (n / t * (i + o) + (k + 1) * shape.conditions * o * i)
            if group > 1:  # the partial merges of every rank's conditions, or every expert
                held = group * shape.conditions if p.expert_tp() == 1 else e
                transient = max(transient, a * held * o * i)
        else:
            gathered = group * n / t
            saved += a * (gathered + k * gathered / ep) * (i + o)
    return saved, transient


def exchanges_merges(p: Any) -> bool:
    """Whether the grouped path exchanges partial merges (``ExpertLinears.exchanges_merges``:
    more than one rank in the TP x EP group, whole experts per rank) rather than experts."""
    return p.expert_tp() * p.ep > 1 and p.expert_tp() == 1


def expert_paths(cfg: Config, shape: Shape, precision: str, device: str = "cuda"
                 ) -> dict[str, str]:
    """The path ``moe.execution`` takes for each expert linear, decided as the layers decide it
    (``choose_execution`` on this micro-batch's shape and the layout)."""
    if not cfg.moe.enabled:
        return {}
    p = cfg.parallel
    configured = resolve_execution(cfg.moe)
    out = {}
    for name in cfg.moe.linears:
        o, i = linear_shape(cfg, name)
        if configured != "auto":
            out[name] = configured
            continue
        out[name] = choose_execution(
            tokens=shape.rows * shape.seq_len // p.tp, conditions=shape.conditions,
            topk=cfg.moe.topk, in_features=i, out_features=o,
            local_experts=cfg.moe.num_experts // p.ep, group_size=p.expert_tp() * p.ep,
            etp=p.expert_tp(), element_bytes=_bytes(precision),
            flops_per_byte=cfg.moe.auto_flops_per_byte or FLOPS_PER_BYTE[device],
            exchange_bound=shape.conditions if exchanges_merges(p) else None)
    return out


def plan_layout(cfg: Config, hw: Hardware, shape: Shape, precision: str = "bf16",
                device: str = "cuda") -> Plan:
    """Memory, FLOPs, communication and time of ``cfg``'s layout on ``hw.gpus`` ranks
    (``device``: whose exchange rate ``moe.execution=auto`` uses, as the layers do)."""
    m, p, moe = cfg.model, cfg.parallel, cfg.moe
    world = hw.gpus
    dp, edp = p.dp(world), p.expert_dp(world)
    t, pp, ep, etp = p.tp, p.pp, p.ep, p.expert_tp()
    w = a = _bytes(precision)
    h, f = m.hidden_size, m.ffn_hidden_size
    n = shape.rows * shape.seq_len
    mb = shape.micro_batches
    per_stage = m.num_layers // pp
    paths = expert_paths(cfg, shape, precision, device)
    recompute = cfg.train.recompute
    plan = Plan(t, pp, ep, etp, dp, edp, recompute, mb, execution=paths)

    worst: dict[str, float] = {}
    for stage in range(pp):
        layers = range(stage * per_stage, (stage + 1) * per_stage)
        first, last = stage == 0, stage == pp - 1
        params = rank_params(cfg, layers, first, last)
        total = params["dense"] + params["expert"]
        shard = (params["dense"] / dp + params["expert"] / edp) if p.distributed_optimizer \
            else total
        acts = [layer_activations(cfg, layer, shape, a, paths) for layer in layers]
        edge = a * 5 * h * n / t * (int(first) + int(last)) / 2 if (first or last) else 0.0
        if recompute:
            per_mb = len(acts) * a * h * n / t + edge
        else:
            per_mb = sum(s for s, _ in acts) + edge
        working = a * n / t * (f + h) + (max(s for s, _ in acts) if recompute else 0.0)
        in_flight = min(pp - stage, mb)
        mem = {
            "weights": w * total,
            "gradients": 4.0 * total,
            "main_weights": 0.0 if precision == "fp32" else 4.0 * shard,
            "adam_moments": 8.0 * shard,
            "activations": in_flight * per_mb,
            "backward_working_set": working,
            "moe_gathered_experts": max((tr for _, tr in acts), default=0.0),
            "batch_and_mask": in_flight * shape.rows * shape.seq_len**2,
        }
        if sum(mem.values()) > sum(worst.values()):
            worst = mem
    plan.memory = worst
    plan.fits = plan.total_bytes <= hw.headroom * hw.gpu_memory_gib * GIB

    # FLOPs: the training log's count, for every token of the step
    tokens = n * mb * dp
    plan.flops = step_flops(cfg, tokens, shape.seq_len)
    factor = (4.0 / 3.0 if recompute else 1.0) * (1.0 + (pp - 1) / mb)
    plan.compute_s = plan.flops / world / (hw.gpu_tflops * 1e12) * factor

    # communication per rank and step, per axis
    comm = {"tp": 0.0, "ep": 0.0, "dp": 0.0, "pp": 0.0}
    moe_layers = set(moe.layer_indices(m.num_layers)) if moe.enabled else set()
    again = 1.0 if recompute else 0.0  # full recompute runs each forward twice
    for layer in range(per_stage):  # stage 0's layers
        for name in LINEAR_SHAPES:
            o, i = linear_shape(cfg, name)
            expert = layer in moe_layers and name in moe.linears
            if t > 1:
                # sequence parallelism: a gather or scatter per linear forward; its backward
                # does the opposite, and a column linear gathers its input again for the
                # weight gradient (dense: h wide; expert linears gather / scatter their own
                # widths, with no second gather)
                width = (o if name in ("qkv", "fc1") else i) if expert else h
                backward = 1.0 if expert or name in ("out", "fc2") else 2.0
                comm["tp"] += (1.0 + again + backward) * _ring(a * n * width, t)
            if expert and etp * ep > 1:
                group = etp * ep
                if paths[name] == "grouped" and exchanges_merges(p):
                    # reduce-scatter the partial merges of every rank's conditions, all-gather
                    # their gradients
                    held = group * shape.conditions
                    comm["ep"] += (2.0 + again) * _ring(w * held * o * i, group)
                elif paths[name] == "grouped":  # gather every expert shard; reduce-scatter grads
                    comm["ep"] += (2.0 + again) * _ring(w * moe.num_experts * o * i, group)
                else:  # gather tokens / reduce-scatter outputs, and again for the gradients
                    comm["ep"] += (2.0 + again) * _ring(a * group * n / t * (i + o), group)
    comm["tp"] *= mb
    comm["ep"] *= mb
    params0 = rank_params(cfg, range(per_stage), True, pp == 1)
    both = 2 if moe.enabled else 1  # 0.16.1's chained optimizer gathers every buffer twice
    grads = _ring(4.0 * params0["dense"], dp) + _ring(4.0 * params0["expert"], edp)
    gathers = both * (_ring(w * params0["dense"], dp) + _ring(w * params0["expert"], edp))
    plan.comm_detail = {"dp_grad_reduce_scatter": grads, "dp_param_all_gather": gathers}
    comm["dp"] = grads + gathers
    if pp > 1:
        comm["pp"] = 2.0 * mb * a * n / t * h  # activations forward, their gradients back
    plan.comm = comm
    spans = {"tp": t, "ep": etp * ep, "dp": t * dp, "pp": world}
    plan.comm_s = {axis: comm[axis] / _group_bw(hw, spans[axis]) for axis in comm}
    plan.step_s = plan.compute_s + sum(plan.comm_s.values())
    return plan


def gib(nbytes: float) -> float:
    return nbytes / GIB


def human_flops(value: float) -> str:
    exp = int(math.log10(max(value, 1))) // 3
    unit = ["", "k", "M", "G", "T", "P", "E"][min(exp, 6)]
    return f"{value / 10 ** (3 * min(exp, 6)):.1f} {unit}FLOP"
