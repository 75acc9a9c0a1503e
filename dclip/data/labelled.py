"""Labelled image data for classification benchmarks (zero-shot classification, linear probe), read through
`datasets` from any of:

- an imagefolder with one subfolder per class (`root/<class>/*.png`, optionally under `train/`, `test/`, ...
  split folders): the classes are the folder names;
- an imagefolder whose `metadata.jsonl` / `metadata.csv` has a label column;
- a CSV or JSON-lines file with an image-path column (relative to the file, or to `image_root`) and a label column;
- a Hub data set (or a local data folder, or a `save_to_disk` folder) whose label is a `ClassLabel`.

Every source becomes a `LabelledData`: a `datasets.Dataset` with an `image` column (`datasets.Image()`) and an integer
`label` column, and the class names in label order. Class names come from the `ClassLabel` (underscores read as
spaces: `golden_retriever` -> `golden retriever`), from the sorted distinct values of a text label column, or from a
names file (`.txt`, one per line, or `.json`: a list, or a mapping from label to name) that overrides either.
Unreadable images are skipped, counted and logged, as in `dclip.data.loaders`."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path


logger = logging.getLogger(__name__)

IMAGE_COLUMNS = ("image", "img", "file_name", "image_path", "filepath", "path", "jpg", "png")
LABEL_COLUMNS = ("label", "labels", "fine_label", "class", "cls")
TABLE_SUFFIXES = {".csv": "csv", ".tsv": "csv", ".jsonl": "json", ".json": "json"}
TEXT_DTYPES = ("string", "large_string", "string_view")


@dataclass
class LabelledData:
    """`dataset` (columns `image`, a `datasets.Image()`, and `label`, an int in `[0, len(class_names))`), the class
    names in label order, where it came from, its split (None for a source without splits: a CSV/JSONL file, a
    saved `Dataset`), and the images skipped as unreadable (reason -> count)."""

    dataset: object
    class_names: list[str]
    source: str
    split: str | None
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def labels(self):
        import numpy as np

        return np.asarray(self.dataset["label"], dtype=np.int64)


def load_labelled_dataset(name_or_path: str, split: str = "test", label_column: str | None = None,
                          image_column: str | None = None, class_names_file: str | None = None,
                          image_root: str | None = None, max_samples: int | None = None, seed: int = 0,
                          num_proc: int | None = None, sources: dict | None = None) -> LabelledData:
    """
    The `split` of a labelled image data set (see the module's docstring for the sources), with an `image` and an
    integer `label` column. `label_column` / `image_column`: default, the first of `LABEL_COLUMNS` / the first
    `Image` feature or `IMAGE_COLUMNS` present. `max_samples`: a seeded random subset of that many rows, kept in
    their order (an imagefolder is sorted by class, so its first rows would be one class). `sources`: a dict in which
    whole sources read are kept, so that reading another split of the same source (a probe's training split) does
    not scan an image folder again.
    """
    dataset, source, split = _read_split(name_or_path, split, image_root, sources)
    image_column = image_column or _first_image_column(dataset, name_or_path)
    label_column = label_column or next((c for c in LABEL_COLUMNS if c in dataset.column_names), None)
    if label_column is None or label_column not in dataset.column_names:
        raise ValueError(f"{source}: no label column {label_column or ''} (columns: {dataset.column_names}); pass "
                         f"--label_column")
    if image_column not in dataset.column_names:
        raise ValueError(f"{source}: no image column {image_column!r} (columns: {dataset.column_names}); pass "
                         f"--image_column")
    dataset = dataset.select_columns([image_column, label_column])
    # the classes first, from every row: a subset must not narrow the zero-shot classifier's choices
    dataset, class_names = _integer_labels(dataset, label_column, class_names_file, source)
    if max_samples is not None and max_samples < len(dataset):
        import numpy as np

        rows = np.sort(np.random.default_rng(seed).choice(len(dataset), max_samples, replace=False))
        dataset = dataset.select(rows)
    dataset = _image_feature(dataset, image_column, _relative_to(name_or_path, image_root))
    dataset, skipped = _drop_unreadable(dataset, source, num_proc)
    if not len(dataset):
        raise ValueError(f"{source}: no readable labelled image in split {split!r} (skipped: {skipped})")
    return LabelledData(dataset, class_names, source, split, skipped)


def _read_split(name_or_path: str, split: str, image_root: str | None, sources: dict | None = None):
    """One split of the source as a `datasets.Dataset`, a name for it in messages, and the split read (None where the
    source has no splits: all its rows); a source with splits is read once into `sources`, if given."""
    from datasets import DatasetDict, load_dataset, load_from_disk

    from .loaders import is_saved_to_disk

    path = Path(name_or_path)
    source = f"{name_or_path} [{split}]"
    if path.is_file():
        builder = TABLE_SUFFIXES.get(path.suffix.lower())
        if builder is None:
            raise ValueError(f"{path}: a labelled file must be CSV/TSV or JSON lines, got {path.suffix!r}")
        extra = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
        return load_dataset(builder, data_files=str(path), split="train", **extra), f"{name_or_path}", None
    if is_saved_to_disk(path):
        loaded = load_from_disk(str(path))
        if not isinstance(loaded, DatasetDict):
            return loaded, str(name_or_path), None
        _check_split(loaded, split, name_or_path)
        return loaded[split], source, split
    sources = {} if sources is None else sources
    if name_or_path not in sources:
        if path.is_dir() and not _has_data_files(path):
            sources[name_or_path] = load_dataset("imagefolder", data_dir=str(path))
        else:  # a Hub name, or a local folder of data files (parquet, csv, ...) that `datasets` reads itself
            sources[name_or_path] = load_dataset(str(name_or_path))
    loaded = sources[name_or_path]
    _check_split(loaded, split, name_or_path)
    return loaded[split], source, split


def _has_data_files(path: Path) -> bool:
    """Whether a folder holds tabular data files (a local copy of a Hub data set) rather than images."""
    return any(file.suffix in (".parquet", ".arrow") for file in path.rglob("*") if file.is_file())


def _check_split(loaded, split: str, name: str) -> None:
    if split not in loaded:
        raise ValueError(f"{name}: no split {split!r}; it has {list(loaded)} (pass --eval_split / --train_split)")


def _first_image_column(dataset, name: str) -> str:
    from datasets import Image

    for column, feature in dataset.features.items():
        if isinstance(feature, Image):
            return column
    found = next((c for c in IMAGE_COLUMNS if c in dataset.column_names), None)
    if found is None:
        raise ValueError(f"{name}: no image column (columns: {dataset.column_names}); pass --image_column")
    return found


def read_class_names(path: str) -> list[str] | dict[str, str]:
    """A names file: `.txt` (one name per line, in label order), or `.json` (a list in label order, or a mapping from
    label, an index or a label string, to name)."""
    text = Path(path).read_text()
    if Path(path).suffix.lower() != ".json":
        names = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        names = json.loads(text)
        if isinstance(names, dict):
            names = {str(key): str(value) for key, value in names.items()}
        elif isinstance(names, list):
            names = [str(name) for name in names]
        else:
            raise ValueError(f"class names file {path}: expected a JSON list or object, got {type(names).__name__}")
    if not names:
        raise ValueError(f"class names file {path}: no class names in it")
    return names


def _integer_labels(dataset, label_column: str, class_names_file: str | None, source: str):
    """`dataset` with an integer `label` column, and the class names in label order (see the module's docstring).
    Text labels are numbered in the names file's order (a list) or sorted (no file, or a mapping to names)."""
    from datasets import ClassLabel, Value

    feature = dataset.features[label_column]
    given = read_class_names(class_names_file) if class_names_file else None
    if isinstance(feature, ClassLabel):
        labels = [str(i) for i in range(feature.num_classes)]
        names = [name.replace("_", " ") for name in feature.names]
        if isinstance(given, dict):  # keyed by index or by the ClassLabel's own names (ImageNet's wnids, ...)
            given = {str(i): given.get(str(i), given.get(name)) for i, name in enumerate(feature.names)}
            given = {key: value for key, value in given.items() if value is not None}
    elif getattr(feature, "dtype", None) in TEXT_DTYPES:
        values = {str(value) for value in dataset[label_column]}
        labels = list(given) if isinstance(given, list) else sorted(values)
        index = {label: i for i, label in enumerate(labels)}
        unknown = sorted(values - set(index))
        if unknown:
            raise ValueError(f"{source}: labels {unknown[:5]} are not in the class names file {class_names_file}")
        dataset = dataset.map(lambda row: {label_column: index[str(row[label_column])]}, desc="class indices")
        names = list(labels)
    elif str(getattr(feature, "dtype", "")).startswith(("int", "uint")):
        count = max(dataset[label_column], default=-1) + 1
        labels, names = [str(i) for i in range(count)], None
    else:
        raise ValueError(f"{source}: label column {label_column!r} must hold integers, strings or a ClassLabel, got "
                         f"{feature}")
    if isinstance(given, dict):
        missing = [label for label in labels if label not in given]
        if missing:
            raise ValueError(f"class names file {class_names_file}: no name for labels {missing[:5]}")
        names = [given[label] for label in labels]
    elif isinstance(given, list):
        names = given
    if names is None:
        raise ValueError(f"{source}: integer labels need class names for prompts: pass --class_names_file (a .txt "
                         "with one name per line, in label order)")
    dataset = dataset.cast_column(label_column, Value("int64"))
    found = dataset[label_column]
    if len(found) and (min(found) < 0 or max(found) >= len(names)):
        raise ValueError(f"{source}: labels run from {min(found)} to {max(found)}, but there are {len(names)} class "
                         f"names")
    if label_column != "label":
        dataset = dataset.rename_column(label_column, "label")
    return dataset, names


def _relative_to(name_or_path: str, image_root: str | None) -> str | None:
    """The folder that relative image paths are read from: `image_root`, else a table file's own folder."""
    if image_root:
        return image_root
    return str(Path(name_or_path).parent) if Path(name_or_path).is_file() else None


def _image_feature(dataset, image_column: str, root: str | None):
    """`dataset` with its images in an `image` column of `datasets.Image()`: path strings made absolute."""
    from datasets import Image

    if not isinstance(dataset.features[image_column], Image):
        if root is not None:
            dataset = dataset.map(lambda row: {image_column: os.path.join(root, row[image_column])},
                                  desc="image paths")
        dataset = dataset.cast_column(image_column, Image())
    return dataset.rename_column(image_column, "image") if image_column != "image" else dataset


def _drop_unreadable(dataset, source: str, num_proc: int | None):
    """`dataset` without the rows whose image is missing or does not decode, each logged, counted by reason."""
    from datasets import Image

    from .loaders import check_image

    raw = dataset.cast_column("image", Image(decode=False))
    def check(row):
        reason, message, _ = check_image(row["image"])
        return {"problem": reason or "", "message": message}

    problems = raw.map(check, remove_columns=raw.column_names, num_proc=num_proc, desc="checking images")
    reasons = problems["problem"]
    skipped: dict[str, int] = {}
    for row, (reason, message) in enumerate(zip(reasons, problems["message"])):
        if reason:
            skipped[reason] = skipped.get(reason, 0) + 1
            logger.warning("%s: row %d skipped (%s): %s", source, row, reason, message)
    if skipped:
        dataset = dataset.select([row for row, reason in enumerate(reasons) if not reason])
    return dataset, skipped
