"""The plots of a model card: retrieval against the baseline, zero-shot recall per class, and each metric's
difference to the baseline with its paired-bootstrap 95% interval. Metrics in reading order; no pyplot (the
process's matplotlib backend stays the user's)."""

from __future__ import annotations

from pathlib import Path

from .evaluation.report import reported_keys


def _grouped_bars(axes, names: list[str], series: list[tuple[str, dict]], title: str, fontsize: int = 8) -> None:
    """One bar group per name, one bar per `(label, values)` series (missing values left empty), scores in [0, 1]."""
    import numpy as np

    positions = np.arange(len(names))
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series):
        axes.bar(positions + i * width, [values.get(name, np.nan) for name in names], width, label=label)
    axes.set_xticks(positions + width * (len(series) - 1) / 2, names, rotation=45, ha="right", fontsize=fontsize)
    axes.set_ylim(0, 1)
    axes.set_title(title, fontsize=9)
    axes.legend(fontsize=7)


def _save_figure(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def plot_retrieval(metrics: dict[str, float], baseline: dict[str, float] | None, path: Path, model_label: str,
                   baseline_label: str, title: callable = str) -> Path:
    """Bar chart of Recall@K both ways (and mAP), the model beside the baseline."""
    from matplotlib.figure import Figure  # no pyplot: the process's matplotlib backend stays the user's

    keys = [key for key in reported_keys(metrics) if key.startswith(("image_retrieval_", "text_retrieval_"))]
    series = [(model_label, metrics)] + ([(baseline_label, baseline)] if baseline else [])
    figure = Figure(figsize=(max(6, 0.9 * len(keys)), 3.6))
    axes = figure.subplots()
    _grouped_bars(axes, keys, series, "Retrieval")
    axes.set_xticklabels([title(key) for key in keys])
    return _save_figure(figure, path)


def plot_zero_shot_per_class(per_class: dict[str, dict[str, float]], baseline: dict[str, dict[str, float]] | None,
                             path: Path, model_label: str, baseline_label: str) -> Path:
    """Per-class zero-shot recall, one panel per task, the model beside the baseline."""
    from matplotlib.figure import Figure

    tasks = list(per_class)
    figure = Figure(figsize=(10, 2.6 * len(tasks)))
    axes_list = figure.subplots(len(tasks), 1, squeeze=False)
    for axes, task in zip(axes_list[:, 0], tasks):
        series = [(model_label, per_class[task])]
        if baseline and task in baseline:
            series.append((baseline_label, baseline[task]))
        _grouped_bars(axes, list(per_class[task]), series,
                      f"zero-shot recall per class: {task.removeprefix('label_')}", fontsize=6)
    return _save_figure(figure, path)


def plot_differences(differences: dict[str, dict], path: Path, model_label: str, baseline_label: str,
                     title: callable = str) -> Path:
    """Each metric's difference `model - baseline` (a `paired_bootstrap` result) as a point with its 95% interval,
    in reading order, a line at 0; filled where the interval excludes 0. `title` names a metric key."""
    from matplotlib.figure import Figure

    keys = [key for key in reported_keys(differences) if key in differences]
    figure = Figure(figsize=(7, 0.32 * len(keys) + 1.2))
    axes = figure.subplots()
    for row, key in enumerate(keys):
        result = differences[key]
        below, above = max(0.0, result["difference"] - result["low"]), max(0.0, result["high"] - result["difference"])
        axes.errorbar(result["difference"], row, xerr=[[below], [above]],
                      fmt="o", color="C0", capsize=3, markerfacecolor="C0" if result["excludes_zero"] else "white")
    axes.axvline(0, color="gray", linewidth=0.8)
    axes.set_yticks(range(len(keys)), [title(key) for key in keys], fontsize=7)
    axes.invert_yaxis()
    axes.set_xlabel(f"{model_label} - {baseline_label} (95% paired-bootstrap interval)", fontsize=8)
    axes.set_title("Difference to the baseline", fontsize=9)
    return _save_figure(figure, path)
