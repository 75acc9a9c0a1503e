"""Whole evaluations of a model: `evaluate_model` (retrieval, zero-shot classification, linear probe and hard
negatives of a dual encoder), `evaluate_teacher` (the cross-modal teacher's re-ranked retrieval), `evaluate_checkpoint`
(either, for a saved folder or Hub checkpoint), and the `EvaluationResult` they return."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..columns import HARD_NEGATIVES
from .classification import (
    DEFAULT_TEMPLATES,
    hard_negative_accuracy,
    hard_negative_kinds,
    linear_probe_accuracy,
    zero_shot_classification,
)
from .embedding import embed_captioned, embed_images, load_clip_towers
from .retrieval import image_groups, retrieval_metrics
from .teacher import teacher_hard_negatives, teacher_retrieval, teacher_zero_shot


@dataclass
class EvaluationResult:
    """Flat `metrics` (name -> value; the keys of summary tables and model cards), `per_class_recall` (zero-shot
    task -> class -> recall), the sizes evaluated, and `outcomes`: for each metric that is a mean over queries, the
    per-query values (aligned across models evaluated on the same data), for paired bootstraps."""

    metrics: dict[str, float]
    per_class_recall: dict[str, dict[str, float]] = field(default_factory=dict)
    num_images: int = 0
    num_texts: int = 0
    outcomes: dict[str, np.ndarray] = field(default_factory=dict)

    def add_means(self) -> None:
        """`zeroshot_mean_acc1` and `linear_probe_mean_acc1`: per image, the mean over the tasks' top-1 outcomes."""
        for prefix in ("zeroshot", "linear_probe"):
            keys = [key for key in self.outcomes if key.startswith(f"{prefix}_label") and key.endswith("_acc1")]
            if keys:
                per_image = np.mean([self.outcomes[key] for key in sorted(keys)], axis=0)
                self.outcomes[f"{prefix}_mean_acc1"] = per_image
                self.metrics[f"{prefix}_mean_acc1"] = float(per_image.mean())


def evaluate_model(model, processor, test, probe_train=None, tasks: dict[str, list[str]] | None = None,
                   templates=DEFAULT_TEMPLATES, ks: tuple[int, ...] = (1, 5, 10), retrieval_backend: str = "auto",
                   batch_size: int = 256) -> EvaluationResult:
    """
    Evaluate a dual encoder (`DCLIPModel`, `DCLIPTeacherModel` towers, or a CLIP wrapped by `load_clip_towers`) on
    `test` (`image`, `caption`, optional `image_id` for several captions per image): retrieval both ways; for each
    `tasks` label column present (column -> class names) zero-shot classification and, with `probe_train`, a linear
    probe fitted on its images; hard-negative accuracy where `test` has `hard_negatives`.
    """
    images, image_embeds, text_embeds, text_to_image = embed_captioned(model, processor, test, batch_size=batch_size)
    outcomes: dict[str, np.ndarray] = {}
    metrics = retrieval_metrics(image_embeds, text_embeds, text_to_image, ks, backend=retrieval_backend,
                                outcomes=outcomes)
    result = EvaluationResult(metrics, num_images=len(image_embeds), num_texts=len(text_embeds), outcomes=outcomes)
    tasks = {column: names for column, names in (tasks or {}).items() if column in test.column_names}
    probe_embeds = None
    if tasks and probe_train is not None:
        probe_images = probe_train.select(image_groups(probe_train)[0])
        probe_embeds = embed_images(model, processor, probe_images, batch_size=batch_size)
    for column, names in tasks.items():
        zero_shot = zero_shot_classification(model, processor, images, column, names, templates,
                                             image_embeds=image_embeds)
        for name in ("acc1", "acc5", "mean_per_class_recall"):
            if name in zero_shot:
                metrics[f"zeroshot_{column}_{name}"] = zero_shot[name]
        result.per_class_recall[column] = zero_shot["per_class_recall"]
        outcomes[f"zeroshot_{column}_acc1"] = zero_shot["correct"]
        if probe_embeds is not None:
            metrics[f"linear_probe_{column}_acc1"], outcomes[f"linear_probe_{column}_acc1"] = linear_probe_accuracy(
                probe_embeds, probe_images[column], image_embeds, images[column], return_correct=True)
    if HARD_NEGATIVES in test.column_names and len(images) == len(test):  # one caption per image
        metrics.update(hard_negative_accuracy(model, processor, test, image_embeds, text_embeds, outcomes=outcomes))
    result.add_means()
    return result


def evaluate_teacher(teacher, processor, test, top_k: int = 16, ks: tuple[int, ...] = (1, 5, 10),
                     batch_size: int = 256, tasks: dict[str, list[str]] | None = None,
                     templates=DEFAULT_TEMPLATES) -> EvaluationResult:
    """The cross-modal teacher's retrieval Recall@K and mAP (global shortlist, fused re-ranking: `teacher_retrieval`),
    zero-shot classification by fused scores for each `tasks` label column present (`teacher_zero_shot`) and
    hard-negative accuracy by fused scores where `test` has `hard_negatives` (`teacher_hard_negatives`);
    regions from the processor's detector (if any) and spans from its extractor, as at test time."""
    from ..targets import compute_teacher_features

    features = compute_teacher_features(test, teacher, processor, batch_size=batch_size, use_given_boxes=False,
                                        use_given_spans=False)
    image_rows, text_to_image = image_groups(test)
    outcomes: dict[str, np.ndarray] = {}
    metrics = teacher_retrieval(teacher, features, top_k=top_k, ks=ks, image_rows=image_rows,
                                text_to_image=text_to_image, outcomes=outcomes)
    result = EvaluationResult(metrics, num_images=len(image_rows), num_texts=len(test), outcomes=outcomes)
    images = test.select(image_rows) if len(image_rows) != len(test) else test
    for column, names in (tasks or {}).items():
        if column in test.column_names:
            zero_shot = teacher_zero_shot(teacher, processor, features, image_rows, images[column], names, templates)
            for name in ("acc1", "acc5", "mean_per_class_recall"):
                if name in zero_shot:
                    metrics[f"zeroshot_{column}_{name}"] = zero_shot[name]
            result.per_class_recall[column] = zero_shot["per_class_recall"]
            outcomes[f"zeroshot_{column}_acc1"] = zero_shot["correct"]
    if HARD_NEGATIVES in test.column_names and len(image_rows) == len(test):  # one caption per image
        metrics.update(teacher_hard_negatives(teacher, processor, features, test[HARD_NEGATIVES],
                                              hard_negative_kinds(test), outcomes=outcomes))
    result.add_means()
    return result


def evaluate_checkpoint(name_or_path: str, test, probe_train=None, tasks: dict[str, list[str]] | None = None,
                        processor=None, templates=DEFAULT_TEMPLATES, ks: tuple[int, ...] = (1, 5, 10),
                        retrieval_backend: str = "auto", teacher_top_k: int = 16) -> EvaluationResult:
    """
    Evaluate a saved model, local or on the Hub: a `DCLIPTeacherModel` folder by its fused retrieval and zero-shot
    (`evaluate_teacher`), anything else (a `DCLIPModel` folder, any CLIP checkpoint, another dual encoder such as a
    `SiglipModel`) with `evaluate_model`. `processor`: default, the checkpoint's own (a `DCLIPProcessor` around its
    tokenizer and image processor; for another dual encoder, its own processor as `DualEncoderProcessor` calls it).
    """
    from modeling_dclip import DCLIPTeacherModel

    from ..teachers import model_type

    if model_type(name_or_path) == "dclip_teacher":
        from processing_dclip import DCLIPProcessor

        processor = processor or DCLIPProcessor.from_pretrained(name_or_path, trust_remote_code=False)  # our class
        teacher = DCLIPTeacherModel.from_pretrained(name_or_path).to("cuda" if torch.cuda.is_available() else "cpu")
        return evaluate_teacher(teacher, processor, test, top_k=teacher_top_k, ks=ks, tasks=tasks, templates=templates)
    model, own_processor = load_dual_encoder(name_or_path)
    return evaluate_model(model, processor or own_processor, test, probe_train=probe_train, tasks=tasks,
                          templates=templates, ks=ks, retrieval_backend=retrieval_backend)


def load_dual_encoder(name_or_path: str):
    """`(model, processor)` of a saved model, local or on the Hub, as a dual encoder with `get_image_features` /
    `get_text_features`: a `DCLIPModel` folder or any CLIP checkpoint with a `DCLIPProcessor` around its tokenizer
    and image processor (our class: no remote code), a `DCLIPTeacherModel` folder by its towers alone, another dual
    encoder (a `SiglipModel`, ...) with its own processor as `DualEncoderProcessor` calls it. On the GPU if there is
    one."""
    from processing_dclip import DCLIPProcessor

    from ..teachers import DUAL_ENCODER, DualEncoderProcessor, load_teacher, model_type

    if model_type(name_or_path) not in ("dclip", "dclip_teacher", "clip"):  # another dual encoder: its own processor
        teacher = load_teacher(name_or_path, DUAL_ENCODER)
        teacher.to("cuda" if torch.cuda.is_available() else "cpu")
        return teacher.model.eval(), DualEncoderProcessor(teacher)
    return load_clip_towers(name_or_path), DCLIPProcessor.from_pretrained(name_or_path, trust_remote_code=False)
