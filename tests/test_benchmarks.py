"""The benchmark harness at a tiny scale, so it cannot rot: the masks benchmark's table,
its JSON, and the rewrite of its own BENCHMARKS.md section only. No timing is asserted."""
from __future__ import annotations

import json

import pytest

from benchmarks import bench_masks, harness
from conftest import ROOT

COLUMNS = ["method", "workers", "data", "images", "seconds", "images/s", "CPU ms/image",
           "peak RSS main (MiB)", "peak RSS per worker (MiB)"]


def test_masks_benchmark_at_tiny_scale_rewrites_only_its_section(tmp_path):
    markdown = tmp_path / "BENCHMARKS.md"
    start, end = harness.markers("masks")
    committed = (ROOT / "BENCHMARKS.md").read_text()
    assert committed.count(start) == 1 and committed.count(end) == 1
    before, after = committed.split(start)[0], committed.split(end)[1]
    markdown.write_text(before + start + "\nstale figures\n" + end + after)

    assert harness.main(["masks", "--scale", "0.025", "--out", str(tmp_path / "out"),
                         "--markdown", str(markdown)]) == 0

    result = json.loads((tmp_path / "out" / "masks.json").read_text())
    table = result["table"]
    assert all(list(row) == COLUMNS for row in table)
    assert {(row["method"], row["data"]) for row in table} == {
        (method, data) for method in bench_masks.METHODS.values() for data in ("1x", "10x")}
    for row in table:
        assert row["images"] == {"1x": 4, "10x": 40}[row["data"]]   # 2 per split, x10
        assert row["seconds"] > 0 and row["images/s"] > 0 and row["peak RSS main (MiB)"] > 0
        assert row["CPU ms/image"] > 0
        pooled = row["method"] == bench_masks.METHODS["stage"] and row["workers"] > 1
        assert (row["peak RSS per worker (MiB)"] != "in main") == pooled
    assert any("byte-identical to the stage's at 1x: yes" in note for note in result["notes"])
    assert result["machine"]["cores_usable"] >= 1 and result["scale"] == 0.025

    text = markdown.read_text()
    assert "stale figures" not in text
    assert text.startswith(before + start + "\n## masks: throughput and peak memory\n")
    assert text.endswith(end + after)
    section = text.split(start)[1].split(end)[0]
    assert "| masks stage (run) | 1 | 10x | 40 |" in section
    assert section.count("\n| ") == len(table) + 1   # header and one line per row


def test_update_markdown_replaces_one_section_or_appends_it():
    text = ("# B\n\n<!-- bench:a:start -->\nold a\n<!-- bench:a:end -->\n\n"
            "<!-- bench:b:start -->\nold b\n<!-- bench:b:end -->\n")
    updated = harness.update_markdown(text, "b", "new b\n")
    assert updated == text.replace("old b", "new b")
    appended = harness.update_markdown(text, "c", "c body\n")
    assert appended == text + "\n<!-- bench:c:start -->\nc body\n<!-- bench:c:end -->\n"


def test_markdown_table_and_result_checks():
    rows = [{"method": "x|y", "rate": 1234.56, "small": 0.123}]
    assert harness.markdown_table(rows) == ("| method | rate | small |\n|---|---|---|\n"
                                            "| x\\|y | 1,234.6 | 0.12 |")
    with pytest.raises(ValueError, match="columns"):
        harness.check_result("z", {"title": "t", "table": [{"a": 1}, {"b": 2}]})
    with pytest.raises(ValueError, match="non-empty table"):
        harness.check_result("z", {"title": "t", "table": []})


def test_unknown_benchmark_is_refused(capsys):
    assert "masks" in harness.available()
    with pytest.raises(SystemExit) as info:
        harness.main(["nosuch"])
    assert info.value.code == 2
    assert "unknown benchmark(s) nosuch (available: " in capsys.readouterr().err


def test_ten_times_data_repeats_images_and_annotations_under_new_ids(tmp_path):
    assert bench_masks.build_raw(tmp_path / "raw", 2, 10) == 40
    doc = json.loads((tmp_path / "raw" / "annotations" / "instances_val.json").read_text())
    ids = [im["id"] for im in doc["images"]]
    assert len(set(ids)) == 20 and len({a["id"] for a in doc["annotations"]}) == len(
        doc["annotations"])
    assert {a["image_id"] for a in doc["annotations"]} <= set(ids)
    assert len(doc["annotations"]) % 10 == 0
    for image in doc["images"]:
        assert (tmp_path / "raw" / "images" / "val" / image["file_name"]).resolve().is_file()


def _smoke(name: str, tmp_path, scale: float) -> dict:
    """Run one benchmark through the harness into tmp_path; return its JSON result."""
    markdown = tmp_path / "BENCHMARKS.md"
    markdown.write_text("# Benchmarks\n")
    assert harness.main([name, "--scale", str(scale), "--out", str(tmp_path / "out"),
                         "--markdown", str(markdown)]) == 0
    start, end = harness.markers(name)
    assert start in markdown.read_text() and end in markdown.read_text()
    return json.loads((tmp_path / "out" / f"{name}.json").read_text())


def test_download_benchmark_smoke(tmp_path, monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    result = _smoke("download", tmp_path, 0.1)
    assert [(r["mode"], r["client"]) for r in result["table"]] == [
        ("subset", "curl"), ("subset", "download stage"),
        ("archives", "curl"), ("archives", "download stage")]
    for row in result["table"]:
        assert row["images"] == 160 and row["MB"] > 20 and row["seconds"] > 0
    assert [r["files fetched"] for r in result["table"]] == [161, 161, 3, 3]


def test_annotations_benchmark_smoke(tmp_path):
    result = _smoke("annotations", tmp_path, 0.01)
    rows = result["table"]
    readers = ["json.load (read whole)", "download stage (streamed)",
               "download stage (streamed), 80 images chosen"]
    assert [(r["reader"], r["train file"]) for r in rows] == [
        *((reader, "sample x 1") for reader in readers),
        *((reader, "sample x 8") for reader in readers)]
    assert [r["annotations"] for r in rows] == [705] * 3 + [5640] * 3
    assert all(r["peak RSS MiB"] >= r["of which imports MiB"] > 0 and r["wall s"] > 0
               for r in rows)
    assert rows[0]["peak RSS vs json.load"] == rows[3]["peak RSS vs json.load"] == "1.00x"


def test_train_benchmark_smoke(tmp_path, one_torch_thread):
    result = _smoke("train", tmp_path, 0.05)
    measured = [r["measurement"] for r in result["table"]]
    assert measured[-3:] == ["train step alone, eager (contiguous)",
                             "train step alone, channels_last",
                             "train epoch (loader num_workers=0 + step)"]
    assert all(r["images/s"] > 0 for r in result["table"])
    assert any("GFLOP per image at 128 px" in n for n in result["notes"])
    # the projection reads the count from this field (MobileNetV2 + pix2pix decoder, 128 px)
    assert result["forward_gflop_per_image"] == pytest.approx(1.17, abs=0.01)


def test_infer_benchmark_smoke(tmp_path, one_torch_thread):
    result = _smoke("infer", tmp_path, 0.05)
    rows = {r["measurement"]: r for r in result["table"]}
    assert rows["segflow model forward, eager"]["vs raw forward (eager)"] == 1.0
    assert rows["segflow model forward, torch.compile"]["images/s"] == "n/a"   # skipped in smoke
    import yaml

    # a smoke run trains params.yaml's epochs x 0.05, at least one (2 of the default 40)
    epochs = max(1, round(yaml.safe_load((ROOT / "params.yaml").read_text())["train"]["epochs"]
                          * 0.05))
    column = f"val mIoU after {epochs} epoch(s)"
    mious = [r for r in result["table"] if r[column] != ""]
    assert len(mious) == 2 and all(0 <= r[column] <= 1 for r in mious)
    assert any("overhead over the raw forward" in n for n in result["notes"])
    stages = [r for r in result["table"] if r["measurement"].startswith("infer stage")]
    assert len(stages) == 3 and all(r["goal"].startswith("overhead ") for r in stages)
    assert sum("(params.yaml)" in r["measurement"] for r in stages) == 1
    parts = next(n for n in result["notes"] if n.startswith("Where the overhead comes from"))
    assert "write PNG" in parts and "decode + resize" in parts


def test_embed_benchmark_smoke(tmp_path, one_torch_thread):
    result = _smoke("embed", tmp_path, 0.05)
    rows = {r["measurement"]: r for r in result["table"]}
    embedding = rows["infer stage, train-split embedding (latents_train.npz)"]
    assert embedding["images"] == 4 and embedding["images/s"] > 0   # 4 train images at 0.05
    assert rows["segflow model forward alone, eager"]["vs raw forward"] == 1.0
    assert any(n.startswith("Full COCO 2014: embedding its 82,783 train images")
               for n in result["notes"])


def test_duplicates_benchmark_smoke(tmp_path):
    result = _smoke("duplicates", tmp_path, 0.002)   # 200 and 244 images
    measured = [r for r in result["table"] if r["measured"] == "yes"]
    assert [(r["search"].split(":")[0], r["images"]) for r in measured] == [
        (kind, n) for kind in ("exact_bytes + exact_pixels", "near_hash", "near_latent")
        for n in (200, 244)]
    # one image in 100 is a planted copy: 1 and 2 pairs, each found
    assert [r["pairs found / planted"] for r in measured] == ["1 / 1", "2 / 2"] * 3
    projected = {(r["search"].split(":")[0], r["measured"]): r for r in result["table"]
                 if r["measured"] != "yes"}
    assert len(projected) == 6
    for kind in ("near_hash", "near_latent"):
        large = next(r for r in measured if r["search"].startswith(kind) and r["images"] == 244)
        one, ten = (projected[(kind, f"projected: full COCO {x}")] for x in ("1x", "10x"))
        assert (one["images"], ten["images"]) == (123_287, 1_232_870)
        assert one["B / image"] == ten["B / image"] == large["B / image"] > 0
        # memory linear in the images, time quadratic (within the rounding of the cells)
        assert ten["peak MiB (tracemalloc)"] == pytest.approx(
            10 * one["peak MiB (tracemalloc)"], rel=0.01)
        assert ten["wall s"] == pytest.approx(100 * one["wall s"], rel=0.01, abs=1)


def test_metrics_benchmark_smoke(tmp_path):
    result = _smoke("metrics", tmp_path, 0.05)
    names = [r["implementation"] for r in result["table"]]
    assert names[0] == "segflow (numpy bincount)" and len(names) == 3
    assert [r["identical matrix"] for r in result["table"][1:]] == ["yes", "yes"]
    assert result["table"][1]["vs torchmetrics"] == 1.0


def test_pipeline_benchmark_reads_snakemake_benchmark_files(tmp_path):
    from benchmarks import bench_pipeline

    header = "s\th:m:s\tmax_rss\tcpu_time\n"
    (tmp_path / "logs" / "benchmark" / "train").mkdir(parents=True)
    (tmp_path / "logs" / "benchmark" / "download.tsv").write_text(
        header + "2.5\t0:00:02\t10\t1.5\n")
    for scheme, seconds in (("a", 10.0), ("b", 12.0)):
        (tmp_path / "logs" / "benchmark" / "train" / f"{scheme}.tsv").write_text(
            header + f"{seconds}\t0:00:10\t10\t{seconds / 2}\n")
    assert bench_pipeline.stage_seconds(tmp_path) == {"download": 2.5, "train": 22.0}
    assert bench_pipeline.stage_seconds(tmp_path, "cpu_time") == {"download": 1.5, "train": 11.0}
    used = {"train": 80, "val": 80}
    # train scales with the train split only: 22 s for 80 images -> 82,783 images
    assert bench_pipeline.projection_hours("train", 22.0, used) == pytest.approx(
        22.0 * 82_783 / 80 / 3600)
    assert bench_pipeline.projection_hours("download", 2.5, used) == pytest.approx(
        2.5 * (82_783 + 40_504) / 160 / 3600)


def test_report_benchmark_smoke(tmp_path, monkeypatch):
    from benchmarks.common import memory_goal_column

    monkeypatch.setenv("TQDM_DISABLE", "1")
    result = _smoke("report", tmp_path, 0.05)
    table = result["table"]
    assert [(r["size"], r["val images"]) for r in table] == [("1x", 4), ("10x", 40)]
    for row in table:
        assert row["wall s"] > 0 and row["peak RSS MiB"] >= row["of which imports MiB"] > 0
        assert row["page MB"] > 0
    assert table[0][memory_goal_column()] == "1.00x"
    assert table[1][memory_goal_column()].endswith((": met", ": missed"))
    assert result["notes"][0].startswith("Goal: peak memory at 10x the images <= 1.2x")


def test_memory_goal_cells_say_met_or_missed_on_the_10x_row():
    from benchmarks.common import memory_goal_cells, memory_goal_note

    assert memory_goal_cells([100.0, 119.0], [1, 10]) == ["1.00x", "1.19x: met"]
    assert memory_goal_cells([100.0, 121.0], [1, 10]) == ["1.00x", "1.21x: missed"]
    assert "missed (1.50x, 100 -> 150 MiB)" in memory_goal_note(100, 150)


# ---------------------------------------------------------------- the full-COCO projection

def _machine(date: str) -> dict:
    return {"cpu": "test CPU", "cores_usable": 2, "date": date}


def _hand_made_results() -> dict:
    """Small round numbers, one result per benchmark the projection reads."""
    return {
        "download": {"machine": _machine("D-download"), "notes": [], "table": [
            {"mode": "subset", "client": "curl", "images/s": 900.0},
            {"mode": "subset", "client": "download stage", "images/s": 100.0}]},
        "masks": {"machine": _machine("D-masks"), "notes": [], "table": [
            {"method": "masks stage (run)", "workers": 1, "data": "1x", "images/s": 999.0,
             "CPU ms/image": 1.0},
            {"method": "masks stage (run)", "workers": 1, "data": "10x", "images/s": 50.0,
             "CPU ms/image": 10.0},
            {"method": "masks stage (run)", "workers": 2, "data": "10x", "images/s": 80.0,
             "CPU ms/image": 12.0}]},
        "train": {"machine": _machine("D-train"), "table": [
            {"measurement": "data loader alone, num_workers=0", "images/s": 50.0},
            {"measurement": "train epoch (loader num_workers=0 + step)", "images/s": 2.0}],
            "notes": [], "forward_gflop_per_image": 1.0},
        "infer": {"machine": _machine("D-infer"), "notes": [], "table": [
            {"measurement": "infer stage, end to end, num_workers=0", "images/s": 10.0},
            {"measurement": "infer stage, end to end, num_workers=1 (params.yaml)",
             "images/s": 20.0},
            {"measurement": "segflow model forward, eager", "images/s": 90.0}],
            "host_ms_per_image": 8.0},
        "embed": {"machine": _machine("D-embed"), "notes": [], "table": [
            {"measurement": "infer stage, train-split embedding (latents_train.npz)",
             "images/s": 40.0}]},
        "analyze": {"machine": _machine("D-analyze"), "notes": [], "table": [
            {"val images": 10, "size": "1x", "wall s": 12.0},
            {"val images": 100, "size": "10x", "wall s": 21.0}]},
        "report": {"machine": _machine("D-report"), "notes": [], "table": [
            {"val images": 80, "size": "1x", "wall s": 5.0},
            {"val images": 800, "size": "10x", "wall s": 12.2}]},
        "pipeline": {"machine": _machine("D-pipeline"), "table": [
            {"what": "stage evaluate (all schemes)", "seconds": 8.0},
            {"what": "stage compare (all schemes)", "seconds": 4.0},
            {"what": "whole run, snakemake --cores all", "seconds": 300.0}],
            "notes": [], "images": {"train": 80, "val": 80}},
    }


PROJECTION_PARAMS = {"schemes": {"a": {}, "b": {}}, "train": {"epochs": 3, "image_size": 128}}


def test_projection_arithmetic_on_hand_made_results():
    from benchmarks import projection

    rows = {r["stage"]: r for r in projection.project(_hand_made_results(), PROJECTION_PARAMS,
                                                      gpu_tflops=30, host_cores=16)}
    train, val = 82_783, 40_504
    every = train + val
    expected = {   # (this machine, GPU machine) in seconds, by hand
        "download": (every / 100, every / (100 / 2 * 16)),
        "masks": (2 * every / 80, 2 * every / (1000 / 10 * 16)),
        # 2 schemes x 3 epochs, each validating on the val split (loader, then forward);
        # GPU: loader-bound (50/s per core x 16) beats 3 GFLOP / 30 TFLOP/s
        "train": (6 * train / 2 + 6 * val * (1 / 50 + 1 / 90),
                  max((6 * train * 3e9 + 6 * val * 1e9) / 30e12, 6 * every / (50 * 16))),
        # host work 8 ms per image over 16 cores (bench_infer's parts), not loading alone;
        # plus the train split's embedding at 40/s, on the GPU loader-bound (50/s x 16)
        "infer": (2 * val / 20 + 2 * train / 40,
                  max(2 * val * 1e9 / 30e12, 2 * val * 0.008 / 16)
                  + max(2 * train * 1e9 / 30e12, 2 * train / (50 * 16))),
        # 1x -> 10x: 0.1 s per image over a fixed 11 s, per scheme
        "analyze": (2 * (11 + 0.1 * val), 2 * (11 + max(val * 1e9 / 30e12, val / 800))),
        "evaluate": (8 * val / 80, 8 * val / 80 / 2),     # one process per scheme, 2 at once
        "compare": (4 * val / 80, 4 * val / 80),
        "report": (4.2 + 0.01 * val, 4.2 + 0.01 * val),   # 0.01 s per image over 4.2 s
    }
    assert list(rows) == list(projection.STAGES)
    for stage, (here, gpu) in expected.items():
        assert rows[stage]["missing"] is None, stage
        assert rows[stage]["here_s"] == pytest.approx(here), stage
        assert rows[stage]["gpu_s"] == pytest.approx(gpu), stage
    assert rows["train"]["gpu_s"] == pytest.approx(6 * every / 800)   # loader-bound here
    assert rows["train"]["from"] == [("train", "D-train"), ("infer", "D-infer")]
    assert rows["infer"]["from"] == [("infer", "D-infer"), ("train", "D-train"),
                                     ("embed", "D-embed")]
    assert (rows["infer"]["images"], rows["infer"]["runs"]) == (every, 2)
    assert (rows["train"]["images"], rows["train"]["runs"]) == (train, 6)
    total = projection.table_rows(list(rows.values()))[-1]
    assert total["this machine"] == projection.duration(sum(h for h, _ in expected.values()))


def test_projection_names_the_benchmark_to_run_instead_of_a_figure(tmp_path):
    from benchmarks import projection

    results = _hand_made_results()
    del results["train"], results["report"]
    rows = {r["stage"]: r for r in projection.project(results, PROJECTION_PARAMS)}
    # infer and analyze need train's FLOPs and loader rate: they wait for it too
    assert {s for s, r in rows.items() if r["missing"]} == {"train", "infer", "analyze", "report"}
    assert rows["infer"]["missing"] == "train" and rows["report"]["missing"] == "report"
    assert rows["masks"]["here_s"] == pytest.approx(2 * 123_287 / 80)
    shown = {r["stage"]: r for r in projection.table_rows(list(rows.values()))}
    assert shown["report"]["this machine"] == "run `python -m benchmarks report`"
    assert "incomplete: without report, train" in shown["**total**"]["how"]

    # a result written before a field the projection reads existed
    older = _hand_made_results()
    del older["pipeline"]["images"]
    rows = {r["stage"]: r for r in projection.project(older, PROJECTION_PARAMS)}
    assert rows["evaluate"]["missing"] == "pipeline" and rows["masks"]["missing"] is None

    # through the harness: its own section, from the JSON files in --out
    out = tmp_path / "out"
    out.mkdir()
    for name, result in results.items():
        (out / f"{name}.json").write_text(json.dumps(result))
    markdown = tmp_path / "BENCHMARKS.md"
    markdown.write_text(
        "# Benchmarks\n\n<!-- bench:masks:start -->\nkept\n<!-- bench:masks:end -->\n")
    assert harness.main(["projection", "--out", str(out), "--markdown", str(markdown)]) == 0
    text = markdown.read_text()
    start, end = harness.markers("projection")
    assert "kept" in text and text.count(start) == 1 and text.count(end) == 1
    section = text.split(start)[1].split(end)[0]
    import yaml

    used = yaml.safe_load((ROOT / "params.yaml").read_text())   # schemes and epochs from it
    runs = len(used["schemes"]) * used["train"]["epochs"]
    assert f"| train | 82,783 x {runs} | run `python -m benchmarks train` |" in section
    assert "masks.json (D-masks)" in section and "(D-train)" not in section


def test_projection_durations():
    from benchmarks.projection import duration

    assert [duration(s) for s in (42, 600, 2 * 3600, 3 * 86400)] == [
        "42 s", "10 min", "2.0 h", "3.0 d"]


def test_peak_memory_of_a_child_is_its_own_not_its_parents():
    """Linux carries ru_maxrss over fork and exec: a child started while this process holds
    300 MB would report at least that. peak_mib reads the child's own high-water mark."""
    import subprocess
    import sys

    held = bytearray(300 * 2**20)
    held[::4096] = b"x" * len(held[::4096])  # touch every page: resident, not just mapped
    code = "from benchmarks.common import peak_mib; print(peak_mib())"
    own = float(subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout)
    assert 0 < own < 150            # ru_maxrss here would say more than 300
    del held


def test_hostile_benchmark_smoke(tmp_path, monkeypatch):
    # every hostile input of issue 13 is refused the way a user needs: exit code 2, one
    # error line, no traceback; the transfers stay within their caps
    monkeypatch.setenv("TQDM_DISABLE", "1")
    result = _smoke("hostile", tmp_path, 0.05)
    rows = {row["hostile input"]: row for row in result["table"]}
    assert len(rows) == 11
    for name, row in rows.items():
        assert (row["exit"], row["error lines"], row["traceback"]) == (2, 1, "no"), name
    cap_mib = 32 + 30      # the image cap plus the sample's other images, with room
    assert rows["image: endless body, no Content-Length"]["written to files MiB"] < cap_mib
    assert rows["val archive: a member unpacking to 3 GiB of zeros"]["written to files MiB"] < 2
    assert result["notes"][0] == ("11 of 11 hostile inputs refused with exit code 2, one "
                                  "error line and no traceback.")


def test_every_recipe_candidate_is_a_valid_params_file_and_they_differ():
    """A candidate written over params.yaml must pass the schema the stages check (a train
    key missing or misspelt would fail every one of its trainings, an hour into the run)."""
    from benchmarks import bench_recipe
    from benchmarks.common import default_params
    from stages.lib.params import validate_params

    base = default_params()
    trains = []
    for name, values in bench_recipe.CANDIDATES:
        params = bench_recipe.candidate_params(base, values)
        validate_params(params, name)
        assert {k: params["train"][k] for k in values} == values
        trains.append(params["train"])
    assert all(a != b for i, a in enumerate(trains) for b in trains[i + 1:])
    # the candidate the table calls the default is params.yaml's training, value for value
    [default] = [t for (name, _), t in zip(bench_recipe.CANDIDATES, trains)
                 if name.endswith("(the default)")]
    assert default == base["train"]
    smoke = bench_recipe.candidate_params(base, bench_recipe.CANDIDATES[0][1], 0.05)
    assert (smoke["train"]["epochs"], smoke["train"]["image_size"]) == (1, 64)


def test_recipe_benchmark_swaps_the_splits_and_tabulates_what_was_measured(tmp_path):
    from benchmarks import bench_recipe

    raw, masks = tmp_path / "raw", tmp_path / "masks"
    for split in ("train", "val"):
        (raw / "images" / split).mkdir(parents=True)
        (raw / "images" / split / f"{split}.jpg").write_text(split)
        (masks / split).mkdir(parents=True)
        (masks / split / f"{split}.png").write_text(split)
        (raw / "annotations").mkdir(exist_ok=True)
        (raw / "annotations" / f"instances_{split}.json").write_text(split)
    new_raw, new_masks = bench_recipe.swapped(raw, masks, tmp_path / "swap")
    assert (new_raw / "annotations" / "instances_train.json").read_text() == "val"
    assert (new_raw / "annotations" / "instances_val.json").read_text() == "train"
    assert (new_raw / "images" / "train" / "val.jpg").read_text() == "val"
    assert (new_masks / "val" / "train.png").read_text() == "train"
    result = {"iou": {"background": 0.9, "person": 0.1564, "car": None}, "miou": 0.5,
              "iqr": {"background": 0.1, "person": 0.25, "car": float("nan")},
              "interval": {"background": [0.85, 0.95], "person": [0.08, 0.2049],
                           "car": [None, None]},
              "train_cpu_s": 100.4, "train_wall_s": 120.6}
    rows = bench_recipe.table({(1, "person_car", "held-out", 0): result}, ["person_car"])
    assert rows == [{"recipe": bench_recipe.CANDIDATES[1][0], "scheme": "person_car",
                     "trained on / scored on": "val / train (held-out)", "seed": 0,
                     "person IoU": "0.156", "person 95% interval": "[0.080, 0.205]",
                     "person per-image IQR": "0.250",
                     "car / vehicle IoU": "n/a", "car / vehicle 95% interval": "n/a",
                     "car / vehicle per-image IQR": "n/a",
                     "mIoU": "0.500", "train CPU s": 100, "train wall s (1 thread)": 121}]
