"""Classification metrics: zero-shot classification with prompt ensembles (`zero_shot_classifier`,
`zero_shot_classification`, top-K and per-class recall in `classification_metrics`), the linear probe on frozen
image features, and hard-negative accuracy (an image's own caption against captions that contradict it in one
attribute, relation or count)."""

from __future__ import annotations

import numpy as np
import torch

from ..columns import HARD_NEGATIVE_TYPES, HARD_NEGATIVES
from .embedding import embed_images, embed_texts


DEFAULT_TEMPLATES = ("a photo of a {}.",)


def zero_shot_classifier(model, processor, class_names: list[str], templates=DEFAULT_TEMPLATES,
                         device: str | torch.device | None = None) -> np.ndarray:
    """`(classes, dim)` class embeddings: each class's prompts (`template.format(name)` for every template) embedded,
    averaged and re-normalised, as in CLIP's prompt ensembling."""
    if not class_names or not templates:
        raise ValueError(f"zero-shot classification needs class names and templates, got {len(class_names)} and "
                         f"{len(templates)}")
    prompts = [template.format(name) for name in class_names for template in templates]
    embeds = embed_texts(model, processor, prompts, device=device).reshape(len(class_names), len(templates), -1)
    mean = embeds.mean(1)
    return mean / np.linalg.norm(mean, axis=1, keepdims=True)


def classification_metrics(scores: np.ndarray, labels, class_names: list[str],
                           ks: tuple[int, ...] = (1, 5), outcomes: dict | None = None) -> dict:
    """From `scores (samples, classes)` (finite) and integer `labels`: top-K accuracy `acc<K>` (K up to the class
    count), `mean_per_class_recall` over the classes present and `per_class_recall` by class name (CLIP_benchmark's
    names; scikit-learn's `top_k_accuracy_score`, `balanced_accuracy_score`, `recall_score`), and `correct`, whether
    each sample's top-1 class is its label. A dict given as `outcomes` receives each `acc<K>`'s per-sample hits (for
    paired bootstraps)."""
    import warnings

    from sklearn.metrics import balanced_accuracy_score, recall_score, top_k_accuracy_score

    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    count = scores.shape[1]
    # scikit-learn's ranking (`top_k_accuracy_score`: a stable sort, reversed, so a tie goes to the higher class), so
    # that the per-sample hits and the reported accuracies agree on ties too
    order = np.argsort(scores, axis=1, kind="mergesort")[:, ::-1]
    top1 = order[:, 0]
    results: dict = {}
    for k in ks:
        if k == 1 or k <= count:  # CLIP_benchmark reports top-5 from 5 classes on
            hits = (order[:, :k] == labels[:, None]).any(1).astype(np.float64)
            with warnings.catch_warnings():  # k == count: "will result in a perfect score", as it should
                warnings.simplefilter("ignore")
                results[f"acc{k}"] = float(hits.mean()) if count <= 2 else float(top_k_accuracy_score(
                    labels, scores, k=k, labels=np.arange(count)))
            if outcomes is not None:
                outcomes[f"acc{k}"] = hits
    present = np.unique(labels)
    with warnings.catch_warnings():  # "y_pred contains classes not in y_true": those are left out, as intended
        warnings.simplefilter("ignore")
        results["mean_per_class_recall"] = float(balanced_accuracy_score(labels, top1)) if len(labels) else \
            float("nan")
        recalls = recall_score(labels, top1, labels=present, average=None, zero_division=0) if len(labels) else []
    results["per_class_recall"] = {class_names[c]: float(r) for c, r in zip(present, recalls)}
    results["correct"] = (top1 == labels).astype(np.float64)
    return results


@torch.no_grad()
def zero_shot_classification(model, processor, dataset, label_column: str, class_names: list[str],
                             templates=DEFAULT_TEMPLATES, image_embeds: np.ndarray | None = None,
                             batch_size: int = 256, device: str | torch.device | None = None,
                             outcomes: dict | None = None) -> dict:
    """Zero-shot classification of `dataset`'s images among `class_names` (see `classification_metrics`, which fills
    `outcomes`); `image_embeds` (normalised, a row per dataset row) saves embedding the images again."""
    if image_embeds is None:
        image_embeds = embed_images(model, processor, dataset, batch_size=batch_size, device=device)
    classifier = zero_shot_classifier(model, processor, class_names, templates, device=device)
    return classification_metrics(image_embeds @ classifier.T, dataset[label_column], class_names, outcomes=outcomes)


def zero_shot_accuracy(model, processor, dataset, label_column: str, class_names: list[str],
                       template: str = "a photo of a {}.", batch_size: int = 256,
                       device: str | torch.device | None = None) -> float:
    """Top-1 accuracy of classifying `dataset` images among `class_names` prompts."""
    return zero_shot_classification(model, processor, dataset, label_column, class_names, (template,),
                                    batch_size=batch_size, device=device)["acc1"]


def linear_probe_accuracy(train_features: np.ndarray, train_labels, test_features: np.ndarray, test_labels,
                          regularization: float = 1.0, max_iter: int = 1000, return_correct: bool = False):
    """Top-1 accuracy on `test_*` of a logistic regression (L-BFGS, inverse regularisation `regularization`) fitted
    on frozen `train_*` features, as in CLIP's linear-probe evaluation; with `return_correct`, also whether each test
    sample was classified right."""
    from sklearn.linear_model import LogisticRegression

    classifier = LogisticRegression(C=regularization, max_iter=max_iter)
    classifier.fit(train_features, np.asarray(train_labels))
    correct = (classifier.predict(test_features) == np.asarray(test_labels)).astype(np.float64)
    return (float(correct.mean()), correct) if return_correct else float(correct.mean())


def hard_negative_kinds(dataset) -> list[list[str]]:
    """Each row's hard-negative kinds (`hard_negative_types`), or `"all"` for each negative where the data has none."""
    if HARD_NEGATIVE_TYPES in dataset.column_names:
        return dataset[HARD_NEGATIVE_TYPES]
    return [["all"] * len(row) for row in dataset[HARD_NEGATIVES]]


def hard_negative_outcomes(correct: np.ndarray, kinds: list[list[str]], outcomes: dict | None = None) -> dict:
    """Hard-negative accuracy from each (image, negative) pair's outcome `correct` (row order) and its kind:
    `hard_negative_accuracy` over all pairs and `hard_negative_accuracy_<kind>` per kind; `outcomes` (a dict)
    receives the per-pair outcomes of each figure."""
    flat_kinds = np.array([kind for row in kinds for kind in row])
    per_pair = {"hard_negative_accuracy": correct.astype(np.float64)}
    for kind in sorted(set(flat_kinds)):
        per_pair[f"hard_negative_accuracy_{kind}"] = correct[flat_kinds == kind].astype(np.float64)
    if outcomes is not None:
        outcomes.update(per_pair)
    return {key: float(values.mean()) for key, values in per_pair.items()}


def hard_negative_accuracy(model, processor, dataset, image_embeds: np.ndarray, text_embeds: np.ndarray,
                           device: str | torch.device | None = None, outcomes: dict | None = None) -> dict[str, float]:
    """
    How often each image scores its own caption above each of its hard-negative captions (`hard_negatives`,
    with kinds in `hard_negative_types`: swapped attribute, swapped relation, wrong count): `hard_negative_accuracy`
    over all (image, negative) pairs and `hard_negative_accuracy_<kind>` per kind. `image_embeds` / `text_embeds`:
    normalised, a row per dataset row (the row's image and caption). A dict given as `outcomes` receives each
    figure's per-pair outcomes (per kind: one per image that has a negative of that kind, in row order).
    """
    negatives = dataset[HARD_NEGATIVES]
    rows = np.repeat(np.arange(len(negatives)), [len(row) for row in negatives])
    if not len(rows):
        return {}
    flat_negatives = [text for row in negatives for text in row]
    negative_embeds = embed_texts(model, processor, flat_negatives, device=device)
    positive_scores = np.einsum("nd,nd->n", image_embeds[rows], text_embeds[rows])
    negative_scores = np.einsum("nd,nd->n", image_embeds[rows], negative_embeds)
    return hard_negative_outcomes(positive_scores > negative_scores, hard_negative_kinds(dataset), outcomes)
