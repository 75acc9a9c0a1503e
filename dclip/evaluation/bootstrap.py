"""Uncertainty of a comparison: the paired bootstrap. Two models evaluated on the same test queries give one outcome
per query each (a Recall@1 hit, a correct zero-shot label, ...); resampling the queries with replacement, the same
queries for both models, gives the distribution of the difference of their means, and its percentile interval.
Queries that are not independent (the 5 captions of one COCO image) are resampled together, by group: a cluster
bootstrap, whose interval is as wide as the number of independent groups warrants."""

from __future__ import annotations

import numpy as np


GROUPS_SUFFIX = ":groups"  # an outcomes key + this: the group of each of its queries (e.g. each caption's image)


def paired_bootstrap(a, b, num_resamples: int = 2000, confidence: float = 0.95, seed: int = 0,
                     groups=None) -> dict[str, float]:
    """
    The difference `mean(a) - mean(b)` of two models' per-query outcomes (aligned: `a[i]` and `b[i]` are the same
    query), with its `confidence` percentile interval over `num_resamples` paired resamples of the queries: `a`,
    `b` (the two means), `difference`, `low`, `high`, and the same for the relative difference
    `(mean(a) - mean(b)) / mean(b)` (`relative`, `relative_low`, `relative_high`; NaN where `mean(b)` is 0), and
    `excludes_zero`, whether the interval of the difference lies wholly above or below 0. With `groups` (a label per
    query), whole groups are resampled and each resample's mean is over the queries of the groups drawn; without,
    each query is its own group (the same draws, the same result as groups `0..n-1`). With a single query or group
    there is no interval: `low` and `high` are NaN and `excludes_zero` is false.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape or not len(a):
        raise ValueError(f"paired outcomes must be two non-empty 1-d arrays of one length, got {a.shape} and {b.shape}")
    if not 0 < confidence < 1 or num_resamples < 1:
        raise ValueError(f"need 0 < confidence < 1 and num_resamples >= 1, got {confidence} and {num_resamples}")
    sums_a, sums_b, counts = _group_sums(a, b, groups)
    rng = np.random.default_rng(seed)
    means_a, means_b = np.empty(num_resamples), np.empty(num_resamples)
    chunk = max(1, 2_000_000 // len(sums_a))  # bound the index matrix's memory
    for start in range(0, num_resamples, chunk):
        rows = rng.integers(0, len(sums_a), size=(min(chunk, num_resamples - start), len(sums_a)))
        size = counts[rows].sum(1) if counts is not None else rows.shape[1]
        means_a[start:start + len(rows)] = sums_a[rows].sum(1) / size
        means_b[start:start + len(rows)] = sums_b[rows].sum(1) / size
    tail = (1 - confidence) / 2
    low, high = np.quantile(means_a - means_b, [tail, 1 - tail])
    if len(sums_a) < 2:  # one query or group: every resample is the same, which says nothing of the spread
        low = high = np.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = np.where(means_b > 0, (means_a - means_b) / means_b, np.nan)
    base = b.mean()
    relative_low, relative_high = np.quantile(relative, [tail, 1 - tail]) \
        if np.isfinite(relative).all() and len(sums_a) > 1 else (np.nan, np.nan)
    return {"a": float(a.mean()), "b": float(base), "difference": float(a.mean() - base), "low": float(low),
            "high": float(high), "relative": float((a.mean() - base) / base) if base else float("nan"),
            "relative_low": float(relative_low), "relative_high": float(relative_high),
            "excludes_zero": bool(low > 0 or high < 0)}


def _group_sums(a: np.ndarray, b: np.ndarray, groups) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Per group (in sorted order of the labels): the sums of `a` and `b` and the query counts;
    the outcomes themselves and no counts where there are no groups."""
    if groups is None:
        return a, b, None
    groups = np.asarray(groups)
    if groups.shape != a.shape:
        raise ValueError(f"groups must give one label per query: {groups.shape} for {a.shape} outcomes")
    _, index = np.unique(groups, return_inverse=True)
    return np.bincount(index, weights=a), np.bincount(index, weights=b), np.bincount(index)


def compare_outcomes(outcomes: dict, baseline: dict, key: str, **kwargs) -> dict[str, float]:
    """[`paired_bootstrap`] of metric `key` between two models' per-query outcome dicts, resampling by the groups
    that either names as `key + GROUPS_SUFFIX` (the same data set: when both name them, they must agree)."""
    groups, other = outcomes.get(key + GROUPS_SUFFIX), baseline.get(key + GROUPS_SUFFIX)
    if groups is not None and other is not None and not np.array_equal(groups, other):
        raise ValueError(f"{key}: the two models' outcomes group their queries differently (not the same data?)")
    return paired_bootstrap(outcomes[key], baseline[key], groups=groups if groups is not None else other, **kwargs)
