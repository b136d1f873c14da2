"""The whole pipeline through a real SLURM (single node on localhost, see slurm_cluster.py)
with the cluster profile workflow/profiles/slurm: every job a SLURM job, the report made.

CI (.ci/run) installs slurm-wlm and munge and sets SEGFLOW_REQUIRE_SLURM=1: there a
missing SLURM is a failure. Elsewhere the test is skipped with the reason, unless that
variable is set. It starts the daemons itself (as root) and stops them by their pid files.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, copy_repo, small_params
from slurm_cluster import (PARTITION, SLURM_CONF, SNAKEMAKE_FLAGS, LocalSlurm, foreign_conf,
                           missing_binaries)

BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
PROFILE = "workflow/profiles/slurm"

REQUIRED = os.environ.get("SEGFLOW_REQUIRE_SLURM") == "1"
MISSING = missing_binaries()
NOT_ROOT = os.geteuid() != 0
_why = (f"SLURM not installed ({', '.join(MISSING)} missing): apt-get install -y slurm-wlm munge"
        if MISSING else "the single-node SLURM needs root (SlurmUser=root)" if NOT_ROOT
        else f"{SLURM_CONF} belongs to this machine's own SLURM" if foreign_conf() else "")
needs_slurm = pytest.mark.skipif(bool(_why) and not REQUIRED, reason=_why)


def _run(cmd, cwd, env=ENV, timeout=None, check=True):
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({result.returncode}):\n"
                             f"{result.stdout[-5000:]}\n{result.stderr[-5000:]}")
    return result


def test_slurm_profile_asks_for_resources_and_gpus():
    """No SLURM needed: a dry run through the profile shows what each job would request
    (the plugin turns threads, mem_mb, runtime and gpu into sbatch flags)."""
    out = _run(["snakemake", "-n", "-F", "--workflow-profile", PROFILE], ROOT).stdout
    jobs = {}
    for block in re.split(r"\n(?=\[|(?:local)?rule )", out):
        rule = re.search(r"^(?:local)?rule (\w+):", block, flags=re.M)
        resources = re.search(r"^\s+resources: (.*)$", block, flags=re.M)
        if rule and resources:
            jobs.setdefault(rule.group(1), []).append(dict(
                item.split("=", 1) for item in resources.group(1).split(", ")))
    jobs.pop("all", None)  # no command: Snakemake runs it itself, never as a SLURM job
    assert {"download", "masks", "train", "infer", "evaluate", "analyze", "report"} <= set(jobs)
    for rule, requests in jobs.items():
        for request in requests:
            assert {"mem_mb", "runtime", "slurm_partition", "slurm_account"} <= set(request)
            assert request.get("gpu") == ("1" if rule in ("train", "infer") else None), rule
    profile = yaml.safe_load((ROOT / PROFILE / "config.yaml").read_text())
    assert profile["executor"] == "slurm"
    assert profile["slurm-keep-successful-logs"] is True


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if _why:
        pytest.fail(f"SEGFLOW_REQUIRE_SLURM=1 but {_why}")
    slurm = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        slurm.start()
        yield slurm
    finally:
        slurm.stop()


def cpu_only_profile(root: Path) -> None:
    """The edits a user of a CPU-only cluster makes to the profile once: the partition,
    and no GPUs for train and infer."""
    path = root / PROFILE / "config.yaml"
    profile = yaml.safe_load(path.read_text())
    profile["default-resources"]["slurm_partition"] = PARTITION
    for rule in ("train", "infer"):
        profile["set-resources"][rule]["gpu"] = 0
    path.write_text(yaml.safe_dump(profile, sort_keys=False))


@needs_slurm
@pytest.mark.e2e
def test_whole_pipeline_as_slurm_jobs(cluster, tmp_path):
    params = small_params(yaml.safe_load((ROOT / "params.yaml").read_text()),
                          train=8, val=6, size=64, epochs=1)
    root = copy_repo(tmp_path / "repo", params)
    cpu_only_profile(root)
    env = cluster.env(ENV)
    # SNAKEMAKE_FLAGS: no slurmdbd here, so squeue tells the plugin when a job ended.
    result = _run(["snakemake", "--workflow-profile", PROFILE, *SNAKEMAKE_FLAGS], root, env=env,
                  timeout=1800, check=False)
    out = result.stdout + result.stderr
    assert result.returncode == 0, f"{out[-6000:]}\n{cluster.logs()}"

    html = (root / "reports" / "index.html").read_text()
    for scheme in params["schemes"]:
        metrics = (root / "metrics" / f"{scheme}.json").read_text()
        assert scheme in html and '"miou"' in metrics

    submitted = dict(re.findall(r"Job (\d+) has been submitted with SLURM jobid (\d+)", out))
    planned = _run(["snakemake", "-n", "-F", "--workflow-profile", PROFILE], root, env=env)
    expected = [r for r in re.findall(r"^rule (\w+):$", planned.stdout, flags=re.M)
                if r != "all"]  # no command: never a SLURM job
    assert len(submitted) == len(expected), out[-6000:]
    jobs = {job["id"]: job for job in cluster.jobs()}
    ctld_log = cluster.ctld_log.read_text()
    rules = []
    for slurm_id in submitted.values():
        job = jobs[slurm_id]
        assert job["state"] == "COMPLETED", job
        assert re.search(rf"_job_complete: JobId={slurm_id} WEXITSTATUS 0", ctld_log), slurm_id
        # The main scheduler logs "sched: Allocate JobId=..."; a job the backfill scheduler
        # starts is logged as "sched/backfill: _start_job: Started JobId=... in <partition>
        # on <nodes>" (which of the two starts a job depends on timing).
        assert (re.search(rf"Allocate JobId={slurm_id} NodeList=localhost .*Partition={PARTITION}",
                          ctld_log)
                or re.search(rf"backfill: \w+: Started JobId={slurm_id} in {PARTITION} "
                             r"on localhost", ctld_log)), slurm_id
        rules.append(job["comment"].split("_wildcards_")[0].removeprefix("rule_"))
    assert sorted(rules) == sorted(expected)
    # The GPU switch: no job asked for a GPU.
    tres = _run(["squeue", "--states=all", "-h", "-o", "%i|%b"], root, env=env).stdout
    assert all(line.split("|")[1] in ("N/A", "") for line in tres.splitlines()), tres
    # Per-job logs: SLURM's output of every job, and each stage's own log.
    slurm_logs = list((root / "logs" / "slurm").rglob("*.log"))
    assert {p.stem for p in slurm_logs} >= set(submitted.values()), slurm_logs
    first = next(iter(params["schemes"]))   # train's logs are per scheme and seed
    assert (root / "logs" / "train" / first / f"seed{params['train']['seeds'][0]}.log").exists()
    # Nothing left to do afterwards.
    dry = _run(["snakemake", "-n", "--workflow-profile", PROFILE, *SNAKEMAKE_FLAGS], root,
               env=env).stdout
    assert "Nothing to be done" in dry, dry[-2000:]
