"""Rendering: the Jinja environment and its number formats, the figures and thumbnails as
data: URIs, and the template's context (build_context) from what the other modules computed."""
from __future__ import annotations

import base64
import hashlib
import io
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined
from markupsafe import Markup
from matplotlib.colors import to_hex
from PIL import Image

from stages.lib.cli import StageError
from stages.lib.labels import IGNORE_INDEX, colourise, palette_colours, read_labels
from stages.lib.names import inside, seed_dir
from stages.lib.plots import fit_width
from stages.report.explorer import explorer_data, explorer_fields, image_table
from stages.report.findings import change_findings, duplicate_evidence, scheme_findings
from stages.report.inputs import Scheme, listed_file
from stages.report.provenance import NO_STAGE_TIMES
from stages.report.tables import (
    category_rows,
    charted_fields,
    choose_examples,
    cluster_agreement,
    cluster_cards,
    cluster_rows,
    comparison_table,
    example_candidates,
    finite,
    flag_rule,
    flagged_bins,
    loss_comparison,
    named,
    sample_scores,
    scheme_differences,
    seed_note,
    seed_spread,
    study_sentence,
    timing_rows,
    training_caveats,
    unshared,
    verdicts,
    weak_classes,
    weak_warning,
)

TEMPLATES = Path(__file__).resolve().parents[1] / "templates"




def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def legend_swatches(class_names: list[str]) -> list[dict]:
    palette = palette_colours()
    swatches = [{"name": c, "colour": to_hex(palette[i] / 255)} for i, c in enumerate(class_names)]
    swatches.append({"name": "ignore", "colour": to_hex(palette[IGNORE_INDEX] / 255)})
    return swatches


def encode(image: Image.Image, fmt: str) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    return data_uri(buffer.getvalue(), f"image/{fmt.lower()}")


def environment() -> Environment:
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = format_number
    env.filters["signed"] = format_signed
    env.filters["thousands"] = lambda v: "—" if v is None else f"{int(v):,}"
    env.filters["share"] = lambda v: "—" if finite(v) is None else f"{finite(v):.1%}"
    # tojson writes <, >, & and ' as \u003c... (the same JSON), so no text in the data can
    # end its <script> element or open a comment there; NaN is refused (JSON has none).
    env.policies["json.dumps_kwargs"] = {"sort_keys": False, "ensure_ascii": False,
                                         "allow_nan": False, "separators": (",", ":")}
    return env


def json_script(document: object) -> Markup:
    """The JSON text the page's <script type="application/json"> holds: the template's own
    tojson filter, with the environment's policies."""
    return Markup(environment().from_string("{{ document | tojson }}").render(document=document))


def format_number(value, digits: int = 3) -> str:
    value = finite(value)
    return "—" if value is None else f"{value:.{digits}f}"


def format_signed(value, digits: int = 3) -> str:
    """+0.012 / -0.012; a difference that rounds to zero prints unsigned, never as -0.000."""
    value = finite(value)
    if value is None:
        return "—"
    return f"{0.0:.{digits}f}" if round(value, digits) == 0 else f"{value:+.{digits}f}"


def render(context: dict) -> str:
    return environment().get_template("report.html.j2").render(**context)


APP_JS = TEMPLATES / "report.js"


PROVENANCE_DEFAULTS = {"params_base": None, "params_diff": [], "stage_times": None, "host": {}}


def app_script() -> tuple[Markup, str]:
    """The page's JavaScript and its CSP hash: the page's Content-Security-Policy lets only
    this exact script run, so even an injected <script> or onerror= would stay inert."""
    code = APP_JS.read_text(encoding="utf-8")
    if "</script" in code.lower() or "<!--" in code:
        raise StageError(f"{APP_JS}: must not contain </script or <!--")
    digest = base64.b64encode(hashlib.sha256(code.encode("utf-8")).digest()).decode("ascii")
    return Markup(code), f"sha256-{digest}"


def build_context(params: dict, schemes: list[Scheme], provenance: dict,
                  examples: list[dict], issues: list[dict] | None = None,
                  summary: dict | None = None, thumbs: dict[str, str] | None = None,
                  cards: dict[str, list[dict]] | None = None,
                  only_in: dict[str, str] | None = None,
                  compare_insights: list[dict] | None = None,
                  pair_thumbs: dict[tuple[str, int], str] | None = None) -> dict:
    """Everything the template shows, figures already encoded; `thumbs` (stem -> data URI)
    are the inlined sample thumbnails, `cards` the cluster cards per scheme (drawn without
    heat-maps or compare's changes when not given), `summary` compare's summary.json,
    `compare_insights` compare's insights.json (None without compare), `pair_thumbs`
    ((split, image id) -> data URI) the images of the duplicate pairs shown."""
    names = [s.name for s in schemes]
    weak = {s.name: weak_classes(s, params["report"]["min_class_iou"]) for s in schemes}
    found = params["analyze"]["insights"]
    confidence, per_finding = found["bootstrap"]["confidence"], params["report"][
        "insight_thumbnails"]
    charted = charted_fields(schemes)
    flagged = [{**f, "not_learned": [c for c in weak[s.name] if f["field"].startswith(f"{c}_")]}
               for s in schemes for f in flagged_bins(s, charted)]
    projection = params["analyze"]["projection"]
    code, script_hash = app_script()
    cards = cards or {s.name: cluster_cards(s, None, {}) for s in schemes}
    explorer = explorer_data(schemes, thumbs or {}, explorer_fields(schemes), charted, flagged,
                             only_in)
    return {
        "title": params["report"]["title"], "schemes": names,
        "insights": [scheme_findings(s, weak[s.name], confidence, per_finding) for s in schemes],
        "insight_changes": change_findings(compare_insights, schemes, weak, confidence,
                                           per_finding, params["compare"]["min_jaccard"]),
        "insights_shown": params["report"]["insights_shown"],
        "duplicates": [d for d in (duplicate_evidence(
            s, params["report"]["duplicate_pairs"],
            params["analyze"]["duplicates"]["hash_radius"]) for s in schemes) if d],
        "pair_thumbs": {f"{split}/{image_id}": src
                        for (split, image_id), src in (pair_thumbs or {}).items()},
        "ood_k": params["analyze"]["representation"]["k"],
        "provenance": {**PROVENANCE_DEFAULTS, **provenance},
        "comparison": comparison_table(schemes), "verdicts": verdicts(summary),
        "seed_note": seed_note(summary, schemes), "unshared": unshared(schemes),
        "seed_spread": seed_spread(schemes),
        "categories": category_rows(schemes, summary), "study": study_sentence(schemes),
        "weak": [{"scheme": s.name, "warnings": [weak_warning(c) for c in weak[s.name]]}
                 for s in schemes if weak[s.name]],
        # One scheme has nothing to subtract; with three or more, each delta names its pair.
        "delta_label": (f"Δ {names[1]} − {names[0]}" if len(names) == 2
                        else "Δ (the two schemes with the class)" if len(names) > 2 else ""),
        "confusion": [{"scheme": s.name, "src": data_uri(s.confusion_png)} for s in schemes],
        "curves": [{"scheme": s.name, "src": data_uri(s.curves_png)} for s in schemes],
        "timing": timing_rows(schemes),
        "population": [{"scheme": s.name, "index": i, "n": len(s.samples),
                        "clusters": cluster_rows(s), "cards": cards[s.name]}
                       for i, s in enumerate(schemes)],
        "agreement": cluster_agreement(summary), "projection": projection,
        "charted": charted, "flagged": flagged, "flag_rule": flag_rule(params),
        "binning": params["analyze"]["buckets"]["binning"][0].replace("_", "-"),
        "legends": [{"scheme": s.name, "swatches": legend_swatches(s.class_names)}
                    for s in schemes],
        "examples": examples, "thumbnail_px": params["report"]["thumbnail_px"],
        "caveats": training_caveats(params, provenance["data"]["images"].get("train")),
        "issues": [{"scheme": s.name, "rows": [{**i, "not_learned": named(weak[s.name], i["what"])}
                                               for i in issues or [] if i["scheme"] == s.name]}
                   for s in schemes],
        "differences": scheme_differences(summary),
        "n_thumbs": len(explorer["thumbs"]), "n_images": len(explorer["images"]["stem"]),
        "max_thumbnails": params["report"].get("max_thumbnails"),
        "data": explorer, "app_js": code, "script_hash": script_hash,
        "no_stage_times": NO_STAGE_TIMES,
    }


def examples(schemes: list[Scheme], raw: Path, masks: Path, predictions: Path,
             n: int, width: int) -> list[dict]:
    candidates = example_candidates(schemes)
    file_names = dict(zip(candidates["stem"], candidates["file_name"]))
    rows = []
    for stem, reason in choose_examples(candidates, n, compare=len(schemes) > 1):
        scores = [sample_scores(s, stem) for s in schemes]
        renders = [{"scheme": s.name, **score,
                    "gt": label_thumbnail(inside(masks, s.name, "val", f"{stem}.png",
                                                 resolve=False), width),
                    "pred": label_thumbnail(inside(predictions, s.name, seed_dir(s.seed), "val",
                                                   f"{stem}.png", resolve=False), width)}
                   for s, score in zip(schemes, scores)]
        rows.append({"stem": stem, "reason": reason, "schemes": renders,
                     "image": photo_thumbnail(inside(raw, "images", "val", file_names[stem],
                                                     resolve=False), width),
                     "comparison": loss_comparison([s.name for s in schemes], scores)})
    return rows


def pair_thumbnails(raw: Path, images: list[tuple[str, int]], paths: dict[tuple[str, int], str],
                    width: int) -> dict[tuple[str, int], str]:
    """(split, image id) -> the image's thumbnail, for the duplicate pairs the page shows (a
    train image is in no table of the report: its path comes from download's manifest)."""
    thumbs = {}
    for key in images:
        if key not in paths:
            raise StageError(f"{raw / 'manifest.json'}: no {key[0]} image {key[1]}, which "
                             "analyze's duplicates.csv names; re-run analyze")
        thumbs[key] = photo_thumbnail(inside(raw, paths[key], resolve=False), width)
    return thumbs


def sample_thumbnails(raw: Path, schemes: list[Scheme], stems: list[str],
                      width: int) -> dict[str, str]:
    """stem -> the val image's thumbnail as a data: URI."""
    files = dict(zip(*(image_table(schemes)[c] for c in ("stem", "file_name"))))
    return {stem: photo_thumbnail(inside(raw, "images", "val", files[stem], resolve=False), width)
            for stem in stems}


def photo_thumbnail(path: Path, width: int) -> str:
    try:
        with Image.open(path) as image:
            return encode(fit_width(image.convert("RGB"), width, enlarge=True), "JPEG")
    except FileNotFoundError:
        raise StageError(f"{path}: missing") from None
    except OSError as exc:
        raise StageError(f"{path}: not a readable image ({exc})") from None


def figure_src(path: Path, width: int) -> str:
    """A pre-drawn figure (label issue, heat-map), scaled down to `width` and stored as JPEG:
    a quarter of the PNG's bytes at no visible cost for photos with overlays."""
    try:
        with Image.open(path) as image:
            return encode(fit_width(image.convert("RGB"), width), "JPEG")
    except FileNotFoundError:
        raise StageError(f"{path}: missing") from None
    except OSError as exc:
        raise StageError(f"{path}: not a readable image ({exc})") from None


def label_thumbnail(path: Path, width: int) -> str:
    try:
        labels = read_labels(path)
    except FileNotFoundError:
        raise StageError(f"{path}: missing") from None
    except (OSError, ValueError) as exc:
        raise StageError(f"{path}: not a label map ({exc})") from None
    return encode(fit_width(Image.fromarray(colourise(labels)), width, nearest=True,
                            enlarge=True), "PNG")


def issue_gallery(folder: Path, scheme: Scheme, flagged_in: dict[str, list[str]],
                  width: int) -> list[dict]:
    """Every image analyze flagged as a label issue, worst first, with its pre-drawn figure
    (image | ground truth | prediction | disagreement) and in which schemes it is flagged."""
    table = scheme.label_issues
    path = folder / "label_issues.csv"
    rows = []
    for r in table[table["flagged"].astype(bool)].itertuples():
        figure = listed_file(folder, r.figure, path)
        if not figure.is_file():
            raise StageError(f"{figure}: missing (listed in {path})")
        stem = str(r.stem)
        schemes_flagging = flagged_in.get(stem, [scheme.name])
        rows.append({"scheme": scheme.name, "rank": int(r.rank), "stem": stem,
                     "score": finite(r.label_quality), "loss": finite(r.loss),
                     # an empty text reads back from the CSV as NaN
                     "what": str(r.main_disagreement)
                     if isinstance(r.main_disagreement, str) else "",
                     "only": schemes_flagging == [scheme.name] and bool(flagged_in),
                     "others": [s for s in schemes_flagging if s != scheme.name],
                     "src": figure_src(figure, width)})
    return rows


def heatmap_sources(folder: Path, scheme: Scheme, width: int) -> dict[str, str]:
    """'cluster/stem' -> the shared-feature heat-map analyze drew over that representative."""
    index = scheme.heatmaps
    shared = index[index["kind"] == "shared_features"]
    listing = folder / "heatmaps" / "index.csv"
    return {f"{int(r.cluster)}/{r.stem}": figure_src(listed_file(folder, r.file, listing), width)
            for r in shared.itertuples()}
