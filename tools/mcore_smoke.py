"""Engine smoke run: megatron-core's own MoE GPT, trained a few steps on any parallel layout.

    torchrun --nproc-per-node 8 -m tools.mcore_smoke --config configs/runs/mcore_smoke.yaml
    python -m tools.mcore_smoke parallel.tp=1 parallel.pp=1 parallel.ep=1    # one process

What it shows: our config tree, distributed init and CPU backend drive megatron-core end to end:
the pipeline schedule, MoE with expert parallelism, DDP with the distributed optimizer, and a
``dist_checkpointing`` save that a freshly built model loads back to the same loss. The data is
synthetic (arithmetic token progressions, learnable), so the loss must fall.

The builders here are also what ``tests/distributed`` uses to check that every layout reproduces
the single-process numbers.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from megatron_uni.config import Config, ConfigError, load_config
from megatron_uni.config.to_mcore import transformer_config
from megatron_uni.parallel.initialize import Runtime, initialize, shutdown
from megatron_uni.train import report_error

log = logging.getLogger("tools.mcore_smoke")


def build_gpt_moe(
    cfg: Config, runtime: Runtime, share_embeddings: bool = False, follow_moe_layers: bool = False
) -> Any:
    """megatron-core's GPTModel (local spec, our SP-capable LayerNorm): MoE on every layer, or,
    with ``follow_moe_layers``, on ``moe.layers`` only (dense MLPs elsewhere; the benchmark's
    like-for-like baseline). ``moe.num_experts=0`` gives the dense GPT."""
    from megatron.core import parallel_state  # noqa: PLC0415
    from megatron.core.models.gpt import GPTModel  # noqa: PLC0415
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: PLC0415
    from megatron.core.transformer.transformer_block import (  # noqa: PLC0415
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )
    from megatron.core.transformer.transformer_layer import (  # noqa: PLC0415
        get_transformer_layer_offset,
    )

    from megatron_uni.models.norm import LayerNorm  # noqa: PLC0415

    config = transformer_config(cfg, use_cpu=runtime.use_cpu, add_bias_linear=False)
    num_experts = cfg.moe.num_experts or None

    def local_spec(experts: int | None) -> Any:
        layer = get_gpt_layer_local_spec(num_experts=experts, moe_grouped_gemm=False)
        layer.submodules.input_layernorm = LayerNorm
        layer.submodules.pre_mlp_layernorm = LayerNorm
        return layer

    moe_spec, dense_spec = local_spec(num_experts), local_spec(None)
    offset = get_transformer_layer_offset(config)
    moe_layers = set(cfg.moe.layer_indices(cfg.model.num_layers)) if follow_moe_layers else None
    block = TransformerBlockSubmodules(
        layer_specs=[
            moe_spec if moe_layers is None or offset + i in moe_layers else dense_spec
            for i in range(get_num_layers_to_build(config))
        ],
        layer_norm=LayerNorm,
    )
    return GPTModel(
        config=config,
        transformer_layer_spec=block,
        vocab_size=cfg.model.vocab_size,
        max_sequence_length=cfg.model.max_text_positions,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=share_embeddings,
    )


def synthetic_batches(
    num_microbatches: int, micro_batch_size: int, seq_len: int, vocab_size: int, seed: int
) -> list[dict[str, torch.Tensor]]:
    """Rows of arithmetic progressions mod vocab: the next token is always predictable."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    positions = torch.arange(seq_len)
    for _ in range(num_microbatches):
        start = torch.randint(0, vocab_size, (micro_batch_size, 1), generator=gen)
        stride = torch.randint(1, 4, (micro_batch_size, 1), generator=gen)
        tokens = (start + stride * torch.arange(seq_len + 1)) % vocab_size
        batches.append(
            {
                "tokens": tokens[:, :-1].contiguous(),
                "labels": tokens[:, 1:].contiguous(),
                "position_ids": positions.unsqueeze(0).expand(micro_batch_size, seq_len),
            }
        )
    return batches


def _causal_mask(seq_len: int, device: torch.device | None = None) -> torch.Tensor:
    # megatron's convention: True marks a position that may NOT be attended. Built on the
    # batch's device: a CPU mask would meet GPU activations.
    return torch.triu(
        torch.ones(1, 1, seq_len, seq_len, dtype=torch.bool, device=device), diagonal=1
    )


def forward_step(batch_iter: Iterator[dict[str, torch.Tensor]], model: Any) -> tuple[Any, Callable]:
    """One micro-batch through the model; the loss is the mean token cross-entropy."""
    batch = next(batch_iter)
    seq_len = batch["tokens"].shape[1]
    per_token = model(
        batch["tokens"],
        batch["position_ids"],
        _causal_mask(seq_len, batch["tokens"].device),
        labels=batch["labels"],
    )

    def loss_func(output: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = output.float().mean()
        # clone: the schedule divides the returned loss in place by the micro-batch count.
        return loss, {"lm loss": loss.detach().clone()}

    return per_token, loss_func


def forward_backward(
    model: Any,
    batches: Sequence[dict[str, torch.Tensor]],
    forward_only: bool = False,
) -> list[float]:
    """Run megatron's schedule over ``batches`` (this rank's micro-batches); per-batch losses.

    Losses come back on the last pipeline stage only; other stages get an empty list.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: PLC0415

    seq_len, micro_batch_size = batches[0]["tokens"].shape[1], batches[0]["tokens"].shape[0]
    out = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(batches),
        model=model,
        num_microbatches=len(batches),
        seq_length=seq_len,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )
    return [float(item["lm loss"]) for item in out]


def mean_over_last_stage(losses: list[float]) -> float:
    """Average of the last stage's micro-batch losses over data-parallel replicas, on every rank."""
    import torch.distributed as dist  # noqa: PLC0415
    from megatron.core import parallel_state  # noqa: PLC0415

    last = parallel_state.is_pipeline_last_stage()
    value = torch.tensor([sum(losses) / max(len(losses), 1) if last else 0.0, float(last)])
    dist.all_reduce(value)
    return float(value[0] / value[1])


def wrap_ddp(model: Any, cfg: Config) -> Any:
    from megatron.core.distributed import (  # noqa: PLC0415
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    ddp_config = DistributedDataParallelConfig(
        use_distributed_optimizer=cfg.parallel.distributed_optimizer, grad_reduce_in_fp32=True
    )
    ddp = DistributedDataParallel(model.config, ddp_config, model)
    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.no_sync_func = ddp.no_sync
    return ddp


def _optimizer(ddp: Any, cfg: Config, runtime: Runtime) -> Any:
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer  # noqa: PLC0415

    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=cfg.optim.lr,
        weight_decay=cfg.optim.weight_decay,
        adam_beta1=cfg.optim.betas[0],
        adam_beta2=cfg.optim.betas[1],
        adam_eps=cfg.optim.eps,
        clip_grad=cfg.optim.clip_grad,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
        bf16=False,
        fp16=False,
    )
    return get_megatron_optimizer(opt_config, [ddp], use_gloo_process_groups=not runtime.use_cpu)


def run(cfg: Config, seq_len: int, num_microbatches: int, out_dir: Path) -> dict[str, float]:
    """Train ``cfg.train.steps`` steps, save, reload into a fresh model, compare; return numbers."""
    from megatron.core import dist_checkpointing, parallel_state  # noqa: PLC0415

    runtime = initialize(cfg)
    dp_rank = parallel_state.get_data_parallel_rank()
    mbs = cfg.train.micro_batch_size
    model = build_gpt_moe(cfg, runtime)
    ddp = wrap_ddp(model, cfg)
    optimizer = _optimizer(ddp, cfg, runtime)

    def batches_for(step: int) -> list[dict[str, torch.Tensor]]:
        global_batches = synthetic_batches(
            num_microbatches * runtime.dp, mbs, seq_len, cfg.model.vocab_size, cfg.data.seed + step
        )
        return global_batches[dp_rank * num_microbatches : (dp_rank + 1) * num_microbatches]

    first = last = float("nan")
    start = time.time()
    for step in range(cfg.train.steps):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        loss = mean_over_last_stage(forward_backward([ddp], batches_for(step)))
        ok, grad_norm, _ = optimizer.step()
        if step == 0:
            first = loss
        last = loss
        if runtime.is_main and (step % cfg.logging.log_interval == 0 or step == cfg.train.steps - 1):
            print(
                f"step {step:4d} | loss {loss:.4f} | grad norm {grad_norm:.3f} | "
                f"{time.time() - start:.1f} s",
                flush=True,
            )

    ckpt = out_dir / "checkpoint"
    if runtime.is_main:  # a fresh directory: dist_checkpointing refuses to mix two saves
        shutil.rmtree(ckpt, ignore_errors=True)
        ckpt.mkdir(parents=True)
    torch.distributed.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), str(ckpt))
    eval_batches = batches_for(cfg.train.steps)
    before = mean_over_last_stage(forward_backward([ddp], eval_batches, forward_only=True))

    # A fresh model with other random weights must give the same loss once it loads the save.
    torch.manual_seed(cfg.train.seed + 1)
    fresh = build_gpt_moe(cfg, runtime)
    from megatron_uni.training.safe_load import load_strategies  # noqa: PLC0415

    sharded, common = load_strategies()  # never unpickles code, like every load of ours
    fresh.load_state_dict(dist_checkpointing.load(fresh.sharded_state_dict(), str(ckpt),
                                                  sharded_strategy=sharded,
                                                  common_strategy=common))
    after = mean_over_last_stage(forward_backward([fresh], eval_batches, forward_only=True))
    result = {"first_loss": first, "last_loss": last, "eval_loss": before, "reloaded_loss": after}
    if runtime.is_main:
        verdict = "OK" if abs(before - after) <= 1e-5 * max(1.0, abs(before)) else "MISMATCH"
        print(
            f"checkpoint {ckpt}: eval loss {before:.6f} before save, {after:.6f} after reload "
            f"({verdict}); loss {first:.4f} -> {last:.4f} over {cfg.train.steps} steps",
            flush=True,
        )
    shutdown()
    if abs(before - after) > 1e-5 * max(1.0, abs(before)):
        raise SystemExit("reloaded checkpoint does not reproduce the loss")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/runs/mcore_smoke.yaml")
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--num-microbatches", type=int, default=2, help="per data-parallel rank")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. parallel.tp=2")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)  # per-bucket and per-config dumps
    try:
        cfg = load_config(args.config, args.overrides)
        run(cfg, args.seq_len, args.num_microbatches, Path(cfg.train.run_dir))
    except ConfigError as err:
        return report_error(err)  # every rank sees the same error: rank 0 says it once
    return 0


if __name__ == "__main__":
    sys.exit(main())
