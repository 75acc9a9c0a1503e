"""Evaluation: retrieval Recall@K and mAP with several captions per image (exact, sampled, or FAISS for large
galleries), zero-shot classification (prompt templates, top-1 / top-5, per class), linear probe, hard-negative
accuracy, the cross-modal teacher's re-ranked retrieval, whole evaluations of a model or checkpoint, and
CLIP_benchmark-compatible tasks and suites on any labelled or captioned data. Metric names follow CLIP_benchmark
(`image_retrieval_recall@5`, `acc1`, `mean_per_class_recall`, `lp_acc1`). One module per task, as CLIP_benchmark's
`metrics/`: `retrieval`, `classification`, `teacher`; `embedding` holds the embedding loops they share, `checkpoint`
the whole evaluations of a model, `benchmark` the CLIP_benchmark tasks and records, `suite` data sets x tasks x
models with paired intervals, `bootstrap` the intervals, `report` the metric tables. This package re-exports the
public names of the first ones."""

from .bootstrap import GROUPS_SUFFIX, compare_outcomes, paired_bootstrap
from .checkpoint import EvaluationResult, evaluate_checkpoint, evaluate_model, evaluate_teacher, load_dual_encoder
from .classification import (
    DEFAULT_TEMPLATES,
    classification_metrics,
    hard_negative_accuracy,
    linear_probe_accuracy,
    zero_shot_accuracy,
    zero_shot_classification,
    zero_shot_classifier,
)
from .embedding import embed_images, embed_texts, load_clip_towers
from .report import (
    format_estimate,
    format_metrics_table,
    is_estimate_detail,
    metric_order,
    reported_keys,
    zero_shot_top1_keys,
)
from .retrieval import (
    exact_positive_ranks,
    faiss_positive_ranks,
    image_groups,
    metrics_from_ranks,
    nearest_neighbours,
    ranks_from_scores,
    recall_from_scores,
    retrieval_metrics,
    sampled_positive_ranks,
)
from .teacher import rerank_scores, teacher_hard_negatives, teacher_retrieval, teacher_zero_shot


__all__ = [
    "DEFAULT_TEMPLATES", "GROUPS_SUFFIX", "EvaluationResult", "classification_metrics", "compare_outcomes",
    "embed_images", "embed_texts",
    "evaluate_checkpoint", "evaluate_model", "evaluate_teacher", "exact_positive_ranks", "faiss_positive_ranks",
    "format_estimate", "format_metrics_table", "hard_negative_accuracy", "image_groups", "is_estimate_detail",
    "linear_probe_accuracy", "load_clip_towers", "load_dual_encoder", "metric_order", "metrics_from_ranks",
    "nearest_neighbours", "paired_bootstrap", "ranks_from_scores", "recall_from_scores", "reported_keys",
    "rerank_scores", "retrieval_metrics", "sampled_positive_ranks", "teacher_hard_negatives", "teacher_retrieval",
    "teacher_zero_shot", "zero_shot_accuracy", "zero_shot_classification", "zero_shot_classifier",
    "zero_shot_top1_keys",
]
