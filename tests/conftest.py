"""Shared fixtures: the repo root, the embedded real COCO sample, small params."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"


@pytest.fixture(scope="session")
def default_params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


@pytest.fixture
def params(default_params) -> dict:
    """A mutable copy of params.yaml, pointed at the embedded sample by absolute path."""
    p = copy.deepcopy(default_params)
    p["data"]["base_url"] = str(SAMPLE)
    return p


def small_params(base: dict, *, train: int = 8, val: int = 6, size: int = 64,
                 epochs: int = 1) -> dict:
    """Low-resolution, few-image params for stage and end-to-end tests."""
    p = copy.deepcopy(base)
    p["data"]["max_images"] = {"train": train, "val": val}
    p["train"].update(image_size=size, epochs=epochs, batch_size=4)
    p["analyze"]["clustering"].update(method="kmeans", k_min=2, k_max=2)
    p["report"]["n_examples"] = 2
    return p


def study_recipe(params: dict) -> dict:
    """params with the study's training recipe (README, "Reproducing the study on one GPU"):
    plain cross-entropy, every image once per epoch, a constant learning rate, no crop or
    colour jitter. For fixtures that need a model to memorise its images exactly."""
    params["train"].update(loss="ce", sampler="uniform", schedule="constant")
    params["train"]["augment"].update(crop_scale=[1.0, 1.0], colour_jitter={
        "brightness": 0, "contrast": 0, "saturation": 0, "hue": 0})
    return params


def copy_repo(dest: Path, params: dict | None = None) -> Path:
    """A fresh git repository at dest holding this checkout's files (tracked and new, not
    ignored), optionally with other params.yaml, committed once (DVC and DVCLive want a
    commit). What a user gets from `git clone`, without any generated output."""
    import shutil
    import subprocess

    def ls_files(*flags: str) -> list[str]:
        out = subprocess.run(["git", "ls-files", "-z", *flags], cwd=ROOT, check=True,
                             capture_output=True).stdout.decode()
        return list(filter(None, out.split("\0")))

    # New files too (code not yet committed), but not a run's metrics: metrics/ is not
    # ignored (DVC's metrics files are meant for git), and a checkout that ran the pipeline
    # holds them untracked.
    listed = ls_files("--cached") + [rel for rel in ls_files("--others", "--exclude-standard")
                                     if not rel.startswith("metrics/")]
    for rel in listed:
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    if params is not None:
        (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git = ["git", "-c", "user.email=test@segflow", "-c", "user.name=segflow-test"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(git + ["add", "-A"], cwd=dest, check=True)
    subprocess.run(git + ["commit", "-q", "-m", "copy"], cwd=dest, check=True)
    return dest


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for in-process torch work in modules that opt in: on a small
    machine shared with other jobs, two competing threads made tiny trainings 10x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def val_truth(tmp_path_factory, default_params) -> dict:
    """All 80 val images of the sample (a few train ones: download needs some) and their
    ground truth under both schemes."""
    root = tmp_path_factory.mktemp("evaluate")
    params = copy.deepcopy(default_params)
    params["data"].update(base_url=str(SAMPLE), max_images={"train": 2, "val": None})
    raw = root / "raw"
    from stages import download, masks

    download.run(params, raw)
    for scheme in ("person_car", "person_vehicle"):
        masks.run(params, scheme, raw, root / "masks" / scheme)
    return {"root": root, "params": params, "raw": raw,
            "annotations": raw / "annotations" / "instances_val.json"}


def write_predictions(val_truth: dict, source_scheme: str, folder: Path) -> Path:
    """Predictions that are another scheme's ground truth (ignore as background): with
    person_vehicle's, every truck, bus, motorcycle... is 'predicted' class 2."""
    import numpy as np

    from stages.lib.labels import IGNORE_INDEX, read_labels, save_labels

    folder.mkdir(parents=True, exist_ok=True)
    for gt in (val_truth["root"] / "masks" / source_scheme / "val").glob("*.png"):
        labels = read_labels(gt)
        save_labels(folder / gt.name, np.where(labels == IGNORE_INDEX, 0, labels).astype(np.uint8))
    return folder


@pytest.fixture(scope="session")
def sample_metadata(tmp_path_factory, default_params):
    """masks' metadata.csv (person_car) of all 160 sample images, both splits, as a table:
    real per-image fields (grayscale score, person fraction...) for the analysis cores."""
    import pandas as pd

    from stages import download, masks

    root = tmp_path_factory.mktemp("sample_metadata")
    params = copy.deepcopy(default_params)
    params["data"].update(base_url=str(SAMPLE), max_images={"train": None, "val": None})
    download.run(params, root / "raw")
    masks.run(params, "person_car", root / "raw", root / "masks")
    return pd.read_csv(root / "masks" / "metadata.csv")
