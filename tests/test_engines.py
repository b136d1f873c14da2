"""Both engines: the same commands and files (parity), real end-to-end runs on real COCO
images at low resolution, and which stages a param change reruns."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, copy_repo, small_params
from stages.lib.codedeps import stage_code

BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
LOG_REDIRECT = re.compile(r"\s*>\s*\S+\s+2>&1\s*$")


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n"
                             f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


# ---------------------------------------------------------------- parity (no computation)

def snakemake_jobs(root: Path) -> dict[str, dict]:
    """Every job of a forced dry run: command (log redirect removed), inputs, outputs."""
    out = run(["snakemake", "-n", "-p", "-F", "--cores", "1"], root).stdout
    jobs, current = {}, {}
    for line in out.splitlines():
        stripped = line.strip()
        if re.match(r"^(localrule|rule) \w+:$", stripped):
            current = {"rule": stripped.split()[1][:-1], "input": [], "output": []}
        elif stripped.startswith(("input:", "output:")) and current:
            key, _, values = stripped.partition(":")
            current[key] = [v.strip() for v in values.split(",") if v.strip()]
        elif line.startswith("Shell command:") and current.get("rule") != "all":
            cmd = LOG_REDIRECT.sub("", line.split(":", 1)[1].strip())
            jobs[cmd] = current
    return jobs


def dvc_stages(root: Path) -> dict[str, dict]:
    # params.yaml shows up as a dep of every stage: it is DVC's params dependency, which
    # Snakemake expresses with `params:` instead.
    code = ("import json; from dvc.repo import Repo\n"
            "r = Repo('.')\n"
            "print(json.dumps({s.cmd: {'name': s.addressing, 'deps': [d.def_path for d in s.deps"
            " if d.def_path != 'params.yaml'], 'outs': [o.def_path for o in s.outs]}"
            " for s in r.index.stages}))")
    return json.loads(run([sys.executable, "-c", code], root).stdout)


@pytest.fixture(scope="module")
def both_engines():
    return snakemake_jobs(ROOT), dvc_stages(ROOT)


def test_both_engines_run_the_same_commands(both_engines):
    smk, dvc = both_engines
    # download, 5 stages per scheme, compare, report
    assert len(smk) == 1 + 5 * len(yaml.safe_load((ROOT / "params.yaml").read_text())["schemes"]) + 2
    assert set(smk) == set(dvc)


def _covered(path: str, folders: list[str]) -> bool:
    return any(path == f or path.startswith(f.rstrip("/") + "/") for f in folders)


def test_both_engines_read_and_write_the_same_files(both_engines):
    smk, dvc = both_engines
    for cmd, job in smk.items():
        stage = dvc[cmd]
        assert sorted(job["output"]) == sorted(stage["outs"]), stage["name"]
        # A DVC folder dependency may stand for several Snakemake inputs (the report's
        # per-scheme folders): each input lies in a dep and each dep holds an input.
        assert [i for i in job["input"] if not _covered(i, stage["deps"])] == [], stage["name"]
        assert [d for d in stage["deps"] if not any(_covered(i, [d]) for i in job["input"])] == [], \
            stage["name"]


def test_dvc_code_deps_are_exactly_the_imported_modules(both_engines):
    _, dvc = both_engines
    for stage in dvc.values():
        name = stage["name"].split("@")[0]
        code = sorted(d for d in stage["deps"] if d.startswith("stages/"))
        assert code == stage_code(name), stage["name"]


def test_snakemake_lint_is_clean():
    result = run(["snakemake", "--lint"], ROOT, check=False)
    assert result.returncode == 0 and "Congratulations" in result.stdout + result.stderr, (
        result.stdout[-3000:] + result.stderr[-3000:])


def test_snakemake_refuses_config_overrides_the_stages_would_not_see():
    result = run(["snakemake", "-n", "--cores", "1", "--config", "report={'title': 'x'}"],
                 ROOT, check=False)
    assert result.returncode != 0
    assert "edit params.yaml instead" in result.stdout + result.stderr


# ---------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def tiny_params() -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    return small_params(params, train=8, val=6, size=64, epochs=1)


def _report_shows_both_schemes(root: Path, params: dict) -> str:
    html = (root / "reports" / "index.html").read_text()
    for scheme in params["schemes"]:
        metrics = json.loads((root / "metrics" / f"{scheme}.json").read_text())
        assert scheme in html
        assert f"{metrics['miou']:.3f}" in html
    return html


@pytest.mark.e2e
def test_snakemake_end_to_end_then_nothing_to_do(tmp_path, tiny_params):
    root = copy_repo(tmp_path / "repo", tiny_params)
    run(["snakemake", "--cores", "2"], root)
    _report_shows_both_schemes(root, tiny_params)
    dry = run(["snakemake", "-n", "--cores", "2"], root).stdout
    assert "Nothing to be done" in dry, dry[-2000:]
    # A report-only param change reruns the report and nothing else.
    changed = {**tiny_params, "report": {**tiny_params["report"], "title": "Retitled"}}
    (root / "params.yaml").write_text(yaml.safe_dump(changed, sort_keys=False))
    dry = run(["snakemake", "-n", "--cores", "2", "--quiet", "rules"], root).stdout
    planned = re.findall(r"^(\w+)\s+\d+$", dry, flags=re.M)
    assert sorted(set(planned) - {"total", "all"}) == ["report"], dry


@pytest.mark.e2e
def test_dvc_repro_end_to_end_status_metrics_plots_and_rerun_rules(tmp_path, tiny_params):
    root = copy_repo(tmp_path / "repo", tiny_params)
    run(["dvc", "repro"], root)
    _report_shows_both_schemes(root, tiny_params)
    status = run(["dvc", "status"], root).stdout
    assert "up to date" in status, status
    shown = run(["dvc", "metrics", "show", "--json"], root).stdout
    files = next(iter(json.loads(shown).values()))["data"]
    assert {f"metrics/{s}.json" for s in tiny_params["schemes"]} <= set(files)
    plots = run(["dvc", "plots", "show", "--json"], root).stdout
    drawn = json.dumps(json.loads(plots))
    for scheme in tiny_params["schemes"]:
        assert f"metrics/train/{scheme}/plots/metrics/val/miou.tsv" in drawn
    changed = {**tiny_params, "report": {**tiny_params["report"], "title": "Retitled"}}
    (root / "params.yaml").write_text(yaml.safe_dump(changed, sort_keys=False))
    rerun = run(["dvc", "repro"], root).stdout
    assert re.findall(r"Running stage '([^']+)'", rerun) == ["report"], rerun
    assert "Retitled" in (root / "reports" / "index.html").read_text()


def _revisions(node):
    """Every revision record in `dvc exp show --json` output, however deeply nested."""
    if isinstance(node, dict):
        if isinstance(node.get("data"), dict) and "params" in node["data"]:
            yield node
        for value in node.values():
            yield from _revisions(value)
    elif isinstance(node, list):
        for value in node:
            yield from _revisions(value)


@pytest.mark.e2e
def test_dvc_experiment_with_a_changed_param_is_listed_with_its_metrics(tmp_path, tiny_params):
    root = copy_repo(tmp_path / "repo", tiny_params)
    run(["dvc", "exp", "run", "-S", "train.epochs=2"], root)
    shown = json.loads(run(["dvc", "exp", "show", "--json"], root).stdout)
    epochs = {r["rev"]: r["data"]["params"]["params.yaml"]["data"]["train"]["epochs"]
              for r in _revisions(shown)}
    baseline = run(["git", "rev-parse", "HEAD"], root).stdout.strip()
    assert epochs.pop(baseline) == 1  # the commit keeps its params
    [experiment] = [rev for rev, value in epochs.items() if rev != "workspace" and value == 2]
    data = next(r for r in _revisions(shown) if r["rev"] == experiment)["data"]
    for scheme in tiny_params["schemes"]:
        assert "miou" in data["metrics"][f"metrics/{scheme}.json"]["data"]


@pytest.mark.e2e
@pytest.mark.parametrize("year, mode, engine", [(2014, "subset", "snakemake"),
                                                (2017, "archives", "dvc")])
def test_pipeline_from_a_flaky_coco_mirror(tmp_path, tiny_params, monkeypatch, year, mode, engine):
    """A mirror of the COCO server (2014 or 2017 naming) over loopback HTTP that breaks
    connections, through the whole pipeline to the report."""
    from coco_mirror import build_mirror
    from fault_server import FaultServer

    monkeypatch.setitem(ENV, "NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setitem(ENV, "no_proxy", "127.0.0.1,localhost")
    build_mirror(tmp_path / "mirror", year)
    with FaultServer(tmp_path / "mirror") as server:
        server.inject(f"/annotations/annotations_trainval{year}.zip", "reset", "ignore_range")
        server.inject(f"/zips/val{year}.zip", "truncate", "503")
        for split in ("train", "val"):
            for path in sorted((tmp_path / "mirror" / f"{split}{year}").iterdir())[:40:4]:
                server.inject(f"/{split}{year}/{path.name}", "reset")
        params = {**tiny_params, "data": {**tiny_params["data"], "base_url": server.base,
                                          "year": year, "mode": mode, "backoff_s": 0.01}}
        root = copy_repo(tmp_path / "repo", params)
        run(["snakemake", "--cores", "2"] if engine == "snakemake" else ["dvc", "repro"], root)
        assert server.served_faults()
    html = _report_shows_both_schemes(root, params)
    assert server.base in html
    names = sorted(p.name for p in (root / "data" / "raw" / "images" / "val").iterdir())
    assert len(names) == 6 and all(n.startswith(f"COCO_val{year}_" if year == 2014 else "0000")
                                   for n in names)
    masks = sorted(p.name for p in (root / "data" / "masks" / "person_car" / "val").iterdir())
    assert masks == [n.replace(".jpg", ".png") for n in names]
    assert not (root / "checkpoints" / "download").exists()
