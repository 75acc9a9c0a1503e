"""What a run reports: DCLIP's claims checked on its metrics, and its summary as plain text tables."""

from __future__ import annotations

import numpy as np

from .evaluation import format_metrics_table, zero_shot_top1_keys


def paper_claims(metrics: dict[str, dict[str, float]]) -> dict[str, float | bool]:
    """DCLIP's claims, checked on this run: the teacher and the student retrieve better than the base CLIP (Recall@1,
    both directions), and the student keeps at least 94% of the base CLIP's mean zero-shot accuracy."""
    base, claims = metrics.get("base_clip"), {}
    if base is None:
        return claims
    directions = ("image_retrieval_recall@1", "text_retrieval_recall@1")
    for name in ("teacher", "student"):
        if name in metrics:
            claims[f"{name}_beats_base_recall@1"] = all(metrics[name][key] > base[key] for key in directions)
    student = metrics.get("student")
    if student is not None:
        base_t2i = base["image_retrieval_recall@1"]
        claims["student_text_to_image_recall@1_relative_gain"] = (
            (student["image_retrieval_recall@1"] - base_t2i) / base_t2i if base_t2i else float("nan"))
        zero_shot = zero_shot_top1_keys(base)
        if zero_shot:
            retention = np.mean([student[k] for k in zero_shot]) / max(np.mean([base[k] for k in zero_shot]), 1e-12)
            claims["student_zero_shot_retention"] = float(retention)
            claims["student_keeps_94%_zero_shot"] = bool(retention >= 0.94)
    return claims


def format_summary(summary: dict) -> str:
    """The run's artefacts, training times, metrics (a column per model) and claims, as plain text tables."""
    lines = ["artefacts:"] + [f"  {name:<10} {path}" for name, path in summary["artefacts"].items()]
    if summary.get("training"):
        lines.append("training:")
        for stage, info in summary["training"].items():
            resumed = f", resumed from {info['resumed_from']}" if info.get("resumed_from") else ""
            lines.append(f"  {stage:<10} {info['global_step']} steps in {info['seconds']} s{resumed}")
    if summary.get("metrics"):
        lines.append("metrics (eval split):")
        lines += ["  " + line for line in format_metrics_table(summary["metrics"]).splitlines()]
    if summary.get("claims"):
        lines.append("claims:")
        lines += [f"  {name}: {value:.4f}" if isinstance(value, float) else f"  {name}: {value}"
                  for name, value in summary["claims"].items()]
    lines.append(f"total: {summary['seconds']} s")
    return "\n".join(lines)
