"""Checks the launchers run before anything is submitted or started.

Each failure is a :class:`LaunchError` naming the option and the fix; the launchers' ``main``
turns it into ``error: ...`` and exit 2 (``megatron_uni.train.report_error``), so a job that
cannot run never reaches the queue.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

# sbatch --time: minutes, minutes:seconds, hours:minutes:seconds, days-hours,
# days-hours:minutes, days-hours:minutes:seconds (Slurm's time_str2secs does not bound the
# fields, so neither do we); 0, "infinite" and "unlimited" mean no limit.
_SLURM_TIME = re.compile(r"^(\d+(:\d+){0,2}|\d+-\d+(:\d+){0,2})$")
_SLURM_TIME_FORMATS = "MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"


class LaunchError(ValueError):
    """A launcher option that cannot work; the message names the option and the fix."""


def positive(option: str, value: int | None, fix: str = "") -> None:
    """``value`` (when given) must be >= 1."""
    if value is not None and value < 1:
        raise LaunchError(f"{option} {value}: must be a positive count"
                          + (f"; {fix}" if fix else f"; give {option} 1 or more"))


def slurm_time(value: str | None) -> None:
    """``value`` must be one of sbatch's time formats."""
    if value is None or value.lower() in ("infinite", "unlimited") or _SLURM_TIME.match(value):
        return
    raise LaunchError(f"--time {value!r}: not a Slurm time limit; write it as "
                      f"{_SLURM_TIME_FORMATS} (e.g. --time 24:00:00 or --time 2-00:00:00)")


def exclusive(a: str, given_a: bool, b: str, given_b: bool, fix: str) -> None:
    if given_a and given_b:
        raise LaunchError(f"{a} and {b} exclude each other: {fix}")


def load_run_config(config: Path | str, overrides: Sequence[str], world_size: int | None,
                    processes: str):  # noqa: ANN201 - megatron_uni.config.Config
    """The run's config with ``overrides``, checked for ``world_size`` processes.

    A layout the process count cannot hold (TP x PP x CP or EP x ETP x PP not dividing it, a
    global batch that does not split over the data-parallel ranks) is a :class:`LaunchError`
    naming ``processes`` (how the launcher's options made that count); other config problems
    stay ``ConfigError``.
    """
    from megatron_uni.config import ConfigError, load_config, validate  # noqa: PLC0415

    if not Path(config).is_file():
        raise LaunchError(f"--config {config}: no such file; give the run's YAML config "
                          "(e.g. configs/runs/demo.yaml)")
    cfg = load_config(config, overrides)
    if world_size is not None:
        try:
            validate(cfg, world_size)
        except ConfigError as err:
            raise LaunchError(
                f"{processes} = {world_size} processes do not fit the config's layout: {err}"
            ) from None
    return cfg


def env_file(path: Path | None) -> dict[str, str]:
    """The ``--env-file`` variables, or an error naming the file and line."""
    from launch import read_env_file  # noqa: PLC0415

    if path is None:
        return {}
    if not path.is_file():
        raise LaunchError(f"--env-file {path}: no such file; give a file of KEY=VALUE lines "
                          "or leave the option out")
    try:
        return read_env_file(path)
    except (ValueError, UnicodeDecodeError, OSError) as err:
        raise LaunchError(f"--env-file {err}; write one KEY=VALUE per line") from None


def plan_verdict(cfg, world_size: int, gpus_per_node: int, gpu_memory_gib: float,  # noqa: ANN001
                 precision: str) -> list[str]:
    """The planner's verdict (``tools.plan``) for ``cfg``'s layout on ``world_size`` ranks, as
    lines to print; a :class:`LaunchError` with the reason and the planner's best layout when
    it cannot fit."""
    from tools.plan import (  # noqa: PLC0415
        default_shape, layout_name, plan_all, plan_config, verdict)
    from tools.plan_model import Hardware, gib  # noqa: PLC0415

    hw = Hardware(world_size, gpu_memory_gib, gpus_per_node=gpus_per_node)
    rows, seq_len, conditions = default_shape(cfg, None, None, 2)
    plan = plan_config(cfg, hw, rows, seq_len, conditions, precision)
    line = f"plan: {verdict(plan, hw)} (micro-batch {rows} x {seq_len}, {precision})"
    if plan.fits:
        return [line]
    fitting = [p for p in plan_all(cfg, hw, rows, seq_len, conditions, precision) if p.fits]
    if fitting:
        best = fitting[0]
        fix = (f"the planner's best layout that fits: {layout_name(best)} "
               f"({gib(best.total_bytes):.1f} GiB per rank, est. {best.step_s:.2f} s/step): "
               f"parallel.tp={best.tp} parallel.pp={best.pp} parallel.ep={best.ep} "
               f"parallel.etp={best.etp} train.recompute={str(best.recompute).lower()}")
    else:
        fix = (f"no layout of {world_size} ranks fits {gpu_memory_gib:g} GiB; use more nodes or "
               f"a smaller micro-batch (train.micro_batch_size)")
    raise LaunchError(f"{line}: needs {gib(plan.total_bytes):.1f} GiB per rank, more than "
                      f"{hw.headroom * gpu_memory_gib:.1f} usable; {fix}")
