"""Distributed start-up: launcher environment -> torch.distributed -> megatron-core process groups.

    runtime = initialize(cfg)          # torchrun, srun, mpirun or a plain `python`
    ... build the model with runtime.pgs, train ...
    shutdown()

The only place in the project that creates process groups (model code receives them).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from megatron_uni.config import Config, validate
from megatron_uni.parallel import cpu_backend, mcore_compat
from megatron_uni.parallel.env import DistEnv, detect_env

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runtime:
    """What a started process knows about its place and its device."""

    env: DistEnv
    device: torch.device
    use_cpu: bool
    backend: str
    tp: int
    pp: int
    ep: int
    etp: int
    cp: int
    dp: int
    # megatron.core.process_groups_config.ProcessGroupCollection (typed loosely: import cost)
    pgs: object

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints progress and writes run records."""
        return self.env.rank == 0


def initialize(cfg: Config, env: DistEnv | None = None) -> Runtime:
    """Start torch.distributed and megatron-core's process groups for ``cfg.parallel``.

    Checks the layout against the world size first (a ``ConfigError`` names the field to change),
    picks nccl on GPU and gloo on CPU (switching the CPU backend on), and seeds every RNG the way
    megatron-core expects: the same default seed on every rank of a model replica's pipeline stage,
    per-TP-rank and per-expert-rank seeds in the model-parallel RNG tracker.
    """
    env = env or detect_env()
    validate(cfg, world_size=env.world_size)
    par = cfg.parallel
    use_cpu = cpu_backend.should_use_cpu(par.device)
    if use_cpu:
        cpu_backend.enable()
        device = torch.device("cpu")
    else:
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    mcore_compat.apply()
    backend = par.backend if par.backend != "auto" else ("gloo" if use_cpu else "nccl")
    if backend == "nccl" and use_cpu:
        raise RuntimeError("parallel.backend=nccl needs GPUs; use parallel.backend=gloo on the CPU")

    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            init_method=env.init_method,
            rank=env.rank,
            world_size=env.world_size,
            timeout=timedelta(minutes=par.timeout_minutes),
        )
    elif dist.get_world_size() != env.world_size:
        raise RuntimeError(
            f"torch.distributed is already initialised with world size {dist.get_world_size()}, "
            f"but the launcher environment says {env.world_size}"
        )

    from megatron.core import parallel_state  # noqa: PLC0415 - heavy import, after env checks
    from megatron.core.process_groups_config import ProcessGroupCollection  # noqa: PLC0415
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed  # noqa: PLC0415

    etp = par.etp if par.etp is not None else par.tp
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=par.tp,
        pipeline_model_parallel_size=par.pp,
        virtual_pipeline_model_parallel_size=par.vpp,
        context_parallel_size=par.cp,
        expert_model_parallel_size=par.ep,
        expert_tensor_parallel_size=etp,
        distributed_timeout_minutes=par.timeout_minutes,
        # On the CPU every group is gloo already; extra gloo groups would double the set-up time.
        create_gloo_process_groups=not use_cpu,
    )
    seed_everything(cfg.train.seed, parallel_state.get_pipeline_model_parallel_rank())
    model_parallel_cuda_manual_seed(cfg.train.seed + 100 * parallel_state.get_pipeline_model_parallel_rank())

    runtime = Runtime(
        env=env,
        device=device,
        use_cpu=use_cpu,
        backend=backend,
        tp=par.tp,
        pp=par.pp,
        ep=par.ep,
        etp=etp,
        cp=par.cp,
        dp=parallel_state.get_data_parallel_world_size(),
        pgs=ProcessGroupCollection.use_mpu_process_groups(),
    )
    if runtime.is_main:
        log.info(
            "distributed: %s launcher, world %d (tp %d, pp %d, cp %d, ep %d, etp %d, dp %d), "
            "%s backend on %s",
            env.launcher, env.world_size, par.tp, par.pp, par.cp, par.ep, etp, runtime.dp,
            backend, device,
        )
    return runtime


def seed_everything(seed: int, pipeline_rank: int = 0) -> None:
    """Seed python, numpy and torch; pipeline stages get distinct streams (megatron's rule)."""
    stage_seed = seed + 100 * pipeline_rank
    random.seed(stage_seed)
    np.random.seed(stage_seed % 2**32)
    torch.manual_seed(stage_seed)


def shutdown() -> None:
    """Tear down megatron's groups and the default process group (safe to call twice)."""
    from megatron.core import parallel_state  # noqa: PLC0415

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
