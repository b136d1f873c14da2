"""A paired percentile bootstrap over val images, on per-image counts.

Every score segflow reports (IoU, pixel accuracy, a category's predicted shares) is a ratio
of sums over images, so a resample is a weighted sum: the weights are how often each image
was drawn, and one matrix product per batch of resamples scores all of them, with no pass
over the label maps. Several arrays resampled with the same weights (two schemes' matrices
of the same images) give paired differences: image difficulty, shared by both schemes,
cancels, and the interval of a difference is narrower than two separate intervals suggest.

Written by hand because scipy.stats.bootstrap resamples by materialising every resample of
the data (n_resamples x N x K x K here) or calls the statistic per resample; this needs
neither and keeps memory flat in both N and the number of resamples (batches of at most
BATCH_CELLS weights). The one unpaired interval, a group's mean loss against the rest's
(mean_difference_interval: clusters, segments, findings), holds one value per image, and
there scipy.stats.bootstrap, batched, is all it takes.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy import stats

from stages.lib.metrics import per_class_iou

BATCH_CELLS = 4_000_000   # weights held at once: 32 MB of int64, whatever N and samples
# Per-image counts converted to float64 at once, for the products: 8 MB, whatever N (a
# float64 copy of the whole (N, ...) array would grow with the val set).
CHUNK_CELLS = 1_000_000
METHOD = "percentile bootstrap over val images, paired across schemes"


@dataclass(frozen=True)
class Settings:
    samples: int = 1000
    confidence: float = 0.95
    seed: int = 0

    @classmethod
    def from_params(cls, section: dict) -> "Settings":
        return cls(section["samples"], section["confidence"], section["seed"])


def resample_weights(rng: np.random.Generator, n: int, batch: int) -> np.ndarray:
    """(batch, n) int64: how many times each of n images is drawn, n draws with
    replacement per resample."""
    drawn = rng.integers(0, n, size=(batch, n))
    offsets = (np.arange(batch) * n)[:, None]
    return np.bincount((drawn + offsets).ravel(), minlength=batch * n).reshape(batch, n)


def resampled_sums(arrays: list[np.ndarray], settings: Settings) -> list[np.ndarray]:
    """For each (N, ...) array, its sum over the images of every resample:
    (settings.samples, ...). All arrays share the resamples (paired)."""
    n = len(arrays[0])
    if n == 0 or any(len(a) != n for a in arrays):
        raise ValueError(f"arrays of {[len(a) for a in arrays]} images; need the same, > 0")
    flat = [a.reshape(n, -1) for a in arrays]
    out = [np.zeros((settings.samples, f.shape[1])) for f in flat]
    rng = np.random.default_rng(settings.seed)
    batch = max(1, min(settings.samples, BATCH_CELLS // n))
    for start in range(0, settings.samples, batch):
        stop = min(start + batch, settings.samples)
        weights = resample_weights(rng, n, stop - start).astype(np.float64)
        for f, o in zip(flat, out):
            chunk = max(1, CHUNK_CELLS // max(1, f.shape[1]))
            for first in range(0, n, chunk):
                part = slice(first, first + chunk)
                o[start:stop] += weights[:, part] @ f[part].astype(np.float64)
    return [o.reshape((settings.samples, *a.shape[1:])) for o, a in zip(out, arrays)]


def interval(values: np.ndarray, confidence: float) -> list[float | None]:
    """The percentile interval of resampled values (NaN resamples, where the score is
    undefined, left out); [None, None] when fewer than half are defined."""
    values = np.asarray(values, float)
    defined = values[np.isfinite(values)]
    if len(defined) < max(1, len(values) / 2):
        return [None, None]
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(defined, [tail, 100 - tail])
    return [float(lo), float(hi)]


def verdict(bounds: list[float | None]) -> str:
    """'higher' / 'lower' only when the interval of b - a excludes zero."""
    lo, hi = bounds
    if lo is not None and lo > 0:
        return "higher"
    if hi is not None and hi < 0:
        return "lower"
    return "no detectable difference"


def confusion_scores(cms: np.ndarray, ignored: np.ndarray) -> dict[str, np.ndarray]:
    """The scores evaluate reports, for a stack of confusion matrices (B, K, K) and their
    ignore counts (B,): as metrics.scores computes them for one."""
    iou = per_class_iou(cms)
    tp = np.diagonal(cms, axis1=-2, axis2=-1).sum(-1)
    total = cms.sum((-2, -1))
    with warnings.catch_warnings():   # a resample with no class present: NaN, as scores()
        warnings.simplefilter("ignore", RuntimeWarning)
        miou = np.nanmean(iou, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"iou": iou, "miou": miou,
                "pixel_accuracy": np.where(total > 0, tp / np.maximum(total, 1), np.nan),
                "pixel_accuracy_with_ignore": np.where(
                    total + ignored > 0, tp / np.maximum(total + ignored, 1), np.nan)}


def scheme_interval(confusion: np.ndarray, ignored: np.ndarray, class_names: list[str],
                    settings: Settings) -> dict:
    """metrics/<scheme>.json's "interval" from the per-image matrices (N, K, K)."""
    cms, ign = resampled_sums([confusion, ignored], settings)
    scored = confusion_scores(cms, ign)
    return {"confidence": settings.confidence, "method": METHOD, "samples": settings.samples,
            "seed": settings.seed,
            **{key: interval(scored[key], settings.confidence)
               for key in ("miou", "pixel_accuracy", "pixel_accuracy_with_ignore")},
            "iou": {name: interval(scored["iou"][:, k], settings.confidence)
                    for k, name in enumerate(class_names)}}


HEADLINE = ("miou", "pixel_accuracy", "pixel_accuracy_with_ignore")


def seed_summary(per_seed: np.ndarray, draws: np.ndarray, confidence: float) -> dict:
    """One score over the seeds: each seed's value (null where undefined), their mean, min
    and max, and the interval of the mean from its resampled values (B, S)."""
    with warnings.catch_warnings():   # a score no seed defines: NaN mean, null
        warnings.simplefilter("ignore", RuntimeWarning)
        mean, lo, hi = np.nanmean(per_seed), np.nanmin(per_seed), np.nanmax(per_seed)
        mean_draws = np.nanmean(draws, axis=1)
    number = lambda v: float(v) if np.isfinite(v) else None  # noqa: E731
    return {"per_seed": [number(v) for v in per_seed], "mean": number(mean),
            "min": number(lo), "max": number(hi),
            "interval": interval(mean_draws, confidence)}


def seeds_block(confusion: np.ndarray, ignored: np.ndarray, class_names: list[str],
                seeds: list[int], settings: Settings) -> dict:
    """metrics/<scheme>.json's "seeds": the headline scores and each class's IoU per training
    seed, from the per-image matrices of every seed (N, S, K, K); the interval is of the
    mean over seeds, every seed scored on the same resampled images."""
    point = confusion_scores(confusion.sum(0), np.broadcast_to(ignored.sum(), len(seeds)))
    cms, ign = resampled_sums([confusion, ignored], settings)
    draws = confusion_scores(cms, np.repeat(ign[:, None], len(seeds), axis=1))
    block = {"seeds": [int(s) for s in seeds]}
    for key in HEADLINE:
        block[key] = seed_summary(point[key], draws[key], settings.confidence)
    block["iou"] = {name: seed_summary(point["iou"][:, k], draws["iou"][:, :, k],
                                       settings.confidence)
                    for k, name in enumerate(class_names)}
    return block


def above_zero(interval: list[float] | None) -> bool:
    """Whether an interval of a difference lies wholly above 0: what calling a group's loss
    "higher" needs (DESIGN.md, "Claims the report may make"). A rank test's q-value alone does
    not carry it: many slightly higher losses against a rest with a few large ones pass the
    rank test while the mean difference's interval holds 0. No interval, no claim."""
    return interval is not None and interval[0] > 0


def mean_difference_interval(inside: np.ndarray, outside: np.ndarray,
                             settings: Settings) -> list[float] | None:
    """Percentile interval of mean(inside) - mean(outside) for two disjoint groups of images
    (a cluster or segment and the rest): each group resampled on its own, since nothing pairs
    an image inside with one outside (scipy.stats.bootstrap, independent samples). Percentile,
    as every other interval of the report; BCa's jackknife fails on a group of tied losses.
    None when either group has fewer than 2 values (no spread to resample)."""
    inside = np.asarray(inside, float)
    outside = np.asarray(outside, float)
    if len(inside) < 2 or len(outside) < 2:
        return None
    result = stats.bootstrap(
        (inside, outside), lambda a, b, axis: a.mean(axis) - b.mean(axis), vectorized=True,
        n_resamples=settings.samples, confidence_level=settings.confidence, method="percentile",
        batch=max(1, BATCH_CELLS // (len(inside) + len(outside))),
        rng=np.random.default_rng(settings.seed))
    return [float(result.confidence_interval.low), float(result.confidence_interval.high)]
