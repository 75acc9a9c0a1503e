"""CLIP_benchmark-compatible tasks on any data: `zeroshot_classification` and `linear_probe` on labelled images
(`dclip.data.labelled`), `zeroshot_retrieval` on captioned images (`dclip.data.loaders`), each giving CLIP_benchmark's
metric names and a result in its JSON layout (`clip_benchmark_record`: `{dataset, model, pretrained, task, metrics,
language}`), plus the per-sample outcomes of each metric that is a mean over samples, for paired bootstraps.

Prompts: a named set of `templates.json` (`openai_imagenet`, 80 prompts; `openai_cifar`, 18; `simple`), a file of
them (`.txt`, one per line, or a `.json` list), or `|`-separated templates; `{}` or `{c}` stands for the class name."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .classification import classification_metrics, zero_shot_classification
from .embedding import embed_captioned, embed_images
from .retrieval import retrieval_metrics


logger = logging.getLogger(__name__)

TASKS = ("zeroshot_classification", "linear_probe", "zeroshot_retrieval")
TEMPLATES_FILE = Path(__file__).with_name("templates.json")
SCHEMA_FILE = Path(__file__).with_name("clip_benchmark_schema.json")
# inverse regularisation strengths tried for the linear probe's logistic regression, on L2-normalised features
PROBE_REGULARIZATION = tuple(float(c) for c in np.logspace(-2, 4, 7))


@dataclass
class TaskResult:
    """One task's CLIP_benchmark `metrics`, and `outcomes`: for each metric that is a mean over the test samples (or
    queries), the per-sample values, aligned across models evaluated on the same data."""

    task: str
    metrics: dict
    outcomes: dict[str, np.ndarray] = field(default_factory=dict)


def template_sets() -> dict[str, list[str]]:
    """The named prompt sets shipped with the package (`templates.json`)."""
    return {name: prompts for name, prompts in json.loads(TEMPLATES_FILE.read_text()).items()
            if not name.startswith("_")}


def load_templates(spec: str) -> tuple[str, ...]:
    """Prompt templates from a named set, a `.txt` / `.json` file, or `|`-separated templates (see the module)."""
    sets = template_sets()
    if spec in sets:
        templates = sets[spec]
    elif Path(spec).is_file():
        text = Path(spec).read_text()
        templates = json.loads(text) if spec.endswith(".json") else [t.strip() for t in text.splitlines() if t.strip()]
    else:
        templates = [t for t in spec.split("|") if t.strip()]
    templates = tuple(str(t).replace("{c}", "{}") for t in templates)
    bad = [t for t in templates if t.count("{}") != 1]
    if not templates or bad:
        raise ValueError(f"--templates {spec!r}: each template needs one '{{}}' (or '{{c}}') for the class name; "
                         f"named sets: {sorted(sets)}; bad: {bad[:3]}")
    return templates


def zeroshot_classification(model, processor, data, templates, batch_size: int = 256, num_workers: int = 0,
                            image_embeds: np.ndarray | None = None) -> TaskResult:
    """Zero-shot classification of `data` (a `LabelledData`): each class's prompts embedded and averaged; `acc1`,
    `acc5` (from 5 classes on), `mean_per_class_recall`, and `per_class_recall` by class name."""
    if image_embeds is None:
        image_embeds = embed_images(model, processor, data.dataset, batch_size=batch_size, num_workers=num_workers)
    outcomes: dict[str, np.ndarray] = {}
    metrics = zero_shot_classification(model, processor, data.dataset, "label", data.class_names, templates,
                                       image_embeds=image_embeds, batch_size=batch_size, outcomes=outcomes)
    metrics.pop("correct")
    return TaskResult("zeroshot_classification", metrics, outcomes)


def linear_probe(train_features: np.ndarray, train_labels, test_features: np.ndarray, test_labels,
                 class_names: list[str], validation_features: np.ndarray | None = None, validation_labels=None,
                 validation_fraction: float = 0.2, regularization=PROBE_REGULARIZATION, seed: int = 0,
                 max_iter: int = 1000) -> TaskResult:
    """
    CLIP's linear probe: a logistic regression (L-BFGS) on frozen features. Its inverse regularisation `C` is the
    value of `regularization` with the best top-1 accuracy on the validation features (default: `validation_fraction`
    of the training features held out, stratified, `seed`); it is then refitted on training + validation features
    and scored on the test features: `lp_acc1`, `lp_acc5` (from 5 classes on), `lp_mean_per_class_recall`
    (CLIP_benchmark's names), and the `C` chosen.
    """
    from sklearn.linear_model import LogisticRegression

    train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
    if validation_features is None:
        train_features, validation_features, train_labels, validation_labels = _hold_out(
            train_features, train_labels, validation_fraction, seed)
    validation_labels = np.asarray(validation_labels)
    if len(np.unique(train_labels)) < 2:
        raise ValueError(f"linear probe: its training part has {len(np.unique(train_labels))} class; it needs two or "
                         "more")
    accuracies = []
    for strength in regularization:
        classifier = LogisticRegression(C=strength, max_iter=max_iter).fit(train_features, train_labels)
        accuracies.append(float(np.mean(classifier.predict(validation_features) == validation_labels)))
    best = regularization[int(np.argmax(accuracies))]  # the first best: the strongest regularisation among ties
    classifier = LogisticRegression(C=best, max_iter=max_iter).fit(
        np.concatenate([train_features, validation_features]), np.concatenate([train_labels, validation_labels]))
    # classes the probe never saw score below every seen one (finite: the metrics rank them, last)
    seen = classifier.decision_function(test_features)
    seen = seen if seen.ndim == 2 else np.stack([-seen, seen], axis=1)  # two classes: one margin
    scores = np.full((len(test_features), len(class_names)), seen.min() - 1.0)
    scores[:, classifier.classes_] = seen
    outcomes: dict[str, np.ndarray] = {}
    found = classification_metrics(scores, test_labels, class_names, outcomes=outcomes)
    metrics = {f"lp_{key}": value for key, value in found.items() if key not in ("correct", "per_class_recall")}
    metrics.update(C=float(best), validation_accuracy=dict(zip(map(str, regularization), accuracies)), seed=seed,
                   normalized=True)
    return TaskResult("linear_probe", metrics, {f"lp_{key}": value for key, value in outcomes.items()})


def _hold_out(features: np.ndarray, labels: np.ndarray, fraction: float, seed: int):
    """`fraction` of the rows held out as validation (`stratified_split`)."""
    fit, held = stratified_split(labels, fraction, seed, "--probe_validation_fraction")
    return features[fit], features[held], labels[fit], labels[held]


def stratified_split(labels: np.ndarray, fraction: float, seed: int, option: str) -> tuple[np.ndarray, np.ndarray]:
    """Row indices `(kept, held out)`, `fraction` of them held out, stratified by label where every class has 2 rows
    and the held-out part can hold every class; else a plain random split (logged)."""
    from sklearn.model_selection import train_test_split

    if not 0 < fraction < 1:
        raise ValueError(f"{option} must lie in (0, 1), got {fraction}")
    rows, labels = np.arange(len(labels)), np.asarray(labels)
    counts = np.bincount(labels)
    classes = int((counts > 0).sum())
    held = int(np.ceil(fraction * len(rows)))
    stratify = labels if counts[counts > 0].min() >= 2 and classes <= min(held, len(rows) - held) else None
    if stratify is None:
        logger.warning("%s: %d rows of %d classes cannot be split stratified by class; splitting at random", option,
                       len(rows), classes)
    try:
        kept, out = train_test_split(rows, test_size=fraction, random_state=seed, stratify=stratify)
    except ValueError as error:
        raise ValueError(f"{option} {fraction}: cannot split {len(rows)} rows ({error})") from error
    return np.sort(kept), np.sort(out)


def linear_probe_task(model, processor, train, test, validation=None, validation_fraction: float = 0.2,
                      seed: int = 0, batch_size: int = 256, num_workers: int = 0, embed=None) -> TaskResult:
    """`linear_probe` on the image embeddings of `train`, `test` and optionally `validation` (`LabelledData`; their
    labels matched by class name where the splits' class lists differ). `embed(data)`: the embeddings of a split
    (default: `embed_images`; a suite passes a cache)."""
    embed = embed or (lambda data: embed_images(model, processor, data.dataset, batch_size=batch_size,
                                                num_workers=num_workers))
    parts = [part for part in (train, test, validation) if part is not None]
    names = test.class_names
    if any(part.class_names != names for part in parts):  # e.g. text labels, each split's own sorted list
        names = sorted({name for part in parts for name in part.class_names})
    index = {name: i for i, name in enumerate(names)}

    def labels(data):
        return np.array([index[data.class_names[label]] for label in data.labels], dtype=np.int64)

    return linear_probe(embed(train), labels(train), embed(test), labels(test), names,
                        embed(validation) if validation is not None else None,
                        labels(validation) if validation is not None else None, validation_fraction, seed=seed)


def split_for_probe(data, test_fraction: float, seed: int = 0):
    """A single labelled split cut into (train, test) `LabelledData` (`stratified_split`), for a linear probe on data
    with no training split of its own."""
    train_rows, test_rows = stratified_split(data.labels, test_fraction, seed, "--probe_test_fraction")
    return tuple(type(data)(data.dataset.select(part), data.class_names, f"{data.source} ({name} part)", data.split,
                            data.skipped) for name, part in (("train", train_rows), ("test", test_rows)))


def zeroshot_retrieval(model, processor, captioned, ks=(1, 5, 10), batch_size: int = 256,
                       backend: str = "auto", num_workers: int = 0) -> TaskResult:
    """Retrieval both ways on captioned images (`image`, `caption`, optional `image_id`):
    `image_retrieval_recall@K` (text to image) and `text_retrieval_recall@K` (image to text), and their mAP."""
    _, image_embeds, text_embeds, text_to_image = embed_captioned(model, processor, captioned, batch_size=batch_size,
                                                                  num_workers=num_workers)
    outcomes: dict[str, np.ndarray] = {}
    metrics = retrieval_metrics(image_embeds, text_embeds, text_to_image, tuple(ks), backend=backend,
                                outcomes=outcomes)
    return TaskResult("zeroshot_retrieval", metrics, outcomes)


def clip_benchmark_record(dataset: str, model: str, result: TaskResult, pretrained: str = "",
                          language: str = "en") -> dict:
    """A result in CLIP_benchmark's JSON layout: `{dataset, model, pretrained, task, metrics, language}`; `metrics`
    holds no NaN (JSON has none: an undefined metric is left out)."""
    metrics = {key: value for key, value in result.metrics.items()
               if not (isinstance(value, float) and not np.isfinite(value))}
    return {"dataset": dataset, "model": model, "pretrained": pretrained, "task": result.task, "metrics": metrics,
            "language": language}


def validate_record(record: dict) -> None:
    """Check a record against CLIP_benchmark's layout (`clip_benchmark_schema.json`, a JSON Schema): raises
    `jsonschema.ValidationError` naming the offending key."""
    import jsonschema

    jsonschema.validate(record, json.loads(SCHEMA_FILE.read_text()))
