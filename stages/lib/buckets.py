"""Metadata against loss: bins of one numeric field, their loss statistics, and the test
that flags a bucket whose loss stands out (the study's "~80% car pixels" bucket).

Each bucket of at least `min_count` samples is tested against the other samples: a one-sided
Mann-Whitney U test (scipy.stats.mannwhitneyu) that its losses tend to be higher. Rank-based,
so a few huge losses do not decide it and its p-value is exact when losses are exchangeable
(no effect). Hundreds of buckets are tested at once (every field, every binning), so the
flag is on the Benjamini-Hochberg q-value over all of them (flag_by_fdr), not on the single
test: a bucket is flagged when its q-value is at most the false discovery rate asked for.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

BINNINGS = ("equal_width", "equal_count")


def is_two_valued(values: pd.Series) -> bool:
    return pd.api.types.is_bool_dtype(values) or set(values.dropna().unique()) <= {0, 1}


def bin_edges(values: pd.Series, n_bins: int, binning: str) -> np.ndarray:
    """Non-decreasing edges; a boolean or 0/1 field always gets the two bins [0, .5), [.5, 1].
    Equal-count edges are quantiles with repeats dropped; when a tie at the minimum swallows
    bins, the minimum gets its own bin and the rest are equal-count over the other values."""
    v = values.astype(float).dropna().to_numpy()
    if is_two_valued(values):
        return np.array([0.0, 0.5, 1.0])
    if binning == "equal_width":
        return np.histogram_bin_edges(v, bins=n_bins)
    if binning == "equal_count":
        edges = np.unique(np.quantile(v, np.linspace(0, 1, n_bins + 1)))
        low, rest = v.min(), v[v > v.min()]
        if len(edges) - 1 < n_bins and len(rest):
            # A heavy tie at the minimum (most images show no car): that value gets a bin of
            # its own and the other values share the remaining bins equally. A single
            # remaining value gets the closed bin [x, x].
            inner = np.unique(np.quantile(rest, np.linspace(0, 1, n_bins)))
            edges = np.concatenate([[low], inner, inner[-1:] if len(inner) == 1 else []])
        return edges if len(edges) >= 2 else np.array([v.min(), v.max() + 1.0])
    raise ValueError(f"unknown binning {binning!r} (known: {', '.join(BINNINGS)})")


def assign(values: pd.Series | np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin index per value: [edge_i, edge_i+1), the last bin closed; -1 for NaN."""
    v = np.asarray(values, dtype=float)
    index = np.clip(np.searchsorted(edges[1:-1], v, side="right"), 0, len(edges) - 2)
    return np.where(np.isnan(v), -1, index)


def bucket_table(samples: pd.DataFrame, field: str, n_bins: int, binning: str,
                 min_count: int) -> tuple[pd.DataFrame, np.ndarray]:
    """Per bin: range, count, loss mean/std/standard error, mean IoU per class, how many
    standard errors its mean loss lies above the overall mean, and the p-value of its test
    (NaN for a bin under min_count). Also returns each sample's bin (for listing the samples
    of flagged bins). The flag needs every bin's p-value: flag_by_fdr."""
    edges = bin_edges(samples[field], n_bins, binning)
    index = assign(samples[field], edges)
    loss = samples["loss"].astype(float)
    overall = loss.mean()
    iou_cols = [c for c in samples.columns if c.startswith("iou_")]
    rows = []
    for b in range(len(edges) - 1):
        members = samples[index == b]
        losses = members["loss"].astype(float).dropna()
        n = len(members)
        std = float(losses.std(ddof=1)) if len(losses) >= 2 else np.nan
        se = std / np.sqrt(len(losses)) if len(losses) >= 2 else np.nan
        mean = float(losses.mean()) if len(losses) else np.nan
        excess = (mean - overall) / se if se and np.isfinite(se) and se > 0 else np.nan
        row = {"binning": binning, "field": field, "bin": b, "low": float(edges[b]),
               "high": float(edges[b + 1]), "count": n, "mean_loss": mean, "std_loss": std,
               "se_loss": se, "overall_mean_loss": float(overall), "excess_se": excess,
               "p_value": higher_p_value(losses, loss[(index != b)].dropna(), min_count)}
        row.update({f"mean_{c}": members[c].mean() if n else np.nan for c in iou_cols})
        rows.append(row)
    return pd.DataFrame(rows), index


def higher_p_value(group: pd.Series, rest: pd.Series, min_count: int) -> float:
    """One-sided p-value that the group's losses are higher than the rest's; NaN when the
    group is under min_count or there is no rest to compare with."""
    if len(group) < min_count or len(rest) == 0:
        return np.nan
    return float(stats.mannwhitneyu(group, rest, alternative="greater").pvalue)


def flag_by_fdr(p_values: pd.Series, fdr: float) -> tuple[pd.Series, pd.Series]:
    """(q_value, flagged) for a table's groups: Benjamini-Hochberg over every group with a
    p-value (scipy.stats.false_discovery_control), flagged where q <= fdr; untested groups
    (NaN p) get NaN and are never flagged."""
    q = pd.Series(np.nan, index=p_values.index)
    tested = p_values.notna()
    if tested.any():
        q[tested] = stats.false_discovery_control(p_values[tested].to_numpy(float), method="bh")
    return q, tested & (q <= fdr)
