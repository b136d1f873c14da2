"""projection: how long each stage would take on full COCO 2014 (82,783 train + 40,504 val
images), on this machine and on one modern GPU with a multi-core host, computed only from
the benchmarks' JSON results in benchmarks/out/ (no measurement of its own).

`python -m benchmarks projection` rewrites the `projection` section of BENCHMARKS.md;
`python -m benchmarks` (all benchmarks) and any list of names ending in `projection` do it
after the runs. A stage whose input JSON is missing says which benchmark to run instead of
a figure. Schemes and epochs come from params.yaml as it is now.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
NAME = "projection"
COCO2014 = {"train": 82_783, "val": 40_504}
GPU_SUSTAINED_TFLOPS = 30.0   # one modern GPU on MobileNetV2 (memory-bound: ~10% of peak)
HOST_CORES = 16               # CPU cores of the GPU machine's host
TRAIN_FLOPS_PER_FORWARD = 3   # a train step: forward + backward (about twice the forward)
STAGES = ("download", "masks", "train", "infer", "evaluate", "analyze", "compare", "report")
COLUMNS = ("stage", "images x runs", "this machine", "GPU machine", "how", "from")
EMBEDDING = "infer stage, train-split embedding (latents_train.npz)"   # bench_embed's row


class Missing(Exception):
    """An input the projection needs is absent: the message names the benchmark to run."""

    def __init__(self, name: str, why: str = ""):
        super().__init__(name)
        self.name, self.why = name, why


def load_results(out: Path) -> dict[str, dict]:
    results = {}
    for path in sorted(out.glob("*.json")):
        try:
            results[path.stem] = json.loads(path.read_text())
        except ValueError:
            continue
    return results


# ---------------------------------------------------------------- reading the results

def _need(results: dict, name: str) -> dict:
    if name not in results:
        raise Missing(name)
    return results[name]


def _row(results: dict, name: str, **match) -> dict:
    for row in _need(results, name)["table"]:
        if all(str(row.get(k)) == str(v) for k, v in match.items()):
            return row
    raise Missing(name, f"no row {match}")


def _rows(results: dict, name: str, **match) -> list[dict]:
    rows = [row for row in _need(results, name)["table"]
            if all(str(row.get(k)) == str(v) for k, v in match.items())]
    if not rows:
        raise Missing(name, f"no row {match}")
    return rows


def _rate(row: dict, column: str, name: str) -> float:
    value = row.get(column)
    if not isinstance(value, (int, float)) or value <= 0:
        raise Missing(name, f"no {column} figure")
    return float(value)


def _field(results: dict, name: str, key: str):
    value = _need(results, name).get(key)
    if value is None:
        raise Missing(name, f"no {key!r} in its result (from before the field existed)")
    return value


def _cores(results: dict, name: str) -> int:
    return int(_need(results, name)["machine"]["cores_usable"])


def forward_flops(results: dict) -> float:
    """Forward FLOPs per image at the training size, as bench_train counted them."""
    return float(_field(results, "train", "forward_gflop_per_image")) * 1e9


def pipeline_run(results: dict) -> tuple[dict[str, int], dict[str, float]]:
    """Images per split of the pipeline run and its seconds per stage (all schemes)."""
    used = {split: int(n) for split, n in _field(results, "pipeline", "images").items()}
    seconds = {}
    for row in _need(results, "pipeline")["table"]:
        stage = re.fullmatch(r"stage (\w+) \(all schemes\)", str(row.get("what", "")))
        if stage:
            seconds[stage.group(1)] = float(row["seconds"])
    return used, seconds


def fixed_and_per_image(results: dict, name: str) -> tuple[float, float]:
    """(fixed s, s per val image) of one stage run from its 1x and 10x rows: the slope
    between them and what is left at 0 images (never below 0)."""
    a, b = _row(results, name, size="1x"), _row(results, name, size="10x")
    n_a, n_b = a["val images"], b["val images"]
    if n_b <= n_a:
        raise Missing(name, "its 1x and 10x rows have the same image count")
    slope = max(0.0, (b["wall s"] - a["wall s"]) / (n_b - n_a))
    return max(0.0, a["wall s"] - slope * n_a), slope


# ---------------------------------------------------------------- the projection

def project(results: dict, params: dict, gpu_tflops: float = GPU_SUSTAINED_TFLOPS,
            host_cores: int = HOST_CORES) -> list[dict]:
    """One row per stage: seconds on this machine and on the GPU machine (None when an input
    is missing, with `missing` naming the benchmark), how, and from which results."""
    schemes = len(params["schemes"])
    epochs = int(params["train"]["epochs"])
    n_train, n_val = COCO2014["train"], COCO2014["val"]
    n_all = n_train + n_val
    gpu_flops = gpu_tflops * 1e12

    def download():
        row = _row(results, "download", mode="subset", client="download stage")
        rate, cores = _rate(row, "images/s", "download"), _cores(results, "download")
        return (n_all / rate, n_all / (rate / cores * host_cores),
                f"download stage's images/s on loopback ({rate:.0f} on {cores} cores), "
                f"per core x {host_cores}; the network is not counted", ["download"])

    def masks():
        stage = _rows(results, "masks", method="masks stage (run)", data="10x")
        best = max(_rate(r, "images/s", "masks") for r in stage)
        one = [r for r in stage if r["workers"] == 1]
        if not one:
            raise Missing("masks", "no 1-worker row")
        per_core = 1000 / _rate(one[0], "CPU ms/image", "masks")
        runs = schemes * n_all
        return (runs / best, runs / (per_core * host_cores),
                f"stage's best images/s at 10x ({best:.0f}); host: {per_core:.0f} images/s "
                f"per core (its CPU ms/image) x {host_cores} workers", ["masks"])

    def train():
        epoch = _rate(_row(results, "train", measurement="train epoch (loader num_workers=0 "
                                                          "+ step)"), "images/s", "train")
        loader = _rate(_row(results, "train", measurement="data loader alone, num_workers=0"),
                       "images/s", "train")
        forward = _rate(_row(results, "infer", measurement="segflow model forward, eager"),
                        "images/s", "infer")
        flops = TRAIN_FLOPS_PER_FORWARD * forward_flops(results)
        runs, val_runs = schemes * epochs * n_train, schemes * epochs * n_val
        # Every epoch also validates on the whole val split: a forward per val image.
        here = runs / epoch + val_runs * (1 / loader + 1 / forward)
        compute = (runs * flops + val_runs * forward_flops(results)) / gpu_flops
        decode = (runs + val_runs) / (loader * host_cores)
        return (here, max(compute, decode),
                f"CPU epoch rate {epoch:.2f} images/s, plus each epoch's validation on the val "
                f"split (loader {loader:.0f} and forward {forward:.0f} images/s, one after the "
                f"other); GPU: {flops / 1e9:.2f} GFLOP per train image and a forward per val "
                f"image ({compute / 3600:.2g} h of compute) or JPEG loading at {loader:.0f} "
                f"images/s per core x {host_cores} ({decode / 3600:.2g} h), whichever is "
                "longer", ["train", "infer"])

    def infer():
        stage = [r for r in _need(results, "infer")["table"]
                 if str(r.get("measurement", "")).startswith("infer stage, end to end")]
        if not stage:
            raise Missing("infer", "no 'infer stage, end to end' row")
        # the stage as params.yaml runs it, when bench_infer times several settings
        chosen = next((r for r in stage if "(params.yaml)" in r["measurement"]), stage[0])
        rate = _rate(chosen, "images/s", "infer")
        # Host work per image besides the forward (decode, score, PNG) where bench_infer
        # measured it; else JPEG loading alone, at train's loader rate.
        host_ms = _need(results, "infer").get("host_ms_per_image")
        if host_ms is None:
            host_ms = 1000 / _rate(_row(results, "train", measurement="data loader alone, "
                                        "num_workers=0"), "images/s", "train")
        flops = forward_flops(results)
        runs = schemes * n_val
        compute, host = runs * flops / gpu_flops, runs * host_ms / 1000 / host_cores
        # Each job also embeds the train split (latents_train.npz, issue 17): a forward and
        # JPEG loading per train image, no scoring or PNG.
        embed = _rate(_row(results, "embed", measurement=EMBEDDING), "images/s", "embed")
        loader = _rate(_row(results, "train", measurement="data loader alone, num_workers=0"),
                       "images/s", "train")
        train_runs = schemes * n_train
        embed_gpu = max(train_runs * flops / gpu_flops, train_runs / (loader * host_cores))
        return (runs / rate + train_runs / embed, max(compute, host) + embed_gpu,
                f"stage's images/s ({rate:.1f}) on val, plus the train split's embedding at "
                f"{embed:.1f} images/s (bench_embed); GPU: {flops / 1e9:.2f} GFLOP per image or "
                f"{host_ms:.1f} ms of host work per val image (decode, score, PNG) over "
                f"{host_cores} cores, whichever is longer, plus per train image a forward or "
                f"its JPEG loading ({loader:.0f} images/s per core)",
                ["infer", "train", "embed"])

    def analyze():
        fixed, per_image = fixed_and_per_image(results, "analyze")
        loader = _rate(_row(results, "train", measurement="data loader alone, num_workers=0"),
                       "images/s", "train")
        flops = forward_flops(results)
        compute, decode = n_val * flops / gpu_flops, n_val / (loader * host_cores)
        return (schemes * (fixed + per_image * n_val),
                schemes * (fixed + max(compute, decode)),
                f"per scheme {fixed:.0f} s fixed + {1000 * per_image:.0f} ms per val image "
                "(slope from 1x to 10x); GPU: the fixed part plus the model pass as for "
                "infer (a lower bound: clustering and scoring stay on the CPU)",
                ["analyze", "train"])

    def from_pipeline(stage: str, parallel: int, what: str):
        def projected():
            used, seconds = pipeline_run(results)
            if stage not in seconds:
                raise Missing("pipeline", f"no {stage} row")
            here = seconds[stage] * n_val / max(used["val"], 1)
            return (here, here / parallel,
                    f"pipeline's {seconds[stage]:.1f} s for {used['val']} val images, linear; "
                    f"{what}", ["pipeline"])
        return projected

    def report():
        fixed, per_image = fixed_and_per_image(results, "report")
        here = fixed + per_image * n_val
        return (here, here, f"{fixed:.1f} s fixed + {1000 * per_image:.1f} ms per val image "
                f"(slope from 1x to 10x, all schemes); one process: the host's cores do not "
                "help", ["report"])

    how = {"download": download, "masks": masks, "train": train, "infer": infer,
           "evaluate": from_pipeline("evaluate", min(schemes, host_cores),
                                     f"host: one process per scheme, {min(schemes, host_cores)} "
                                     "at once"),
           "analyze": analyze,
           "compare": from_pipeline("compare", 1, "one process: the host's cores do not help"),
           "report": report}
    runs = {"download": (n_all, 1), "masks": (n_all, schemes), "train": (n_train, schemes * epochs),
            "infer": (n_all, schemes), "evaluate": (n_val, schemes), "analyze": (n_val, schemes),
            "compare": (n_val, 1), "report": (n_val, 1)}
    rows = []
    for stage in STAGES:
        images, times = runs[stage]
        try:
            here, gpu, basis, sources = how[stage]()
            rows.append({"stage": stage, "images": images, "runs": times, "here_s": here,
                         "gpu_s": gpu, "how": basis,
                         "from": [(name, results[name]["machine"]["date"]) for name in sources],
                         "missing": None})
        except Missing as missing:
            rows.append({"stage": stage, "images": images, "runs": times, "here_s": None,
                         "gpu_s": None, "how": missing.why, "from": [],
                         "missing": missing.name})
    return rows


# ---------------------------------------------------------------- rendering

def duration(seconds: float) -> str:
    if seconds >= 36 * 3600:
        return f"{seconds / 86400:.1f} d"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s"


def table_rows(rows: list[dict]) -> list[dict]:
    shown = []
    for r in rows:
        todo = f"run `python -m benchmarks {r['missing']}`" if r["missing"] else None
        shown.append({
            "stage": r["stage"],
            "images x runs": f"{r['images']:,} x {r['runs']}",
            "this machine": todo or duration(r["here_s"]),
            "GPU machine": todo or duration(r["gpu_s"]),
            "how": r["how"] if not todo else (r["how"] or "its result is missing"),
            "from": ", ".join(f"{name}.json ({date})" for name, date in r["from"]) or "-"})
    missing = sorted({r["missing"] for r in rows if r["missing"]})
    total = {"stage": "**total**", "images x runs": "",
             "this machine": duration(sum(r["here_s"] for r in rows if r["here_s"] is not None)),
             "GPU machine": duration(sum(r["gpu_s"] for r in rows if r["gpu_s"] is not None)),
             "how": "stages one after another" + (
                 f"; incomplete: without {', '.join(missing)}" if missing else ""),
             "from": ""}
    return shown + [total]


def section_body(rows: list[dict], results: dict, params: dict, date: str,
                 gpu_tflops: float = GPU_SUSTAINED_TFLOPS, host_cores: int = HOST_CORES) -> str:
    from benchmarks.harness import markdown_table

    cores = sorted({r["machine"]["cores_usable"] for r in results.values() if "machine" in r})
    cpus = sorted({r["machine"]["cpu"] for r in results.values() if "machine" in r})
    lines = [
        "## projection: full COCO 2014 on this machine and on one GPU", "",
        f"Computed {date} by `python -m benchmarks projection` from the JSON results in "
        "benchmarks/out/ (each row names the results and the date they were measured); no "
        f"measurement of its own. COCO 2014: {COCO2014['train']:,} train + "
        f"{COCO2014['val']:,} val images; {len(params['schemes'])} schemes and "
        f"{params['train']['epochs']} epochs as in params.yaml, at "
        f"{params['train']['image_size']} px.", "",
        markdown_table(table_rows(rows)), "",
        f"- This machine: {', '.join(cpus) or 'unknown CPU'}, "
        f"{'/'.join(map(str, cores)) or '?'} usable cores, rates as measured (one run each on "
        "a shared machine: see each benchmark's load average).",
        f"- GPU machine (assumed, not measured): one modern GPU sustaining {gpu_tflops:g} "
        f"TFLOP/s on this model (~10% of an A100's dense bf16 peak; MobileNetV2 is "
        f"memory-bound) for the model stages (train, infer, analyze: measured FLOPs per image "
        f"from bench_train), and a {host_cores}-core host of this machine's per-core speed for "
        "the CPU work (download, masks, evaluate, compare, report, JPEG loading): per-core "
        f"rates x {host_cores} where the stage spreads over cores, one core where it is one "
        "process.",
        "- Linear in the images: fixed costs are separated only where a benchmark measured "
        "1x and 10x (analyze, report); superlinear parts (clustering and silhouette on 40k "
        "points, nearest neighbours in the report) are not extrapolated beyond 10x the sample.",
    ]
    return "\n".join(lines) + "\n"


def write(out: Path, markdown: Path, params_path: Path = ROOT / "params.yaml") -> str:
    import datetime

    from benchmarks.harness import write_section

    results = {k: v for k, v in load_results(out).items() if k != NAME}
    params = yaml.safe_load(params_path.read_text())
    rows = project(results, params)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = section_body(rows, results, params, date)
    write_section(out, markdown, NAME, body)
    return body
