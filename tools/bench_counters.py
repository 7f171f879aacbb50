"""What ``tools.bench_step`` counts besides time: collective bytes, saved activations, peak
memory, and the matmul ceiling that MFU is measured against.

Every counter is device-independent except the ceiling and the memory high-water mark:

    with CollectiveCounter() as comm:          # torch.distributed calls -> bytes per kind
        step()
    comm.bytes   # {"all_reduce": 4096, "all_gather_into_tensor": ...}

    with SavedActivationCounter(model.parameters()) as saved:   # autograd's saved tensors
        loss = model(x); loss.backward()
    saved.bytes  # each storage once, parameters excluded
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist

def _nbytes(t: Any) -> int:
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    if isinstance(t, (list, tuple)):
        return sum(_nbytes(x) for x in t)
    return 0


def _arg(args: tuple, kwargs: dict, name: str, position: int) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[position] if len(args) > position else None


# kind -> (argument holding the bytes, its position, position of the group argument). One
# call's bytes per rank: the larger buffer of the call (the gathered output of a gather, the
# full input of a reduce-scatter or all-to-all, the tensor otherwise).
_KINDS: dict[str, tuple[str, int, int]] = {
    "all_reduce": ("tensor", 0, 2),
    "broadcast": ("tensor", 0, 2),
    "send": ("tensor", 0, 2),
    "recv": ("tensor", 0, 2),
    "all_gather": ("tensor_list", 0, 2),
    "all_gather_into_tensor": ("output_tensor", 0, 2),
    "reduce_scatter_tensor": ("input", 1, 3),
    "all_to_all_single": ("input", 1, 4),
    "all_to_all": ("input_tensor_list", 1, 2),
}


def _group_size(group: Any) -> int:
    try:
        return dist.get_world_size(group=group)
    except (RuntimeError, ValueError):
        return 1


# megatron-core binds these at import time under its own names: the DDP gradient
# reduce-scatter and the distributed optimizer's parameter all-gather (param_and_grad_buffer.py),
# the sequence-parallel / token-dispatch gathers and reduce-scatters (tensor_parallel/mappings.py,
# which the grouped path's merge exchange and the allgather dispatcher go through).
_ALIASES = tuple(
    (module, f"dist_{kind}_func", name)
    for module in ("megatron.core.distributed.param_and_grad_buffer",
                   "megatron.core.tensor_parallel.mappings")
    for kind, name in (("all_gather", "all_gather_into_tensor"),
                       ("reduce_scatter", "reduce_scatter_tensor"))
)


class CollectiveCounter:
    """Sums the tensor bytes of torch.distributed collectives called inside the ``with``.

    Only groups of more than one rank count. Wraps the module functions of ``torch.distributed`` (what megatron-core and our code call)
    and megatron's import-time aliases. Not counted: ``isend``/``irecv`` (``P2POp`` refuses
    wrapped functions; ``batch_isend_irecv`` is counted as send/recv instead), collectives issued
    from C++ or through ``torch.distributed._functional_collectives``.
    """

    def __init__(self) -> None:
        self.bytes: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        self._saved: list[tuple[Any, str, Any]] = []

    def _add(self, kind: str, n: int) -> None:
        self.bytes[kind] = self.bytes.get(kind, 0) + n
        self.calls[kind] = self.calls.get(kind, 0) + 1

    def _wrap(self, kind: str, fn: Callable) -> Callable:
        name, position, group_position = _KINDS[kind]

        @functools.wraps(fn)
        def counted(*args: Any, **kwargs: Any) -> Any:
            # a group of one rank moves nothing (megatron calls collectives on such groups)
            if _group_size(_arg(args, kwargs, "group", group_position)) > 1:
                self._add(kind, _nbytes(_arg(args, kwargs, name, position)))
            return fn(*args, **kwargs)

        return counted

    def _wrap_batch_p2p(self, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def counted(p2p_op_list: list, *args: Any, **kwargs: Any) -> Any:
            for op in p2p_op_list:  # P2POp(op, tensor, peer, group)
                kind = "send" if getattr(op.op, "__name__", "") == "isend" else "recv"
                self._add(kind, _nbytes(op.tensor))
            return fn(p2p_op_list, *args, **kwargs)

        return counted

    def _patch(self, owner: Any, name: str, new: Any) -> None:
        self._saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, new)

    def __enter__(self) -> "CollectiveCounter":
        import importlib  # noqa: PLC0415

        for kind in _KINDS:
            if hasattr(dist, kind):
                self._patch(dist, kind, self._wrap(kind, getattr(dist, kind)))
        self._patch(dist, "batch_isend_irecv", self._wrap_batch_p2p(dist.batch_isend_irecv))
        for module_name, attr, kind in _ALIASES:
            try:
                module = importlib.import_module(module_name)
            except ImportError:
                continue
            if hasattr(module, attr):
                self._patch(module, attr, self._wrap(kind, getattr(module, attr)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for owner, name, old in reversed(self._saved):
            setattr(owner, name, old)
        self._saved.clear()


class SavedActivationCounter:
    """Bytes autograd saves for backward inside the ``with`` (``saved_tensors_hooks``).

    Each storage counts once at its full size (views of one buffer are one buffer); storages of
    ``exclude`` (the parameters, and the DDP buffers they live in) do not count: they are
    weights, not activations.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self._excluded = {p.untyped_storage().data_ptr() for p in exclude}
        self._seen: set[tuple[str, int]] = set()
        self.bytes = 0
        self.tensors = 0
        self._hooks: Any = None

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        key = (str(t.device), ptr)
        if ptr not in self._excluded and key not in self._seen:
            self._seen.add(key)
            self.bytes += storage.nbytes()
            self.tensors += 1
        return t

    def __enter__(self) -> "SavedActivationCounter":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new high-water mark: the allocator's on GPU, the process RSS (VmHWM) on Linux."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # "5" resets the peak resident set size (proc(5), /proc/pid/clear_refs)
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
    except OSError:
        pass


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated bytes on GPU; the RSS high-water mark (VmHWM) of this process on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource  # noqa: PLC0415

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def matmul_ceiling(m: int, k: int, n: int, dtype: torch.dtype, device: torch.device,
                   repeats: int = 5) -> float:
    """FLOP/s of the best of ``repeats`` dense ``[m, k] @ [k, n]`` matmuls (after one warm-up)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(k, n, generator=gen).to(device=device, dtype=dtype)
    reps = 20 if device.type == "cuda" else 1
    best = float("inf")
    for i in range(repeats + 1):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, b)
        synchronize(device)
        if i:  # the first is the warm-up
            best = min(best, (time.perf_counter() - start) / reps)
    return 2.0 * m * k * n / best


def heap_bytes() -> int:
    """Bytes the C heap has handed out and not taken back (glibc ``mallinfo2``: in-use chunks
    of every arena plus mmapped blocks); torch's CPU allocator takes every tensor from it.
    -1 where glibc is not there."""
    import ctypes  # noqa: PLC0415

    class _Mallinfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
            "fordblks", "keepcost")]

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _Mallinfo2
    except (OSError, AttributeError):
        return -1
    info = libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


class HeapPeakCounter:
    """The CPU heap's high-water mark inside the ``with``, sampled after every aten operator.

    torch's CPU allocator keeps no peak counter (and the RSS high-water mark also holds pages
    glibc freed but kept), so this samples :func:`heap_bytes` from a ``TorchDispatchMode``
    after each operator returns: ``peak`` is the largest in-use heap seen (its output alive,
    its inputs too), ``peak - base`` what the block added over the heap at entry. Temporaries
    freed inside one operator are not seen. CPU only (on GPU use ``max_memory_allocated``).
    """

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode  # noqa: PLC0415

        counter = self

        class _Sample(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
                out = func(*args, **(kwargs or {}))
                now = heap_bytes()
                if now > counter.peak:
                    counter.peak = now
                return out

        self._mode = _Sample()
        self.base = 0
        self.peak = 0

    def __enter__(self) -> "HeapPeakCounter":
        self.base = self.peak = heap_bytes()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._mode.__exit__(*exc)
        self.peak = max(self.peak, heap_bytes())
