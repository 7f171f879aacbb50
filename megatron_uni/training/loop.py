"""The training loop: data -> megatron's schedule -> optimizer, with logs and checkpoints.

    runtime = initialize(cfg); trainer = Trainer(cfg, runtime); trainer.train()

One step = one task (drawn alike on every data-parallel rank) x ``num_microbatches`` micro-batches
through megatron's pipeline schedule, DDP gradient reduction, the (distributed) optimizer and the
LR schedule. Checkpoints every ``checkpoint.save_interval`` steps, at the end, and when SIGTERM /
SIGUSR1 arrive (then the run exits 0 after saving: Slurm preemption).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from megatron_uni.config import Config
from megatron_uni.config.to_mcore import resolved_precision
from megatron_uni.parallel.initialize import Runtime
from megatron_uni.training import checkpoint as ckpt
from megatron_uni.moe.stats import stats_to_json
from megatron_uni.training.metrics import (
    RunLog,
    gather_router_losses,
    gather_routing_stats,
    memory_gb,
    reduce_step_metrics,
    step_flops,
)
from megatron_uni.training.optimizer import build_optimizer, build_scheduler
from megatron_uni.training.run_dir import RunDirError, RunLock, write_run_record
from megatron_uni.training.exit_status import record_saved_after_signal
from megatron_uni.training.step import finalize_prescaled, forward_backward, unwrap

log = logging.getLogger(__name__)


def build_model_chunks(cfg: Config, runtime: Runtime) -> tuple[list[Any], Any]:
    """This rank's model stage wrapped for its precision and in megatron's DDP."""
    from megatron.core.distributed import (  # noqa: PLC0415
        DistributedDataParallel,
        DistributedDataParallelConfig,
    )

    from megatron_uni.models.generalist import build_placed_model  # noqa: PLC0415

    module, model = build_placed_model(cfg, runtime)
    config = model.config
    ddp = DistributedDataParallel(
        config,
        DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            use_distributed_optimizer=cfg.parallel.distributed_optimizer,
        ),
        module,
    )
    config.finalize_model_grads_func = finalize_prescaled  # the loss is scaled (training/step.py)
    config.no_sync_func = ddp.no_sync
    return [ddp], model


def num_microbatches(cfg: Config, dp: int) -> int:
    """Gradient accumulation: ``train.global_batch_size`` in units of ``train.micro_batch_size``
    micro-batches over the data-parallel ranks (1 when unset)."""
    if cfg.train.global_batch_size is None:
        return 1
    return max(cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp), 1)


class Trainer:
    """Owns the model chunks, optimizer, scheduler, data stream and run records of one run."""

    def __init__(self, cfg: Config, runtime: Runtime) -> None:
        from megatron.core import parallel_state  # noqa: PLC0415

        from megatron_uni.data.loader import MultiTaskLoader, task_draw_ranks  # noqa: PLC0415

        self.cfg, self.runtime = cfg, runtime
        self.run_dir = Path(cfg.train.run_dir)
        self.save_root = Path(cfg.save_dir())
        self.lock = self._take_run_dir()
        try:
            self.precision = resolved_precision(cfg, runtime.use_cpu)
            if runtime.use_cpu and self.precision != "fp32" and runtime.is_main:
                log.warning("train.precision=%s on CPU: the mixed-precision path runs emulated "
                            "and slowly (for testing it); CPU runs are the fp32 numeric reference",
                            self.precision)
            self.chunks, self.model = build_model_chunks(cfg, runtime)
            self.optimizer = build_optimizer(cfg, self.chunks, runtime.use_cpu, self.precision)
            self.scheduler = build_scheduler(cfg, self.optimizer)
            self.num_microbatches = num_microbatches(cfg, runtime.dp)
            self.dp_rank = parallel_state.get_data_parallel_rank()
            self.reporter = (parallel_state.is_pipeline_last_stage()
                             and parallel_state.get_tensor_model_parallel_rank() == 0)
            self.loader = MultiTaskLoader(cfg, self.dp_rank, runtime.dp, self.num_microbatches,
                                          draw_ranks=task_draw_ranks(cfg))
            self.step = 0
            self._resume()
            self.stop_requested = ckpt.install_signal_handlers()
        except BaseException:
            self.close()  # a run that cannot start leaves the run dir free
            raise

    def _take_run_dir(self) -> RunLock | None:
        """Global rank 0 locks the run dir and writes the run record; every rank learns whether
        that worked (collective), so that all stop together when it did not."""
        lock, error = None, None
        if self.runtime.is_main:
            try:
                lock = RunLock.acquire(self.run_dir)
                write_run_record(self.cfg, self.run_dir)
            except RunDirError as err:
                error = err
        if ckpt.any_rank(error is not None):
            if lock is not None:
                lock.release()
            raise error or RunDirError(f"run directory {self.run_dir}: refused on rank 0")
        return lock

    def close(self) -> None:
        """Release the run directory (the lock)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _resume(self) -> None:
        """The run dir's newest checkpoint wins (a rerun or requeue continues its own progress);
        ``checkpoint.load`` only initialises a run that has none (megatron's convention)."""
        cfg = self.cfg
        own = ckpt.find_latest(self.save_root)
        path = own or (Path(cfg.checkpoint.load) if cfg.checkpoint.load else None)
        if path is None:
            return
        load_optimizer = cfg.checkpoint.load_optimizer
        if own is not None:
            if self.runtime.is_main:
                log.info("resuming from %s (latest in %s)%s", own, self.save_root,
                         f"; checkpoint.load={cfg.checkpoint.load} only initialises a fresh "
                         "run" if cfg.checkpoint.load else "")
            # Its own checkpoints hold this run's optimizer state (checkpoint.load_optimizer
            # =false, for initialising from weights, must not drop it on every requeue).
            saved_kind = ckpt.read_meta(ckpt.resolve(own)).get("optimizer")
            load_optimizer = load_optimizer or saved_kind == ckpt.optimizer_kind(self.optimizer)
        elif cfg.checkpoint.finetune:
            if self.runtime.is_main:
                log.info("initialising the weights from checkpoint.load=%s; starting at step 0 "
                         "(checkpoint.finetune)", path)
            # weights only (the optimizer's fp32 main copies are refreshed from them); the saved
            # step, schedule and data position are not taken
            ckpt.load_checkpoint(path, self.chunks, self.optimizer, self.scheduler, cfg,
                                 load_optimizer=False)
            return
        elif self.runtime.is_main:
            log.info("initialising from checkpoint.load=%s", path)
        # The data position is kept per global micro-batch slot: it continues under another
        # data-parallel size as long as the global batch (hence the slot count) is unchanged.
        self.step, loader_state = ckpt.load_checkpoint(
            path, self.chunks, self.optimizer, self.scheduler, cfg,
            load_optimizer=load_optimizer,
            data_slots=ckpt.DataSlots(self.loader.num_slots, self.loader.slots),
        )
        if loader_state is not None:
            self.loader.load_state_dict(loader_state)
        else:
            self.loader = type(self.loader)(cfg, self.dp_rank, self.runtime.dp,
                                            self.num_microbatches, start_step=self.step,
                                            draw_ranks=self.loader.draw_ranks)

    def save(self) -> Path:
        return ckpt.save_checkpoint(
            self.save_root, self.step, self.chunks, self.optimizer, self.scheduler,
            self.loader.state_dict(), self.cfg, self.cfg.checkpoint.keep_last,
        )

    def train_step(self, collect_routing: bool = False) -> dict[str, Any]:
        """One optimizer step; returns the record that metrics.jsonl gets (with the step's
        routing statistics under "routing" when ``collect_routing``)."""
        start = time.time()
        task, batches = self.loader.next_step()
        # counted on the host copies: on a GPU the moved ones would cost a sync each
        tokens = sum(int((b.seq_id >= 0).sum()) for b in batches) * self.runtime.dp
        if not self.runtime.use_cpu:
            batches = [b.to(torch.cuda.current_device()) for b in batches]
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        tracker = unwrap(self.chunks[0]).routing_tracker
        tracker.reset(collect_stats=collect_routing)
        out = forward_backward(self.chunks, batches)
        ok, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        metrics = reduce_step_metrics(out, self.reporter)
        router = gather_router_losses(tracker.losses())
        elapsed = time.time() - start
        seq_len = batches[0].seq_len
        record: dict[str, Any] = {
            "step": self.step + 1,  # optimizer steps done, as the console counts
            "task": task,
            "loss": metrics["loss"],
            "accuracy": metrics["accuracy"],
            "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "skipped": not ok,
            "tokens_per_s": tokens / elapsed,
            "tflops": step_flops(self.cfg, tokens, seq_len) / elapsed / 1e12,
            "mem_gb": memory_gb(),
            "step_time_s": elapsed,
        }
        for name, value in router.items():
            layer, kind = name.rsplit(".", 1)
            record[f"{kind}/{layer}"] = value
        if collect_routing and self.cfg.moe.enabled:
            record["routing"] = stats_to_json(gather_routing_stats(tracker.stats()),
                                              self.cfg.moe.topk)
        return record

    def train(self) -> int:
        """Run to ``train.steps`` (or a stop signal); returns the last step done."""
        cfg = self.cfg
        end = cfg.train.stop_at_step or cfg.train.steps
        if self.step >= end:
            if self.runtime.is_main:
                log.info("checkpoint is at step %d, the run ends at %d: nothing to train",
                         self.step, end)
            self.close()
            return self.step
        runlog = RunLog(cfg, self.run_dir, cfg.train.steps, self.step, self.runtime.is_main)
        interval = cfg.checkpoint.save_interval
        try:
            while self.step < end:
                log_now = ((self.step + 1) % cfg.logging.log_interval == 0
                           or self.step == 0 or self.step + 1 == end)
                record = self.train_step(collect_routing=log_now)
                routing = record.pop("routing", None)
                self.step += 1
                runlog.step(record, print_line=log_now)
                if routing is not None:
                    runlog.routing_stats(record["step"], record["task"], routing)
                last = self.step == end
                # A signal may reach only some ranks: the save is collective, so agree first.
                stop = ckpt.any_rank(self.stop_requested())
                if last or stop or (interval > 0 and self.step % interval == 0):
                    self.save()
                if stop:
                    if self.runtime.is_main:
                        log.info("stop signal received: saved step %d, exiting", self.step)
                        # tells launch.local / the sbatch script that torchrun's exit 1 after
                        # the signal followed a clean save (training/exit_status.py)
                        record_saved_after_signal(self.run_dir, self.step)
                    break
        finally:
            runlog.close()
            self.loader.close()
            self.close()
        return self.step
