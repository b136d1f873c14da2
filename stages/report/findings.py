"""The Insights section: analyze's ranked findings per scheme (analysis/<scheme>/insights.json)
and compare's findings that differ between the schemes (compare/insights.json), as the page
shows them. Pure: the records are shown in their file's order (the stages rank them), with
their own title and numbers; nothing is recomputed here.
"""
from __future__ import annotations

from stages.report.inputs import SPLIT_PAIRS, SUMMARY_METRICS, Scheme
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


# ---------------------------------------------------------------- duplicates and leakage

# duplicates.csv's kinds, strongest first, in words
PAIR_KINDS = {"exact_bytes": "same bytes", "exact_pixels": "same pixels",
              "near_hash": "near by perceptual hash", "near_latent": "near in the latent space"}


def _pair_distance(kind: str, distance: float) -> str:
    if kind == "near_hash":
        bits = int(round(distance))
        return f"hashes {bits} bit{'' if bits == 1 else 's'} apart"
    if kind == "near_latent":
        return f"cosine distance {distance:.3g}"
    return "identical"


def _leak_rows(metrics: dict, leak_free: dict, class_names: list[str]) -> list[dict]:
    """metrics/S.json and leak_free_metrics.json side by side: the headline scores, then
    each class's IoU, each with its interval where the file has one."""
    def cell(doc: dict, key: str, cls: str | None = None) -> dict:
        interval = doc.get("interval") or {}
        if cls is None:
            value, bounds = doc.get(key), interval.get(key)
        else:
            value, bounds = (doc.get("iou") or {}).get(cls), (interval.get("iou") or {}).get(cls)
        bounds = [finite(b) for b in bounds] if isinstance(bounds, list) else [None, None]
        return {"value": finite(value), "interval": None if None in bounds else bounds}
    rows = [{"label": label, "all": cell(metrics, key), "free": cell(leak_free, key)}
            for key, label in SUMMARY_METRICS]
    rows += [{"label": f"IoU {c}", "all": cell(metrics, "iou", c),
              "free": cell(leak_free, "iou", c)} for c in class_names]
    return rows


def duplicate_evidence(scheme: Scheme, shown: int, hash_radius: int) -> dict | None:
    """The duplicates and leakage of a scheme as analyze found them (duplicates.csv,
    insights.json's leak record, leak_free_metrics.json): the pairs counted by kind and
    split, the first `shown` pairs (the leaking ones first, each part in the file's order)
    and how many more the file holds, and either the metrics with and without the leaked
    val images or the sentence that no val image has a train copy. None when the scheme was
    built without analyze's duplicates.csv."""
    pairs = scheme.duplicates
    if pairs is None:
        return None
    split = (pairs["split_a"].astype(str) + "-" + pairs["split_b"].astype(str)).to_numpy()
    counts = [{"kind": k, "words": w,
               "cells": [scheme.duplicate_counts[k][s] for s in SPLIT_PAIRS]}
              for k, w in PAIR_KINDS.items()]
    leak = next((r for r in scheme.insights if r["type"] == "leak"), None)
    leaking = {(int(p["image_id_a"]), int(p["image_id_b"]))
               for p in (leak["evidence"].get("pairs") or [] if leak else [])}
    listed = []
    for i, r in enumerate(pairs.itertuples(index=False)):
        a, b = int(r.image_id_a), int(r.image_id_b)
        listed.append({"a": {"split": str(r.split_a), "id": a},
                       "b": {"split": str(r.split_b), "id": b},
                       "kind": str(r.kind), "words": PAIR_KINDS.get(str(r.kind), str(r.kind)),
                       "distance": _pair_distance(str(r.kind), float(r.distance)),
                       "split": split[i], "leak": split[i] == "train-val" and (a, b) in leaking})
    listed.sort(key=lambda p: not p["leak"])   # stable: the file's order within each part
    latent_across = sum(c["cells"][2] for c in counts if c["kind"] == "near_latent")
    result = {"scheme": scheme.name, "total": len(listed), "counts": counts,
              "splits": list(SPLIT_PAIRS), "pairs": listed[:shown],
              "more": max(0, len(listed) - shown), "leak": None, "no_leak": None}
    if scheme.leak_free is not None:
        free = scheme.leak_free
        result["leak"] = {"excluded": len(free["excluded_image_ids"]),
                          "all_images": scheme.metrics["images"], "free_images": free["images"],
                          "rows": _leak_rows(scheme.metrics, free, scheme.class_names)}
    else:
        result["no_leak"] = (
            f"No val image of {scheme.name} has a copy among the training images: analyze "
            "found no train-val pair of the same bytes, the same decoded pixels or perceptual "
            f"hashes at most {hash_radius} bits apart, so its metrics need no recount without "
            "leaked images.")
        if latent_across:
            result["no_leak"] += (
                f" The {latent_across} train-val pair{'' if latent_across == 1 else 's'} near "
                "only in the latent space (below) "
                f"{'is' if latent_across == 1 else 'are'} not counted as leaks: distinct "
                "photographs come that near too.")
    return result


def duplicate_images(evidence: list[dict | None]) -> list[tuple[str, int]]:
    """(split, image id) of both images of every pair the page shows, in its order, once."""
    return list(dict.fromkeys((side["split"], side["id"]) for e in evidence if e
                              for p in e["pairs"] for side in (p["a"], p["b"])))
