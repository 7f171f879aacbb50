"""Find this process's place in a distributed job from the launcher's environment.

Supported launchers, tried in this order (an MPI launcher, recognised by its local-rank variable,
before Slurm: ``mpiexec`` inside an allocation starts its proxies with srun, so its ranks carry
Slurm step variables that are not theirs; ``srun --mpi=pmi2`` sets only PMI_RANK/PMI_SIZE, and
then Slurm's variables win):
- torchrun (and anything that sets the same variables): RANK, WORLD_SIZE, LOCAL_RANK,
  LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT;
- Slurm ``srun``: SLURM_PROCID, SLURM_STEP_NUM_TASKS / SLURM_NTASKS, SLURM_LOCALID; the master is
  the first host of SLURM_STEP_NODELIST / SLURM_JOB_NODELIST unless MASTER_ADDR is set;
- MPI: Open MPI (OMPI_COMM_WORLD_*), MPICH / Hydra and Intel MPI (PMI_RANK, PMI_SIZE,
  MPI_LOCALRANKID), PMIx (PMIX_RANK); the master comes from MASTER_ADDR, else from mpi4py
  (rank 0 broadcasts its address and a free port), else loopback when every rank is local;
- nothing at all: a single process on loopback.

Only reads the environment (and, for MPI without MASTER_ADDR, talks to mpi4py); creates no
process group. ``megatron_uni.parallel.initialize`` turns the result into one.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from typing import Literal, Mapping

Launcher = Literal["torchrun", "slurm", "mpi", "single"]

DEFAULT_MASTER_PORT = 29500


class LaunchEnvError(RuntimeError):
    """The launcher's environment is incomplete or inconsistent."""


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: Launcher

    @property
    def init_method(self) -> str:
        """The ``tcp://`` rendezvous address for ``torch.distributed.init_process_group``."""
        host = f"[{self.master_addr}]" if ":" in self.master_addr else self.master_addr
        return f"tcp://{host}:{self.master_port}"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host`` (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand a Slurm host list: ``"gpu[01-03,07],login1"`` -> gpu01 gpu02 gpu03 gpu07 login1.

    Zero padding of ranges is kept (``[08-10]`` -> 08, 09, 10). Nested brackets do not occur in
    Slurm node names; several bracket groups in one name (``rack[1-2]-n[1-2]``) are expanded.
    """
    hosts: list[str] = []
    for item in _split_top_level(hostlist.strip()):
        if item:
            hosts.extend(_expand_one(item))
    return hosts


def _split_top_level(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _expand_one(item: str) -> list[str]:
    match = re.search(r"\[([^\]]+)\]", item)
    if match is None:
        return [item]
    prefix, suffix = item[: match.start()], item[match.end() :]
    names: list[str] = []
    for part in match.group(1).split(","):
        if "-" in part:
            lo, hi = part.split("-", 1)
            width = len(lo)
            for n in range(int(lo), int(hi) + 1):
                names.append(f"{n:0{width}d}")
        else:
            names.append(part)
    out: list[str] = []
    for name in names:
        out.extend(_expand_one(prefix + name + suffix))
    return out


def _slurm_tasks_on_node(tasks_per_node: str, node_id: int) -> int:
    """Parse SLURM_TASKS_PER_NODE (``"2(x3),1"``) and return the count on node ``node_id``."""
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m is None:
            raise LaunchEnvError(f"cannot parse SLURM_TASKS_PER_NODE={tasks_per_node!r}")
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    if node_id >= len(counts):
        raise LaunchEnvError(
            f"SLURM_NODEID={node_id} but SLURM_TASKS_PER_NODE={tasks_per_node!r} lists "
            f"{len(counts)} nodes"
        )
    return counts[node_id]


def _int(env: Mapping[str, str], name: str) -> int:
    value = env.get(name)
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise LaunchEnvError(f"environment variable {name}={value!r} is not an integer") from None


def _port(env: Mapping[str, str], default: int) -> int:
    return _int(env, "MASTER_PORT") if "MASTER_PORT" in env else default


def _from_torchrun(env: Mapping[str, str]) -> DistEnv:
    world = _int(env, "WORLD_SIZE")
    local_world = _int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else world
    if world > 1 and "MASTER_ADDR" not in env:
        raise LaunchEnvError(
            "RANK and WORLD_SIZE are set but MASTER_ADDR is not; set MASTER_ADDR and MASTER_PORT "
            "(torchrun does this) or unset RANK/WORLD_SIZE for a single-process run"
        )
    return DistEnv(
        rank=_int(env, "RANK"),
        world_size=world,
        local_rank=_int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
        local_world_size=local_world,
        master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
        master_port=_port(env, DEFAULT_MASTER_PORT),
        launcher="torchrun",
    )


def _from_slurm(env: Mapping[str, str]) -> DistEnv:
    world = _int(env, "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS")
    node_id = _int(env, "SLURM_NODEID") if "SLURM_NODEID" in env else 0
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    local_world = _slurm_tasks_on_node(per_node, node_id) if per_node else world
    master = env.get("MASTER_ADDR")
    if master is None:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        if not nodelist:
            raise LaunchEnvError(
                "Slurm task without SLURM_JOB_NODELIST: cannot find the master host; "
                "set MASTER_ADDR"
            )
        master = expand_hostlist(nodelist)[0]
    # Every step of one job must agree on the port without talking: derive it from the job id.
    job_id = _int(env, "SLURM_JOB_ID") if "SLURM_JOB_ID" in env else 0
    return DistEnv(
        rank=_int(env, "SLURM_PROCID"),
        world_size=world,
        local_rank=_int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
        local_world_size=local_world,
        master_addr=master,
        master_port=_port(env, 20000 + job_id % 20000),
        launcher="slurm",
    )


_MPI_VARS = (
    # (rank, size, local rank, local size)
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
     "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    ("PMIX_RANK", "PMIX_SIZE", "PMIX_LOCAL_RANK", "PMIX_LOCAL_SIZE"),
)


def _from_mpi(env: Mapping[str, str], names: tuple[str, str, str, str]) -> DistEnv:
    rank_var, size_var, local_var, local_size_var = names
    rank = _int(env, rank_var)
    world = _int(env, size_var) if size_var in env else _mpi4py_size()
    local_rank = _int(env, local_var) if local_var in env else rank
    local_world = _int(env, local_size_var) if local_size_var in env else world
    addr, port = env.get("MASTER_ADDR"), _port(env, 0)
    if addr is None or port == 0:
        shared = _mpi4py_rendezvous()
        if shared is not None:
            addr = addr or shared[0]
            port = port or shared[1]
        elif local_world == world:
            addr = addr or "127.0.0.1"
            port = port or DEFAULT_MASTER_PORT
        else:
            raise LaunchEnvError(
                "MPI job across several nodes without MASTER_ADDR and without mpi4py: cannot "
                "agree on a rendezvous address; export MASTER_ADDR/MASTER_PORT (mpirun -x) or "
                "install the 'mpi' extra (pip install 'megatron-uni[mpi]')"
            )
    return DistEnv(rank, world, local_rank, local_world, addr, port, "mpi")


def _mpi4py_size() -> int:
    comm = _mpi_comm()
    if comm is None:
        raise LaunchEnvError("MPI rank found but not the world size, and mpi4py is not installed")
    return int(comm.Get_size())


def _mpi_comm():  # -> mpi4py.MPI.Comm | None
    try:
        from mpi4py import MPI  # noqa: PLC0415 - optional dependency
    except ImportError:
        return None
    return MPI.COMM_WORLD


def _mpi4py_rendezvous() -> tuple[str, int] | None:
    """Rank 0 picks its address and a free port and broadcasts them (None without mpi4py)."""
    comm = _mpi_comm()
    if comm is None:
        return None
    shared = None
    if comm.Get_rank() == 0:
        host = socket.gethostname()
        try:
            addr = socket.gethostbyname(host)
        except OSError:
            addr = "127.0.0.1"
        shared = (addr, free_port("0.0.0.0"))
    return comm.bcast(shared, root=0)


def _slurm_batch_step(env: Mapping[str, str]) -> bool:
    """The sbatch script (or an salloc shell) itself, not an srun task: Slurm sets SLURM_PROCID=0
    and SLURM_NTASKS=N there too, but no step variables; a process started there is alone."""
    return "SLURM_JOB_ID" in env and not any(
        name in env for name in ("SLURM_STEP_ID", "SLURM_STEPID", "SLURM_STEP_NUM_TASKS")
    )


def detect_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Read the launcher environment (``os.environ`` by default) into a :class:`DistEnv`."""
    env = os.environ if environ is None else environ
    mpi_names = next((names for names in _MPI_VARS if names[0] in env), None)
    # An MPI launcher (mpiexec/mpirun) sets the local rank too; srun's PMI plugins set only the
    # rank and size, and then Slurm's variables are the complete ones.
    mpi_launcher = mpi_names is not None and mpi_names[2] in env
    if "RANK" in env and "WORLD_SIZE" in env:
        result = _from_torchrun(env)
    elif mpi_launcher:
        # Before Slurm: mpiexec inside an allocation starts its proxies with srun, so the ranks
        # also carry (the proxies') Slurm step variables; the MPI ones are the ranks' own.
        result = _from_mpi(env, mpi_names)
    elif (
        "SLURM_PROCID" in env
        and ("SLURM_STEP_NUM_TASKS" in env or "SLURM_NTASKS" in env)
        and not _slurm_batch_step(env)
    ):
        result = _from_slurm(env)
    elif mpi_names is not None:
        result = _from_mpi(env, mpi_names)
    else:
        result = DistEnv(0, 1, 0, 1, "127.0.0.1", _port(env, 0) or free_port(), "single")
    _check(result)
    return result


def _check(env: DistEnv) -> None:
    if env.world_size < 1:
        raise LaunchEnvError(f"world size {env.world_size} from the {env.launcher} environment")
    if not 0 <= env.rank < env.world_size:
        raise LaunchEnvError(
            f"rank {env.rank} is outside [0, {env.world_size}) in the {env.launcher} environment"
        )
    if not 0 <= env.local_rank < max(env.local_world_size, 1):
        raise LaunchEnvError(
            f"local rank {env.local_rank} is outside [0, {env.local_world_size}) in the "
            f"{env.launcher} environment"
        )
    if not 0 < env.master_port < 65536:
        raise LaunchEnvError(f"master port {env.master_port} is not a valid TCP port")
