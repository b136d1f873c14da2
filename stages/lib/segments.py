"""Weak segments: combinations of metadata conditions under which the loss is higher
("is_grayscale and person_fraction > 0.4"), found by a shallow regression tree and kept only
when they hold out of sample (Deepchecks' weak segments, with a test).

The images are split at random in two halves. A DecisionTreeRegressor (max_depth,
min_samples_leaf) of the per-sample loss on the metadata is fitted on one half; its leaves
whose fitted mean loss is above that half's mean are the candidates (a leaf below it is a
strong segment, not a weak one). Each candidate is tested on the OTHER half only: a one-sided
Mann-Whitney U test (scipy.stats.mannwhitneyu, "greater") of its held-out members' losses
against the rest of the held-out half, so the tree's search over splits does not make the
test optimistic. Benjamini-Hochberg q-values (scipy.stats.false_discovery_control) over the
candidates tested; a segment is reported when q <= fdr with at least min_count held-out
members AND the bootstrap interval of its effect (mean loss inside minus outside) lies above
0: the finding states that difference, and a rank test can pass while its interval holds 0.
The effect and interval are on the held-out half too, for the same reason.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.tree import DecisionTreeRegressor

from stages.lib import bootstrap


@dataclass(frozen=True)
class Condition:
    """One field's range on a tree path: above < value <= at_most (None: unbounded); images
    with no value for the field are members when `missing` (the tree routes them)."""
    field: str
    above: float | None
    at_most: float | None
    missing: bool

    def text(self, values: pd.Series) -> str:
        """In plain terms: 'is_grayscale', 'n_annotations >= 3', '0.1 < person_fraction <=
        0.4'; a boolean field by its name, an integer-valued one by its integers."""
        if pd.api.types.is_bool_dtype(values):
            words = self.field if self.above is not None else f"not {self.field}"
        else:
            words = _range_text(self.field, self.above, self.at_most, _integral(values))
        return f"({words} or unknown)" if self.missing and values.isna().any() else words


def _integral(values: pd.Series) -> bool:
    v = values.dropna().to_numpy(float)
    return bool(len(v)) and bool(np.all(v == np.round(v)))


def _g(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"


def _range_text(field: str, above: float | None, at_most: float | None, integral: bool) -> str:
    """'a < field <= b', one-sided when a bound is open. An integer-valued field is stated in
    its integers ('n_annotations >= 3', not '> 2.5': thresholds fall between observed
    values), a single one as 'field = v'."""
    if integral:
        low = None if above is None else math.floor(above) + 1
        high = None if at_most is None else math.floor(at_most)
        if low is not None and low == high:
            return f"{field} = {low}"
        low_text, high_text, low_op, inner_op = f"{low}", f"{high}", ">=", "<="
    else:
        low_text, high_text, low_op, inner_op = _g(above), _g(at_most), ">", "<"
    if above is not None and at_most is not None:
        return f"{low_text} {inner_op} {field} <= {high_text}"
    if above is not None:
        return f"{field} {low_op} {low_text}"
    return f"{field} <= {high_text}"


@dataclass(frozen=True)
class Segment:
    """A reported segment. `held_out_ids` (the tested half's members) carry the test, the
    effect and its interval; `member_ids` are every image of either half in the leaf, the
    set a reader filters to."""
    conditions: tuple[Condition, ...]
    text: str
    member_ids: list[int]
    held_out_ids: list[int]
    mean_inside: float
    mean_outside: float
    effect: float
    interval: list[float] | None
    p_value: float
    q_value: float


def halves(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of the fitting half and the testing half, drawn at random."""
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[: n // 2]), np.sort(order[n // 2:])


def path_conditions(tree: DecisionTreeRegressor, leaf: int,
                    fields: list[str]) -> tuple[Condition, ...]:
    """The leaf's path from the root merged per field (tightest bound each side), fields in
    the order the path first tests them."""
    t = tree.tree_
    parent = {int(c): (node, c == t.children_left[node]) for node in range(t.node_count)
              for c in (t.children_left[node], t.children_right[node]) if c != -1}
    steps = []
    node = leaf
    while node in parent:
        node, left = parent[node]
        steps.append((node, left))
    bounds: dict[str, list] = {}
    for node, left in reversed(steps):
        field, threshold = fields[t.feature[node]], float(t.threshold[node])
        above, at_most, missing = bounds.setdefault(field, [None, None, True])
        if left:
            at_most = threshold if at_most is None else min(at_most, threshold)
        else:
            above = threshold if above is None else max(above, threshold)
        went_left = bool(t.missing_go_to_left[node])
        bounds[field] = [above, at_most, missing and went_left == left]
    return tuple(Condition(f, *b) for f, b in bounds.items())


def candidate_leaves(tree: DecisionTreeRegressor, fit_loss: np.ndarray) -> list[int]:
    """Leaves whose mean loss on the fitting half is above that half's mean."""
    t = tree.tree_
    leaves = np.flatnonzero(t.children_left == -1)
    return [int(leaf) for leaf in leaves if t.value[leaf].ravel()[0] > fit_loss.mean()]


def weak_segments(metadata: pd.DataFrame, loss: np.ndarray, image_ids: np.ndarray, *,
                  max_depth: int, min_samples_leaf: int, min_count: int, fdr: float,
                  seed: int, settings: bootstrap.Settings) -> list[Segment]:
    """The reported segments, lowest q first (then largest effect). `metadata`: one numeric
    or boolean column per field, one row per image (as `loss` and `image_ids`); images
    without a loss are left out. Empty when there is nothing to split or nothing holds."""
    loss = np.asarray(loss, float)
    keep = np.isfinite(loss)
    frame, y, ids = metadata[keep].reset_index(drop=True), loss[keep], np.asarray(image_ids)[keep]
    fields = list(frame.columns)
    if not fields or len(y) < 2 * max(min_samples_leaf, min_count):
        return []
    x = frame.astype(float).to_numpy()
    fit, test = halves(len(y), seed)
    tree = DecisionTreeRegressor(max_depth=max_depth, min_samples_leaf=min_samples_leaf,
                                 random_state=seed).fit(x[fit], y[fit])
    leaf_of = tree.apply(x)
    tested = []
    for leaf in candidate_leaves(tree, y[fit]):
        inside = test[leaf_of[test] == leaf]
        outside = test[leaf_of[test] != leaf]
        if len(inside) >= min_count and len(outside):
            p = stats.mannwhitneyu(y[inside], y[outside], alternative="greater").pvalue
            tested.append((leaf, inside, outside, float(p)))
    if not tested:
        return []
    q = stats.false_discovery_control([p for *_, p in tested], method="bh")
    found = [_segment(tree, leaf, fields, frame, y, ids, leaf_of, inside, outside, p, float(qv),
                      settings)
             for (leaf, inside, outside, p), qv in zip(tested, q) if qv <= fdr]
    return sorted((s for s in found if bootstrap.above_zero(s.interval)),
                  key=lambda s: (s.q_value, -s.effect))


def _segment(tree, leaf, fields, frame, y, ids, leaf_of, inside, outside, p, q,
             settings) -> Segment:
    conditions = path_conditions(tree, leaf, fields)
    text = " and ".join(c.text(frame[c.field]) for c in conditions)
    mean_in, mean_out = float(y[inside].mean()), float(y[outside].mean())
    return Segment(conditions=conditions, text=text,
                   member_ids=sorted(int(i) for i in ids[leaf_of == leaf]),
                   held_out_ids=sorted(int(i) for i in ids[inside]),
                   mean_inside=mean_in, mean_outside=mean_out, effect=mean_in - mean_out,
                   interval=bootstrap.mean_difference_interval(y[inside], y[outside], settings),
                   p_value=p, q_value=q)
