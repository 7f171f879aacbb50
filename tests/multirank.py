"""Run a test function on N gloo ranks on loopback (free port, timeout, the failing rank's
traceback in the pytest failure).

    results = run_ranks(my_check, world_size=8, args=(tmp_path,), timeout=240)

The machinery is the library's :mod:`megatron_uni.parallel.spawn` (the offline checkpoint tools
use it too); here a failing, dead or late rank becomes an ``AssertionError`` so pytest shows it
as a test failure with that rank's traceback. ``my_check`` must be a module-level function.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from megatron_uni.parallel import spawn


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    timeout: float = 180.0,
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes; return values by rank."""
    try:
        return spawn.run_ranks(fn, world_size, args, timeout, env)
    except spawn.RankFailure as err:
        raise AssertionError(str(err)) from None
