"""How Snakemake shares a checkout with DVC: the engine glue, used by the Snakefile
(workflow/rules/common.smk) and never by a stage (it serves the workflow, so it lives
beside the rules, outside the stages package).

Public interfaces where the tools have one, internals only where none does, behind a
version guard (`check_versions`: an untested DVC or Snakemake stops the run naming the
version, unless SEGFLOW_UNTESTED_ENGINES=1) with a test per behaviour relied on
(tests/test_engine_glue.py):

* `dvc status --json` (public) tells which DVC stages are not up to date.
* DVC's `dvc.lock.make_lock`, `dvc.rwlock.rwlock` and `dvc.config.Config` (internal): DVC
  has no public command to hold its locks, and the claim must be in DVC's own lock files
  for DVC to honour it (section 1 below).
* Snakemake's metadata record path under .snakemake/metadata (internal, rebuilt here):
  Snakemake has no public interface that says when it wrote an output; its
  `--summary` needs a second Snakemake run (seconds, over the no-op budget).

1. One engine at a time on the same outputs (`SnakemakeClaim`). Snakemake and DVC each
delete a job's outputs before running it and keep their own bookkeeping, so a second
engine started while the first runs would delete or overwrite files the first is writing
or has just vouched for. The lock is DVC's own, so both directions need no cooperation
from a DVC command:

* DVC guards every stage it reads or writes with `.dvc/tmp/rwlock` (a JSON list of paths
  with the pid and command of the DVC process using them), edited under
  `.dvc/tmp/rwlock.lock`, and guards each step between stage commands with its repository
  lock `.dvc/tmp/lock` (it lets go of that lock while a stage's command runs).
* A Snakemake run (the Snakefile's `onstart`, main process only, never in a dry run or
  inside a SLURM job) takes DVC's repository lock for a moment, then writes a *write*
  claim on every output folder of the workflow into the rwlock file under its own pid and
  command, and lets go of the repository lock. It fails, before any job starts, when DVC
  holds its repository lock or claims any of those paths (DVC is between stages or in a
  stage's command). `onsuccess`/`onerror` remove the claim.
* Any DVC command that would read or write those paths while Snakemake runs (`dvc repro`,
  `status`, `checkout`, `pull`, `commit`, `exp run` in the workspace) stops before
  touching anything with "'data/raw' is busy, it is being blocked by: (PID n): snakemake
  ... [segflow: ...]".
* A claim whose process died (SIGKILL, a crash) is not a stale lock: DVC drops claims of
  pids that no longer exist, with a warning, and so does the next Snakemake run.

The rwlock file knows pids of this machine only: both engines on one checkout on a shared
file system from two different machines are not caught (DVC has the same limit).

2. Outputs that DVC wrote keep Snakemake's rerun decisions sane (`align_restored_times`).
Snakemake reruns a job when an input is newer than its oldest output. `dvc pull`,
`dvc checkout` and `dvc repro` write files at times that say nothing about the pipeline's
order (an upstream folder restored last would rerun everything after it), and leaving
`mtime` out of --rerun-triggers does not help: Snakemake 9.x compares input times
whatever the triggers say. So before Snakemake plans anything, every output that
Snakemake did not write itself (no metadata record in .snakemake/, or a file time other
than the one it recorded) and whose DVC stage `dvc status` calls up to date (its content
matches dvc.lock, which records the code, params and inputs it came from) gets the time
of its newest input: "made right after its inputs". An output Snakemake had written
before DVC rewrote it gets Snakemake's recorded time back instead (no older than its
upstream outputs), since Snakemake judges its code files by recorded checksums. Outputs
Snakemake wrote, and outputs of stages DVC does not vouch for (say, after editing their
code), keep their times and Snakemake's usual rules. For a folder the time is set on its
.snakemake_timestamp file, where Snakemake keeps a folder's time (DVC ignores it:
.dvcignore). This costs one `dvc status --json` per Snakemake invocation while such
outputs exist (none in a checkout only Snakemake writes to): a subprocess, about the cost
of BENCHMARKS.md's "no-op dvc status" row.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import stat
import subprocess
import sys
from base64 import urlsafe_b64encode
from dataclasses import dataclass, field
from pathlib import Path

NOTE = ("[segflow: a Snakemake run owns these outputs; never run DVC and Snakemake on "
        "the same outputs at once: wait for it to finish or stop it]")


class EngineBusy(RuntimeError):
    """The other engine is running in this checkout."""


# The versions whose internals tests/test_engine_glue.py checks: pyproject.toml's pins
# (a test keeps the two equal, so bumping a pin means running those tests again).
TESTED = {"dvc": "3.67.1", "snakemake": "9.27.1"}
UNTESTED_OK = "SEGFLOW_UNTESTED_ENGINES"
RELIES_ON = {"dvc": "its lock files .dvc/tmp/lock and .dvc/tmp/rwlock (dvc.lock, dvc.rwlock)",
             "snakemake": "its metadata records under .snakemake/metadata"}


class UntestedVersion(RuntimeError):
    """An engine version whose internals the glue has not been tested with."""


def check_versions(*names: str, installed=importlib.metadata.version) -> None:
    """Refuse an engine version other than the tested one, naming it: the glue relies on
    internals of that tool that a release may change without notice."""
    if os.environ.get(UNTESTED_OK) == "1":
        return
    for name in names:
        version = installed(name)
        if version != TESTED[name]:
            raise UntestedVersion(
                f"{name} {version} is untested with segflow's engine glue "
                f"(workflow/lib/engines.py relies on {RELIES_ON[name]}; tested with "
                f"{name} {TESTED[name]}): run tests/test_engine_glue.py with it and update "
                f"TESTED, or set {UNTESTED_OK}=1 to proceed at your own risk")


class SnakemakeClaim:
    """Snakemake's claim on the workflow's outputs, in DVC's rwlock."""

    def __init__(self, root: str | Path, outputs: list[str], argv: list[str] | None = None):
        self.root = Path(root).resolve()
        self.outputs = sorted({str(self.root / o) for o in outputs})
        argv = sys.argv if argv is None else argv
        self.cmd = " ".join(["snakemake", *argv[1:], NOTE])
        self._claim = None

    @property
    def tmp_dir(self) -> Path:
        return self.root / ".dvc" / "tmp"

    def _hardlink_lock(self) -> bool:
        from dvc.config import Config

        return bool(Config(dvc_dir=str(self.root / ".dvc"))["core"].get("hardlink_lock", False))

    def acquire(self) -> None:
        if not (self.root / ".dvc").is_dir():
            return  # not a DVC repository: no other engine to keep out
        check_versions("dvc")
        from dvc.fs import localfs
        from dvc.lock import LockError, make_lock
        from dvc.rwlock import rwlock

        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        hardlink = self._hardlink_lock()
        repo_lock = make_lock(str(self.tmp_dir / "lock"), tmp_dir=str(self.tmp_dir),
                              hardlink_lock=hardlink)
        try:
            repo_lock.lock()  # DVC's own few retries (about 3 s)
        except LockError:
            raise EngineBusy(
                f"a DVC command is running in {self.root} (it holds .dvc/tmp/lock): segflow "
                "runs one engine at a time on the same outputs; wait for it to finish, then "
                "run Snakemake") from None
        try:
            claim = rwlock(str(self.tmp_dir), localfs, self.cmd, [], self.outputs, hardlink)
            try:
                claim.__enter__()
            except LockError as exc:
                raise EngineBusy(
                    f"DVC is running a stage in {self.root}: segflow runs one engine at a "
                    f"time on the same outputs; wait for it to finish, then run Snakemake.\n"
                    f"{exc}") from None
            self._claim = claim
        finally:
            repo_lock.unlock()

    def release(self) -> None:
        claim, self._claim = self._claim, None
        if claim is not None:
            claim.__exit__(None, None, None)


def output_roots(patterns: list[str]) -> list[str]:
    """The folders (or files) that hold every output pattern: the part before the first
    wildcard, cut back to a whole path component; nested ones folded into their parent."""
    roots = set()
    for pattern in patterns:
        head = pattern.split("{", 1)[0]
        if head != pattern:
            head = head.rsplit("/", 1)[0] if "/" in head else ""
        head = os.path.normpath(head) if head else ""
        if head and head != ".":
            roots.add(head)
    return sorted(r for r in roots
                  if not any(r != o and r.startswith(o.rstrip("/") + "/") for o in roots))


# ---------------------------------------------------------------- times of DVC's outputs

STAMP = ".snakemake_timestamp"


@dataclass
class Job:
    """One Snakemake job as the time alignment needs it: the DVC stage with the same
    name (rule, or rule@scheme), its input and output paths (relative to the root)."""
    stage: str
    inputs: list[str]
    outputs: list[str] = field(default_factory=list)


def snakemake_time_ns(path: Path) -> int | None:
    """The time Snakemake compares: a folder's .snakemake_timestamp if it has one."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISDIR(info.st_mode):
        try:
            return os.stat(path / STAMP).st_mtime_ns
        except FileNotFoundError:
            pass
    return info.st_mtime_ns


def _set_time_ns(path: Path, ns: int) -> None:
    if path.is_dir():
        path = path / STAMP
        path.touch()
    os.utime(path, ns=(ns, ns))


def record_path(root: Path, rel: str) -> Path:
    """Where Snakemake keeps the metadata record of an output (its persistence module's
    layout, internal: the path's urlsafe base64, cut into file-name-sized parts, all but
    the last prefixed with '@'). tests/test_engine_glue.py checks it against what the
    installed Snakemake writes."""
    folder = root / ".snakemake" / "metadata"
    max_len = os.pathconf(folder, "PC_NAME_MAX") if folder.is_dir() else 255
    b64 = urlsafe_b64encode(rel.encode()).decode()
    parts = [b64[i:i + max_len - 1] for i in range(0, len(b64), max_len - 1)]
    parts = ["@" + part for part in parts[:-1]] + parts[-1:]
    return folder.joinpath(*parts)


def _record(root: Path, rel: str) -> dict | None:
    """Snakemake's metadata record of an output, if it has one."""
    try:
        return json.loads(record_path(root, rel).read_text())
    except (OSError, ValueError):
        return None


def written_by_snakemake(root: Path, rel: str) -> bool:
    """Snakemake wrote this output last: it recorded it, at the time it still has."""
    record = _record(root, rel)
    now = snakemake_time_ns(root / rel)
    return (record is not None and now is not None and record.get("endtime") is not None
            and abs(now / 1e9 - record["endtime"]) < 1e-3)


def dvc_stages_not_up_to_date(root: Path) -> set[str] | None:
    """Names of the DVC stages `dvc status --json` lists; None when DVC cannot tell (no
    DVC repository, no dvc.lock, another DVC command holds the repository, or an answer
    that is not the JSON object it documents)."""
    if not (root / ".dvc").is_dir() or not (root / "dvc.lock").is_file():
        return None
    # The public command, run by this Python (the venv's dvc, whatever PATH says).
    result = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=root,
                            capture_output=True, text=True)
    try:
        status = json.loads(result.stdout)
    except ValueError:
        return None
    if result.returncode != 0 or not isinstance(status, dict):
        return None
    return set(status)


def align_restored_times(root: str | Path, jobs: list[Job],
                         dvc_status=dvc_stages_not_up_to_date) -> list[str]:
    """Give the outputs DVC vouches for, and Snakemake did not write, the time of their
    newest input, upstream first. Returns the outputs whose time was set. `dvc_status`
    (root -> names of stages not up to date, or None) is `dvc status --json`."""
    check_versions("snakemake")  # the metadata record path (_record)
    root = Path(root).resolve()
    foreign = {rel for job in jobs for rel in job.outputs
               if (root / rel).exists() and not written_by_snakemake(root, rel)}
    if not foreign:
        return []  # the usual case: no DVC import, no status
    changed = dvc_status(root)
    if changed is None:
        return []
    producer = {rel: job for job in jobs for rel in job.outputs}
    done: set[int] = set()
    aligned: list[str] = []

    def visit(job: Job) -> None:
        if id(job) in done:
            return
        done.add(id(job))
        for rel in job.inputs:
            if rel in producer:
                visit(producer[rel])
        mine = [rel for rel in job.outputs if rel in foreign]
        times = {rel: snakemake_time_ns(root / rel) for rel in job.inputs}
        if not mine or job.stage in changed or not times or None in times.values():
            return
        upstream = [t for rel, t in times.items() if rel in producer]
        for rel in mine:
            record = _record(root, rel)
            if record and record.get("endtime"):
                # Snakemake wrote it before: its own time back (not older than what it
                # was made from); its recorded input checksums judge the code files.
                target = max([int(record["endtime"] * 1e9), *upstream])
            else:
                target = max(times.values())
            if snakemake_time_ns(root / rel) != target:
                _set_time_ns(root / rel, target)
                aligned.append(rel)

    for job in jobs:
        visit(job)
    return aligned
