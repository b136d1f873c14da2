"""Metadata against loss: bins of one numeric field, their loss statistics, and the test
that flags a bucket whose loss stands out (the study's "~80% car pixels" bucket).

A bucket is flagged when it holds at least `min_count` samples and its mean loss exceeds
the mean loss of all samples by more than `z` times its own standard error (the sample
standard deviation of its losses over the square root of its count): a one-sample test of
"this bucket is harder than the data set", with `z` ~ 2 for about 95% one-sided.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

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
                 z: float, min_count: int) -> tuple[pd.DataFrame, np.ndarray]:
    """Per bin: range, count, loss mean/std/standard error, mean IoU per class, how many
    standard errors its mean loss lies above the overall mean, and the flag. Also returns
    each sample's bin (for listing the samples of flagged bins)."""
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
        flagged = bool(n >= min_count and np.isfinite(mean) and np.isfinite(se)
                       and mean > overall + z * se)
        row = {"binning": binning, "field": field, "bin": b, "low": float(edges[b]),
               "high": float(edges[b + 1]), "count": n, "mean_loss": mean, "std_loss": std,
               "se_loss": se, "overall_mean_loss": float(overall), "excess_se": excess,
               "flagged": flagged}
        row.update({f"mean_{c}": members[c].mean() if n else np.nan for c in iou_cols})
        rows.append(row)
    return pd.DataFrame(rows), index
