"""A CPU backend for megatron-core (which has no CPU path of its own).

megatron-core 0.16.1 assumes CUDA in a few dozen places: ``device="cuda"`` literals in the
pipeline schedules, the optimizer and ``dist_checkpointing``; ``torch.cuda.current_device()`` as a
device argument; CUDA RNG states in the model-parallel RNG tracker; CUDA streams in the MoE token
dispatchers; ``Tensor.type()`` checks in the distributed optimizer. Everything this module does
is listed in :func:`enable`, in one place a reader can audit:

1. ``torch.cuda.current_device()`` answers ``torch.device("cpu")``;
2. a ``TorchFunctionMode`` rewrites ``device="cuda..."`` arguments (and ``Tensor.cuda()``,
   ``Tensor.to("cuda")``) to the CPU, and makes ``Tensor.type()`` report ``torch.cuda.*Tensor``;
3. the CUDA RNG functions (``torch.cuda.get_rng_state`` / ``set_rng_state`` / ``manual_seed``
   and megatron's ``_get_cuda_rng_state`` / ``_set_cuda_rng_state``) act on the CPU generator,
   so megatron's model-parallel RNG tracker works unchanged (``manual_seed_all`` stays: with no
   CUDA device it is a no-op, and ``torch.manual_seed`` calls it);
4. ``torch.cuda.Stream`` / ``current_stream`` / ``stream`` / ``synchronize`` / ``Event`` become
   no-ops (CPU work is synchronous);
5. megatron's advice to set CUDA_DEVICE_MAX_CONNECTIONS (a CUDA launch-queue setting) and the RNG
   tracker's "CPU RNG state changed within GPU RNG context" (always true when the CUDA stream is
   the CPU generator) are silenced;
6. the all-to-all token dispatcher's device-to-host step (``maybe_move_tensor_to_cpu``, which
   turns the split sizes into the numpy arrays ``all_to_all_single`` takes) also converts
   tensors that are already on the CPU (megatron converts only CUDA ones);
7. megatron's gradient / parameter buffers (``param_and_grad_buffer``) skip their reduce-scatter
   and all-gather over a group of one rank (a data-parallel or expert-data-parallel group of
   size 1), and ``torch.distributed.all_reduce`` returns at once over one rank: megatron issues
   them for every bucket whatever the group's size, and gloo then clones and copies the whole
   buffer (three passes over every gradient per step, 0.5 s per step for a one-process model
   with 100 M expert parameters); with one rank the output already is the input (a view of the
   same buffer) or is copied from it;
8. glibc's allocator keeps the memory a training step frees for the next step
   (:func:`keep_freed_memory`: ``mallopt`` of the trim threshold, top pad and mmap threshold).
   By default a freed block above the dynamic mmap threshold, or the free top of the heap past
   the trim threshold, goes back to the kernel, and the next step's allocations of the same
   sizes page-fault and zero-fill it again; a step's activations are allocated and freed every
   step, so that is paid every step (the issue-13 CPU benchmark, two runs each: dense 1.17 ->
   1.15-1.19 s forward+backward, the E=8 MoE 1.31-1.33 -> 1.25-1.26 s; its optimizer phase
   444-460 -> 379-388 ms). The peak resident memory is unchanged; the process keeps its peak
   until it ends. Not a megatron matter, but a CPU one: CUDA's caching allocator does the same
   on GPU.

It is switched on only for CPU runs (:func:`should_use_cpu`) and never when CUDA is in use: GPU
behaviour is untouched. It patches process-wide state, so it is meant for processes that run on
the CPU for their whole life (tests, CI, the demo); :func:`enable` is idempotent and there is no
``disable``. The sequence-parallel LayerNorm that megatron's torch fallback lacks is not a CPU
matter and lives in ``megatron_uni.models.norm``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")
_lock = threading.Lock()
_enabled = False


def should_use_cpu(device: str = "auto") -> bool:
    """Whether a run asking for ``device`` (auto/cpu/cuda) runs on the CPU."""
    if device == "cpu":
        return True
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                "parallel.device=cuda but no CUDA device is visible; use parallel.device=auto "
                "or parallel.device=cpu to run on the CPU"
            )
        return False
    return not torch.cuda.is_available()


def is_enabled() -> bool:
    """Whether :func:`enable` has run in this process."""
    return _enabled


def _to_cpu_device(device: Any) -> Any:
    if isinstance(device, str) and device.startswith("cuda"):
        return _CPU
    if isinstance(device, torch.device) and device.type == "cuda":
        return _CPU
    if isinstance(device, int) and not isinstance(device, bool):
        return _CPU  # a bare int device means a CUDA ordinal
    return device


class _CudaToCpuMode(TorchFunctionMode):
    """Sends every tensor that megatron-core asks to put on CUDA to the CPU instead."""

    def __torch_function__(
        self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1:
            args = (args[0],) + tuple(
                _to_cpu_device(a) if isinstance(a, (str, torch.device)) else a for a in args[1:]
            )
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # The distributed optimizer accepts only parameters whose type() is torch.cuda.*.
            name = func(*args)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        return func(*args, **kwargs)


class _NoStream:
    """Stands in for ``torch.cuda.Stream`` and ``torch.cuda.Event``: CPU work is synchronous."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, *args: Any) -> None:
        pass

    def wait_event(self, *args: Any) -> None:
        pass

    def record_event(self, *args: Any) -> "_NoStream":
        return self

    def record(self, *args: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other: "_NoStream") -> float:
        return 0.0


def _cpu_rng_state(*args: Any, **kwargs: Any) -> torch.Tensor:
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state: torch.Tensor, *args: Any, **kwargs: Any) -> None:
    torch.set_rng_state(new_state)


def _cpu_manual_seed(seed: int) -> None:
    # Straight to the generator: torch.manual_seed itself calls torch.cuda.manual_seed_all.
    torch.default_generator.manual_seed(int(seed))


def _split_sizes_to_host(tensor: Any, as_numpy: bool = False, record_stream: bool = False
                         ) -> Any:
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.numpy()
    return tensor


class _DoneWork:
    """The handle of a collective that had nothing to do."""

    def wait(self, *args: Any) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


def _skip_single_rank(collective: Callable[..., Any]) -> Callable[..., Any]:
    """``collective(output, input, ..., group=, async_op=)`` (all-gather / reduce-scatter into
    a tensor), or ``collective(tensor, ..., group=, async_op=)`` (all-reduce), without the call
    over a group of one rank."""
    import torch.distributed as dist  # noqa: PLC0415

    def call(*args: Any, group: Any = None, async_op: bool = False, **kwargs: Any) -> Any:
        if dist.get_world_size(group) != 1:
            return collective(*args, group=group, async_op=async_op, **kwargs)
        if len(args) >= 2 and torch.is_tensor(args[1]):
            output, source = args[0], args[1]
            if not (output.data_ptr() == source.data_ptr() and output.numel() == source.numel()):
                output.copy_(source.view_as(output))
        return _DoneWork() if async_op else None

    return call


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_memory() -> bool:
    """Item 8: glibc's malloc keeps freed memory in the process (no trimming of the heap top,
    allocations up to 32 MiB, glibc's largest mmap threshold, from the heap, 64 MiB of top
    pad). False where the C library is not glibc (nothing changed)."""
    import ctypes  # noqa: PLC0415
    import ctypes.util  # noqa: PLC0415

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # also ends the threshold's dynamic adjustment
    ok &= mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    ok &= mallopt(_M_TOP_PAD, 64 << 20)
    return bool(ok)


def enable() -> None:
    """Switch the CPU backend on for this process (idempotent). See the module docstring."""
    global _enabled
    with _lock:
        if _enabled:
            return
        if torch.cuda.is_available():
            raise RuntimeError(
                "the CPU backend must not be enabled in a process that uses CUDA; "
                "set parallel.device=cuda or hide the GPUs (CUDA_VISIBLE_DEVICES='')"
            )
        import megatron.core.tensor_parallel.random as mcore_random  # noqa: PLC0415

        # 1. device queries
        torch.cuda.current_device = lambda: _CPU  # type: ignore[assignment]
        # 3. RNG: the CUDA generator functions act on the CPU generator.
        torch.cuda.get_rng_state = _cpu_rng_state  # type: ignore[assignment]
        torch.cuda.random.get_rng_state = _cpu_rng_state  # type: ignore[assignment]
        torch.cuda.set_rng_state = _set_cpu_rng_state  # type: ignore[assignment]
        torch.cuda.manual_seed = _cpu_manual_seed  # type: ignore[assignment]
        mcore_random._get_cuda_rng_state = _cpu_rng_state
        mcore_random._set_cuda_rng_state = _set_cpu_rng_state
        # 4. streams and events
        torch.cuda.Stream = _NoStream  # type: ignore[assignment,misc]
        torch.cuda.Event = _NoStream  # type: ignore[assignment,misc]
        torch.cuda.current_stream = lambda *a, **k: _NoStream()  # type: ignore[assignment]
        torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()  # type: ignore[assignment]
        torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
        # CUDA launch-queue tuning advice, meaningless without CUDA.
        warnings.filterwarnings("ignore", message=".*CUDA_DEVICE_MAX_CONNECTIONS")
        # The tracker warns when the CPU generator moves inside a forked CUDA stream; here the
        # CUDA stream IS the CPU generator, so it always does.
        logging.getLogger("megatron.core.tensor_parallel.random").addFilter(
            lambda record: "CPU RNG state changed" not in record.getMessage()
        )
        # 6. the all-to-all dispatcher's split sizes
        import megatron.core.transformer.moe.token_dispatcher as dispatchers  # noqa: PLC0415

        dispatchers.maybe_move_tensor_to_cpu = _split_sizes_to_host
        # 7. no collectives over one rank in megatron's gradient / parameter buffers
        import megatron.core.distributed.param_and_grad_buffer as buffers  # noqa: PLC0415

        buffers.dist_reduce_scatter_func = _skip_single_rank(buffers.dist_reduce_scatter_func)
        buffers.dist_all_gather_func = _skip_single_rank(buffers.dist_all_gather_func)
        torch.distributed.all_reduce = _skip_single_rank(torch.distributed.all_reduce)
        # 8. freed memory stays in the process for the next step
        keep_freed_memory()
        # 2. device arguments: the mode lives on this thread's torch-function stack for good.
        _CudaToCpuMode().__enter__()
        _enabled = True
