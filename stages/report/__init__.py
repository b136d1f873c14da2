"""report: one self-contained HTML page comparing the label schemes side by side.
Reads, for every scheme in params.yaml, the metrics and confusion matrix (evaluate),
train.json and the training curves (train), timing and predicted masks (infer), the sample,
cluster, neighbour, bin-member, heat-map, label-issue and metadata-vs-loss tables and the
ranked findings, insights.json, duplicates.csv and leak_free_metrics.json (analyze), the
scheme differences and the findings that differ between schemes (compare), the ground truth
(masks), the val images, the train images of the duplicate pairs shown and the manifest
(download), and, under Snakemake, its benchmark files of the upstream jobs (the
stage times). Every file it reads is a declared input in both engines. Writes --out: every
figure and thumbnail is inlined and the interactive parts (population maps, similars,
histograms, the samples table) run from one JSON blob with inlined vanilla JavaScript, so
the page needs no network.

The package: inputs (read and check the files), tables, findings and explorer (what the
page shows, computed from what was read), provenance, render (figures, thumbnails, the
template).
"""
from __future__ import annotations

import logging
from pathlib import Path

from stages.lib.cli import run_main, stage_parser
from stages.lib.io import atomic_path
from stages.lib.params import load_params, select
from stages.report.explorer import (
    CATEGORY_COLOURS,
    colour_ramp,
    explorer_data,
    explorer_fields,
    thumbnail_stems,
)
from stages.report.findings import (
    change_findings,
    duplicate_evidence,
    duplicate_images,
    evidence_words,
    insight_stems,
    scheme_findings,
)
from stages.report.inputs import (
    Scheme,
    load_scheme,
    read_cluster_changes,
    read_compare_insights,
    read_compare_summary,
    read_flagged_in,
    read_image_paths,
    read_insights,
)
from stages.report.provenance import (
    git_state,
    params_diff,
    porcelain_paths,
    read_stage_times,
    record,
    sha256_file,
)
from stages.report.render import (
    app_script,
    build_context,
    environment,
    examples,
    format_number,
    format_signed,
    heatmap_sources,
    issue_gallery,
    json_script,
    legend_swatches,
    pair_thumbnails,
    photo_thumbnail,
    render,
    sample_thumbnails,
)
from stages.report.tables import (
    SUMMARY_METRICS,
    category_rows,
    choose_examples,
    cluster_cards,
    comparison_table,
    example_candidates,
    informative_fields,
    study_sentence,
    training_caveats,
    verdict,
    verdicts,
    weak_classes,
    weak_warning,
)

# What the tests and other tools reach as report.X (the modules hold them).
__all__ = ["CATEGORY_COLOURS", "PARAMS", "SUMMARY_METRICS", "Scheme",
           "app_script", "build_context", "change_findings", "choose_examples", "colour_ramp",
           "comparison_table", "duplicate_evidence", "environment", "evidence_words",
           "example_candidates",
           "explorer_data", "explorer_fields", "format_number", "format_signed", "git_state",
           "informative_fields", "insight_stems", "json_script", "legend_swatches",
           "load_scheme", "main", "params_diff", "photo_thumbnail",
           "porcelain_paths", "read_compare_insights", "read_insights", "read_stage_times",
           "render", "run", "scheme_findings", "sha256_file",
           "thumbnail_stems", "training_caveats", "verdict", "verdicts", "category_rows",
           "study_sentence", "weak_classes", "weak_warning"]

log = logging.getLogger("report")

# The params this stage reads: run() sees only these (stages.lib.params.select), and dvc.yaml's
# and the rule's `params:` list the same keys. Every section: the provenance section prints the
# whole params file and its diff against HEAD, so every value is read.
PARAMS = ("data", "schemes", "masks", "model", "train", "infer", "evaluate", "analyze", "compare",
          "report")


def run(params: dict, raw: Path, masks: Path, models: Path, predictions: Path, metrics: Path,
        analysis: Path, out: Path, compare: Path | None = None,
        benchmarks: list[Path] | None = None, engine_paths: list[Path] = ()) -> Path:
    params = select(params, PARAMS)
    cfg = params["report"]
    schemes = [load_scheme(params, name, models, predictions, metrics, analysis)
               for name in params["schemes"]]
    summary, flagged_in = read_compare_summary(compare), read_flagged_in(compare, schemes)
    issues = [row for s in schemes
              for row in issue_gallery(analysis / s.name, s, flagged_in, 4 * cfg["thumbnail_px"])]
    changes = read_cluster_changes(compare)
    cards = {s.name: cluster_cards(s, changes, heatmap_sources(analysis / s.name, s,
                                                               cfg["thumbnail_px"]))
             for s in schemes}
    changed = read_compare_insights(compare, schemes)
    # Label issues, then the Insights section's thumbnails, then the cluster representatives:
    # the images the page shows as pictures get theirs first (report.max_thumbnails).
    shown = [i["stem"] for i in issues] + insight_stems(schemes, changed,
                                                        cfg["insight_thumbnails"])
    shown += [r["stem"] for cs in cards.values() for c in cs for r in c["representatives"]]
    thumbs = sample_thumbnails(raw, schemes, thumbnail_stems(schemes, shown, cfg["max_thumbnails"]),
                               cfg["sample_thumbnail_px"])
    only_in = {stem: found[0] for stem, found in flagged_in.items() if len(found) == 1}
    # Both images of each duplicate pair shown, train ones too (found through the manifest).
    pairs = duplicate_images([duplicate_evidence(s, cfg["duplicate_pairs"], 0) for s in schemes])
    pair_thumbs = pair_thumbnails(raw, pairs, read_image_paths(raw) if pairs else {},
                                  cfg["sample_thumbnail_px"])
    # What the pipeline and the engines write is not a user's edit (git_state).
    own = [raw, masks, models, predictions, metrics, analysis, compare, out, *engine_paths,
           *(benchmarks or [])]
    context = build_context(
        params, schemes, record(params, raw, schemes, benchmarks, own),
        examples(schemes, raw, masks, predictions, cfg["n_examples"], cfg["thumbnail_px"]),
        issues, summary, thumbs, cards, only_in, changed, pair_thumbs)
    html = render(context)
    with atomic_path(out) as tmp:
        tmp.write_text(html, encoding="utf-8")
    log.info("%s: %d schemes, %d val images, %d thumbnails inlined (report.max_thumbnails %d), "
             "%d examples, %.1f MB", out, len(schemes), context["n_images"], len(thumbs),
             cfg["max_thumbnails"], len(context["examples"]), len(html.encode()) / 1e6)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("report", __doc__)
    parser.add_argument("--raw", required=True, type=Path, help="folder written by download")
    parser.add_argument("--masks", required=True, type=Path, help="folder of masks/{scheme}")
    parser.add_argument("--models", required=True, type=Path,
                        help="folder of models/{scheme}/seed<N> (train.json of the first seed)")
    parser.add_argument("--predictions", required=True, type=Path,
                        help="folder of predictions/{scheme}/seed<N>")
    parser.add_argument("--metrics", required=True, type=Path,
                        help="folder of {scheme}.json and {scheme}.confusion.csv")
    parser.add_argument("--analysis", required=True, type=Path, help="folder of analysis/{scheme}")
    parser.add_argument("--compare", type=Path, help="folder written by compare")
    parser.add_argument("--benchmarks", nargs="*", type=Path,
                        help="Snakemake's benchmark files of the upstream jobs "
                             "(<stage>[/<scheme>].tsv): the stage times; DVC has none")
    parser.add_argument("--engine-paths", nargs="*", type=Path, default=[],
                        help="files the engines write on every run (dvc.lock, logs/): never "
                             "read, and not counted as uncommitted changes")
    parser.add_argument("--out", required=True, type=Path, help="HTML file to write")
    args = parser.parse_args(argv)
    return run_main("report", lambda: run(load_params(args.params), args.raw, args.masks,
                                          args.models, args.predictions, args.metrics,
                                          args.analysis, args.out, args.compare,
                                          args.benchmarks, args.engine_paths),
                    outputs=(args.out,))
