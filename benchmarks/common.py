"""What several benchmarks share: the embedded sample downloaded and masked into a
temporary folder, and a steady-state timer."""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Callable

import yaml

ROOT = Path(__file__).resolve().parents[1]
SCHEME = "person_car"


def default_params() -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["base_url"] = str(ROOT / "data" / "sample")
    return params


def images_per_split(scale: float) -> int | None:
    """The whole sample (80 per split) from scale 1 up; fewer images for smoke runs."""
    return None if scale >= 1 else max(4, round(80 * scale))


def prepare_sample(dest: Path, params: dict | None = None,
                   per_split: int | None = None) -> tuple[Path, Path, dict]:
    """download + masks (one scheme) of the sample under dest: (raw, masks, params)."""
    from stages import download, masks

    params = copy.deepcopy(params or default_params())
    params["data"]["max_images"] = {"train": per_split, "val": per_split}
    raw, mask_dir = dest / "raw", dest / "masks" / SCHEME
    download.run(params, raw, dest / "ck")
    masks.run(params, SCHEME, raw, mask_dir)
    return raw, mask_dir, params


def steady_rate(step: Callable[[], int], warmup: int, repeats: int) -> float:
    """Items per second of `step` (which returns how many items it handled) after warm-up."""
    for _ in range(warmup):
        step()
    started, items = time.perf_counter(), 0
    for _ in range(repeats):
        items += step()
    return items / (time.perf_counter() - started)
