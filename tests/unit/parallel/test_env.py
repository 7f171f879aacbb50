"""Each launcher's environment yields the right rank, world size, local rank and master."""

from __future__ import annotations

import pytest

from megatron_uni.parallel.env import DistEnv, LaunchEnvError, detect_env, expand_hostlist


def test_no_environment_is_a_single_process() -> None:
    env = detect_env({})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (0, 1, 0, 1)
    assert env.launcher == "single" and env.master_addr == "127.0.0.1"
    assert 0 < env.master_port < 65536


def test_torchrun() -> None:
    env = detect_env(
        {
            "RANK": "5",
            "WORLD_SIZE": "8",
            "LOCAL_RANK": "1",
            "LOCAL_WORLD_SIZE": "4",
            "MASTER_ADDR": "node07",
            "MASTER_PORT": "29400",
        }
    )
    assert env == DistEnv(5, 8, 1, 4, "node07", 29400, "torchrun")
    assert env.init_method == "tcp://node07:29400"


def test_torchrun_wins_over_slurm_when_both_are_set() -> None:
    # torchrun started inside an srun step: torchrun's per-process variables are the truth.
    env = detect_env(
        {
            "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "MASTER_ADDR": "a", "MASTER_PORT": "1",
            "SLURM_PROCID": "0", "SLURM_NTASKS": "1",
        }
    )
    assert (env.launcher, env.rank, env.world_size) == ("torchrun", 3, 4)


def test_mpi_inside_a_slurm_allocation_uses_the_mpi_ranks() -> None:
    env = detect_env(
        {
            "PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2",
            "MASTER_ADDR": "n1", "MASTER_PORT": "29500",
            # the hydra proxy's own srun step: one task per node
            "SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "SLURM_NTASKS": "2",
        }
    )
    assert (env.launcher, env.rank, env.world_size, env.local_rank) == ("mpi", 3, 4, 1)


def test_srun_with_pmi2_is_a_slurm_task() -> None:
    # srun --mpi=pmi2 adds PMI_RANK/PMI_SIZE but no local rank: Slurm's view is complete.
    env = detect_env(
        {
            "PMI_RANK": "3", "PMI_SIZE": "4", "SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0",
            "SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
            "SLURM_TASKS_PER_NODE": "2(x2)", "SLURM_JOB_NODELIST": "n[1-2]",
        }
    )
    assert (env.launcher, env.rank, env.world_size, env.local_rank) == ("slurm", 3, 4, 1)


def test_slurm_srun_two_nodes() -> None:
    env = detect_env(
        {
            "SLURM_PROCID": "3",
            "SLURM_NTASKS": "4",
            "SLURM_STEP_NUM_TASKS": "4",
            "SLURM_LOCALID": "1",
            "SLURM_NODEID": "1",
            "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
            "SLURM_JOB_NODELIST": "gpu[07-08]",
            "SLURM_JOB_ID": "123456",
        }
    )
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (3, 4, 1, 2)
    assert env.master_addr == "gpu07"
    assert env.master_port == 20000 + 123456 % 20000
    assert env.launcher == "slurm"


def test_slurm_master_addr_override_and_uneven_nodes() -> None:
    env = detect_env(
        {
            "SLURM_PROCID": "4",
            "SLURM_NTASKS": "5",
            "SLURM_LOCALID": "0",
            "SLURM_NODEID": "2",
            "SLURM_TASKS_PER_NODE": "2(x2),1",
            "SLURM_JOB_NODELIST": "n[1-3]",
            "MASTER_ADDR": "10.0.0.1",
            "MASTER_PORT": "6000",
        }
    )
    assert (env.rank, env.world_size, env.local_world_size) == (4, 5, 1)
    assert (env.master_addr, env.master_port) == ("10.0.0.1", 6000)


def test_open_mpi() -> None:
    env = detect_env(
        {
            "OMPI_COMM_WORLD_RANK": "2",
            "OMPI_COMM_WORLD_SIZE": "4",
            "OMPI_COMM_WORLD_LOCAL_RANK": "0",
            "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
            "MASTER_ADDR": "host1",
            "MASTER_PORT": "29501",
        }
    )
    assert env == DistEnv(2, 4, 0, 2, "host1", 29501, "mpi")


def test_mpich_hydra_single_node_uses_loopback(monkeypatch) -> None:
    import megatron_uni.parallel.env as env_mod

    monkeypatch.setattr(env_mod, "_mpi_comm", lambda: None)  # as without mpi4py
    env = detect_env(
        {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"}
    )
    # No mpi4py and every rank local: loopback.
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (1, 2, 1, 2)
    assert env.launcher == "mpi" and env.master_addr == "127.0.0.1"


def test_mpi_multi_node_without_rendezvous_is_a_clear_error(monkeypatch) -> None:
    import megatron_uni.parallel.env as env_mod

    monkeypatch.setattr(env_mod, "_mpi_comm", lambda: None)
    with pytest.raises(LaunchEnvError, match="MASTER_ADDR"):
        detect_env(
            {"PMI_RANK": "0", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "2"}
        )


@pytest.mark.parametrize(
    "environ,message",
    [
        ({"RANK": "4", "WORLD_SIZE": "4", "MASTER_ADDR": "a"}, "outside"),
        ({"RANK": "x", "WORLD_SIZE": "4", "MASTER_ADDR": "a"}, "not an integer"),
        ({"RANK": "1", "WORLD_SIZE": "2"}, "MASTER_ADDR"),
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}, "SLURM_JOB_NODELIST"),
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_NODEID": "0",
          "SLURM_TASKS_PER_NODE": "two", "SLURM_JOB_NODELIST": "n1"}, "SLURM_TASKS_PER_NODE"),
    ],
)
def test_bad_environments_name_the_variable(environ: dict, message: str) -> None:
    with pytest.raises(LaunchEnvError, match=message):
        detect_env(environ)


@pytest.mark.parametrize(
    "hostlist,hosts",
    [
        ("node1", ["node1"]),
        ("n[1-3]", ["n1", "n2", "n3"]),
        ("gpu[08-10],login1", ["gpu08", "gpu09", "gpu10", "login1"]),
        ("a[1,3-4]b", ["a1b", "a3b", "a4b"]),
        ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
    ],
)
def test_expand_hostlist(hostlist: str, hosts: list[str]) -> None:
    assert expand_hostlist(hostlist) == hosts
