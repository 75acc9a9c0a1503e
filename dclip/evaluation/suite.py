"""Benchmark suites: data sets x tasks (`DatasetSpec`, read from a YAML file by `read_suite`), evaluated for any
number of models in one call (`run_suite`). Each (model, data set, task) gives a CLIP_benchmark record (JSON lines);
the models are compared in one table (markdown and CSV), each model against the first, every difference with its
paired-bootstrap 95% interval over the test samples.

A suite file:

```yaml
models: [outputs/default/student/final, outputs/default/student_none/final]   # optional; the CLI adds its own
datasets:
  - name: pets                      # the name in results and tables
    dataset_name: data/pets         # imagefolder, CSV/JSONL, Hub name or save_to_disk folder
    tasks: [zeroshot_classification, linear_probe]
    split: test                     # evaluated split; linear probe trains on train_split
    train_split: train              # null: probe_test_fraction of `split` is held out as the probe's test part
    templates: openai_imagenet      # a named set, a file, or '|'-separated templates
  - name: coco
    dataset_name: dataset_coco.json
    image_root: coco/
    tasks: [zeroshot_retrieval]
```
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from .benchmark import TASKS, TaskResult, clip_benchmark_record


logger = logging.getLogger(__name__)
HEADLINE = {"zeroshot_classification": ("acc1", "acc5", "mean_per_class_recall"),
            "linear_probe": ("lp_acc1", "lp_acc5", "lp_mean_per_class_recall")}


@dataclass
class DatasetSpec:
    """One data set of a suite, and the tasks run on it (see the module's docstring for the file)."""

    name: str
    dataset_name: str
    tasks: list[str] = field(default_factory=lambda: ["zeroshot_classification"])
    split: str = "test"
    train_split: str | None = "train"
    validation_split: str | None = None
    label_column: str | None = None
    image_column: str | None = None
    class_names_file: str | None = None
    image_root: str | None = None
    dataset_format: str | None = None
    templates: str = "simple"
    max_samples: int | None = None
    probe_test_fraction: float = 0.5
    probe_validation_fraction: float = 0.2
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    seed: int = 0

    def __post_init__(self):
        unknown = [task for task in self.tasks if task not in TASKS]
        if unknown or not self.tasks:
            raise ValueError(f"data set {self.name!r}: tasks must be among {list(TASKS)}, got {self.tasks}")


def read_suite(path: str) -> tuple[list[str], list[DatasetSpec]]:
    """`(models, data sets)` of a suite YAML file, with errors naming the file and entry."""
    import yaml

    try:
        suite = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ValueError(f"suite {path}: not a readable YAML file ({error})") from error
    entries = suite.get("datasets")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"suite {path}: needs a non-empty `datasets:` list")
    known = {f.name for f in fields(DatasetSpec)}
    specs = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "name" not in entry or "dataset_name" not in entry:
            raise ValueError(f"suite {path}: datasets[{i}] needs `name` and `dataset_name`, got {entry!r}")
        unknown = sorted(set(entry) - known)
        if unknown:
            raise ValueError(f"suite {path}: datasets[{i}] ({entry['name']}) has unknown keys {unknown}; known: "
                             f"{sorted(known)}")
        try:
            specs.append(DatasetSpec(**entry))
        except ValueError as error:
            raise ValueError(f"suite {path}: {error}") from error
    return list(suite.get("models") or []), specs


class _Data:
    """A suite data set's splits, each read once for all models and tasks (`num_proc` processes check its images),
    and the current model's image embeddings of each split, computed once for all its tasks."""

    def __init__(self, spec: DatasetSpec, num_proc: int | None = None):
        self.spec, self._splits, self.num_proc, self.embeds, self._sources = spec, {}, num_proc, {}, {}

    def labelled(self, split: str):
        from ..data.labelled import load_labelled_dataset

        if split not in self._splits:
            spec = self.spec
            self._splits[split] = load_labelled_dataset(
                spec.dataset_name, split, label_column=spec.label_column, image_column=spec.image_column,
                class_names_file=spec.class_names_file, image_root=spec.image_root, max_samples=spec.max_samples,
                seed=spec.seed, num_proc=self.num_proc, sources=self._sources)
        return self._splits[split]

    def probe_splits(self):
        """(train, validation or None, test) of the linear probe."""
        from .benchmark import split_for_probe

        spec = self.spec
        test = self.labelled(spec.split)
        if spec.train_split and spec.train_split != spec.split and test.split is not None:
            validation = self.labelled(spec.validation_split) if spec.validation_split else None
            return self.labelled(spec.train_split), validation, test
        # no training split of its own (a file, one split, or the evaluated split named again): never train on the
        # test rows; a stratified part of them is held out as the probe's test part
        logger.warning("%s: linear probe on %.0f%% of its rows, trained on the rest (no separate training split)",
                       test.source, 100 * spec.probe_test_fraction)
        train, test = split_for_probe(test, spec.probe_test_fraction, spec.seed)
        return train, None, test

    def embed(self, model, processor, data, batch_size: int, num_workers: int):
        """The image embeddings of a `LabelledData` of this data set under the current model, once."""
        from .embedding import embed_images

        if data.source not in self.embeds:
            self.embeds[data.source] = embed_images(model, processor, data.dataset, batch_size=batch_size,
                                                    num_workers=num_workers)
        return self.embeds[data.source]

    def captioned(self):
        if "captioned" not in self._splits:
            from ..data.loaders import load_caption_dataset

            spec = self.spec
            extra = {"image_root": spec.image_root} if spec.image_root else {}
            dataset, _ = load_caption_dataset(spec.dataset_name, format=spec.dataset_format, split=spec.split, **extra)
            if spec.max_samples is not None:
                dataset = caption_subset(dataset, spec.max_samples, spec.seed)
            self._splits["captioned"] = dataset
        return self._splits["captioned"]


def caption_subset(dataset, max_images: int, seed: int = 0):
    """A seeded random subset of `max_images` images of a captioned data set, each with all its captions (rows by
    `image_id`, else one image a row), in their order; the whole set when it has no more images."""
    import numpy as np

    from .retrieval import image_groups

    _, text_to_image = image_groups(dataset)
    num_images = int(text_to_image.max()) + 1 if len(text_to_image) else 0
    if max_images >= num_images:
        return dataset
    chosen = np.zeros(num_images, dtype=bool)
    chosen[np.random.default_rng(seed).choice(num_images, max_images, replace=False)] = True
    return dataset.select(np.flatnonzero(chosen[text_to_image]))


def run_task(model, processor, data: _Data, task: str, batch_size: int = 256, num_workers: int = 0) -> TaskResult:
    """One task of one suite data set for one loaded model (its image embeddings shared between tasks)."""
    from .benchmark import linear_probe_task, load_templates, zeroshot_classification, zeroshot_retrieval

    spec = data.spec

    def embed(split_data):
        return data.embed(model, processor, split_data, batch_size, num_workers)

    if task == "zeroshot_classification":
        test = data.labelled(spec.split)
        return zeroshot_classification(model, processor, test, load_templates(spec.templates),
                                       batch_size=batch_size, image_embeds=embed(test))
    if task == "linear_probe":
        train, validation, test = data.probe_splits()
        return linear_probe_task(model, processor, train, test, validation, spec.probe_validation_fraction,
                                 seed=spec.seed, embed=embed)
    return zeroshot_retrieval(model, processor, data.captioned(), ks=tuple(spec.ks), batch_size=batch_size,
                              num_workers=num_workers)


def evaluate_suite(models: list[str], specs: list[DatasetSpec], batch_size: int = 256, num_workers: int = 0):
    """Every model on every (data set, task): `(records, results)`, the CLIP_benchmark records in order and the
    `TaskResult`s by model, then (data set name, task). Each split is read once for all models."""
    from .checkpoint import load_dual_encoder

    if not models:
        raise ValueError("a suite needs at least one model (--model_name_or_path, or `models:` in the suite file)")
    from .benchmark import validate_record

    names = [spec.name for spec in specs]
    if len(set(names)) != len(names) or len(set(models)) != len(models):
        raise ValueError(f"suite data set names and models must be unique, got {names} and {models}")
    datas = [_Data(spec, num_proc=num_workers or None) for spec in specs]
    results: dict[str, dict[tuple[str, str], TaskResult]] = {}
    records = []
    for name in models:
        model, processor = load_dual_encoder(name)
        results[name] = {}
        for data in datas:
            data.embeds.clear()  # the previous model's
            for task in data.spec.tasks:
                logger.info("suite: %s on %s, %s", name, data.spec.name, task)
                result = run_task(model, processor, data, task, batch_size=batch_size, num_workers=num_workers)
                results[name][(data.spec.name, task)] = result
                records.append(clip_benchmark_record(data.spec.name, Path(name).name or name, result,
                                                     pretrained=name))
                validate_record(records[-1])
    return records, results


def run_suite(models: list[str], specs: list[DatasetSpec], output_dir: str, batch_size: int = 256,
              num_workers: int = 0, num_resamples: int = 2000) -> dict[str, Path]:
    """`evaluate_suite`, then write `results.jsonl` (CLIP_benchmark records), `outcomes.npz` (per-sample outcomes,
    keyed `model|data set|task|metric`), `table.md` and `table.csv` (each model against the first, with paired 95%
    intervals) and `suite.json` (the suite as run) into `output_dir`; return their paths."""
    records, results = evaluate_suite(models, specs, batch_size=batch_size, num_workers=num_workers)
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    paths = {"results": output / "results.jsonl", "outcomes": output / "outcomes.npz", "table": output / "table.md",
             "csv": output / "table.csv", "suite": output / "suite.json"}
    paths["results"].write_text("".join(json.dumps(record) + "\n" for record in records))
    np.savez_compressed(paths["outcomes"], **{f"{m}|{d}|{t}|{k}": v for m, by_task in results.items()
                                              for (d, t), r in by_task.items() for k, v in r.outcomes.items()})
    rows = comparison_rows(results, num_resamples=num_resamples)
    paths["table"].write_text(markdown_table(rows, models, num_resamples))
    write_csv(rows, paths["csv"])
    paths["suite"].write_text(json.dumps({"models": models, "datasets": [asdict(s) for s in specs]}, indent=2))
    return paths


def reported_metrics(task: str, metrics: dict) -> list[str]:
    """The metrics a suite table (and a card from it) shows for a task, among `metrics`, in reading order (R@1, R@5,
    R@10, then mAP)."""
    if task in HEADLINE:
        return [key for key in HEADLINE[task] if key in metrics]
    from .report import reported_keys

    return [key for key in reported_keys(metrics) if key.startswith(("image_retrieval_", "text_retrieval_"))]


def comparison_rows(results: dict[str, dict[tuple[str, str], TaskResult]], num_resamples: int = 2000) -> list[dict]:
    """A row per (data set, task, metric, model): the value, and for each model after the first the difference to
    the first with its paired-bootstrap 95% interval where the metric has per-sample outcomes (a mean over samples;
    not mean per-class recall, a mean over classes)."""
    from .bootstrap import compare_outcomes

    models = list(results)
    reference = results[models[0]]
    rows = []
    for (dataset, task), first in reference.items():
        for metric in reported_metrics(task, first.metrics):
            for model in models:
                result = results[model][(dataset, task)]
                row = {"dataset": dataset, "task": task, "metric": metric, "model": model,
                       "value": result.metrics.get(metric), "reference": models[0]}
                if model != models[0] and metric in result.outcomes and metric in first.outcomes:
                    comparison = compare_outcomes(result.outcomes, first.outcomes, metric,
                                                  num_resamples=num_resamples)
                    row.update(difference=comparison["difference"], low=comparison["low"],
                               high=comparison["high"], excludes_zero=comparison["excludes_zero"])
                rows.append(row)
    return rows


def markdown_table(rows: list[dict], models: list[str], num_resamples: int = 2000) -> str:
    """The comparison rows as a markdown table: a line per (data set, task, metric), a column per model; after the
    first model each cell is `value (difference [low, high])`, `*` where the interval excludes 0."""
    header = ["data set", "task", "metric"] + [Path(m).name or m for m in models]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    keyed: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        keyed.setdefault((row["dataset"], row["task"], row["metric"]), {})[row["model"]] = row
    for (dataset, task, metric), by_model in keyed.items():
        cells = []
        for model in models:
            row = by_model.get(model, {})
            cell = "-" if row.get("value") is None else f"{row['value']:.4f}"
            if "difference" in row:
                mark = " *" if row["excludes_zero"] else ""
                cell += f" ({row['difference']:+.4f} [{row['low']:+.4f}, {row['high']:+.4f}]{mark})"
            cells.append(cell)
        lines.append("| " + " | ".join([dataset, task, metric] + cells) + " |")
    note = (f"\nEach model after the first ({Path(models[0]).name or models[0]}) shows its difference to it with a "
            f"paired-bootstrap 95% interval over the test samples ({num_resamples:,} resamples); * marks an interval "
            "that excludes 0. Mean per-class recall, a mean over classes, has no interval.\n")
    return "\n".join(lines) + "\n" + note


def write_csv(rows: list[dict], path: Path) -> None:
    columns = ["dataset", "task", "metric", "model", "value", "reference", "difference", "low", "high",
               "excludes_zero"]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({column: row.get(column, "") for column in columns})
