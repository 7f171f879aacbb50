"""Render and submit an sbatch script for a training run.

    python -m launch.slurm --config configs/runs/demo.yaml --nodes 2 --gpus-per-node 8 \
        --partition gpu --time 24:00:00 --env-file cluster.env [--dry-run] [key=value ...]

One task per GPU (``--launcher srun``, the default) or one ``torchrun`` per node
(``--launcher torchrun``); on CPU-only clusters give ``--tasks-per-node`` instead of GPUs. The
master address and port come from the allocation inside the job. USR1 arrives
``--signal-seconds`` before the time limit: every rank checkpoints, the job requeues itself and
resumes from ``<run_dir>/checkpoints/latest``. The rendered script, the resolved config and the
git revision are written to ``<run_dir>/launch/`` (``--dry-run`` prints the script instead and
writes nothing).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from launch import ENTRY, git_revision
from launch import validate as v

TEMPLATE = Path(__file__).parent / "templates" / "sbatch.sh.tmpl"


@dataclass
class SlurmJob:
    """Everything the sbatch template needs."""

    config: Path
    run_dir: Path
    nodes: int
    gpus_per_node: int = 0
    tasks_per_node: int | None = None
    cpus_per_task: int | None = None
    partition: str | None = None
    account: str | None = None
    time: str | None = None
    container_image: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    job_name: str = "megatron-uni"
    launcher: str = "srun"
    entry: str = "train"
    python: str = sys.executable
    workdir: Path = field(default_factory=Path.cwd)
    overrides: list[str] = field(default_factory=list)
    signal_seconds: int = 300
    base_port: int = 20000
    extra_sbatch: list[str] = field(default_factory=list)
    probe: bool = True

    @property
    def ntasks_per_node(self) -> int:
        if self.launcher == "torchrun":
            return 1
        return self.tasks_per_node or max(self.gpus_per_node, 1)

    @property
    def procs_per_node(self) -> int:
        return self.tasks_per_node or max(self.gpus_per_node, 1)

    def train_args(self) -> list[str]:
        return ["-m", ENTRY[self.entry], "--config", str(self.config),
                f"train.run_dir={self.run_dir}", *self.overrides]

    def launch_command(self) -> str:
        srun = ["srun", "--kill-on-bad-exit=1"]
        if self.container_image:
            srun += [f"--container-image={self.container_image}",
                     f"--container-mounts={self.workdir}:{self.workdir}",
                     f"--container-workdir={self.workdir}"]
        if self.launcher == "srun":
            return shlex.join([*srun, self.python, *self.train_args()])
        if self.launcher != "torchrun":
            raise ValueError(f"launcher {self.launcher!r}: use 'srun' or 'torchrun'")
        # One torchrun per node; the node rank and master are expanded inside each task.
        torchrun = shlex.join([
            self.python, "-m", "torch.distributed.run", "--nnodes", str(self.nodes),
            "--nproc-per-node", str(self.procs_per_node),
            # Pass the preemption signal on to the workers and give them time to checkpoint.
            "--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
            "--shutdown-timeout", str(self.signal_seconds)])
        inner = (f"{torchrun} --node-rank $SLURM_NODEID --master-addr $MASTER_ADDR "
                 f"--master-port $MASTER_PORT {shlex.join(self.train_args())}")
        return shlex.join(srun) + " bash -c " + shlex.quote(inner)

    def probe_command(self) -> str:
        """A one-second step before training: every task prints where it thinks it is, so the
        job log shows a wrong topology before any model is built."""
        if not self.probe or self.launcher != "srun":
            return "# (no topology probe)"
        return shlex.join(["srun", self.python, "-m", "launch.slurm", "--probe"])

    def exit_check(self) -> str:
        """torchrun exits 1 after a stop signal even when its workers saved and exited 0: the
        workers' marker (``megatron_uni.training.exit_status``) turns that into 0. srun reports
        the tasks' own codes, which need no such help."""
        if self.launcher != "torchrun":
            return "# (srun reports the tasks' own exit codes)"
        check = shlex.join([self.python, "-m", "megatron_uni.training.exit_status",
                            str(self.run_dir)])
        return (f'if [ "$rc" != 0 ] && {check} --since "$step_started"; then\n'
                f'    echo "torchrun exited $rc after the workers saved on a stop signal: 0"\n'
                f'    rc=0\nfi')

    def resource_lines(self) -> str:
        lines = []
        if self.gpus_per_node:
            lines.append(f"--gpus-per-node={self.gpus_per_node}")
        for flag, value in (("partition", self.partition), ("account", self.account),
                            ("time", self.time)):
            if value:
                lines.append(f"--{flag}={value}")
        lines += self.extra_sbatch
        return "".join(f"#SBATCH {line}\n" for line in lines)

    def render(self) -> str:
        exports = "\n".join(f"export {k}={shlex.quote(v)}" for k, v in self.env.items())
        values = {
            "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "record_dir": str(self.run_dir / "launch"),
            "job_name": self.job_name,
            "nodes": str(self.nodes),
            "tasks_per_node": str(self.ntasks_per_node),
            "cpus_per_task": str(self.cpus_per_task or 1),
            "resource_lines": self.resource_lines(),
            "workdir": str(self.workdir),
            "signal_seconds": str(self.signal_seconds),
            "env_exports": exports or "# (no env file)",
            "base_port": str(self.base_port),
            "probe_command": self.probe_command(),
            "launch_command": self.launch_command(),
            "exit_check": self.exit_check(),
        }
        text = TEMPLATE.read_text()
        for key, value in values.items():
            text = text.replace("{{ " + key + " }}", value)
        if "{{" in text:
            raise ValueError(f"unfilled placeholder in {TEMPLATE}")
        return text


def record(job: SlurmJob, script: str) -> Path:
    """Write the script, the resolved config and the git revision to ``<run_dir>/launch``."""
    from megatron_uni.config import dump_yaml, load_config  # noqa: PLC0415

    out = job.run_dir / "launch"
    out.mkdir(parents=True, exist_ok=True)
    (out / "sbatch.sh").write_text(script)
    dump_yaml(load_config(job.config, [f"train.run_dir={job.run_dir}", *job.overrides]),
              out / "config.yaml")
    (out / "git_revision.txt").write_text(git_revision(job.workdir) + "\n")
    return out / "sbatch.sh"


def submit(script_path: Path) -> str:
    """``sbatch --parsable``; returns the job id."""
    try:
        out = subprocess.run(["sbatch", "--parsable", str(script_path)], capture_output=True,
                             text=True, check=False)
    except OSError as err:
        raise v.LaunchError(f"sbatch could not be started ({err}); run on a Slurm login node, "
                            "or use --dry-run to see the script") from None
    if out.returncode != 0:
        raise v.LaunchError(f"sbatch failed ({out.returncode}): {out.stderr.strip()}; the "
                            f"script is kept in {script_path}")
    return out.stdout.strip().split(";")[0]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, type=Path)
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, default=None)
    p.add_argument("--tasks-per-node", type=int, default=None,
                   help="processes per node (CPU clusters; default: one per GPU)")
    p.add_argument("--cpus-per-task", type=int, default=None)
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--time", help="time limit: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS")
    p.add_argument("--container-image", help="pyxis/enroot image for srun")
    p.add_argument("--env-file", type=Path, help="KEY=VALUE lines exported in the job")
    p.add_argument("--job-name", default="megatron-uni")
    p.add_argument("--launcher", choices=["srun", "torchrun"], default="srun")
    p.add_argument("--entry", choices=sorted(ENTRY), default="train")
    p.add_argument("--run-dir", type=Path, help="default: the config's train.run_dir")
    p.add_argument("--python", default=sys.executable, help="python on the compute nodes")
    p.add_argument("--signal-seconds", type=int, default=300,
                   help="USR1 this many seconds before the time limit (checkpoint + requeue)")
    p.add_argument("--sbatch-arg", action="append", default=[],
                   help="extra #SBATCH line, e.g. --sbatch-arg=--exclusive")
    p.add_argument("--no-probe", action="store_true",
                   help="skip the topology-printing step before training")
    p.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    p.add_argument("--plan", action="store_true",
                   help="print tools.plan's verdict for the job's layout; refuse one that cannot "
                   "fit (with the planner's best alternative)")
    p.add_argument("--gpu-memory-gib", type=float, default=141.0,
                   help="memory per GPU for --plan (default 141: H200)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Refuse options sbatch would refuse, or that give a job that cannot run (LaunchError)."""
    v.positive("--nodes", args.nodes)
    v.positive("--gpus-per-node", args.gpus_per_node,
               "give the GPUs per node, or --tasks-per-node N on CPU nodes")
    v.positive("--tasks-per-node", args.tasks_per_node)
    v.positive("--cpus-per-task", args.cpus_per_task)
    v.positive("--signal-seconds", args.signal_seconds,
               "give the seconds before the time limit at which the job checkpoints (e.g. 300)")
    v.exclusive("--gpus-per-node", args.gpus_per_node is not None,
                "--tasks-per-node", args.tasks_per_node is not None,
                "give --gpus-per-node N on GPU nodes (one task per GPU) or --tasks-per-node N "
                "on CPU nodes, not both")
    if args.gpus_per_node is None and args.tasks_per_node is None:
        raise v.LaunchError("give --gpus-per-node N (GPU nodes) or --tasks-per-node N (CPU)")
    v.slurm_time(args.time)


def job_from_args(args: argparse.Namespace) -> SlurmJob:
    check_args(args)
    config = args.config.resolve()
    per_node = args.tasks_per_node or args.gpus_per_node
    per_node_opt = "--tasks-per-node" if args.tasks_per_node else "--gpus-per-node"
    # Fail here, not in the queue: the layout must fit nodes x processes per node.
    cfg = v.load_run_config(config, args.overrides, args.nodes * per_node,
                            f"--nodes {args.nodes} x {per_node_opt} {per_node}")
    env = v.env_file(args.env_file)
    workdir = Path.cwd()
    run_dir = args.run_dir or Path(cfg.train.run_dir)
    if not run_dir.is_absolute():
        run_dir = workdir / run_dir
    return SlurmJob(
        config=config, run_dir=run_dir, nodes=args.nodes, gpus_per_node=args.gpus_per_node or 0,
        tasks_per_node=args.tasks_per_node, cpus_per_task=args.cpus_per_task,
        partition=args.partition, account=args.account, time=args.time,
        container_image=args.container_image, env=env, job_name=args.job_name,
        launcher=args.launcher, entry=args.entry, python=args.python, workdir=workdir,
        overrides=[o for o in args.overrides if not o.startswith("train.run_dir=")],
        signal_seconds=args.signal_seconds, extra_sbatch=args.sbatch_arg,
        probe=not args.no_probe,
    )


def probe() -> int:
    """Print this task's launch environment as ``megatron_uni`` reads it (one line per task)."""
    from megatron_uni.parallel.env import detect_env  # noqa: PLC0415

    env = detect_env()
    print(f"topology: rank={env.rank} world_size={env.world_size} local_rank={env.local_rank} "
          f"local_world_size={env.local_world_size} master={env.master_addr}:{env.master_port} "
          f"launcher={env.launcher}", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    if list(sys.argv[1:] if argv is None else argv) == ["--probe"]:
        return probe()
    args = parse_args(argv)
    from megatron_uni.config import ConfigError  # noqa: PLC0415
    from megatron_uni.train import report_error  # noqa: PLC0415

    try:
        job = job_from_args(args)
        if args.plan:
            per_node = args.tasks_per_node or args.gpus_per_node
            cfg = v.load_run_config(job.config, args.overrides, None, "")
            for line in v.plan_verdict(cfg, args.nodes * per_node, per_node,
                                       args.gpu_memory_gib,
                                       "bf16" if args.gpus_per_node else "fp32"):
                print(line, flush=True)
    except (ConfigError, v.LaunchError) as err:
        return report_error(err)
    script = job.render()
    if args.dry_run:
        print(script, end="")
        return 0
    path = record(job, script)
    try:
        job_id = submit(path)
    except v.LaunchError as err:
        return report_error(err)
    with (path.parent / "job_ids.txt").open("a") as ids:
        ids.write(job_id + "\n")
    print(f"submitted job {job_id}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
