"""Metric reports: the plain-text table of several models' metrics, a sampled estimate written as value±error,
and the helpers that tell an estimate's details (standard errors, query counts) and the zero-shot top-1 keys apart."""

from __future__ import annotations

import re

import numpy as np


METRIC_GROUPS = ("image_retrieval_", "text_retrieval_", "zeroshot_", "linear_probe_", "hard_negative_")


def metric_order(key: str) -> tuple:
    """Sort key of a flat metric name in reading order: text-to-image retrieval, image-to-text retrieval (each R@1,
    R@5, R@10, then mAP), zero-shot, linear probe, hard negatives, anything else."""
    group = next((i for i, prefix in enumerate(METRIC_GROUPS) if key.startswith(prefix)), len(METRIC_GROUPS))
    k = re.search(r"@(\d+)", key)
    return group, "mAP" in key, int(k.group(1)) if k else 0, key


def reported_keys(metrics: dict[str, float]) -> list[str]:
    """The metrics a table or card reports, in reading order (`metric_order`): not the standard errors
    (`<key>_stderr`) and query counts (`*_queries`) that a sampled retrieval evaluation adds beside its estimates."""
    return sorted((key for key in metrics if not is_estimate_detail(key)), key=metric_order)


def format_metrics_table(metrics: dict[str, dict[str, float]]) -> str:
    """A plain-text table of `metrics` (model -> metric -> value): a row per metric in reading order, a column per
    model ("-" where a model lacks the metric)."""
    names = sorted({key for values in metrics.values() for key in values if not is_estimate_detail(key)},
                   key=metric_order)
    width = max([len(name) for name in names] + [6])
    lines = [f"{'metric':<{width}}" + "".join(f"{model:>16}" for model in metrics)]
    for name in names:
        cells = "".join(f"{format_estimate(values, name):>16}" if name in values else f"{'-':>16}"
                        for values in metrics.values())
        lines.append(f"{name:<{width}}{cells}")
    return "\n".join(lines)


def format_estimate(metrics: dict[str, float], key: str, digits: int = 4, separator: str = "±") -> str:
    """`metrics[key]`, with `separator` and its standard error where a sampled evaluation gave a finite one."""
    stderr = metrics.get(f"{key}_stderr")
    text = f"{metrics[key]:.{digits}f}"
    return text + (f"{separator}{stderr:.{digits}f}" if stderr is not None and np.isfinite(stderr) else "")


def is_estimate_detail(key: str) -> bool:
    """A sampled evaluation's standard error (`<metric>_stderr`) or query count (`*_queries`): a detail of another
    metric's estimate, not a metric of its own."""
    return key.endswith(("_stderr", "_queries"))


def zero_shot_top1_keys(metrics: dict[str, float]) -> list[str]:
    """The zero-shot top-1 accuracies among `metrics` (one per task)."""
    return [key for key in metrics if key.startswith("zeroshot_") and key.endswith("_acc1")
            and key != "zeroshot_mean_acc1"]
