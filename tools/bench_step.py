"""Training-step benchmark: our model's dense and MoE paths beside megatron-core's GPT, the
reference's merged-weight MoE and DeepSpeed-MoE, on any device and layout, in one run.

    python -m tools.bench_step --config configs/runs/bench_cpu.yaml --threads 1 \\
        --json bench.json --markdown bench.md [--variants dense,attr-grouped] [key=value ...]
    torchrun --nproc-per-node 4 -m tools.bench_step --config configs/runs/bench_ep.yaml \\
        --variants attr-grouped,attr-dispatch,attr-auto parallel.ep=4

Warm-up, then ``--steps`` timed training steps (megatron's schedule, optimizer, zero grads) on a
batch built before timing (data loading is ``tools.bench_loader``'s business); every rank runs,
rank 0 prints. Per variant: median ms per step and per phase (forward / backward / optimizer,
measured where the forward's end is visible: one pipeline stage; "-" otherwise; backward ends
after megatron's gradient finalisation, the optimizer phase includes zeroing the gradient
buffers for the next step), tokens/s,
model TFLOP/s per rank (megatron_uni.training.metrics.step_flops: active experts only) and MFU
against a dense [tokens, hidden] x [hidden, ffn] matmul in the run's precision on the same
device (measured before and after the variants; the better one counts), peak memory per rank
(allocated on GPU, RSS high-water on CPU: rough there, the allocator keeps freed pages),
expert-parameter bytes per rank, bytes autograd saves for backward per step
(tools.bench_counters.SavedActivationCounter: device-independent), and bytes per step
and rank by collective kind (tools.bench_counters.CollectiveCounter; groups of one rank move
nothing and are not counted). ``vs first`` is the ratio of forward+backward ms to the first
variant's, ``vs own dense`` to the variant's own dense baseline (ours: dense; megatron-core:
mcore-dense; ref-merged, deepspeed-moe: ref-dense), ``step vs first`` of the whole step's.

Variants (``--variants``, comma-separated; default: all below):
  dense                our model, moe.num_experts=0 (and parallel.ep=1), same width
  ROUTER-EXECUTION     our MoE: ROUTER in attr|attribute|token|context|modality|task,
                       EXECUTION in grouped|dispatch|auto (attr-grouped, token-dispatch, ...)
  mcore-dense          megatron-core's GPTModel, local spec, same hidden/layers/heads/ffn,
                       micro-batch = the batch's rows, sequence = its row length; vocabulary
                       --gpt-vocab (the logits are counted in its FLOPs)
  mcore-moe            the same with moe.num_experts experts top-moe.topk on the fc1/fc2 of
                       moe.layers (megatron's MoE has no attention experts)
  ref-dense            a plain-torch pre-LN encoder of the same shape (tools.bench_baselines)
  ref-merged           the same with the reference's per-sample merged-weight MoE linears
                       (W = sum of the k chosen g_j * W_j per sample, one bmm), qkv/out/fc1/fc2
  deepspeed-moe        the same with deepspeed.moe.layer.MoE as FFN (skipped, with the
                       reason, where deepspeed does not import or run)

The batch: one captioning micro-batch of --rows x --seq-len tokens at model.image_size /
model.patch_size (one image + caption per input row, the vocabulary targets fill the rest).
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from megatron_uni.config import Config, ConfigError, load_config
from tools.bench_counters import matmul_ceiling
from tools.bench_measure import (
    Subject,
    combine,
    gather_ranks,
    measure,
    median_or_none,
    now,
    round_order,
    summarize,
)
from tools.bench_report import text_table, write_outputs

log = logging.getLogger("tools.bench_step")

DEFAULT_VARIANTS = (
    "dense", "attr-grouped", "attr-dispatch", "attr-auto", "token-dispatch",
    "mcore-dense", "mcore-moe", "ref-dense", "ref-merged", "deepspeed-moe",
)
ROUTERS = {"attr": "attribute", "attribute": "attribute", "token": "token",
           "context": "context", "modality": "modality", "task": "task"}
EXECUTIONS = ("grouped", "dispatch", "auto")


def expert_bytes(named: Sequence[tuple[str, torch.Tensor]]) -> int:
    """Bytes of expert parameters: marked ``allreduce = False`` (ours always; megatron's and
    DeepSpeed's under expert parallelism), or named ``experts`` (megatron's at EP=1)."""
    return sum(p.numel() * p.element_size() for name, p in named
               if getattr(p, "allreduce", True) is False or ".experts." in f".{name}")


# A dense model has no expert-parallel dimension: under an EP layout its baselines run with
# parallel.ep=1 on the same ranks (data parallel over what were the expert ranks).
DENSE = ["moe.num_experts=0", "parallel.ep=1"]


def parse_variant(name: str) -> dict[str, Any]:
    """``attr-grouped`` -> {"kind": "ours", "overrides": [...]}, ``mcore-moe`` -> ..."""
    if name == "dense":
        return {"kind": "ours", "overrides": DENSE}
    if name in ("mcore-dense", "mcore-moe", "ref-dense", "ref-merged", "deepspeed-moe"):
        return {"kind": name.split("-")[0] if name != "deepspeed-moe" else "deepspeed",
                "moe": name.endswith(("moe", "merged"))}
    router, _, execution = name.partition("-")
    if router in ROUTERS and execution in EXECUTIONS:
        return {"kind": "ours",
                "overrides": [f"moe.router={ROUTERS[router]}", f"moe.execution={execution}"]}
    raise ConfigError(
        f"unknown benchmark variant {name!r}", field="--variants", value=name,
        fix=f"one of {', '.join(DEFAULT_VARIANTS)}, or ROUTER-EXECUTION with ROUTER in "
            f"{'|'.join(ROUTERS)} and EXECUTION in {'|'.join(EXECUTIONS)}")


# ---------------------------------------------------------------------------- the batch


def caption_batch(cfg: Config, rows: int, seq_len: int, seed: int = 0) -> Any:
    """A captioning PackedBatch of exactly ``rows x seq_len``: one image + caption per input row
    (captions as long as the row allows), the vocabulary targets (2 tokens each) after them."""
    from megatron_uni.batch import VOCAB_SIZE  # noqa: PLC0415
    from megatron_uni.data import tasks  # noqa: PLC0415

    m = cfg.model
    patches = (m.image_size // m.patch_size) ** 2
    caption = (seq_len - 1 - patches) // 2
    if caption < 1:
        raise ConfigError(
            f"a row of {seq_len} tokens holds no image of {patches} patches plus a caption",
            field="--seq-len", value=seq_len, fix=f"at least {patches + 3}, or a smaller image")
    inputs = max(1, rows * 8 // 9)
    vocab_size = max(1, (rows - inputs) * (seq_len // 2))
    gen = torch.Generator().manual_seed(seed)
    vocab = torch.randperm(VOCAB_SIZE - 3, generator=gen)[:vocab_size].tolist()
    images = torch.randn(inputs, 1, 3, m.image_size, m.image_size, generator=gen)
    captions = [[vocab[int(i)] for i in torch.randint(0, vocab_size, (caption,), generator=gen)]
                for _ in range(inputs)]
    return tasks.captioning_batch(images, captions, vocab, patch_size=m.patch_size,
                                  seq_len=seq_len, max_caption_len=caption, num_rows=rows)


# ---------------------------------------------------------------------------- builders


def zero_grads(chunks: Sequence[Any], optimizer: Any) -> None:
    """Zero the DDP gradient buffers for the next step, at the end of this one: the zeroing
    counts in the optimizer phase (its cost grows with the parameters, as the optimizer's does;
    megatron's distributed optimizer zeroes them itself), not in forward+backward."""
    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()


def build_ours(cfg: Config, runtime: Any, rows: int, seq_len: int) -> Subject:
    """Our model through the trainer's builders and megatron's schedule (training/step.py)."""
    from megatron_uni.config.to_mcore import resolved_precision  # noqa: PLC0415
    from megatron_uni.training.loop import build_model_chunks  # noqa: PLC0415
    from megatron_uni.training.metrics import step_flops  # noqa: PLC0415
    from megatron_uni.training.optimizer import build_optimizer  # noqa: PLC0415
    from megatron_uni.training.step import forward_backward, unwrap  # noqa: PLC0415

    chunks, model = build_model_chunks(cfg, runtime)
    optimizer = build_optimizer(cfg, chunks, runtime.use_cpu,
                                resolved_precision(cfg, runtime.use_cpu))
    batch = caption_batch(cfg, rows, seq_len, cfg.train.seed)
    if not runtime.use_cpu:
        batch = batch.to(runtime.device)
    marks: dict[str, float] = {}
    if getattr(model, "head", None) is not None:  # the last module of the forward
        model.head.register_forward_hook(lambda *_: marks.__setitem__("forward",
                                                                      now(runtime.device)))

    def step(out: dict[str, float]) -> None:
        marks.clear()
        unwrap(chunks[0]).routing_tracker.reset()  # as the trainer does every step
        forward_backward(chunks, [batch])
        out["backward"] = now(runtime.device)
        optimizer.step()
        zero_grads(chunks, optimizer)
        out.update({k: v for k, v in marks.items()})

    named = [item for c in chunks for item in c.named_parameters()]
    tokens = int((batch.seq_id >= 0).sum()) * runtime.dp
    return Subject(step, [p for _, p in named], expert_bytes(named), tokens,
                   step_flops(cfg, tokens, seq_len), phases=runtime.pp == 1)


def _gpt_flops(cfg: Config, tokens: int, seq_len: int, moe: bool, vocab: int) -> float:
    from megatron_uni.config import apply_overrides  # noqa: PLC0415
    from megatron_uni.training.metrics import step_flops  # noqa: PLC0415

    gpt = apply_overrides(cfg, ["moe.linears=[fc1,fc2]"] if moe else DENSE)
    return step_flops(gpt, tokens, seq_len) + 3.0 * 2 * cfg.model.hidden_size * vocab * tokens


def build_mcore(cfg: Config, runtime: Any, rows: int, seq_len: int, moe: bool,
                vocab: int) -> Subject:
    """megatron-core's stock GPTModel (tools.mcore_smoke's builder, local spec, no TE)."""
    from megatron.core.transformer.module import Float16Module  # noqa: PLC0415

    from megatron_uni.config import apply_overrides  # noqa: PLC0415
    from megatron_uni.config.to_mcore import resolved_precision  # noqa: PLC0415
    from megatron_uni.training.optimizer import build_optimizer  # noqa: PLC0415
    from tools.mcore_smoke import build_gpt_moe, forward_backward, synthetic_batches, wrap_ddp  # noqa: PLC0415

    gcfg = apply_overrides(cfg, [f"model.vocab_size={vocab}",
                                 f"model.max_text_positions={max(seq_len, cfg.model.max_text_positions)}",
                                 *([] if moe else DENSE)])
    model = build_gpt_moe(gcfg, runtime, follow_moe_layers=True)
    if not runtime.use_cpu:
        model.cuda(torch.cuda.current_device())
    module = Float16Module(model.config, model) if model.config.bf16 or model.config.fp16 else model
    ddp = wrap_ddp(module, gcfg)
    optimizer = build_optimizer(gcfg, [ddp], runtime.use_cpu,
                                resolved_precision(gcfg, runtime.use_cpu))
    batches = synthetic_batches(1, rows, seq_len, vocab, cfg.train.seed)
    if not runtime.use_cpu:
        batches = [{k: v.to(runtime.device) for k, v in b.items()} for b in batches]
    marks: dict[str, float] = {}
    model.register_forward_hook(lambda *_: marks.__setitem__("forward", now(runtime.device)))

    def step(out: dict[str, float]) -> None:
        marks.clear()
        forward_backward([ddp], batches)
        out["backward"] = now(runtime.device)
        optimizer.step()
        zero_grads([ddp], optimizer)
        out.update(marks)

    named = list(ddp.named_parameters())
    tokens = rows * seq_len * runtime.dp
    note = "experts on fc1/fc2 only" if moe else ""
    return Subject(step, [p for _, p in named], expert_bytes(named), tokens,
                   _gpt_flops(gcfg, tokens, seq_len, moe, vocab), phases=runtime.pp == 1,
                   note=note)


def build_ref(cfg: Config, runtime: Any, rows: int, seq_len: int, kind: str) -> Subject:
    """tools.bench_baselines' plain-torch encoder; every rank runs its own copy (no collectives
    besides DeepSpeed's own), AdamW from torch, autocast for bf16/fp16."""
    from megatron_uni.config import apply_overrides  # noqa: PLC0415
    from megatron_uni.config.to_mcore import resolved_precision, torch_dtype  # noqa: PLC0415
    from megatron_uni.training.metrics import step_flops  # noqa: PLC0415
    from tools import bench_baselines as bb  # noqa: PLC0415

    m, moe = cfg.model, cfg.moe
    device = runtime.device
    if kind == "deepspeed":
        reason = bb.deepspeed_unavailable()
        if reason:
            raise RuntimeError(reason)
        bb.init_deepspeed_comm(runtime.backend)
    torch.manual_seed(cfg.train.seed)
    model = bb.RefEncoder(m.hidden_size, m.num_layers, m.num_attention_heads, m.ffn_hidden_size,
                          kind, moe.num_experts, moe.topk).to(device)
    for name, p in model.named_parameters():  # mark experts as megatron and DeepSpeed do
        if ".weight" in name and name.split(".")[-2] in ("qkv", "out", "fc1", "fc2") \
                and kind == "merged" and p.dim() == 3:
            p.allreduce = False
        if kind == "merged" and name.endswith("bias") and p.dim() == 2:
            p.allreduce = False
    precision = resolved_precision(cfg, runtime.use_cpu)
    dtype = torch_dtype(precision)
    x, attributes, proj = bb.ref_inputs(rows, seq_len, m.hidden_size, device, torch.float32,
                                        cfg.train.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr,
                                  weight_decay=cfg.optim.weight_decay)

    def step(out: dict[str, float]) -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=precision != "fp32"):
            loss = (model(x, attributes).float() @ proj).square().mean()
        out["forward"] = now(device)
        loss.backward()
        out["backward"] = now(device)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if kind == "dense":
        fcfg = apply_overrides(cfg, DENSE)
    elif kind == "merged":
        fcfg = apply_overrides(cfg, ["moe.layers=all", "moe.linears=[qkv,out,fc1,fc2]"])
    else:
        fcfg = apply_overrides(cfg, ["moe.layers=all", "moe.linears=[fc1,fc2]"])
    named = list(model.named_parameters())
    tokens = rows * seq_len * runtime.world_size
    notes = {"dense": "plain torch", "merged": "per-sample merge + bmm, every layer",
             "deepspeed": "DeepSpeed MoE FFN (token top-k), every layer, ep_size 1"}
    return Subject(step, [p for _, p in named], expert_bytes(named), tokens,
                   step_flops(fcfg, tokens, seq_len),
                   phases=True, note=notes[kind])


# ---------------------------------------------------------------------------- one round


def run_variant(name: str, base: Config, runtime_for: Callable[[Config], Any], args: Any
                ) -> tuple[dict[str, Any], dict[str, Any], int]:
    """Build one variant, measure one round of it, free it: (info, this rank's round, world)."""
    from megatron_uni.config import apply_overrides  # noqa: PLC0415

    spec = parse_variant(name)
    if spec["kind"] == "ours":
        cfg = apply_overrides(base, spec["overrides"])
        runtime = runtime_for(cfg)
        subject = build_ours(cfg, runtime, args.rows, args.seq_len)
    elif spec["kind"] == "mcore":
        cfg = base if spec["moe"] else apply_overrides(base, DENSE)
        runtime = runtime_for(cfg)
        subject = build_mcore(cfg, runtime, args.rows, args.seq_len, spec["moe"], args.gpt_vocab)
    else:
        runtime = runtime_for(base)
        kind = {"ref": "merged" if spec["moe"] else "dense", "deepspeed": "deepspeed"}[spec["kind"]]
        subject = build_ref(base, runtime, args.rows, args.seq_len, kind)
    result = measure(subject, runtime.device, args.warmup, args.steps)
    info = {"variant": name, "tokens": subject.tokens, "flops": subject.flops,
            "note": subject.note}
    del subject
    gc.collect()
    return info, result, runtime.world_size


# ---------------------------------------------------------------------------- entry point


def run(cfg: Config, args: Any, command: str,
        partial: Callable[[dict[str, Any]], None] = lambda report: None) -> dict[str, Any]:
    """Every variant in ``args.variants``, one after another, ``args.rounds`` times
    (``round_order``), in this process group; each round of a variant builds it afresh and frees
    it after (memory as for one variant alone); ``partial(report)`` after each (rank 0), so a
    run cut short keeps what it measured."""
    from megatron_uni.config.to_mcore import resolved_precision, torch_dtype  # noqa: PLC0415
    from megatron_uni.parallel.initialize import initialize  # noqa: PLC0415

    runtime = initialize(cfg)
    precision = resolved_precision(cfg, runtime.use_cpu)
    tokens = args.rows * args.seq_len
    shape = (tokens, cfg.model.hidden_size, cfg.model.ffn_hidden_size)
    dtype = torch_dtype(precision)
    device_name = (torch.cuda.get_device_name(runtime.device) if runtime.device.type == "cuda"
                   else "CPU")

    def report(ceiling: float, rows: list[dict[str, Any]]) -> dict[str, Any]:
        for row in rows:
            if "ms" in row:
                row["mfu"] = row["tflops_per_rank"] * 1e12 / ceiling
        return {
            "command": command, "device": device_name, "world_size": runtime.world_size,
            "layout": {"tp": cfg.parallel.tp, "pp": cfg.parallel.pp, "ep": cfg.parallel.ep,
                       "dp": runtime.dp},
            "precision": precision, "threads": torch.get_num_threads(), "rows": args.rows,
            "seq_len": args.seq_len, "steps": args.steps, "warmup": args.warmup,
            "rounds": args.rounds,
            "ceiling_tflops": ceiling / 1e12, "ceiling_shape": "x".join(map(str, shape)),
            "model": {"hidden": cfg.model.hidden_size, "layers": cfg.model.num_layers,
                      "heads": cfg.model.num_attention_heads, "ffn": cfg.model.ffn_hidden_size,
                      "experts": cfg.moe.num_experts, "topk": cfg.moe.topk,
                      "moe_layers": cfg.moe.layer_indices(cfg.model.num_layers),
                      "moe_linears": list(cfg.moe.linears)},
            "variants": rows, "is_main": runtime.is_main,
        }

    # The ceiling is measured before and after the variants and the better one kept: a shared
    # machine's load changes during a run, and the ceiling must not be the unlucky moment.
    first_ceiling = matmul_ceiling(*shape, dtype, runtime.device)
    infos: dict[str, dict[str, Any]] = {}
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in args.variants}
    skipped: dict[str, str] = {}
    world = runtime.world_size

    def rows() -> list[dict[str, Any]]:
        out = []
        for name in args.variants:
            if name in skipped:
                out.append({"variant": name, "skipped": skipped[name]})
            elif rounds[name]:
                out.append(combine(gather_ranks(summarize(rounds[name])), infos[name], world))
        return out

    for turn, name in round_order(args.variants, args.rounds):
        if name in skipped:
            continue
        try:
            infos[name], result, world = run_variant(name, cfg, initialize, args)
        except (ConfigError, RuntimeError, ValueError, ImportError, AssertionError) as err:
            # every rank builds the same thing, so every rank fails alike: skip, say why
            skipped[name] = f"{type(err).__name__}: {str(err)[:200]}"
            result = None
        if result is not None:
            rounds[name].append(result)
        done = rows()  # collective (gathers every rank's rounds): every rank calls it
        if runtime.is_main:
            row = next(r for r in done if r["variant"] == name)
            where = f" (round {turn + 1}/{args.rounds})" if args.rounds > 1 else ""
            print(f"[bench_step] {name}{where}: "
                  + (f"{1e3 * median_or_none(result['seconds']['step']):.1f} ms/step this round, "
                     f"{row['ms']['step']:.1f} over its rounds so far" if result is not None
                     else row["skipped"]), flush=True)
            partial(report(first_ceiling, done))
    ceiling = min(gather_ranks(max(first_ceiling, matmul_ceiling(*shape, dtype, runtime.device))))
    return report(ceiling, rows())


def main(argv: Sequence[str] | None = None) -> int:
    from megatron_uni.parallel.initialize import shutdown  # noqa: PLC0415
    from megatron_uni.train import report_error  # noqa: PLC0415

    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per round")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the variants this many times in turn, reversed every other "
                             "round; medians pool every round's timed steps")
    parser.add_argument("--rows", type=int, default=18, help="rows of the micro-batch")
    parser.add_argument("--seq-len", type=int, default=90, help="tokens per row")
    parser.add_argument("--gpt-vocab", type=int, default=1024,
                        help="vocabulary of the megatron-core GPT baselines")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("overrides", nargs="*", help="dotted config overrides")
    args = parser.parse_args(argv)
    # each variant once: repeating one (to time it twice) is what --rounds does, pooled
    args.variants = list(dict.fromkeys(v.strip() for v in args.variants.split(",") if v.strip()))
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python -m tools.bench_step " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        for name in args.variants:
            parse_variant(name)
        for flag, value, least in (("--steps", args.steps, 1), ("--rounds", args.rounds, 1),
                                   ("--warmup", args.warmup, 0)):
            if value < least:
                raise ConfigError(f"{flag} must be at least {least}", field=flag, value=value,
                                  fix=f"pass {flag} {max(least, 1)} or more")
        cfg = load_config(args.config, args.overrides)
        report = run(cfg, args, command, partial=lambda r: write_outputs(r, args))
    except ConfigError as err:
        return report_error(err)
    if report.pop("is_main"):
        print(text_table(report), flush=True)
        write_outputs(report, args)
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
