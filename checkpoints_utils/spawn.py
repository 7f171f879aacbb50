"""The offline tools' CPU "world": :func:`megatron_uni.parallel.spawn.run_ranks` with the tools'
error convention (a :class:`ToolError` the CLI prints as one line)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from checkpoints_utils.common import ToolError
from megatron_uni.parallel import spawn

# Errors whose message already says what is wrong and how to fix it: shown as they are.
_USER_ERRORS = ("ToolError", "CheckpointError", "ConfigError")


def run_world(fn: Callable[..., Any], world: int, args: Sequence[Any] = (),
              timeout: float = 3600.0) -> list[Any]:
    """``fn(rank, world, *args)`` on ``world`` CPU processes; return values in rank order.
    A failing rank raises :class:`ToolError` with its error (a ToolError/CheckpointError/
    ConfigError message as is; anything else with its traceback)."""
    try:
        return spawn.run_ranks(fn, world, args, timeout, env={"CUDA_VISIBLE_DEVICES": ""})
    except spawn.RankFailure as err:
        if err.error_type in _USER_ERRORS:
            raise ToolError(err.message) from None
        if err.rank is not None:
            raise ToolError(f"rank {err.rank} of {world} failed: {err.error_type}: "
                            f"{err.message}\n{err.traceback_text}") from None
        raise ToolError(str(err)) from None
