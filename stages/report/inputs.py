"""Reading the report's inputs: the documented files of docs/outputs.md, each checked for the
columns or keys the page uses (stages.lib.tables), one StageError naming the file otherwise."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import jsonschema
import numpy as np
import pandas as pd

from stages.lib.cli import StageError
from stages.lib.names import check_plain_name, inside, seed_dir
from stages.lib.params import scheme_class_names
from stages.lib.tables import read_json, read_table


@dataclass
class Scheme:
    """Everything the report shows about one scheme, as read from the documented files."""
    name: str
    class_names: list[str]
    claims: dict
    metrics: dict                    # evaluate's S.json
    confusion: np.ndarray            # evaluate's S.confusion.csv
    confusion_png: bytes             # evaluate's S.confusion.png
    categories: pd.DataFrame         # evaluate's S.categories.csv
    curves_png: bytes                # train's models/S/seed<N>/curves.png
    timing: dict                     # infer's timing.json
    train: dict                      # train's train.json
    samples: pd.DataFrame            # analyze's samples.csv (with a `stem` from file_name)
    clusters: pd.DataFrame           # analyze's clusters.csv
    metadata_loss: pd.DataFrame      # analyze's metadata_loss.csv, first binning
    # analyze's neighbours.csv as each sample's nearest samples (row indices into samples,
    # -1 where fewer) and their cosine distances, n x k
    neighbours: np.ndarray
    distances: np.ndarray
    bin_members: dict[str, list[int]]  # analyze's bin_members.csv: field -> each row's bin
    label_issues: pd.DataFrame       # analyze's label_issues.csv
    heatmaps: pd.DataFrame           # analyze's heatmaps/index.csv
    seed: int = 0                    # the analysed model's training seed (train.seeds[0])
    insights: list[dict] = field(default_factory=list)   # analyze's insights.json, ranked
    # analyze's duplicates.csv (None: not read, as in pages built without analyze's files)
    duplicates: pd.DataFrame | None = None
    # analyze's summary.json duplicates.by_kind_and_split: {kind: {split pair: pairs}}
    duplicate_counts: dict[str, dict[str, int]] | None = None
    leak_free: dict | None = None    # analyze's leak_free_metrics.json, when some image leaks


SUMMARY_METRICS = [
    ("miou", "mIoU"),
    ("pixel_accuracy", "pixel accuracy (ignore excluded)"),
    ("pixel_accuracy_with_ignore", "pixel accuracy (ignore counted as error)"),
    ("mean_class_accuracy", "mean class accuracy"),
    ("fw_iou", "frequency-weighted IoU"),
]
METRICS_KEYS = [key for key, _ in SUMMARY_METRICS] + ["iou", "images", "seeds"]


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# analyze's duplicates.csv and summary.json's counts of it (docs/outputs.md), spelled out
# here rather than imported from stages.lib.duplicates, whose image hashing the report does not
# need (it would make the report's code dependencies, and reruns, wider)
PAIR_COLUMNS = ["image_id_a", "split_a", "image_id_b", "split_b", "kind", "distance"]
KINDS = ("exact_bytes", "exact_pixels", "near_hash", "near_latent")
SPLIT_PAIRS = ("train-train", "val-val", "train-val")   # train is a pair's first side


SAMPLE_COLUMNS = ["image_id", "file_name", "loss", "pixel_accuracy", "miou", "x", "y", "cluster",
                  "label_quality", "background_fraction", "ood_score"]
CLUSTER_COLUMNS = ["cluster", "size", "mean_loss", "mean_pixel_accuracy", "grayscale_share",
                   "dominant_categories", "representative_image_ids", "train_images",
                   "train_share", "val_share"]
LEAK_FREE_KEYS = ["miou", "pixel_accuracy", "pixel_accuracy_with_ignore", "mean_class_accuracy",
                  "fw_iou", "iou", "images", "interval", "excluded_image_ids"]
BIN_COLUMNS = ["binning", "field", "bin", "low", "high", "count", "mean_loss", "se_loss",
               "flagged"]
ISSUE_COLUMNS = ["rank", "image_id", "stem", "label_quality", "loss", "flagged",
                 "main_disagreement", "figure"]
CATEGORY_COLUMNS = ["category", "supercategory", "claimed_by", "instances", "pixels",
                    "instance_recall", "instance_pull"]
TRAIN_KEYS = ["device", "precision", "epochs", "wall_s", "torch_version", "model_sha256",
              "train_images", "val_images", "encoder_pretraining"]
TIMING_KEYS = ["images", "device", "batch_size", "latency_ms", "wall_s", "throughput_img_s"]
LATENCY_KEYS = ["total", "mean", "variance", "median"]


def read_metrics(path: Path, class_names: list[str]) -> dict:
    metrics = read_json(path)
    missing = [k for k in METRICS_KEYS if k not in metrics]
    if missing:
        raise StageError(f"{path}: missing keys {', '.join(missing)}")
    if list(metrics["iou"]) != class_names:
        raise StageError(f"{path}: classes {list(metrics['iou'])} differ from params.yaml "
                         f"{class_names}; re-run evaluate")
    return metrics


def read_confusion(path: Path, class_names: list[str]) -> np.ndarray:
    frame = read_table(path, ["ground_truth", *class_names])
    if list(frame.columns) != ["ground_truth", *class_names] or \
            frame["ground_truth"].tolist() != class_names:
        raise StageError(f"{path}: rows/columns are not the classes {class_names}; "
                         "re-run evaluate")
    return frame[class_names].to_numpy(dtype=np.int64)


def read_samples(path: Path, class_names: list[str]) -> pd.DataFrame:
    samples = read_table(path, SAMPLE_COLUMNS + [f"iou_{c}" for c in class_names], "analyze",
                         dtype={"file_name": str})
    for image_id, file_name in zip(samples["image_id"], samples["file_name"]):
        check_plain_name(file_name, f"{path}: image {image_id}")   # read as files below
    # The stem comes from file_name: a numeric-looking stem column loses its zeros in CSV.
    samples["stem"] = samples["file_name"].map(lambda name: Path(name).stem)
    duplicated = samples["stem"][samples["stem"].duplicated()]
    if len(duplicated):
        raise StageError(f"{path}: file_name {duplicated.iloc[0]!r} listed twice")
    return samples


def read_png(path: Path, produced_by: str) -> bytes:
    """A figure a stage drew, inlined as it is."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise StageError(f"{path}: missing (run the {produced_by} stage first)") from None
    if not data.startswith(PNG_SIGNATURE):
        raise StageError(f"{path}: not a PNG; re-run {produced_by}")
    return data


def load_scheme(params: dict, name: str, models: Path, predictions: Path, metrics: Path,
                analysis: Path) -> Scheme:
    class_names = scheme_class_names(params, name)
    folder = inside(analysis, name, resolve=False)
    seed = params["train"]["seeds"][0]   # the analysed model: its training facts and masks
    trained = inside(models, name, seed_dir(seed), resolve=False)
    binning = params["analyze"]["buckets"]["binning"][0]   # the charts show the first
    samples = read_samples(folder / "samples.csv", class_names)
    neighbours, distances = read_neighbours(folder / "neighbours.csv", samples)
    found = read_insights(folder / "insights.json", "analyze", {name: samples}, name)
    pairs = read_table(folder / "duplicates.csv", PAIR_COLUMNS, "analyze")
    return Scheme(
        name=name, class_names=class_names, claims=params["schemes"][name]["classes"],
        metrics=read_metrics(metrics / f"{name}.json", class_names),
        confusion=read_confusion(metrics / f"{name}.confusion.csv", class_names),
        confusion_png=read_png(metrics / f"{name}.confusion.png", "evaluate"),
        categories=read_table(metrics / f"{name}.categories.csv",
                              [*CATEGORY_COLUMNS, *(f"pred_{c}" for c in class_names)],
                              "evaluate").fillna({"claimed_by": ""}),
        curves_png=read_png(trained / "curves.png", "train"),
        timing=read_timing(inside(predictions, name, seed_dir(seed), "timing.json",
                                  resolve=False)),
        train=read_train(trained / "train.json"),
        samples=samples, neighbours=neighbours, distances=distances,
        bin_members=read_bin_members(folder / "bin_members.csv", samples, binning),
        clusters=read_table(folder / "clusters.csv", CLUSTER_COLUMNS, "analyze"),
        metadata_loss=one_binning(read_table(folder / "metadata_loss.csv", BIN_COLUMNS,
                                             "analyze"), binning),
        label_issues=read_table(folder / "label_issues.csv", ISSUE_COLUMNS, "analyze",
                                dtype={"stem": str}),
        heatmaps=read_table(folder / "heatmaps" / "index.csv", ["file", "kind", "cluster", "stem"],
                            "analyze", dtype={"stem": str}),
        seed=seed, insights=found,
        duplicates=pairs,
        duplicate_counts=read_duplicate_counts(folder / "summary.json", len(pairs)),
        leak_free=read_leak_free(folder / "leak_free_metrics.json", found),
    )


def read_duplicate_counts(path: Path, rows: int) -> dict[str, dict[str, int]]:
    """analyze's summary.json duplicates.by_kind_and_split: a count for every kind and split
    pair, summing to the rows of duplicates.csv beside it (`rows`); else of another run."""
    block = read_json(path, ["duplicates"], "analyze")["duplicates"]
    counts = block.get("by_kind_and_split") if isinstance(block, dict) else None
    for kind in KINDS:
        for split in SPLIT_PAIRS:
            cells = counts.get(kind) if isinstance(counts, dict) else None
            n = cells.get(split) if isinstance(cells, dict) else None
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise StageError(f"{path}: duplicates.by_kind_and_split.{kind}.{split}: "
                                 f"expected a count of pairs, found {_found(n)}; re-run analyze")
    total = sum(counts[k][s] for k in KINDS for s in SPLIT_PAIRS)
    if total != rows:
        raise StageError(f"{path}: duplicates.by_kind_and_split counts {_count(total, 'pair')} "
                         f"but duplicates.csv beside it has {_count(rows, 'row')}: the two are "
                         "of different runs; re-run analyze")
    return {k: {s: counts[k][s] for s in SPLIT_PAIRS} for k in KINDS}


def read_leak_free(path: Path, found: list[dict]) -> dict | None:
    """leak_free_metrics.json, which analyze writes exactly when its insights.json beside it
    has a leak record, over the val images that record does not name; None when there is no
    leak. A file without its record, or the reverse, is of another run: refused."""
    leaks = [r for r in found if r["type"] == "leak"]
    if not path.exists():
        if leaks:
            raise StageError(f"{path}: missing, but insights.json beside it has a leak record "
                             f"({_count(leaks[0]['size'], 'val image')}); re-run analyze")
        return None
    metrics = read_json(path, LEAK_FREE_KEYS, "analyze")
    leaked = leaks[0]["image_ids"] if leaks else []
    if metrics["excluded_image_ids"] != leaked:
        raise StageError(f"{path}: excluded_image_ids {_found(metrics['excluded_image_ids'])} "
                         f"differ from the leak record of insights.json beside it "
                         f"({_found(leaked)}); re-run analyze")
    return metrics


def read_image_paths(raw: Path) -> dict[tuple[str, int], str]:
    """(split, image id) -> the image's path under `raw`, from download's manifest.json: how
    the report finds the train image of a duplicate pair (no table of the report lists it)."""
    manifest = read_json(raw / "manifest.json", ["splits"], "download")
    try:
        return {(split, int(image["id"])): str(image["path"])
                for split, body in manifest["splits"].items() for image in body["images"]}
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise StageError(f"{raw / 'manifest.json'}: splits.<split>.images: expected objects "
                         f"with an integer id and a path ({exc!r}); re-run download") from None


def _rows(path: Path, ids: pd.Series, samples: pd.DataFrame) -> np.ndarray:
    """Row positions in samples of the image ids a table of the same analyze run lists."""
    row_of = pd.Series(np.arange(len(samples)), index=samples["image_id"].astype(np.int64))
    unknown = sorted(set(ids.astype(np.int64)) - set(row_of.index))
    if unknown:
        raise StageError(f"{path}: image {unknown[0]} is not in samples.csv beside it; "
                         "re-run analyze")
    return row_of.loc[ids.astype(np.int64)].to_numpy()


def read_neighbours(path: Path, samples: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    return neighbour_matrix(read_table(path, ["image_id", "rank", "neighbour_image_id",
                                              "cosine_distance"], "analyze"), samples, path)


def neighbour_matrix(table: pd.DataFrame, samples: pd.DataFrame,
                     path: Path) -> tuple[np.ndarray, np.ndarray]:
    """neighbours.csv as an n x k matrix of row indices (and one of distances), rank order:
    the page looks a sample's similars up by row."""
    table = table.sort_values(["image_id", "rank"], kind="stable")
    rows, found = _rows(path, table["image_id"], samples), \
        _rows(path, table["neighbour_image_id"], samples)
    slot = table.groupby("image_id").cumcount().to_numpy()
    width = int(slot.max()) + 1 if len(slot) else 0
    neighbours = np.full((len(samples), width), -1, dtype=np.int64)
    distances = np.full((len(samples), width), np.nan)
    neighbours[rows, slot] = found
    distances[rows, slot] = table["cosine_distance"].to_numpy(dtype=float)
    return neighbours, distances


def read_bin_members(path: Path, samples: pd.DataFrame, binning: str) -> dict[str, list[int]]:
    return member_lists(one_binning(read_table(path, ["image_id", "binning", "field", "bin"],
                                               "analyze"), binning), samples, path)


def member_lists(table: pd.DataFrame, samples: pd.DataFrame, path: Path) -> dict[str, list[int]]:
    """bin_members.csv (one binning) as field -> each sample row's bin, -1 for none."""
    members = {}
    for name, part in table.groupby("field", sort=False):
        column = np.full(len(samples), -1, dtype=np.int64)
        column[_rows(path, part["image_id"], samples)] = part["bin"].to_numpy(dtype=np.int64)
        members[name] = column.tolist()
    return members


def one_binning(frame: pd.DataFrame, binning: str) -> pd.DataFrame:
    return frame[frame["binning"] == binning].reset_index(drop=True)


def read_train(path: Path) -> dict:
    train = read_json(path, TRAIN_KEYS, "train")
    if not isinstance(train["encoder_pretraining"], str):
        raise StageError(f"{path}: encoder_pretraining: expected a string, found "
                         f"{_found(train['encoder_pretraining'])}; re-run train")
    return train


def read_timing(path: Path) -> dict:
    timing = read_json(path, TIMING_KEYS, "infer")
    missing = [f"latency_ms.{k}" for k in LATENCY_KEYS if k not in timing["latency_ms"]]
    if missing:
        raise StageError(f"{path}: missing keys {', '.join(missing)}")
    return timing


def read_flagged_in(compare: Path | None, schemes: list[Scheme]) -> dict[str, list[str]]:
    """stem -> the schemes in which compare found the image flagged as a label issue."""
    if compare is None:
        return {}
    table = read_table(compare / "label_issues.csv", ["image_id", "flagged_in"], "compare")
    stems = {}
    for s in schemes:
        stems.update(zip(s.samples["image_id"].astype(int), s.samples["stem"]))
    return {stems[int(r.image_id)]: str(r.flagged_in).split()
            for r in table.itertuples() if int(r.image_id) in stems}


def read_cluster_changes(compare: Path | None) -> pd.DataFrame | None:
    if compare is None:
        return None
    return read_table(compare / "clusters.csv", ["a", "b", "clusters_of", "cluster", "images",
                                                 "mean_loss_a", "mean_loss_b", "z",
                                                 "significant"], "compare")


def listed_file(folder: Path, name: object, table: Path) -> Path:
    """A file an analysis table lists by its path relative to the folder: read from there,
    never from outside it (the table is input like any other)."""
    try:
        return inside(folder, str(name), resolve=False)
    except StageError as exc:
        raise StageError(f"{table}: lists {name!r}: {exc}") from None


def read_compare_summary(compare: Path | None) -> dict | None:
    return None if compare is None else read_json(compare / "summary.json", ["pairs"], "compare")


# ---------------------------------------------------------------- insights (issue 17)

# docs/insights.schema.json, read as package data (stages/schemas/insights.schema.json is a
# symlink to it, as params.schema.yaml is to workflow/schemas/), so a built wheel carries it.
INSIGHTS_SCHEMA = resources.files("stages") / "schemas" / "insights.schema.json"
SHORT = 60   # longest value quoted in a message


def _where(error: jsonschema.ValidationError) -> str:
    """'[3].interval', or 'the top level'."""
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
    return where or "the top level"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _found(value: object) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return f"a list of {_count(len(value), 'item')}"
    text = json.dumps(value)
    return text if len(text) <= SHORT else text[:SHORT] + "..."


def _describe(schema: dict) -> str:
    """A subschema in words: 'null', 'a list of 2 numbers'."""
    kind = schema.get("type")
    if kind == "array" and schema.get("minItems") == schema.get("maxItems") is not None:
        return f"a list of {schema['minItems']} {schema.get('items', {}).get('type', 'item')}s"
    return " or ".join(kind) if isinstance(kind, list) else str(kind)


def _expected(error: jsonschema.ValidationError) -> str:
    """What the schema wanted where the file differs from it, in words."""
    value = error.validator_value
    if error.validator == "type":
        return " or ".join(value) if isinstance(value, list) else value
    if error.validator == "enum":
        return f"one of {', '.join(map(str, value))}"
    if error.validator in ("oneOf", "anyOf"):
        return " or ".join(_describe(s) for s in value)
    if error.validator in ("minItems", "maxItems"):
        bound = "at least" if error.validator == "minItems" else "at most"
        return f"a list of {bound} {_count(value, 'item')}"
    if error.validator == "minLength":
        return f"a string of at least {_count(value, 'character')}"
    if error.validator in ("minimum", "maximum"):
        return f"a number of at {'least' if error.validator == 'minimum' else 'most'} {value}"
    return f"{error.validator} {json.dumps(value)}"   # a keyword the schema does not use yet


def insights_problem(document: object) -> str | None:
    """Where `document` breaks docs/insights.schema.json and what was expected there, in one
    phrase, or None when it holds. One error, jsonschema's best match: the line stays short."""
    schema = json.loads(INSIGHTS_SCHEMA.read_text(encoding="utf-8"))
    error = jsonschema.exceptions.best_match(
        jsonschema.Draft202012Validator(schema).iter_errors(document))
    if error is None:
        return None
    if error.validator == "required":
        missing = [k for k in error.validator_value if k not in error.instance]
        return f"{_where(error)}: missing key {missing[0]}"
    return f"{_where(error)}: expected {_expected(error)}, found {_found(error.instance)}"


def read_insights(path: Path, produced_by: str, samples: dict[str, pd.DataFrame],
                  scheme: str | None = None) -> list[dict]:
    """An insights.json (docs/outputs.md, "Insights"): a list valid under
    docs/insights.schema.json, in its file's order (the stage ranked it). analyze's (`scheme`
    given) holds that scheme's findings, compare's (`scheme` None) scheme_change records of
    the schemes in `samples` (name -> analyze's samples.csv). Every image of a finding is a
    val image of its scheme, but for duplicates, whose train pairs name train images."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StageError(f"{path}: missing (run the {produced_by} stage first)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StageError(f"{path}: not valid JSON ({exc})") from None
    problem = insights_problem(document)
    if problem is not None:
        raise StageError(f"{path}: {problem} (docs/insights.schema.json); re-run {produced_by}")
    for i, r in enumerate(document):
        owner = scheme
        if scheme is None:
            owner = r["evidence"].get("scheme")
            if r["type"] != "scheme_change" or owner not in samples:
                raise StageError(
                    f"{path}: [{i}]: expected a scheme_change record of one of "
                    f"{', '.join(samples)}, found a {r['type']} record of {_found(owner)}; "
                    f"re-run {produced_by}")
        elif r["type"] == "scheme_change":
            raise StageError(f"{path}: [{i}]: a scheme_change record; those are compare's "
                             f"(compare/insights.json); re-run {produced_by}")
        kind = r["evidence"].get("finding_type") if r["type"] == "scheme_change" else r["type"]
        if kind == "duplicate":
            continue
        known = set(samples[owner]["image_id"].astype(int))
        unknown = [i for i in r["image_ids"] if i not in known]
        if unknown:
            raise StageError(f"{path}: [{i}].image_ids: image {unknown[0]} is not among "
                             f"{owner}'s val images (its samples.csv); re-run {produced_by}")
    return document


def read_compare_insights(compare: Path | None, schemes: list[Scheme]) -> list[dict] | None:
    if compare is None:
        return None
    return read_insights(compare / "insights.json", "compare",
                         {s.name: s.samples for s in schemes})
