"""A real single-node SLURM on localhost for the tests, from Debian's slurm-wlm and munge
(see shared SLURM-NOTES): munged, slurmctld and slurmd started by hand (no systemd), with
cgroup-free settings, every file in one folder, and stopped again by their pid files.

The configuration is written to /etc/slurm/slurm.conf, where every SLURM command looks by
default: SLURM_CONF alone is not enough, because the plugin's job step (inside each job)
removes every SLURM_* variable before it calls srun. So an existing slurm.conf that is not
ours is never overwritten (the cluster refuses to start), and ours is removed on stop.
munged is shared with the machine: started only if no munged answers yet, and then
stopped at the end too.

There is deliberately no slurmdbd (no accounting): see `SNAKEMAKE_FLAGS` for how the
Snakemake SLURM plugin is told to live without `sacct`.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

BINARIES = ["slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scontrol", "munged", "munge",
            "unmunge"]
MUNGE_PID = Path("/run/munge/munged.pid")
MUNGE_KEY = Path("/etc/munge/munge.key")
SLURM_CONF = Path("/etc/slurm/slurm.conf")
MARKER = "# written by segflow's tests/slurm_cluster.py"
PARTITION = "segflow-ci"
MIN_JOB_AGE_S = 3600
# The accounting trap (shared SLURM-NOTES): without slurmdbd, `sacct` only answers
# "accounting storage is disabled", so the plugin's default status check (sacct) never sees
# a job finish and the run hangs. Of the two ways out we take squeue, not slurmdbd: no
# MariaDB and slurmdbd to install, configure, start and stop in CI (more time, two more
# daemons that can fail), and it is the plugin's own mode for clusters without
# accounting. What it costs: a failed job is reported without SLURM's reason (the stage's
# log path and text are still shown), and squeue forgets a job MinJobAge after it ends
# (3600 s here; the plugin silently goes back to sacct unless MinJobAge >= 3 x the first
# status-check delay). The first check comes after 5 s instead of the default 40 s, which
# would otherwise add half a minute or more to a short chain of jobs.
SNAKEMAKE_FLAGS = ["--slurm-status-command", "squeue",
                   "--slurm-init-seconds-before-status-checks", "5",
                   "--slurm-no-account"]


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None
            and not Path("/usr/sbin", b).exists()]


def foreign_conf() -> bool:
    """A slurm.conf that these tests did not write: a real SLURM they must leave alone."""
    return SLURM_CONF.exists() and MARKER not in SLURM_CONF.read_text(errors="replace")


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LocalSlurm:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.conf = SLURM_CONF
        self.wrote_conf = False
        self.ctld_pid = self.folder / "slurmctld.pid"
        self.slurmd_pid = self.folder / "slurmd.pid"
        self.ctld_log = self.folder / "slurmctld.log"
        self.slurmd_log = self.folder / "slurmd.log"
        self.started_munge = False

    # ------------------------------------------------------------ setup

    def env(self, base: dict | None = None) -> dict:
        return {**(base if base is not None else os.environ), "SLURM_CONF": str(self.conf)}

    def write_conf(self) -> None:
        cpus = os.cpu_count() or 1
        total_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        memory = max(1000, total_mb - 1024)
        (self.folder / "state").mkdir(parents=True, exist_ok=True)
        (self.folder / "spool").mkdir(parents=True, exist_ok=True)
        if foreign_conf():
            raise RuntimeError(f"{self.conf} exists and is not segflow's: this machine has a "
                               "SLURM of its own, which the tests leave alone")
        self.conf.parent.mkdir(parents=True, exist_ok=True)
        self.wrote_conf = True
        self.conf.write_text(f"""\
{MARKER} (removed when its cluster stops)
ClusterName=segflow-ci
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# No cgroups on this kind of machine.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MailProg=/bin/true
# Finished jobs stay visible to squeue this long (the plugin reads their state there).
MinJobAge={MIN_JOB_AGE_S}
SlurmctldPort=6817
SlurmdPort=6818
SlurmctldPidFile={self.ctld_pid}
SlurmdPidFile={self.slurmd_pid}
SlurmctldLogFile={self.ctld_log}
SlurmdLogFile={self.slurmd_log}
SlurmctldDebug=info
SlurmdDebug=info
StateSaveLocation={self.folder / "state"}
SlurmdSpoolDir={self.folder / "spool"}
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory} State=UNKNOWN
PartitionName={PARTITION} Nodes=localhost Default=YES MaxTime=INFINITE State=UP DefMemPerCPU=1000
""")

    # ------------------------------------------------------------ daemons

    def _munge_answers(self) -> bool:
        try:
            cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
            if cred.returncode != 0:
                return False
            return subprocess.run(["unmunge"], input=cred.stdout, capture_output=True,
                                  timeout=10).returncode == 0
        except (OSError, subprocess.SubprocessError):
            return False

    def start_munge(self) -> None:
        if self._munge_answers():
            return
        if not MUNGE_KEY.exists():
            subprocess.run([_sbin("mungekey"), "--create", "--keyfile", str(MUNGE_KEY)],
                           check=True)
        shutil.chown(MUNGE_KEY, "munge", "munge")
        MUNGE_KEY.chmod(0o400)
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", _sbin("munged")], check=True)
        self.started_munge = True
        self._wait(self._munge_answers, 20, "munged did not answer munge -n | unmunge")

    def start(self) -> None:
        self.write_conf()
        self.start_munge()
        env = self.env()
        subprocess.run([_sbin("slurmctld"), "-f", str(self.conf)], check=True, env=env)
        subprocess.run([_sbin("slurmd"), "-f", str(self.conf), "-N", "localhost"], check=True,
                       env=env)
        self._wait(self._idle, 60, "the node did not become idle")

    def _idle(self) -> bool:
        try:
            out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True,
                                 env=self.env(), timeout=10).stdout.split()
        except (OSError, subprocess.SubprocessError):
            return False
        return out == ["idle"]

    def _wait(self, ready, seconds: float, message: str) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if ready():
                return
            time.sleep(0.5)
        raise RuntimeError(f"{message} within {seconds} s; see {self.folder}:\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in (self.ctld_log, self.slurmd_log) if p.exists())

    def stop(self) -> None:
        """Stop what this object started, each daemon by the pid in its own pid file."""
        for pidfile in (self.slurmd_pid, self.ctld_pid):
            self._stop(_pid(pidfile))
        if self.started_munge:
            self._stop(_pid(MUNGE_PID))
        if self.wrote_conf and not foreign_conf() and self.conf.exists():
            self.conf.unlink()

    @staticmethod
    def _stop(pid: int | None) -> None:
        if not _alive(pid):
            return
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)

    # ------------------------------------------------------------ queries

    def jobs(self) -> list[dict]:
        """Every job slurmctld still knows (MinJobAge keeps finished ones): id, name,
        comment (the plugin writes the rule and wildcards there), state, exit code."""
        out = subprocess.run(["squeue", "--states=all", "-h", "-o", "%i|%j|%k|%T"],
                             capture_output=True, text=True, env=self.env(), check=True,
                             timeout=30).stdout
        rows = [line.split("|", 3) for line in out.splitlines() if line.strip()]
        return [dict(zip(("id", "name", "comment", "state"), row)) for row in rows]
