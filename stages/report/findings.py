"""The Insights section: analyze's ranked findings per scheme (analysis/<scheme>/insights.json)
and compare's findings that differ between the schemes (compare/insights.json), as the page
shows them. Pure: the records are shown in their file's order (the stages rank them), with
their own title and numbers; nothing is recomputed here.
"""
from __future__ import annotations

from stages.report.inputs import Scheme
from stages.report.tables import finite, named, weak_warning

TYPE_WORDS = {"low_performance": "low-performance cluster",
              "under_represented": "under-represented cluster",
              "out_of_distribution": "out of distribution", "duplicate": "duplicates",
              "leak": "leak between train and val", "weak_segment": "weak segment",
              "label_issue": "suspected label issue", "scheme_change": "differs between schemes"}
NONE_SURVIVES = ("No finding survives under {scheme}: analyze reported no low-performance or "
                 "under-represented cluster, weak segment, out-of-distribution image, "
                 "duplicate, leak or suspected label issue.")


def _signed(value: float) -> str:
    """As render.format_signed (which imports this module): never -0.000."""
    return f"{0.0:.3f}" if round(value, 3) == 0 else f"{value:+.3f}"


def evidence_words(record: dict, confidence: float) -> str:
    """The record's count, effect with its interval, and q-value, in words:
    '3 images · loss effect +0.015 (95% interval -0.019 to +0.038) · q = 0.02'."""
    size = record["size"]
    parts = [f"{size} image{'' if size == 1 else 's'}"]
    effect, interval = finite(record["effect"]), record["interval"]
    if effect is None:
        parts.append("no loss effect (none applies to this finding)")
    elif interval is None:
        parts.append(f"loss effect {_signed(effect)} (no interval: a side has fewer than 2 "
                     "losses)")
    else:
        parts.append(f"loss effect {_signed(effect)} ({confidence:.0%} interval "
                     f"{_signed(interval[0])} to {_signed(interval[1])})")
    q = finite(record["q_value"])
    parts.append("no q-value (not a test)" if q is None else f"q = {q:.2g}")
    return " · ".join(parts)


def not_learned(record: dict, evidence: dict, weak: list[str]) -> list[str]:
    """The classes the model has not learned that a label-issue or weak-segment finding is
    about: those its disagreement names, or whose fields (`car_fraction`...) its segment's
    conditions use. Such a finding describes the model's failure, not the labels or the data
    (issue 15, item 5). `evidence`: the finding's own (a scheme_change's is the one it
    repeats)."""
    kind = record["type"]
    if kind == "scheme_change":
        kind = record["evidence"].get("finding_type")
    if kind == "label_issue":
        return named(weak, str(evidence.get("main_disagreement") or ""))
    if kind == "weak_segment":
        fields = [str(c.get("field", "")) for c in evidence.get("conditions") or []]
        return [c for c in weak if any(f.startswith(f"{c}_") for f in fields)]
    return []


def _original(change: dict, records: list[dict]) -> dict:
    """The evidence of the finding a scheme_change record repeats (same type, same images),
    from its scheme's insights.json; {} when none matches."""
    for r in records:
        if r["type"] == change["evidence"].get("finding_type") and \
                r["image_ids"] == change["image_ids"]:
            return r["evidence"]
    return {}


def stems_by_id(scheme: Scheme) -> dict[int, str]:
    return dict(zip(scheme.samples["image_id"].astype(int), scheme.samples["stem"]))


def finding(record: dict, scheme: Scheme, stem_of: dict[int, str], weak: list[str],
            confidence: float, thumbnails: int, evidence: dict | None = None) -> dict:
    """One finding as the page shows it. `ids`: its images that are val images of the scheme
    (the samples table's rows, what its link filters to; `stem_of` maps them); `outside`: how
    many are not (the train side of duplicates); `stems`: the first `thumbnails` of them."""
    ids = [i for i in record["image_ids"] if i in stem_of]
    classes = not_learned(record, record["evidence"] if evidence is None else evidence, weak)
    return {"type": record["type"], "words": TYPE_WORDS[record["type"]],
            "title": record["title"], "evidence": evidence_words(record, confidence),
            "scheme": scheme.name, "size": record["size"], "ids": ids,
            "outside": record["size"] - len(ids),
            "stems": [stem_of[i] for i in ids[:thumbnails]],
            "not_learned": classes,
            "warnings": [weak_warning(c) for c in classes],
            "finding_words": "", "other": None,
            "source": "compare" if record["type"] == "scheme_change" else "analyze"}


def scheme_findings(scheme: Scheme, weak: list[str], confidence: float,
                    thumbnails: int) -> dict:
    """A scheme's findings in their file's order (its ranking), or the sentence that none
    survives."""
    stem_of = stems_by_id(scheme)
    return {"scheme": scheme.name,
            "findings": [finding(r, scheme, stem_of, weak, confidence, thumbnails)
                         for r in scheme.insights],
            "none": NONE_SURVIVES.format(scheme=scheme.name) if not scheme.insights else None}


def change_findings(records: list[dict] | None, schemes: list[Scheme],
                    weak: dict[str, list[str]], confidence: float, thumbnails: int,
                    min_jaccard: float) -> dict:
    """compare's scheme_change records in their file's order, each shown under the scheme
    whose finding it is, and what to say when there are none."""
    if len(schemes) < 2:
        return {"findings": [], "none": "One scheme: no finding can differ between schemes."}
    if records is None:
        return {"findings": [], "none": "No comparison between schemes: the compare stage's "
                                        "output was not given."}
    by_name = {s.name: s for s in schemes}
    stem_of = {s.name: stems_by_id(s) for s in schemes}
    shown = []
    for r in records:
        s = by_name[r["evidence"]["scheme"]]
        shown.append({**finding(r, s, stem_of[s.name], weak[s.name], confidence, thumbnails,
                                _original(r, s.insights)),
                      "other": r["evidence"].get("other"),
                      "finding_words": TYPE_WORDS.get(r["evidence"].get("finding_type"), "")})
    none = None
    if not shown and any(s.insights for s in schemes):
        none = ("No finding differs between the schemes: each finding of a scheme has one of "
                f"the same type under every other scheme sharing at least {min_jaccard:.0%} of "
                "its images.")
    elif not shown:
        none = "No finding differs between the schemes: no scheme has any."
    return {"findings": shown, "none": none}


def insight_stems(schemes: list[Scheme], changes: list[dict] | None, thumbnails: int) -> list[str]:
    """The val images the Insights section shows as thumbnails, in the page's order (each
    scheme's findings, then the scheme changes): they go first among the inlined ones."""
    stem_of = {s.name: stems_by_id(s) for s in schemes}
    listed = [(s.name, r) for s in schemes for r in s.insights]
    listed += [(r["evidence"]["scheme"], r) for r in changes or []]
    stems = []
    for name, r in listed:
        stems += [stem_of[name][i] for i in r["image_ids"] if i in stem_of[name]][:thumbnails]
    return list(dict.fromkeys(stems))
