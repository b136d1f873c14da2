"""The engine glue (workflow/lib/engines.py) without a pipeline run: its pure parts
(output_roots, the claim's command and paths, the time alignment), its version guard, and
one test per behaviour of an engine's internals it relies on, against the installed DVC
and Snakemake (DVC's lock file formats, Snakemake's metadata record path)."""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT
from workflow.lib import engines
from workflow.lib.engines import (NOTE, EngineBusy, Job, SnakemakeClaim, UntestedVersion,
                                  align_restored_times, check_versions, output_roots,
                                  record_path, snakemake_time_ns, written_by_snakemake)

BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}


# ---------------------------------------------------------------- version guard

def test_tested_versions_are_pyprojects_pins():
    text = (ROOT / "pyproject.toml").read_text()
    pins = dict(re.findall(r'"(dvc|snakemake)==([^"]+)"', text))
    assert pins == engines.TESTED


def test_the_installed_engines_are_the_tested_ones(monkeypatch):
    monkeypatch.delenv(engines.UNTESTED_OK, raising=False)
    check_versions("dvc", "snakemake")  # raises otherwise


def test_an_untested_version_fails_naming_it_unless_overridden(monkeypatch):
    monkeypatch.delenv(engines.UNTESTED_OK, raising=False)
    with pytest.raises(UntestedVersion) as info:
        check_versions("snakemake", "dvc", installed=lambda name: {"snakemake": "9.27.1",
                                                                   "dvc": "3.70.0"}[name])
    assert str(info.value) == (
        "dvc 3.70.0 is untested with segflow's engine glue (workflow/lib/engines.py relies on "
        "its lock files .dvc/tmp/lock and .dvc/tmp/rwlock (dvc.lock, dvc.rwlock); tested with "
        "dvc 3.67.1): run tests/test_engine_glue.py with it and update TESTED, or set "
        "SEGFLOW_UNTESTED_ENGINES=1 to proceed at your own risk")
    monkeypatch.setenv(engines.UNTESTED_OK, "1")
    check_versions("dvc", installed=lambda name: "3.70.0")


def test_the_time_alignment_checks_snakemakes_version_first(tmp_path, monkeypatch):
    monkeypatch.delenv(engines.UNTESTED_OK, raising=False)
    monkeypatch.setitem(engines.TESTED, "snakemake", "0.0.1")
    with pytest.raises(UntestedVersion, match=r"^snakemake 9\.27\.1 is untested"):
        align_restored_times(tmp_path, [])


# ---------------------------------------------------------------- output_roots

def test_output_roots_cut_patterns_at_the_first_wildcard_and_fold_nested_ones():
    assert output_roots([
        "data/raw", "data/masks/{scheme}", "models/{scheme}", "metrics/{scheme}.json",
        "metrics/train/{scheme}", "reports/index.html", "compare", "predictions/{scheme}/val",
        "{scheme}.txt", "./x/../top.txt", "data/raw/manifest.json",
    ]) == ["compare", "data/masks", "data/raw", "metrics", "models", "predictions",
           "reports/index.html", "top.txt"]
    assert output_roots([]) == []
    # a wildcard inside a name keeps only the folder above it
    assert output_roots(["logs/x{scheme}/a", "logsx/b"]) == ["logs", "logsx/b"]


# ---------------------------------------------------------------- the claim

def test_the_claim_names_snakemakes_command_and_every_output_under_the_root(tmp_path):
    claim = SnakemakeClaim(tmp_path, ["models", "data/raw", "models"],
                           argv=["/x/bin/snakemake", "--cores", "2"])
    root = tmp_path.resolve()
    assert claim.outputs == [str(root / "data/raw"), str(root / "models")]
    assert claim.cmd == f"snakemake --cores 2 {NOTE}"
    claim.acquire()  # not a DVC repository: nothing to claim, nothing written
    assert not (tmp_path / ".dvc").exists()
    claim.release()


def _dvc_repo(root: Path) -> Path:
    """A DVC repository (no git) with one stage writing the folder `out`."""
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=root, env=ENV, check=True)
    (root / "dvc.yaml").write_text("stages:\n  make:\n    cmd: mkdir -p out\n    outs: [out]\n")
    return root


def _rwlock(root: Path) -> dict:
    return json.loads((root / ".dvc" / "tmp" / "rwlock").read_text())


def test_dvc_honours_the_claim_and_it_is_dvcs_rwlock_format(tmp_path, monkeypatch):
    """What the claim relies on in DVC: a write entry {path: {pid, cmd}} in
    .dvc/tmp/rwlock stops a DVC command that reads that path, naming the claim's command;
    releasing it empties the entry and DVC runs again."""
    monkeypatch.delenv(engines.UNTESTED_OK, raising=False)
    root = _dvc_repo(tmp_path / "repo")
    claim = SnakemakeClaim(root, ["out"], argv=["snakemake", "--cores", "1"])
    claim.acquire()
    try:
        out = str(root.resolve() / "out")
        assert _rwlock(root) == {"write": {out: {"pid": os.getpid(),
                                                 "cmd": f"snakemake --cores 1 {NOTE}"}},
                                 "read": {}}
        refused = subprocess.run(["dvc", "status"], cwd=root, env=ENV, capture_output=True,
                                 text=True)
        said = refused.stdout + refused.stderr
        assert refused.returncode != 0
        assert f"'{out}' is busy, it is being blocked by:" in said
        assert f"(PID {os.getpid()}): snakemake --cores 1 [segflow: a Snakemake run" in said
    finally:
        claim.release()
    assert _rwlock(root).get("write", {}) == {}
    subprocess.run(["dvc", "status"], cwd=root, env=ENV, check=True, capture_output=True)


def _write_dvc_claim(root: Path, pid: int, path: str) -> None:
    """A write claim as DVC's own rwlock writes it while `dvc repro` runs a stage."""
    tmp = root / ".dvc" / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "rwlock").write_text(json.dumps({
        "write": {str(root.resolve() / path): {"pid": pid, "cmd": "dvc repro"}}, "read": {}}))


def test_a_live_dvc_claim_refuses_snakemake_and_a_dead_ones_is_dropped(tmp_path, monkeypatch):
    monkeypatch.delenv(engines.UNTESTED_OK, raising=False)
    root = _dvc_repo(tmp_path / "repo")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_dvc_claim(root, sleeper.pid, "out")
        with pytest.raises(EngineBusy) as info:
            SnakemakeClaim(root, ["out/sub"]).acquire()  # overlapping paths count
        assert str(info.value).startswith(
            f"DVC is running a stage in {root.resolve()}: segflow runs one engine at a time "
            "on the same outputs; wait for it to finish, then run Snakemake.\n"
            "'")
        assert f"(PID {sleeper.pid}): dvc repro" in str(info.value)
    finally:
        sleeper.kill()
        sleeper.wait()
    # The same claim once its process is gone: DVC's rwlock drops it, the claim is taken.
    claim = SnakemakeClaim(root, ["out"], argv=["snakemake"])
    claim.acquire()
    try:
        assert {i["pid"] for i in _rwlock(root)["write"].values()} == {os.getpid()}
    finally:
        claim.release()


def test_dvcs_repository_lock_held_elsewhere_refuses_snakemake(tmp_path, monkeypatch):
    """DVC's repository lock (.dvc/tmp/lock) held by another process, as between two
    stages of `dvc repro`: the claim fails after DVC's own retries, nothing claimed."""
    monkeypatch.delenv(engines.UNTESTED_OK, raising=False)
    root = _dvc_repo(tmp_path / "repo")
    tmp = root / ".dvc" / "tmp"
    tmp.mkdir(exist_ok=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom dvc.lock import make_lock\n"
         f"lock = make_lock({str(tmp / 'lock')!r}, tmp_dir={str(tmp)!r})\nlock.lock()\n"
         "print('held', flush=True)\ntime.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(EngineBusy) as info:
            SnakemakeClaim(root, ["out"]).acquire()
        assert str(info.value) == (
            f"a DVC command is running in {root.resolve()} (it holds .dvc/tmp/lock): segflow "
            "runs one engine at a time on the same outputs; wait for it to finish, then run "
            "Snakemake")
    finally:
        holder.kill()
        holder.wait()
    assert not (tmp / "rwlock").exists() or _rwlock(root)["write"] == {}


# ---------------------------------------------------------------- Snakemake's records

def test_record_path_is_where_the_installed_snakemake_writes_its_records(tmp_path):
    """What the time alignment relies on in Snakemake: the metadata record of an output
    (with its endtime, the output's time when written) at record_path(), also for a path
    whose encoding is longer than a file name."""
    # its base64 (272 characters) is cut into two parts; not periodic (Snakemake refuses it)
    long_name = "".join(hashlib.sha256(bytes([i])).hexdigest() for i in range(4))[:200]
    (tmp_path / "Snakefile").write_text(
        "rule all:\n"
        f"    input: 'out/a.txt', 'out/{long_name}.txt', 'folder'\n"
        "rule one:\n"
        "    output: 'out/{name}.txt'\n"
        "    shell: 'echo {wildcards.name} > {output}'\n"
        "rule dir:\n"
        "    output: directory('folder')\n"
        "    shell: 'mkdir -p {output} && echo x > {output}/f'\n")
    subprocess.run(["snakemake", "--cores", "1", "--quiet"], cwd=tmp_path, env=ENV, check=True,
                   capture_output=True)
    for rel in ("out/a.txt", f"out/{long_name}.txt", "folder"):
        path = record_path(tmp_path, rel)
        assert path.is_file(), rel
        record = json.loads(path.read_text())
        assert abs(record["endtime"] - snakemake_time_ns(tmp_path / rel) / 1e9) < 1e-3, rel
        assert written_by_snakemake(tmp_path, rel), rel
    assert record_path(tmp_path, f"out/{long_name}.txt").parent.name.startswith("@")
    # A folder's time is its .snakemake_timestamp file's: Snakemake wrote one.
    assert (tmp_path / "folder" / engines.STAMP).is_file()
    # Rewritten since (as `dvc checkout` does): no longer Snakemake's.
    os.utime(tmp_path / "out" / "a.txt", (time.time() + 5, time.time() + 5))
    assert not written_by_snakemake(tmp_path, "out/a.txt")
    assert not written_by_snakemake(tmp_path, "out/never.txt")


# ---------------------------------------------------------------- time alignment

S = 10**9


def _file(root: Path, rel: str, seconds: int) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(rel)
    os.utime(path, ns=(seconds * S, seconds * S))


def _chain(root: Path) -> list[Job]:
    """params -> a -> b/ (a folder) -> c.txt, every output written by DVC at times that say
    nothing about the order (upstream newest)."""
    _file(root, "in.txt", 1000)
    _file(root, "code.py", 900)
    _file(root, "a.txt", 5000)
    _file(root, "b/inside.txt", 4000)
    os.utime(root / "b", ns=(4000 * S, 4000 * S))
    _file(root, "c.txt", 3000)
    return [Job("c", ["b", "code.py"], ["c.txt"]), Job("a", ["in.txt"], ["a.txt"]),
            Job("b@x", ["a.txt", "code.py"], ["b"])]


def test_outputs_dvc_vouches_for_get_their_newest_inputs_time_upstream_first(tmp_path):
    jobs = _chain(tmp_path)
    asked = []
    aligned = align_restored_times(tmp_path, jobs, dvc_status=lambda r: asked.append(r) or set())
    assert asked == [tmp_path.resolve()]
    assert aligned == ["a.txt", "b", "c.txt"]
    assert os.stat(tmp_path / "a.txt").st_mtime_ns == 1000 * S
    # a folder's time goes on its .snakemake_timestamp, where Snakemake reads it
    assert os.stat(tmp_path / "b" / engines.STAMP).st_mtime_ns == 1000 * S
    assert snakemake_time_ns(tmp_path / "b") == 1000 * S
    assert os.stat(tmp_path / "c.txt").st_mtime_ns == 1000 * S
    # already aligned: nothing to set
    assert align_restored_times(tmp_path, jobs, dvc_status=lambda r: set()) == []


def test_stages_dvc_does_not_vouch_for_keep_their_times(tmp_path):
    jobs = _chain(tmp_path)
    aligned = align_restored_times(tmp_path, jobs, dvc_status=lambda r: {"b@x"})
    assert aligned == ["a.txt", "c.txt"]
    assert os.stat(tmp_path / "b").st_mtime_ns == 4000 * S
    assert not (tmp_path / "b" / engines.STAMP).exists()
    # c's newest input is b as it is (4000)
    assert os.stat(tmp_path / "c.txt").st_mtime_ns == 4000 * S
    # DVC cannot tell (no repository, lock held): nothing changes
    jobs = _chain(tmp_path / "other")
    assert align_restored_times(tmp_path / "other", jobs, dvc_status=lambda r: None) == []
    assert os.stat(tmp_path / "other" / "a.txt").st_mtime_ns == 5000 * S


def test_snakemakes_own_outputs_are_left_alone_without_asking_dvc(tmp_path):
    _file(tmp_path, "in.txt", 1000)
    _file(tmp_path, "a.txt", 5000)
    record = record_path(tmp_path, "a.txt")
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"endtime": 5000.0}))
    jobs = [Job("a", ["in.txt"], ["a.txt"]), Job("b", ["a.txt"], ["missing.txt"])]
    assert align_restored_times(tmp_path, jobs, dvc_status=lambda r: pytest.fail("asked")) == []
    assert os.stat(tmp_path / "a.txt").st_mtime_ns == 5000 * S


def test_an_output_snakemake_wrote_before_dvc_rewrote_it_gets_its_recorded_time(tmp_path):
    _file(tmp_path, "in.txt", 1000)
    _file(tmp_path, "up.txt", 2500)   # DVC-restored upstream output, newer than the record
    _file(tmp_path, "a.txt", 9000)    # rewritten by DVC after Snakemake wrote it at 2000
    record = record_path(tmp_path, "a.txt")
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"endtime": 2000.0}))
    jobs = [Job("up", ["in.txt"], ["up.txt"]), Job("a", ["up.txt", "in.txt"], ["a.txt"])]
    assert align_restored_times(tmp_path, jobs, dvc_status=lambda r: set()) == ["up.txt", "a.txt"]
    assert os.stat(tmp_path / "up.txt").st_mtime_ns == 1000 * S
    # its recorded time, since that is not older than its upstream output's (now 1000)
    assert os.stat(tmp_path / "a.txt").st_mtime_ns == 2000 * S


def test_an_output_with_a_missing_input_keeps_its_time(tmp_path):
    _file(tmp_path, "a.txt", 5000)
    assert align_restored_times(tmp_path, [Job("a", ["gone.txt"], ["a.txt"])],
                                dvc_status=lambda r: set()) == []
    assert os.stat(tmp_path / "a.txt").st_mtime_ns == 5000 * S


# ---------------------------------------------------------------- dvc status --json

def test_dvc_status_json_names_the_stages_not_up_to_date(tmp_path):
    root = _dvc_repo(tmp_path / "repo")
    assert engines.dvc_stages_not_up_to_date(root) is None  # no dvc.lock yet
    subprocess.run(["dvc", "repro", "-q"], cwd=root, env=ENV, check=True, capture_output=True)
    assert engines.dvc_stages_not_up_to_date(root) == set()
    (root / "out").rmdir()
    assert engines.dvc_stages_not_up_to_date(root) == {"make"}
    assert engines.dvc_stages_not_up_to_date(tmp_path / "nothing") is None
