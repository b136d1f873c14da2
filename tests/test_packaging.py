"""The built wheel, not only the editable install, carries and runs the stages.

How: the wheel is built offline from a copy of the package's sources (`pip wheel --no-deps
--no-build-isolation`, this venv's setuptools), so the checkout gets no build/ or egg-info.
A fresh venv (`python -m venv --without-pip`, from the interpreter this venv was made from)
gets one .pth file naming this venv's site-packages: a path line in a .pth file puts that
folder on sys.path without running the .pth files inside it, so the heavy dependencies
(torch, pandas, ...) are importable but the editable install's finder
(__editable__.segflow-*.pth) never runs and `stages` can come only from the wheel. The
wheel is installed into the fresh venv by this venv's pip (`--python`), and the stages run
from a working folder with no stages/ in it. No GPU, no network (the repo's data/sample is
the mirror).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

# Files a stage reads at run time besides its modules (grep stages/ for Path(__file__),
# importlib.resources and templates): all must be in the wheel, with the repo's bytes.
DATA_FILES = {
    "stages/schemas/params.schema.yaml": "workflow/schemas/params.schema.yaml",
    "stages/schemas/insights.schema.json": "docs/insights.schema.json",
    "stages/templates/report.html.j2": "stages/templates/report.html.j2",
    "stages/templates/report.js": "stages/templates/report.js",
    "stages/templates/report.css": "stages/templates/report.css",
    **{p.relative_to(ROOT).as_posix(): p.relative_to(ROOT).as_posix()
       for p in sorted((ROOT / "stages" / "templates" / "report").glob("*.html.j2"))},
}


def _run(cmd: list, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    """What a build needs, copied: the checkout gets no build/ or egg-info."""
    src = tmp_path_factory.mktemp("src")
    shutil.copy2(ROOT / "pyproject.toml", src)
    shutil.copy2(ROOT / "README.md", src)  # pyproject's readme
    # symlinks=True: the schema link stays a link, as in a checkout, so the build must
    # follow it; its target comes along at the same relative place.
    shutil.copytree(ROOT / "stages", src / "stages", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "workflow" / "schemas", src / "workflow" / "schemas")
    (src / "docs").mkdir()
    shutil.copy2(ROOT / "docs" / "insights.schema.json", src / "docs")
    return src


@pytest.fixture(scope="module")
def wheel(sources, tmp_path_factory) -> Path:
    src = sources
    out = tmp_path_factory.mktemp("wheel")
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                  "--no-index", "--quiet", "-w", out, src], cwd=src)
    assert built.returncode == 0, built.stderr
    (found,) = out.glob("segflow-*.whl")
    return found


@pytest.fixture(scope="module")
def fresh_python(wheel, tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("venv") / "fresh"
    base = getattr(sys, "_base_executable", sys.executable)
    made = _run([base, "-m", "venv", "--without-pip", venv], cwd=venv.parent)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                     cwd=venv).stdout.strip())
    ours = dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])
    (site / "segflow-test-deps.pth").write_text("".join(f"{p}\n" for p in ours))
    # the dependencies are there, the editable install is not
    before = _run([python, "-c", "import torch, yaml, jinja2; import stages"], cwd=venv.parent)
    assert before.returncode == 1
    assert before.stderr.strip().splitlines()[-1] == (
        "ModuleNotFoundError: No module named 'stages'")
    installed = _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps",
                      "--no-index", "--quiet", wheel], cwd=venv.parent)
    assert installed.returncode == 0, installed.stderr
    return python


def test_wheel_holds_every_data_file_with_the_repo_bytes(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        for member, source in DATA_FILES.items():
            assert member in names, f"{member} missing from {wheel.name}"
            # the bytes, not a link: a symlink in a zip would unpack as a path string
            assert archive.read(member) == (ROOT / source).read_bytes(), member


def test_sdist_holds_every_data_file_with_the_repo_bytes(sources, tmp_path):
    """pip builds a wheel from the sdist when it gets one: the link must become bytes there
    too, or the wheel built from it would lack the schema."""
    built = _run([sys.executable, "-c", "import sys; from setuptools import build_meta; "
                  "print(build_meta.build_sdist(sys.argv[1]))", tmp_path], cwd=sources)
    assert built.returncode == 0, built.stderr
    (found,) = tmp_path.glob("segflow-*.tar.gz")
    with tarfile.open(found) as archive:
        for member, source in DATA_FILES.items():
            info = archive.getmember(f"segflow-0.1.0/{member}")
            assert info.isfile(), member
            assert archive.extractfile(info).read() == (ROOT / source).read_bytes(), member


def test_installed_package_loads_its_schema_and_templates(fresh_python, tmp_path):
    probe = """
import json, stages
from stages.lib import params
from stages import report
schema = params.load_schema()
report.environment().get_template("report.html.j2")
code, digest = report.app_script()
from stages.report import inputs
print(json.dumps({"stages": stages.__file__, "schema": str(params.SCHEMA),
                  "required": sorted(schema["required"]), "js": len(code),
                  "insights": inputs.insights_problem([{"type": "big"}])}))
"""
    done = _run([fresh_python, "-c", probe], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    venv = fresh_python.parent.parent
    assert Path(found["stages"]).is_relative_to(venv), found["stages"]
    assert Path(found["schema"]).is_relative_to(venv), found["schema"]
    assert found["required"] == sorted(yaml.safe_load(
        (ROOT / "workflow/schemas/params.schema.yaml").read_text())["required"])
    assert found["js"] == len((ROOT / "stages/templates/report.js").read_text(encoding="utf-8"))
    # the insights contract, read from the wheel, holds the report's inputs to it
    assert found["insights"] == "[0]: missing key title"


def test_stages_run_from_the_installed_wheel(fresh_python, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["base_url"] = str(ROOT / "data" / "sample")
    params["data"]["max_images"] = {"train": 2, "val": 2}
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    scheme = next(iter(params["schemes"]))

    download = _run([fresh_python, "-m", "stages.download", "--params", "params.yaml",
                     "--out", "data/raw"], cwd=work)
    assert download.returncode == 0, download.stderr
    raw = work / "data" / "raw"
    images = sorted(raw.glob("images/*/*.jpg"))
    assert [p.parent.name for p in images] == ["train", "train", "val", "val"]
    for image in images:  # the sample's own bytes, fetched through the installed package
        source = ROOT / "data" / "sample" / f"{image.parent.name}2017" / image.name
        assert image.read_bytes() == source.read_bytes(), image
    assert (raw / "manifest.json").is_file()

    masks = _run([fresh_python, "-m", "stages.masks", "--params", "params.yaml",
                  "--scheme", scheme, "--raw", "data/raw", "--out", f"data/masks/{scheme}"],
                 cwd=work)
    assert masks.returncode == 0, masks.stderr
    masks_dir = work / "data" / "masks" / scheme
    assert (sorted(p.relative_to(masks_dir).with_suffix("") for p in masks_dir.glob("*/*.png"))
            == sorted(p.relative_to(raw / "images").with_suffix("") for p in images))
    assert (masks_dir / "metadata.csv").is_file()

    helped = _run([fresh_python, "-m", "stages.report", "--help"], cwd=work)
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: ")

    # a bad value is still the one-line refusal, with the schema read from the wheel
    params["data"]["max_images"]["train"] = -1
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    refused = _run([fresh_python, "-m", "stages.masks", "--params", "params.yaml",
                    "--scheme", scheme, "--raw", "data/raw", "--out", "data/masks/x"], cwd=work)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1].endswith(
        "masks ERROR params.yaml: data.max_images.train: -1 is not valid under any of the given "
        "schemas")
    assert not (work / "data" / "masks" / "x").exists()


def test_readme_names_as_many_browser_tests_as_pytest_collects():
    """The README says how many tests are skipped without Chromium ("the N of them"); pytest's
    own collection of the browser mark is the count (it once said 13 when there were 16)."""
    import re

    said = re.search(r"the (\d+) of them \(`pytest --collect-only -m browser`\) are skipped",
                     " ".join((ROOT / "README.md").read_text().split()))
    assert said, "README.md no longer says how many browser tests are skipped"
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m",
                           "browser", "-p", "no:cacheprovider", "tests"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    collected = re.search(r"^(\d+)/\d+ tests collected", done.stdout, re.M)
    assert collected, done.stdout[-2000:] + done.stderr[-2000:]
    assert int(said[1]) == int(collected[1])
