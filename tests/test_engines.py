"""Both engines: the same commands and files (parity), real end-to-end runs on real COCO
images at low resolution, and which stages a param change reruns."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, copy_repo, small_params
from stages.lib.codedeps import stage_code

BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
LOG_REDIRECT = re.compile(r"\s*>\s*\S+\s+2>&1\s*$")
# Snakemake's own stage times: the report's rule passes every upstream job's benchmark file
# (declared inputs); DVC records none, so its command has no such argument.
BENCHMARKS = re.compile(r" --benchmarks((?: logs/benchmark/\S+)+)")


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n"
                             f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


# ---------------------------------------------------------------- parity (no computation)

def snakemake_jobs(root: Path) -> dict[str, dict]:
    """Every job of a forced dry run: command (log redirect and the Snakemake-only
    --benchmarks removed), inputs (benchmark files apart), outputs, benchmark file."""
    out = run(["snakemake", "-n", "-p", "-F", "--cores", "1"], root).stdout
    jobs, current = {}, {}
    for line in out.splitlines():
        stripped = line.strip()
        if re.match(r"^(localrule|rule) \w+:$", stripped):
            current = {"rule": stripped.split()[1][:-1], "input": [], "output": [],
                       "benchmark": [], "benchmarks_given": []}
        elif stripped.startswith(("input:", "output:", "benchmark:")) and current:
            key, _, values = stripped.partition(":")
            current[key] = [v.strip() for v in values.split(",") if v.strip()]
        elif line.startswith("Shell command:") and current.get("rule") != "all":
            cmd = LOG_REDIRECT.sub("", line.split(":", 1)[1].strip())
            given = BENCHMARKS.search(cmd)
            if given:
                current["benchmarks_given"] = given.group(1).split()
                cmd = BENCHMARKS.sub("", cmd)
            current["input"], current["benchmark_inputs"] = (
                [i for i in current["input"] if not i.startswith("logs/benchmark/")],
                [i for i in current["input"] if i.startswith("logs/benchmark/")])
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
    # download; per scheme masks, evaluate, analyze, and train and infer per seed; compare,
    # report
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    schemes, seeds = params["schemes"], params["train"]["seeds"]
    assert len(smk) == 1 + (3 + 2 * len(seeds)) * len(schemes) + 2
    assert set(smk) == set(dvc)


def test_both_engines_name_a_seeds_folders_as_the_stages_do(both_engines):
    """The rules and dvc.yaml write each seed's model and predictions under the folder name
    evaluate and the report read them from (stages.lib.names.seed_dir)."""
    from stages.lib.names import seed_dir
    smk, _ = both_engines
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    first = seed_dir(params["train"]["seeds"][0])
    outputs = {o for job in smk.values() if job["rule"] in ("train", "infer")
               for o in job["output"]}
    assert outputs == {f"{root}/{s}/{seed_dir(n)}" for root in ("models", "metrics/train",
                                                                "predictions")
                       for s in params["schemes"] for n in params["train"]["seeds"]}
    analysed = {i for job in smk.values() if job["rule"] == "analyze" for i in job["input"]
                if i.startswith(("models/", "predictions/"))}
    assert analysed == {f"{root}/{s}/{first}" for root in ("models", "predictions")
                        for s in params["schemes"]}


def test_the_report_gets_every_upstream_jobs_benchmark_under_snakemake(both_engines):
    """The report's stage times: each upstream job's benchmark file is a declared input of
    the report's rule and is passed to it; no other job reads one."""
    smk, _ = both_engines
    [report] = [job for job in smk.values() if job["rule"] == "report"]
    upstream = sorted(f for job in smk.values() if job["rule"] != "report"
                      for f in job["benchmark"])
    assert len(upstream) == len(smk) - 1
    assert sorted(report["benchmark_inputs"]) == sorted(report["benchmarks_given"]) == upstream
    assert [job["rule"] for job in smk.values() if job["benchmark_inputs"]] == ["report"]


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
        assert [d for d in stage["deps"]
                if not any(_covered(i, [d]) for i in job["input"])] == [], stage["name"]


def test_dvc_code_deps_are_exactly_the_imported_modules(both_engines):
    _, dvc = both_engines
    for stage in dvc.values():
        name = stage["name"].split("@")[0]
        code = sorted(d for d in stage["deps"] if d.startswith("stages/"))
        assert code == stage_code(name), stage["name"]


def test_codedeps_follows_absolute_imports_only(tmp_path):
    """stage_code follows `stages.*` imports written absolutely, transitively; a relative
    import (`from .lib import x`) is not followed: it is a known limit, so that the stages
    may rely on it the next test keeps relative imports out of stages/."""
    (tmp_path / "stages" / "lib").mkdir(parents=True)
    (tmp_path / "stages" / "lib" / "a.py").write_text("from stages.lib import b\n")
    (tmp_path / "stages" / "lib" / "b.py").write_text("X = 1\n")
    (tmp_path / "stages" / "lib" / "c.py").write_text("Y = 2\n")
    (tmp_path / "stages" / "one.py").write_text("import stages.lib.a\nfrom .lib import c\n")
    assert stage_code("one", tmp_path) == ["stages/lib/a.py", "stages/lib/b.py",
                                           "stages/one.py"]          # no stages/lib/c.py


def test_no_relative_imports_in_stages():
    """codedeps would miss them, and DVC and Snakemake would not rerun a stage whose code
    changed: every `stages` import must be absolute."""
    import ast

    files = sorted((ROOT / "stages").rglob("*.py"))
    assert len(files) > 10
    relative = [f"{path.relative_to(ROOT)}:{node.lineno}"
                for path in files for node in ast.walk(ast.parse(path.read_text()))
                if isinstance(node, ast.ImportFrom) and node.level > 0]
    assert relative == []


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

# The report prints its date: one fixed date makes both engines' reports comparable.
ENV["SOURCE_DATE_EPOCH"] = "1700000000"
DEFAULT_PROFILE = ["--workflow-profile", "workflow/profiles/default"]
# What the two engines write that is not a function of params, code and data alone:
# wall-clock timings (infer's timing.json, train.json's wall_s and the latency_ms column that
# infer's and analyze's samples.csv carry), and Snakemake's own time stamps in its output
# folders.
TIMING_COLUMN = "latency_ms"


@pytest.fixture(scope="module")
def tiny_params() -> dict:
    """Two training seeds (issue 16): both engines train, infer and evaluate each."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params = small_params(params, train=8, val=6, size=64, epochs=1)
    params["train"]["seeds"] = [0, 1]
    return params


@pytest.fixture(scope="module")
def smk_run(tmp_path_factory, tiny_params) -> Path:
    """One real Snakemake run (workstation profile), shared by the tests below."""
    root = copy_repo(tmp_path_factory.mktemp("smk") / "repo", tiny_params)
    run(["snakemake", *DEFAULT_PROFILE, "--cores", "2"], root)
    return root


@pytest.fixture(scope="module")
def dvc_run(tmp_path_factory, tiny_params) -> Path:
    """One real `dvc repro`, shared by the tests below."""
    root = copy_repo(tmp_path_factory.mktemp("dvc") / "repo", tiny_params)
    run(["dvc", "repro"], root)
    return root


def _report_shows_both_schemes(root: Path, params: dict) -> str:
    html = (root / "reports" / "index.html").read_text()
    seeds = params["train"]["seeds"]
    for scheme in params["schemes"]:
        metrics = json.loads((root / "metrics" / f"{scheme}.json").read_text())
        assert scheme in html
        assert f"{metrics['miou']:.3f}" in html
        assert metrics["seeds"]["seeds"] == seeds
        for seed in seeds:
            record = json.loads((root / "models" / scheme / f"seed{seed}" / "train.json")
                                .read_text())
            assert record["seed"] == seed
    if len(seeds) > 1:   # the spread over seeds, and the note that training noise was measured
        assert 'id="seed-spread-table"' in html
        assert f"{len(seeds)} training runs per scheme (seeds " in html
    return html


def _planned_jobs(root: Path) -> set[tuple[str, str | None, str | None]]:
    """(rule, scheme, seed) of every job a Snakemake dry run would run."""
    out = run(["snakemake", "-n", *DEFAULT_PROFILE], root).stdout
    jobs, current = set(), None
    for line in out.splitlines():
        stripped = line.strip()
        match = re.match(r"^(?:localrule|rule) (\w+):$", stripped)
        if match:
            if current:
                jobs.add(current)
            current = (match.group(1), None, None)
        elif stripped.startswith("wildcards:") and current:
            values = dict(w.split("=") for w in stripped.split(":", 1)[1].strip().split(", "))
            current = (current[0], values["scheme"], values.get("seed"))
    if current:
        jobs.add(current)
    jobs.discard(("all", None, None))
    return jobs


def _planned(root: Path) -> set[tuple[str, str | None]]:
    """(rule, scheme) of every job a Snakemake dry run would run, seeds merged."""
    return {(rule, scheme) for rule, scheme, _ in _planned_jobs(root)}


def _dvc_changed(root: Path) -> set[str]:
    return set(json.loads(run(["dvc", "status", "--json"], root).stdout))


def _chain(stages: list[str], schemes: list[str]) -> set[tuple[str, str | None]]:
    return {(stage, scheme) for stage in stages for scheme in schemes}


class _Edited:
    """Change files of a test repository for a dry run, and put them back."""

    def __init__(self, root: Path):
        self.root, self.saved = root, {}

    def params(self, change) -> None:
        params = yaml.safe_load((self.root / "params.yaml").read_text())
        change(params)
        self.write("params.yaml", yaml.safe_dump(params, sort_keys=False))

    def write(self, rel: str, text: str) -> None:
        path = self.root / rel
        self.saved.setdefault(rel, path.read_bytes())
        path.write_text(text)

    def append(self, rel: str, text: str) -> None:
        self.write(rel, (self.root / rel).read_text() + text)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for rel, data in self.saved.items():
            (self.root / rel).write_bytes(data)


@pytest.mark.e2e
def test_snakemake_end_to_end_then_nothing_to_do(smk_run, tiny_params):
    _report_shows_both_schemes(smk_run, tiny_params)
    dry = run(["snakemake", "-n", "--cores", "2"], smk_run).stdout
    assert "Nothing to be done" in dry, dry[-2000:]
    # A report-only param change reruns the report and nothing else.
    with _Edited(smk_run) as edit:
        edit.params(lambda p: p["report"].update(title="Retitled"))
        dry = run(["snakemake", "-n", "--cores", "2", "--quiet", "rules"], smk_run).stdout
    planned = re.findall(r"^(\w+)\s+\d+$", dry, flags=re.M)
    assert sorted(set(planned) - {"total", "all"}) == ["report"], dry


def _split(jobs: set[tuple[str, str | None]]) -> tuple[set, set]:
    """Per-scheme jobs, and the names of the jobs over all schemes (report and the like)."""
    return ({j for j in jobs if j[1] is not None},
            {name for name, scheme in jobs if scheme is None})


def _check_plan(planned: set, per_scheme: set) -> None:
    """Exactly these per-scheme jobs; of the jobs over all schemes, the report and maybe
    other aggregates, never download."""
    mine, shared = _split(planned)
    assert mine == per_scheme, planned
    assert "report" in shared and "download" not in shared, planned


@pytest.mark.e2e
def test_snakemake_reruns_what_a_change_affects_and_nothing_else(smk_run, tiny_params):
    schemes = list(tiny_params["schemes"])
    assert _planned(smk_run) == set()
    with _Edited(smk_run) as edit:  # one scheme's definition: that scheme's chain + report
        edit.params(lambda p: p["schemes"][schemes[1]].update(crowd="background"))
        _check_plan(_planned(smk_run),
                    _chain(["masks", "train", "infer", "evaluate", "analyze"], schemes[1:]))
    with _Edited(smk_run) as edit:  # training params: not download, not masks
        edit.params(lambda p: p["train"].update(lr=0.005))  # the default is 0.002
        _check_plan(_planned(smk_run), _chain(["train", "infer", "evaluate", "analyze"], schemes))
    # A stage's code (behind a shell: command, so Snakemake's own code trigger cannot see
    # it; the rules list it as input, stage_code()): that stage and everything after it.
    with _Edited(smk_run) as edit:
        edit.append("stages/infer.py", "\n# edited\n")
        _check_plan(_planned(smk_run), _chain(["infer", "evaluate", "analyze"], schemes))
    with _Edited(smk_run) as edit:  # a library module every stage imports: everything
        edit.append("stages/lib/params.py", "\n# edited\n")
        assert {"download", "masks", "train", "infer", "evaluate", "analyze", "report"} <= {
            rule for rule, _ in _planned(smk_run)}
    # Code put back as it was (newer file, same content): Snakemake compares the checksum
    # it recorded, so nothing reruns.
    assert _planned(smk_run) == set()


@pytest.mark.e2e
@pytest.mark.parametrize("section, key, value, stages", [
    ("infer", "batch_size", 3, ["infer", "evaluate", "analyze"]),
    ("analyze", "similars", {"k": 4}, ["analyze"]),
])
def test_snakemake_reruns_only_the_jobs_reading_a_changed_key(smk_run, tiny_params, section,
                                                              key, value, stages):
    """A key only some stages declare (PARAMS, tests/test_params_declared.py) reruns those
    jobs and what consumes their outputs: infer's batch size not train or masks, the
    neighbour count not infer."""
    schemes = list(tiny_params["schemes"])
    with _Edited(smk_run) as edit:
        edit.params(lambda p: p[section][key].update(value) if isinstance(value, dict)
                    else p[section].update({key: value}))
        assert _planned(smk_run) == _chain(stages, schemes) | {("compare", None),
                                                                ("report", None)}
    assert _planned(smk_run) == set()


def _set_times_upstream_newest(root: Path) -> None:
    """What `dvc checkout`/`dvc pull` may do to file times: every output (files, folders,
    Snakemake's time stamps) rewritten, upstream ones last."""
    order = ["reports", "compare", "analysis", "metrics", "predictions", "models", "data/masks",
             "data/raw"]
    now = time.time()
    for step, rel in enumerate(order):
        if not (root / rel).exists():
            continue
        for path in [root / rel, *(root / rel).rglob("*")]:
            os.utime(path, (now + step, now + step), follow_symlinks=False)


@pytest.mark.e2e
def test_snakemake_plans_nothing_after_dvc_rewrote_its_outputs(smk_run, tiny_params):
    """Snakemake's results committed to DVC, two folders deleted and restored with
    `dvc checkout`, then every output's time scrambled (upstream newest): DVC vouches for
    them all, so Snakemake plans nothing; after a code edit it plans that stage onwards."""
    root = smk_run
    run(["dvc", "commit", "-f"], root)
    assert _dvc_changed(root) == set()
    shutil.rmtree(root / "data" / "raw")
    shutil.rmtree(root / "models")
    run(["dvc", "checkout"], root)
    assert _planned(root) == set()
    _set_times_upstream_newest(root)
    assert _planned(root) == set()
    with _Edited(root) as edit:
        edit.append("stages/evaluate.py", "\n# edited\n")
        _check_plan(_planned(root), _chain(["evaluate"], list(tiny_params["schemes"])))
    assert _planned(root) == set()


@pytest.mark.e2e
def test_dvc_repro_end_to_end_status_metrics_plots_and_rerun_rules(dvc_run, tiny_params):
    root = dvc_run
    _report_shows_both_schemes(root, tiny_params)
    status = run(["dvc", "status"], root).stdout
    assert "up to date" in status, status
    shown = run(["dvc", "metrics", "show", "--json"], root).stdout
    files = next(iter(json.loads(shown).values()))["data"]
    assert {f"metrics/{s}.json" for s in tiny_params["schemes"]} <= set(files)
    plots = run(["dvc", "plots", "show", "--json"], root).stdout
    drawn = json.dumps(json.loads(plots))
    for scheme in tiny_params["schemes"]:
        for seed in tiny_params["train"]["seeds"]:
            assert f"metrics/train/{scheme}/seed{seed}/plots/metrics/val/miou.tsv" in drawn
    with _Edited(root) as edit:
        edit.params(lambda p: p["report"].update(title="Retitled"))
        rerun = run(["dvc", "repro"], root).stdout
        assert re.findall(r"Running stage '([^']+)'", rerun) == ["report"], rerun
        assert "Retitled" in (root / "reports" / "index.html").read_text()
    rerun = run(["dvc", "repro"], root).stdout  # back to the shared run's report
    assert re.findall(r"Running stage '([^']+)'", rerun) in (["report"], []), rerun


@pytest.mark.e2e
def test_dvc_reruns_what_a_change_affects_and_nothing_else(dvc_run, tiny_params):
    """`dvc status` names the stages whose own params or deps changed; DVC then reruns a
    downstream stage only if an upstream output's content changed (content hashes)."""
    root = dvc_run
    first, second = list(tiny_params["schemes"])

    def changed():
        return _split({_stage_and_scheme(s) for s in _dvc_changed(root)})

    assert _dvc_changed(root) == set()
    with _Edited(root) as edit:
        edit.params(lambda p: p["schemes"][second].update(crowd="background"))
        mine, shared = changed()
        assert mine == _chain(["masks", "train", "evaluate"], [second])
        assert "report" in shared and "download" not in shared
    with _Edited(root) as edit:
        edit.params(lambda p: p["train"].update(lr=0.005))  # the default is 0.002
        mine, shared = changed()
        assert mine == _chain(["train"], [first, second])
        assert "report" in shared and "download" not in shared
    with _Edited(root) as edit:
        edit.append("stages/infer.py", "\n# edited\n")
        every = {f"infer@{s}-{n}" for s in (first, second) for n in tiny_params["train"]["seeds"]}
        assert _dvc_changed(root) == every
        dry = run(["dvc", "repro", "--dry"], root).stdout
        assert set(re.findall(r"Running stage '([^']+)'", dry)) == every
    assert _dvc_changed(root) == set()


def _stage_and_scheme(name: str) -> tuple[str, str | None]:
    """DVC's stage name as (stage, scheme): `train@person_car-1` (matrix over scheme and
    seed) and `evaluate@person_car` (foreach over schemes) both give the scheme."""
    stage, _, item = name.partition("@")
    if stage in ("train", "infer"):
        item = item.rsplit("-", 1)[0]
    return stage, item or None


@pytest.mark.e2e
def test_adding_a_seed_trains_only_that_seed_under_both_engines(smk_run, dvc_run, tiny_params):
    """train reads every train key but the seed list: a new seed adds its own train and
    infer jobs, evaluate (which scores every seed) and what reads it rerun, and no model
    already trained, nor analyze (the first seed's model), is touched."""
    schemes = list(tiny_params["schemes"])
    added = [*tiny_params["train"]["seeds"], 7]
    with _Edited(smk_run) as edit:
        edit.params(lambda p: p["train"].update(seeds=added))
        planned = _planned_jobs(smk_run)
    assert {j for j in planned if j[0] in ("train", "infer")} == {
        (rule, s, "7") for rule in ("train", "infer") for s in schemes}
    assert {j[:2] for j in planned if j[0] not in ("train", "infer")} == {
        *_chain(["evaluate"], schemes), ("compare", None), ("report", None)}
    with _Edited(dvc_run) as edit:
        edit.params(lambda p: p["train"].update(seeds=added))
        changed = _dvc_changed(dvc_run)
    assert {c for c in changed if c.startswith(("train@", "infer@"))} == {
        f"{rule}@{s}-7" for rule in ("train", "infer") for s in schemes}
    assert {c for c in changed if not c.startswith(("train@", "infer@"))} == {
        f"evaluate@{s}" for s in schemes} | {"report"}


# ---------------------------------------------------------------- same artifacts

OUTPUT_DIRS = ["data/raw", "data/masks", "models", "metrics", "predictions", "analysis",
               "compare", "reports"]


def _artifacts(root: Path) -> dict[str, str]:
    """sha256 of every output file, Snakemake's .snakemake_timestamp files and DVC's
    .gitignore files left out; timings blanked (see TIMING_COLUMN)."""
    import hashlib

    import pandas as pd

    digests = {}
    for rel in OUTPUT_DIRS:
        for path in sorted((root / rel).rglob("*")):  # (nothing when a folder is absent)
            if not path.is_file() or path.name in (".snakemake_timestamp", ".gitignore"):
                continue
            key = path.relative_to(root).as_posix()
            data = path.read_bytes()
            if path.name == "timing.json":
                timing = json.loads(data)
                data = json.dumps({k: timing[k] for k in ("images", "device", "batch_size")})
                data = data.encode()
            elif path.name == "train.json":
                data = json.dumps({**json.loads(data), "wall_s": None}).encode()
            elif path.name == "samples.csv":
                frame = pd.read_csv(path)
                data = frame.drop(columns=[TIMING_COLUMN], errors="ignore").to_csv(index=False)
                data = data.encode()
            elif path.name == "index.html":
                data = _deterministic_report(data.decode()).encode()
            digests[key] = hashlib.sha256(data).hexdigest()
    return digests


def _deterministic_report(html: str) -> str:
    """The report without what depends on the checkout, the engine and the clock: the git
    commit (each test repository has its own) and the timing section (inference and
    training wall times; stage times from Snakemake's benchmark files, none under DVC)."""
    html = re.sub(r'<section id="timing">.*?</section>', "", html, flags=re.S)
    html = re.sub(r"commit [0-9a-f]{7,40}", "commit <commit>", html)
    return re.sub(r"<code>[0-9a-f]{7,40}</code>", "<code><commit></code>", html)


@pytest.mark.e2e
def test_both_engines_write_identical_artifacts(smk_run, dvc_run):
    smk, dvc = _artifacts(smk_run), _artifacts(dvc_run)
    assert sorted(smk) == sorted(dvc)
    assert len(smk) > 50
    differ = sorted(k for k in smk if smk[k] != dvc[k])
    assert differ == [], differ


# ---------------------------------------------------------------- DVC remote

@pytest.mark.e2e
def test_dvc_push_then_pull_in_a_fresh_clone_restores_every_output(dvc_run, tiny_params):
    """The committed default remote is ../segflow-dvc-remote beside the checkout, so a
    clone beside it pulls from the same folder."""
    root = dvc_run
    git = ["git", "-c", "user.email=test@segflow", "-c", "user.name=segflow-test"]
    run(git + ["add", "-A"], root)
    run(git + ["commit", "-q", "-m", "results"], root)
    pushed = run(["dvc", "push"], root)
    remote = root.parent / "segflow-dvc-remote"
    assert remote.is_dir() and any(remote.rglob("*")), pushed.stdout
    clone = root.parent / "clone"
    run(["git", "clone", "-q", str(root), str(clone)], root.parent)
    assert not (clone / "models").exists()
    run(["dvc", "pull"], clone)
    assert _raw_artifacts(clone) == _raw_artifacts(root)
    status = run(["dvc", "status"], clone).stdout
    assert "up to date" in status, status
    repro = run(["dvc", "repro"], clone).stdout
    assert "Running stage" not in repro, repro
    _report_shows_both_schemes(clone, tiny_params)
    # Pulled outputs with fresh file times: Snakemake has nothing to do either...
    assert _planned(clone) == set()
    # ...nor after `dvc checkout` rewrote upstream outputs after downstream ones.
    shutil.rmtree(clone / "data" / "raw")
    shutil.rmtree(clone / "data" / "masks")
    run(["dvc", "checkout"], clone)
    assert _raw_artifacts(clone) == _raw_artifacts(root)
    assert _planned(clone) == set()
    # DVC vouches only for what matches dvc.lock: after a code edit Snakemake reruns that
    # stage and what follows, as usual; with the code put back, nothing again.
    schemes = list(tiny_params["schemes"])
    with _Edited(clone) as edit:
        edit.append("stages/infer.py", "\n# edited\n")
        _check_plan(_planned(clone), _chain(["infer", "evaluate", "analyze"], schemes))
    assert _planned(clone) == set()


def _raw_artifacts(root: Path) -> dict[str, str]:
    import hashlib

    return {path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
            for rel in OUTPUT_DIRS for path in sorted((root / rel).rglob("*"))
            if path.is_file() and path.name not in (".gitignore", ".snakemake_timestamp")}


# ---------------------------------------------------------------- failures and locks

@pytest.mark.e2e
def test_a_failing_job_is_reported_with_its_log(tmp_path, tiny_params):
    root = copy_repo(tmp_path / "repo", tiny_params)
    for image in (root / "data" / "sample" / "val2017").glob("*.jpg"):
        image.write_bytes(b"not a JPEG " * 100)
    result = run(["snakemake", *DEFAULT_PROFILE, "--cores", "2"], root, check=False)
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Error in rule download" in out, out[-3000:]
    assert "logs/download.log" in out, out[-3000:]
    # show-failed-logs (the profiles): the stage's own error is printed with it.
    log = (root / "logs" / "download.log").read_text()
    assert "ERROR" in log and log.strip().splitlines()[-1] in out


class _HoldServer:
    """An HTTP server on loopback that answers nothing until released (a download that
    takes as long as the test needs), then 404 (the download fails quickly)."""

    def __init__(self):
        import http.server
        import threading

        owner = self
        self.held = threading.Event()
        self.released = threading.Event()

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                owner.held.set()
                owner.released.wait(120)
                self.send_error(404)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def hold(self):
        self.held.clear()
        self.released.clear()

    def release(self):
        self.released.set()

    def close(self):
        self.release()
        self.server.shutdown()
        self.server.server_close()


def _wait_for(check, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _claims(root: Path) -> dict:
    path = root / ".dvc" / "tmp" / "rwlock"
    try:
        lock = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return {p: info for p, info in lock.get("write", {}).items()}


def _start(cmd: list[str], root: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=root, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _finish(proc: subprocess.Popen, seconds: float = 180) -> str:
    try:
        out, _ = proc.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        raise AssertionError(f"{proc.args} did not end:\n{out[-3000:]}") from None
    return out


@pytest.mark.e2e
def test_one_engine_at_a_time_in_both_directions(tmp_path, tiny_params, monkeypatch):
    monkeypatch.setitem(ENV, "NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setitem(ENV, "no_proxy", "127.0.0.1,localhost")
    server = _HoldServer()
    try:
        params = {**tiny_params, "data": {**tiny_params["data"], "base_url": server.url,
                                          "retries": 0, "timeout_s": 120}}
        # Snakemake runs (its download is stuck on the server): DVC refuses to start.
        root = copy_repo(tmp_path / "smk" / "repo", params)
        snakemake = _start(["snakemake", *DEFAULT_PROFILE, "--cores", "1"], root)
        _wait_for(lambda: server.held.is_set() and _claims(root), 60, "Snakemake's download")
        assert {info["pid"] for info in _claims(root).values()} == {snakemake.pid}
        for cmd in (["dvc", "repro"], ["dvc", "status"]):
            refused = run(cmd, root, check=False)
            out = refused.stdout + refused.stderr
            assert refused.returncode != 0, (cmd, out)
            assert "is busy, it is being blocked by" in out and "Snakemake run owns" in out, out
        assert not (root / "dvc.lock").exists()
        assert snakemake.poll() is None
        server.release()
        out = _finish(snakemake)
        assert snakemake.returncode != 0 and "Error in rule download" in out, out[-3000:]
        assert _claims(root) == {}  # onerror released the claim
        run(["dvc", "status"], root)

        # DVC runs (its download is stuck): Snakemake refuses before any job starts.
        server.hold()
        root = copy_repo(tmp_path / "dvc" / "repo", params)
        dvc = _start(["dvc", "repro"], root)
        _wait_for(lambda: server.held.is_set() and _claims(root), 60, "DVC's download")
        refused = run(["snakemake", *DEFAULT_PROFILE, "--cores", "1"], root, check=False)
        out = refused.stdout + refused.stderr
        assert refused.returncode != 0, out
        assert "DVC is running a stage" in out and "data/raw" in out, out[-3000:]
        assert not (root / "logs" / "download.log").exists()  # no job started
        assert dvc.poll() is None
        server.release()
        _finish(dvc)
        # Between two stages DVC holds its repository lock instead: refused as well.
        from dvc.lock import make_lock

        tmp = root / ".dvc" / "tmp"
        lock = make_lock(str(tmp / "lock"), tmp_dir=str(tmp))
        lock.lock()
        try:
            refused = run(["snakemake", *DEFAULT_PROFILE, "--cores", "1"], root, check=False)
        finally:
            lock.unlock()
        out = refused.stdout + refused.stderr
        assert refused.returncode != 0 and "holds .dvc/tmp/lock" in out, out[-3000:]
    finally:
        server.close()


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


def _train_threads(cores: list[str]) -> dict[str, int]:
    """{scheme: threads} of the train jobs of a forced dry run (Snakemake prints threads only
    above 1)."""
    out = run(["snakemake", "-n", "-F", *cores], ROOT).stdout
    threads = {}
    for block in out.split("rule train:")[1:]:
        block = block.split("\n[")[0]
        scheme = re.search(r"scheme=(\w+)", block).group(1)
        found = re.search(r"threads: (\d+)", block)
        threads[scheme] = int(found.group(1)) if found else 1
    return threads


def test_trainings_take_train_cpu_threads_and_run_side_by_side():
    """Each training takes train.cpu_threads of --cores (1 by default: on 2 cores the two
    schemes train side by side, 1.4x sooner than one after the other with 2 threads)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    schemes = list(params["schemes"])
    assert len(schemes) == 2 and params["train"]["cpu_threads"] == 1
    assert _train_threads(["--cores", "2"]) == dict.fromkeys(schemes, 1)
    assert _train_threads(["--cores", "8"]) == dict.fromkeys(schemes, 1)
