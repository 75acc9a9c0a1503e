"""What a run reports: paired comparisons of its models with bootstrap intervals, the papers' claims checked on them,
and its summary as plain text tables."""

from __future__ import annotations

import numpy as np

from .evaluation import compare_outcomes, format_metrics_table, zero_shot_top1_keys


# the metrics every comparison covers, where both models have their per-query outcomes
COMPARED_METRICS = (
    "image_retrieval_recall@1", "text_retrieval_recall@1", "image_retrieval_recall@5", "text_retrieval_recall@5",
    "image_retrieval_mAP", "text_retrieval_mAP", "zeroshot_mean_acc1", "linear_probe_mean_acc1",
    "hard_negative_accuracy_swap_attribute", "hard_negative_accuracy_swap_relation",
    "hard_negative_accuracy_wrong_count",
)


def comparison_pairs(names, student_of: dict[str, str]) -> list[tuple[str, str]]:
    """Which of the evaluated models (`names`) to compare, `(model, baseline)`: every distilled student and the
    teacher against the same student without a teacher, CLIP-CID's cluster + instance student against its
    instance-only one, and the published student against the base CLIP. `student_of`: method -> model name."""
    names, pairs = set(names), []
    no_teacher = student_of.get("none")
    if no_teacher in names:
        pairs += [(student, no_teacher) for method, student in student_of.items()
                  if method != "none" and student in names]
        pairs += [("teacher", no_teacher)] if "teacher" in names else []
    if student_of.get("clip_cid") in names and student_of.get("instance") in names:
        pairs.append((student_of["clip_cid"], student_of["instance"]))
    if {"student", "base_clip"} <= names:
        pairs.append(("student", "base_clip"))
    return pairs


def compare(outcomes: dict[str, dict[str, np.ndarray]], pairs: list[tuple[str, str]], seed: int = 0) -> dict:
    """`"<model> vs <baseline>"` -> metric -> `paired_bootstrap` of their per-query outcomes (95% intervals)."""
    comparisons = {}
    for model, baseline in pairs:
        shared = [key for key in COMPARED_METRICS if key in outcomes.get(model, {}) and key in outcomes[baseline]
                  and len(outcomes[model][key]) == len(outcomes[baseline][key])]
        if shared:
            comparisons[f"{model} vs {baseline}"] = {
                key: compare_outcomes(outcomes[model], outcomes[baseline], key, seed=seed) for key in shared}
    return comparisons


def paper_claims(metrics: dict[str, dict[str, float]], comparisons: dict | None = None) -> dict[str, float | bool]:
    """The claims, checked on this run. With `comparisons` (`compare`): `<model>_beats_<baseline>_<metric>` for each
    compared metric, true only where the 95% interval of the difference lies above 0. Against the base CLIP: the
    teacher and the student retrieve better (Recall@1, both directions), the student's relative text-to-image
    Recall@1 gain, and whether it keeps at least 94% of the base CLIP's mean zero-shot accuracy."""
    claims: dict[str, float | bool] = {}
    for pair, results in (comparisons or {}).items():
        model, baseline = pair.split(" vs ")
        for key, result in results.items():
            claims[f"{model}_beats_{baseline}_{key}"] = bool(result["low"] > 0)
    base = metrics.get("base_clip")
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
    for pair, results in (summary.get("comparisons") or {}).items():
        lines.append(f"{pair} (difference, paired bootstrap 95% interval):")
        lines += [f"  {key:<40} {r['a']:.4f} vs {r['b']:.4f}: {r['difference']:+.4f} [{r['low']:+.4f}, "
                  f"{r['high']:+.4f}]" for key, r in results.items()]
    if summary.get("claims"):
        lines.append("claims:")
        lines += [f"  {name}: {value:.4f}" if isinstance(value, float) else f"  {name}: {value}"
                  for name, value in summary["claims"].items()]
    lines.append(f"total: {summary['seconds']} s")
    return "\n".join(lines)
