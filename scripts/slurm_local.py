"""A single-node Slurm cluster on loopback, for the tests and for trying the Slurm launcher without a cluster.

    python scripts/slurm_local.py STATE_DIR   # a new folder; prints `export SLURM_CONF=...`; Ctrl-C stops it

Debian's Slurm 22.05 (`scripts/install_slurm.sh` installs slurm-wlm, munge, slurmdbd, mariadb-server).
Init services are not used: munged, mariadbd, slurmdbd, slurmctld and slurmd run in the foreground as
children of this process, with configs, state, sockets and logs under STATE_DIR, on free loopback
ports, and are stopped by their PIDs. Accounting (mariadbd + slurmdbd) is not optional: without it
submitit cannot tell a cancelled job from a running one and waits for its result forever.
`--cpus`, `--memory-gb` and `--gpus` make the node declare resources it does not have, so that a job
sized for a GPU cluster is accepted: for looking at what a launcher submits, not for running it.
"""

from __future__ import annotations

import argparse
import ctypes
import getpass
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

DAEMONS = ("munged", "mariadbd", "mariadb-install-db", "slurmdbd", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "sinfo", "sacct", "scancel", "srun")
CLUSTER = "lineareval"
NODE = "localhost"  # a name that resolves: submitit takes the rendezvous address from the node list


class SlurmUnavailable(RuntimeError):
    """The Slurm, munge or MariaDB programs are not installed."""


def missing_programs() -> list[str]:
    """Programs this cluster needs that are not on PATH (Debian puts the daemons in /usr/sbin)."""
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
    return [name for name in DAEMONS + CLIENTS if shutil.which(name, path=search) is None]


def _program(name: str) -> str:
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"]))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the process that started the cluster dies (Linux)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _wait_for(condition, what: str, timeout_s: float, logs: list[Path]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    tails = "\n".join(f"--- {path}\n{path.read_text(errors='replace')[-2000:]}" for path in logs if path.exists())
    raise RuntimeError(f"local Slurm: {what} not ready after {timeout_s:.0f} s\n{tails}")


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class LocalSlurm:
    """munged + mariadbd + slurmdbd + slurmctld + slurmd with everything under `state_dir`.

    Use as a context manager; `env` holds SLURM_CONF for clients (sbatch, squeue, sacct, submitit).
    """

    state_dir: Path
    cpus: int | None = None           # None: this machine's
    memory_mb: int | None = None      # None: this machine's
    gpus: int = 0
    timeout_s: float = 60.0
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir).resolve()
        self.user = getpass.getuser()
        self.ports = {name: _free_port() for name in ("mariadb", "slurmdbd", "slurmctld", "slurmd")}

    @property
    def conf(self) -> Path:
        return self.state_dir / "etc" / "slurm.conf"

    @property
    def munge_socket(self) -> Path:
        return self.state_dir / "munge" / "munge.socket"

    @property
    def env(self) -> dict[str, str]:
        """The environment for Slurm clients: this process's plus SLURM_CONF."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def __enter__(self) -> LocalSlurm:
        missing = missing_programs()
        if missing:
            raise SlurmUnavailable(f"not installed: {', '.join(missing)} (run scripts/install_slurm.sh)")
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> None:
        if self.state_dir.exists() and any(self.state_dir.iterdir()):
            raise ValueError(f"{self.state_dir} is not empty: give the cluster a new folder")
        if len(str(self.munge_socket)) > 100:  # Unix socket paths are limited to 107 bytes
            raise ValueError(f"{self.state_dir} is too long a path for munge's socket: use a shorter folder")
        for folder in ("etc", "log", "run", "munge", "mysql", "ctld", "slurmd"):
            (self.state_dir / folder).mkdir(parents=True, exist_ok=True)
        self._start_munge()
        self._start_mariadb()
        self._write_configs()
        self._spawn("slurmdbd", [_program("slurmdbd"), "-D"])
        _wait_for(lambda: _listening(self.ports["slurmdbd"]), "slurmdbd", self.timeout_s, self._logs())
        self._spawn("slurmctld", [_program("slurmctld"), "-D", "-i"])
        _wait_for(lambda: _listening(self.ports["slurmctld"]), "slurmctld", self.timeout_s, self._logs())
        self._spawn("slurmd", [_program("slurmd"), "-D", "-N", NODE])
        _wait_for(self._node_idle, "node (idle in sinfo)", self.timeout_s, self._logs())
        log.info("local Slurm up: SLURM_CONF=%s", self.conf)

    def _spawn(self, name: str, command: list[str]) -> None:
        output = open(self.state_dir / "log" / f"{name}.out", "ab")
        with output:
            self.processes[name] = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT,
                                                    stdin=subprocess.DEVNULL, env=self.env,
                                                    preexec_fn=_die_with_parent)

    def _logs(self) -> list[Path]:
        return sorted((self.state_dir / "log").glob("*"))

    def _start_munge(self) -> None:
        key = self.state_dir / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        (self.state_dir / "munge").chmod(0o700)
        self._spawn("munged", [_program("munged"), "-F", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={key}", f"--pid-file={self.state_dir / 'munge' / 'munged.pid'}",
                               f"--seed-file={self.state_dir / 'munge' / 'munged.seed'}",
                               f"--log-file={self.state_dir / 'log' / 'munged.log'}"])
        _wait_for(self.munge_socket.exists, "munged", self.timeout_s, self._logs())

    def _start_mariadb(self) -> None:
        data = self.state_dir / "mysql" / "data"
        small = ["--innodb-log-file-size=8M", "--innodb-buffer-pool-size=32M"]
        install = subprocess.run([_program("mariadb-install-db"), "--no-defaults", f"--datadir={data}",
                                  f"--user={self.user}", "--skip-test-db", "--auth-root-authentication-method=normal",
                                  *small], capture_output=True, text=True, timeout=self.timeout_s)
        if install.returncode != 0:
            output = (install.stdout + install.stderr)[-4000:]
            raise RuntimeError(f"local Slurm: mariadb-install-db failed:\n{output}")
        self._spawn("mariadbd", [_program("mariadbd"), "--no-defaults", f"--datadir={data}", f"--user={self.user}",
                                 f"--port={self.ports['mariadb']}", "--bind-address=127.0.0.1",
                                 f"--socket={self.state_dir / 'mysql' / 'mysqld.sock'}",
                                 f"--pid-file={self.state_dir / 'mysql' / 'mariadbd.pid'}",
                                 f"--log-error={self.state_dir / 'log' / 'mariadbd.log'}", *small])
        _wait_for(lambda: _listening(self.ports["mariadb"]), "mariadbd", self.timeout_s, self._logs())

    def _write_configs(self) -> None:
        state, log_dir = self.state_dir, self.state_dir / "log"
        dbd = self.state_dir / "etc" / "slurmdbd.conf"
        dbd.write_text("\n".join([
            "AuthType=auth/munge", f"AuthInfo=socket={self.munge_socket}",
            "DbdHost=localhost", "DbdAddr=127.0.0.1", f"DbdPort={self.ports['slurmdbd']}", f"SlurmUser={self.user}",
            f"PidFile={state / 'run' / 'slurmdbd.pid'}", f"LogFile={log_dir / 'slurmdbd.log'}",
            "StorageType=accounting_storage/mysql", "StorageHost=127.0.0.1",
            f"StoragePort={self.ports['mariadb']}", "StorageUser=root", "StorageLoc=slurm_acct_db", ""]))
        dbd.chmod(0o600)  # slurmdbd refuses a config others can read
        gres = [f"Gres=gpu:{self.gpus}"] if self.gpus else []
        self.conf.write_text("\n".join([
            f"ClusterName={CLUSTER}", "SlurmctldHost=localhost(127.0.0.1)",
            f"SlurmctldPort={self.ports['slurmctld']}", f"SlurmdPort={self.ports['slurmd']}",
            f"SlurmUser={self.user}", f"SlurmdUser={self.user}",
            "AuthType=auth/munge", f"AuthInfo=socket={self.munge_socket}", "CredType=cred/munge",
            f"StateSaveLocation={state / 'ctld'}", f"SlurmdSpoolDir={state / 'slurmd'}",
            f"SlurmctldPidFile={state / 'run' / 'slurmctld.pid'}", f"SlurmdPidFile={state / 'run' / 'slurmd.pid'}",
            f"SlurmctldLogFile={log_dir / 'slurmctld.log'}", f"SlurmdLogFile={log_dir / 'slurmd.log'}",
            # no cgroups in containers; schedule batch jobs at once and kill cancelled ones quickly
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "MpiDefault=none",
            "SchedulerType=sched/backfill", "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "SchedulerParameters=batch_sched_delay=0", "KillWait=5", "ReturnToService=2",
            "JobAcctGatherType=jobacct_gather/none", "JobCompType=jobcomp/none",
            "AccountingStorageType=accounting_storage/slurmdbd", "AccountingStorageHost=localhost",
            f"AccountingStoragePort={self.ports['slurmdbd']}", f"AccountingStoragePass={self.munge_socket}",
            *(["GresTypes=gpu"] if self.gpus else []),
            # the node's CPUs, memory and GPUs are what this file says, not what slurmd detects
            "SlurmdParameters=config_overrides",
            f"NodeName={NODE} NodeHostname=localhost NodeAddr=127.0.0.1 CPUs={self.cpus or os.cpu_count()} "
            f"RealMemory={self.memory_mb or self._memory_mb()} {' '.join(gres)} State=UNKNOWN",
            f"PartitionName=debug Nodes={NODE} Default=YES MaxTime=INFINITE State=UP", ""]))
        if self.gpus:  # slurmd counts GPUs by their device files: empty stand-ins
            devices = [self.state_dir / "dev" / f"gpu{index}" for index in range(self.gpus)]
            for device in devices:
                device.parent.mkdir(exist_ok=True)
                device.touch()
            (self.state_dir / "etc" / "gres.conf").write_text(
                "AutoDetect=off\n" + "".join(f"NodeName={NODE} Name=gpu File={device}\n" for device in devices))

    @staticmethod
    def _memory_mb() -> int:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20

    def _node_idle(self) -> bool:
        state = subprocess.run(["sinfo", "--noheader", "--Node", "--format=%T"], env=self.env,
                               capture_output=True, text=True)
        return state.returncode == 0 and state.stdout.strip() == "idle"

    def stop(self) -> None:
        """Cancel what is queued, then stop the daemons (last started first) by PID."""
        if "slurmctld" in self.processes and self.processes["slurmctld"].poll() is None:
            try:
                subprocess.run(["scancel", f"--user={self.user}"], env=self.env, capture_output=True, timeout=30)
                _wait_quietly(lambda: not _queue(self.env), timeout_s=15)
            except subprocess.TimeoutExpired:
                log.warning("local Slurm: scancel did not answer; stopping the daemons anyway")
        for name in reversed(list(self.processes)):
            process = self.processes.pop(name)
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def _queue(env: dict[str, str]) -> str:
    result = subprocess.run(["squeue", "--noheader", "--format=%i"], env=env, capture_output=True, text=True,
                            timeout=30)
    return result.stdout.strip() if result.returncode == 0 else ""


def _wait_quietly(condition, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not condition():
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("state_dir", type=Path)
    parser.add_argument("--cpus", type=int, help="CPUs the node declares (default: this machine's)")
    parser.add_argument("--memory-gb", type=int, help="memory the node declares (default: this machine's)")
    parser.add_argument("--gpus", type=int, default=0, help="GPUs the node declares (none exist)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    memory_mb = args.memory_gb * 1024 if args.memory_gb else None
    with LocalSlurm(args.state_dir, cpus=args.cpus, memory_mb=memory_mb, gpus=args.gpus) as cluster:
        print(f"export SLURM_CONF={cluster.conf}", flush=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # leave the `with` block: stop the daemons
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
