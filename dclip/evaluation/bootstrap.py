"""Uncertainty of a comparison: the paired bootstrap. Two models evaluated on the same test queries give one outcome
per query each (a Recall@1 hit, a correct zero-shot label, ...); resampling the queries with replacement, the same
queries for both models, gives the distribution of the difference of their means, and its percentile interval."""

from __future__ import annotations

import numpy as np


def paired_bootstrap(a, b, num_resamples: int = 2000, confidence: float = 0.95, seed: int = 0) -> dict[str, float]:
    """
    The difference `mean(a) - mean(b)` of two models' per-query outcomes (aligned: `a[i]` and `b[i]` are the same
    query), with its `confidence` percentile interval over `num_resamples` paired resamples of the queries: `a`,
    `b` (the two means), `difference`, `low`, `high`, and the same for the relative difference
    `(mean(a) - mean(b)) / mean(b)` (`relative`, `relative_low`, `relative_high`; NaN where `mean(b)` is 0), and
    `excludes_zero`, whether the interval of the difference lies wholly above or below 0.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape or not len(a):
        raise ValueError(f"paired outcomes must be two non-empty 1-d arrays of one length, got {a.shape} and {b.shape}")
    if not 0 < confidence < 1 or num_resamples < 1:
        raise ValueError(f"need 0 < confidence < 1 and num_resamples >= 1, got {confidence} and {num_resamples}")
    rng = np.random.default_rng(seed)
    means_a, means_b = np.empty(num_resamples), np.empty(num_resamples)
    chunk = max(1, 2_000_000 // len(a))  # bound the index matrix's memory
    for start in range(0, num_resamples, chunk):
        rows = rng.integers(0, len(a), size=(min(chunk, num_resamples - start), len(a)))
        means_a[start:start + len(rows)], means_b[start:start + len(rows)] = a[rows].mean(1), b[rows].mean(1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means_a - means_b, [tail, 1 - tail])
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = np.where(means_b > 0, (means_a - means_b) / means_b, np.nan)
    base = b.mean()
    relative_low, relative_high = np.quantile(relative, [tail, 1 - tail]) if np.isfinite(relative).all() else \
        (np.nan, np.nan)
    return {"a": float(a.mean()), "b": float(base), "difference": float(a.mean() - base), "low": float(low),
            "high": float(high), "relative": float((a.mean() - base) / base) if base else float("nan"),
            "relative_low": float(relative_low), "relative_high": float(relative_high),
            "excludes_zero": bool(low > 0 or high < 0)}
