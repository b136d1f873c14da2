"""Every stage declares the params it reads (PARAMS), run() sees only those, and both
engines list exactly the same keys, so a change to a key a stage does not read reruns
nothing (issue 14, section 3)."""
from __future__ import annotations

import ast
import copy
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from conftest import ROOT, copy_repo
from stages.lib.codedeps import declared_params
from stages.lib.params import ParamsError, load_params, lookup, select

STAGES = ["download", "masks", "train", "infer", "evaluate", "analyze", "compare", "report"]
# download declares `data` but its run() does not select yet: with
# data.filter.scheme_categories_only on it also reads every scheme's classes, which DVC
# cannot declare without rerunning download on any scheme change (see stages/download.py).
NOT_YET_SELECTING = {"download"}
BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}


@pytest.fixture(scope="module")
def params() -> dict:
    return load_params(ROOT / "params.yaml")


# ---------------------------------------------------------------- select()

def test_select_keeps_only_the_declared_keys_nested_as_in_params_yaml():
    params = {"schemes": {"a": {"classes": 1}, "b": {"classes": 2}},
              "analyze": {"similars": {"k": 5, "metric": "cosine"}, "seed": 0},
              "report": {"title": "t"}}
    assert select(params, ("schemes.{scheme}", "analyze.similars.k", "report"), scheme="b") == {
        "schemes": {"b": {"classes": 2}}, "analyze": {"similars": {"k": 5}},
        "report": {"title": "t"}}


def test_select_makes_an_undeclared_read_a_key_error(params):
    selected = select(params, ("schemes.{scheme}", "masks"), scheme="person_car")
    with pytest.raises(KeyError, match="train"):
        selected["train"]
    with pytest.raises(KeyError, match="person_vehicle"):
        selected["schemes"]["person_vehicle"]


def test_select_twice_is_select_once_and_leaves_params_alone(params):
    before = copy.deepcopy(params)
    once = select(params, ("schemes.{scheme}", "model", "train"), scheme="person_vehicle")
    assert select(once, ("schemes.{scheme}", "model", "train"), scheme="person_vehicle") == once
    assert params == before


def test_select_names_an_unknown_scheme_and_the_known_ones(params):
    with pytest.raises(ParamsError) as exc:
        select(params, ("schemes.{scheme}",), scheme="nope")
    assert str(exc.value) == ("scheme 'nope' is not in params.yaml schemes "
                              "(known: person_car, person_vehicle)")


def test_select_refuses_a_scheme_key_without_a_scheme(params):
    with pytest.raises(ValueError, match=r"'schemes.\{scheme\}' is declared but no scheme"):
        select(params, ("schemes.{scheme}",))


# ---------------------------------------------------------------- the stages

@pytest.mark.parametrize("stage", STAGES)
def test_the_module_declaration_is_what_the_snakefile_reads(stage):
    # The rules read PARAMS from the source (no torch import in the Snakefile).
    assert importlib.import_module(f"stages.{stage}").PARAMS == declared_params(stage)


@pytest.mark.parametrize("stage", sorted(set(STAGES) - NOT_YET_SELECTING))
def test_run_selects_its_declared_params_before_anything_else(stage):
    """run()'s first statement narrows params to PARAMS, so its body (and everything it
    passes params to) can read nothing else: the stage tests, which run every stage on the
    sample with the full params, would fail with a KeyError on an undeclared read."""
    path = ROOT / "stages" / stage / "__init__.py"   # a stage package (report)
    if not path.is_file():
        path = ROOT / "stages" / f"{stage}.py"
    [run] = [n for n in ast.parse(path.read_text()).body
             if isinstance(n, ast.FunctionDef) and n.name == "run"]
    first = ast.unparse(run.body[0])
    scheme_arg = run.args.args[1].arg if "{scheme}" in str(declared_params(stage)) else None
    expected = ("params = select(params, PARAMS"
                + (f", scheme={scheme_arg})" if scheme_arg else ")"))
    assert first == expected


def _dvc_params() -> dict[str, tuple[str, ...]]:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    # foreach over schemes names the scheme ${key}, the matrix over scheme and seed
    # ${item.scheme}
    return {name: tuple(p.replace("${key}", "{scheme}").replace("${item.scheme}", "{scheme}")
                        for p in stage.get("do", stage).get("params", []))
            for name, stage in stages.items()}


def _rule_params() -> dict[str, list[tuple[str | None, dict]]]:
    """Each rule's params, per scheme (None for rules over all schemes), as Snakemake
    holds them after reading the workflow."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import OutputSettings, ResourceSettings

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        with SnakemakeApi(OutputSettings(quiet=True)) as api:
            workflow = api.workflow(snakefile=ROOT / "Snakefile",
                                    resource_settings=ResourceSettings(cores=1))._workflow
            schemes = list(workflow.config["schemes"])
            rules = {}
            for rule in workflow.rules:
                per_scheme = "scheme" in rule.wildcard_names
                rules[rule.name] = [
                    (scheme, {name: value(SimpleNamespace(scheme=scheme)) if callable(value)
                              else value for name, value in zip(rule.params.keys(), rule.params)})
                    for scheme in (schemes if per_scheme else [None])]
    finally:
        os.chdir(cwd)
    return rules


def test_declarations_dvc_yaml_and_the_rules_list_the_same_params(params):
    dvc, rules = _dvc_params(), _rule_params()
    assert set(dvc) == set(STAGES) and set(rules) == {*STAGES, "all"}
    for stage in STAGES:
        declared = importlib.import_module(f"stages.{stage}").PARAMS
        assert dvc[stage] == declared, stage
        for scheme, values in rules[stage]:
            keys = [key.replace("{scheme}", scheme or "?") for key in declared]
            assert list(values.values()) == [lookup(params, key) for key in keys], (stage, scheme)


def test_the_report_is_the_only_stage_reading_other_stages_sections():
    # Each stage reads its own section (if it has one) and the schemes; the report prints
    # every value in its provenance section, so it declares every section. evaluate reads
    # compare.bootstrap too: its intervals and compare's come from the same draws (issue 16
    # names the key compare.bootstrap); and train.seeds: the models whose predictions it
    # scores.
    own = {"download": {"data"}, "masks": {"masks"}, "train": {"model", "train"},
           "infer": {"infer"}, "evaluate": {"evaluate", "compare", "train"},
           "analyze": {"analyze"},
           "compare": {"compare"}}
    for stage, sections in own.items():
        declared = {key.split(".")[0] for key in declared_params(stage)}
        assert declared - {"schemes"} == sections, stage
    top = list(yaml.safe_load((ROOT / "params.yaml").read_text()))
    assert list(declared_params("report")) == top


# ---------------------------------------------------------------- what a change reruns

def _run(cmd: list[str], cwd: Path) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def committed_repo(tmp_path_factory) -> Path:
    """A copy of the project whose dvc.lock records every stage as done, with placeholder
    outputs (`dvc commit --force`): `dvc status` then compares params alone, in seconds."""
    root = copy_repo(tmp_path_factory.mktemp("declared"))
    code = ("import json; from dvc.repo import Repo\n"
            "print(json.dumps([o.def_path for s in Repo('.').index.stages for o in s.outs]))")
    for out in json.loads(_run([sys.executable, "-c", code], root)):
        path = root / out
        if path.suffix:   # a file output (metrics/x.json, reports/index.html)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("{}\n")
        else:             # a folder output
            path.mkdir(parents=True, exist_ok=True)
            (path / "placeholder").write_text("x\n")
    _run(["dvc", "commit", "--force", "--quiet"], root)
    assert json.loads(_run(["dvc", "status", "--json"], root)) == {}
    return root


@pytest.mark.parametrize("key, value, stages", [
    ("report.title", "Retitled", {"report"}),
    ("infer.batch_size", 3, {"infer@person_car-0", "infer@person_vehicle-0", "report"}),
    ("analyze.similars.k", 4, {"analyze@person_car", "analyze@person_vehicle", "report"}),
    ("schemes.person_vehicle.crowd", "background",
     {"masks@person_vehicle", "train@person_vehicle-0", "evaluate@person_vehicle", "compare",
      "report"}),
    ("model.dropout", 0.25, {"train@person_car-0", "train@person_vehicle-0", "report"}),
    # the seed list: a new seed's train and infer jobs, evaluate (it scores every seed), the
    # report; no seed already trained, nor analyze (the first seed's model)
    ("train.seeds", [0, 4], {"train@person_car-4", "train@person_vehicle-4",
                             "infer@person_car-4", "infer@person_vehicle-4",
                             "evaluate@person_car", "evaluate@person_vehicle", "report"}),
])
def test_dvc_reruns_only_the_stages_that_declare_a_changed_key(committed_repo, key, value,
                                                               stages):
    params_file = committed_repo / "params.yaml"
    saved = params_file.read_bytes()
    params = yaml.safe_load(saved)
    *parents, last = key.split(".")
    assert last in lookup(params, ".".join(parents)) and lookup(params, key) != value
    lookup(params, ".".join(parents))[last] = value
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        assert set(json.loads(_run(["dvc", "status", "--json"], committed_repo))) == stages
    finally:
        params_file.write_bytes(saved)
