"""Evaluation: retrieval Recall@K and mAP with several captions per image (exact, sampled, or FAISS for large
galleries), zero-shot classification (prompt templates, top-1 / top-5, per class), linear probe, hard-negative
accuracy, the cross-modal teacher's re-ranked retrieval, and whole evaluations of a model or checkpoint. Metric names
follow CLIP_benchmark where they overlap (`image_retrieval_recall@5`, `acc1`, `mean_per_class_recall`). One module per
task, as CLIP_benchmark's `metrics/`: `retrieval`, `classification`, `teacher`; `embedding` holds the embedding loops
they share, `suite` the whole evaluations, `report` the metric tables. This package re-exports their public names."""

from .bootstrap import paired_bootstrap
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
from .report import format_estimate, format_metrics_table, is_estimate_detail, zero_shot_top1_keys
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
from .suite import EvaluationResult, evaluate_checkpoint, evaluate_model, evaluate_teacher
from .teacher import rerank_scores, teacher_hard_negatives, teacher_retrieval, teacher_zero_shot


__all__ = [
    "DEFAULT_TEMPLATES", "EvaluationResult", "classification_metrics", "embed_images", "embed_texts",
    "evaluate_checkpoint", "evaluate_model", "evaluate_teacher", "exact_positive_ranks", "faiss_positive_ranks",
    "format_estimate", "format_metrics_table", "hard_negative_accuracy", "image_groups", "is_estimate_detail",
    "linear_probe_accuracy", "load_clip_towers", "metrics_from_ranks", "nearest_neighbours", "paired_bootstrap",
    "ranks_from_scores", "recall_from_scores", "rerank_scores", "retrieval_metrics", "sampled_positive_ranks",
    "teacher_hard_negatives", "teacher_retrieval", "teacher_zero_shot",
    "zero_shot_accuracy", "zero_shot_classification", "zero_shot_classifier", "zero_shot_top1_keys",
]
