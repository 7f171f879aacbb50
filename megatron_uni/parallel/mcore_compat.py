"""Fixes for known megatron-core defects that hit us on every device (CPU and GPU alike).

Each fix names the version it is for and does nothing where the defect is absent.
"""

from __future__ import annotations

import logging
import warnings


def apply() -> None:
    """Apply every fix (idempotent)."""
    _router_gemm_without_te()
    _quiet_rng_tracker_log()
    _quiet_deprecations_inside_megatron()


def _router_gemm_without_te() -> None:
    # megatron-core 0.16.1: moe_utils imports te_general_gemm inside a try block but reads it
    # unconditionally in the fp32 router GEMM, so any MoE router raises NameError when
    # Transformer Engine is not installed. Defining the name as None selects the torch path.
    import megatron.core.transformer.moe.moe_utils as moe_utils  # noqa: PLC0415

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _quiet_rng_tracker_log() -> None:
    # The RNG tracker logs one INFO line per rank and per seed; with many ranks that drowns the
    # progress output. Warnings and errors still show.
    logging.getLogger("megatron.core.tensor_parallel.random").setLevel(logging.WARNING)


def _quiet_deprecations_inside_megatron() -> None:
    # megatron-core 0.16.1 calls torch APIs that torch 2.14 deprecates (one warning per call site
    # and rank). Users cannot act on them; they would bury our own warnings.
    for message in (
        r"`torch.distributed.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
        r"Please use DTensor instead and we are deprecating ShardedTensor",
        r"`load_state_dict` is deprecated and will be removed",
    ):
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
    # The distributed optimizer's zero_grad probes `.grad` on its non-leaf shard views. On the
    # CPU the access is routed through the CPU backend's function mode, hence the second module.
    warnings.filterwarnings(
        "ignore",
        message=r"The \.grad attribute of a Tensor that is not a leaf Tensor",
        category=UserWarning,
        module=r"megatron\.core\.optimizer\..*|megatron_uni\.parallel\.cpu_backend",
    )
