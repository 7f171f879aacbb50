"""A real two-node Slurm cluster on loopback for tests (Debian's slurmctld/slurmd, as root).

Writes slurm.conf under a temporary directory, starts slurmctld and one slurmd per emulated node
(n1, n2: same host, 127.0.0.1, different ports), waits until every node is idle, and on
``stop()`` kills only the daemons it started. Without the packages or root, ``SlurmUnavailable``
names what is missing; in CI (``CI`` set) the tests turn that into a failure, not a skip.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

CONF = """\
ClusterName=ci
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
# A requeued job may start again cred_expire seconds after the requeue (default 120).
AuthInfo=cred_expire=5
CredType=cred/none
MpiDefault=pmi2
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Start a requeued job as soon as it is eligible (the defaults wait up to a minute).
SchedulerParameters=sched_interval=1,bf_interval=1
ReturnToService=2
MailProg=/bin/true
KillWait=60
SlurmctldPort={ctld_port}
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
TmpFS={d}/tmp/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd-%n.log
NodeName=n[1-{n}] NodeHostname={host} NodeAddr=127.0.0.1 Port=[{p0}-{p1}] CPUs={cpus} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _free_ports(count: int) -> int:
    """The first of ``count`` consecutive TCP ports that are free now on loopback."""
    for _ in range(200):
        base = random.randint(30000, 60000 - count)
        socks = []
        try:
            for port in range(base, base + count):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(sock)
                sock.bind(("0.0.0.0", port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise SlurmUnavailable("no free ports for the test cluster")


class SlurmUnavailable(RuntimeError):
    """Slurm's daemons cannot run here (packages missing, not root)."""


class SlurmCluster:
    def __init__(self, root: Path, num_nodes: int = 2, cpus_per_node: int = 2) -> None:
        self.root, self.num_nodes = Path(root), num_nodes
        self.cpus = cpus_per_node
        # Free ports, so that two test runs on one machine do not meet each other's daemons.
        self.ctld_port = _free_ports(1)
        self.first_node_port = _free_ports(num_nodes)
        self.conf = self.root / "slurm.conf"
        self.procs: list[subprocess.Popen] = []

    @property
    def env(self) -> dict[str, str]:
        """The environment for sbatch/squeue/scontrol against this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self, timeout: float = 60) -> "SlurmCluster":
        missing = [b for b in ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo")
                   if shutil.which(b) is None]
        if missing:
            raise SlurmUnavailable(f"not installed: {' '.join(missing)} (apt-get install -y "
                                   "--no-install-recommends slurmctld slurmd slurm-client)")
        if os.geteuid() != 0:
            raise SlurmUnavailable("the test cluster runs its daemons as root")
        d = self.root
        for sub in ("state", "log"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        for i in range(1, self.num_nodes + 1):
            (d / "spool" / f"n{i}").mkdir(parents=True, exist_ok=True)
            (d / "tmp" / f"n{i}").mkdir(parents=True, exist_ok=True)
        self.conf.write_text(CONF.format(
            d=d, n=self.num_nodes, host=socket.gethostname().split(".")[0], cpus=self.cpus,
            ctld_port=self.ctld_port, p0=self.first_node_port,
            p1=self.first_node_port + self.num_nodes - 1))
        log = d / "log"
        self._spawn(["slurmctld", "-D", "-i", "-f", str(self.conf)], log / "slurmctld.out")
        for i in range(1, self.num_nodes + 1):
            self._spawn(["slurmd", "-D", "-N", f"n{i}", "-f", str(self.conf)],
                        log / f"slurmd-n{i}.out")
        deadline = time.time() + timeout
        while time.time() < deadline:
            for proc in self.procs:
                if proc.poll() is not None:
                    self.stop()
                    raise SlurmUnavailable(f"{proc.args[0]} exited: {self.logs()[-3000:]}")
            out = subprocess.run(["sinfo", "-h", "-N", "-t", "idle", "-o", "%N"], env=self.env,
                                 capture_output=True, text=True)
            if len(set(out.stdout.split())) == self.num_nodes:
                return self
            time.sleep(0.5)
        self.stop()
        raise SlurmUnavailable(f"nodes not idle after {timeout} s: {self.logs()[-3000:]}")

    def _spawn(self, cmd: list[str], out: Path) -> None:
        with out.open("w") as fh:
            self.procs.append(subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT,
                                               env=self.env, start_new_session=True))

    def logs(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')}"
                         for p in sorted((self.root / "log").glob("*")) if p.is_file())

    def job_state(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=self.env,
                             capture_output=True, text=True)
        fields: dict[str, str] = {}
        for item in out.stdout.split():
            key, _, value = item.partition("=")
            fields.setdefault(key, value)
        return fields

    def wait_job(self, job_id: str, timeout: float) -> dict[str, str]:
        """Until the job is finished (not pending/running/requeued); returns its state."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = self.job_state(job_id)
            if state.get("JobState") in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                         "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}:
                return state
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not done after {timeout} s: {self.job_state(job_id)}")

    def stop(self) -> None:
        """Cancel this cluster's jobs (their steps die with them), then SIGTERM, then SIGKILL,
        to the daemons this object started (and nothing else)."""
        if self.procs and all(proc.poll() is None for proc in self.procs):
            subprocess.run(["scancel", "--full", "--user", "root"], env=self.env,
                           capture_output=True, timeout=30)
            deadline = time.time() + 30
            while time.time() < deadline:
                out = subprocess.run(["squeue", "-h"], env=self.env, capture_output=True,
                                     text=True, timeout=30)
                if out.returncode != 0 or not out.stdout.strip():
                    break
                time.sleep(0.5)
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self.procs.clear()
