"""The run's data: the `train` and `eval` splits (the embedded scenes, or a captioned data set through
`dclip.data.loaders`), cut to `--max_train_samples`, a curated `--train_indices` file and `--max_eval_samples`. The
training, evaluation and curation CLIs all read their data here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from datasets import DatasetDict

from ..arguments import DataArguments
from .scenes import SceneConfig, load_scenes


def load_data(data_args: DataArguments, seed: int) -> tuple[DatasetDict, dict[str, dict]]:
    """`train` and `eval` splits (the embedded scenes, or a real captioned data set through `dclip.data.loaders`), and
    per split what the loader kept and skipped (missing or corrupt images, empty captions)."""
    reports: dict[str, dict] = {}
    if data_args.dataset_name is None:
        scenes = load_scenes(SceneConfig(
            num_train=data_args.num_train_scenes, image_size=data_args.image_size, seed=seed,
            exact_duplicate_fraction=data_args.exact_duplicate_fraction,
            near_duplicate_fraction=data_args.near_duplicate_fraction, concept_fraction=data_args.concept_fraction,
        ), cache_dir=data_args.cache_dir)
        data = DatasetDict(train=scenes["train"], eval=scenes[data_args.eval_split], validation=scenes["validation"],
                           test=scenes["test"])
    else:
        from .loaders import load_caption_dataset

        data = DatasetDict()
        extra = {"image_root": data_args.image_root} if data_args.image_root else {}
        for name, split in (("train", data_args.train_split), ("eval", data_args.eval_split)):
            streaming = data_args.streaming and name == "train"
            dataset, report = load_caption_dataset(data_args.dataset_name, format=data_args.dataset_format,
                                                   split=split, streaming=streaming, **extra)
            if not streaming and len(dataset) == 0:  # before any stage: nothing to train on or to evaluate
                skipped = ", ".join(f"{count} {reason}" for reason, count in sorted(report.skipped.items()))
                raise ValueError(f"{report.source}: no usable (image, caption) pair in split {split!r} (skipped: "
                                 f"{skipped or 'nothing; it has no rows'}). Every caption empty or every image "
                                 "unreadable? The log names each skipped file.")
            data[name] = dataset
            reports[name] = {"source": report.source, "rows": report.num_rows, "images": report.num_images,
                             "skipped": dict(report.skipped)}
    if data_args.streaming:  # checked and counted as it is read (the report's counts grow as the stream is)
        pass
    elif data_args.max_train_samples is not None:  # first, as in examples/curate.py, so curated indices line up
        data["train"] = data["train"].select(range(min(data_args.max_train_samples, len(data["train"]))))
    if data_args.train_indices is not None:
        data["train"] = select_rows(data["train"], data_args.train_indices)
    data["eval"] = data["eval"].select(range(min(data_args.max_eval_samples, len(data["eval"]))))
    return data, reports


def select_rows(dataset, indices_file: str):
    """The rows of `dataset` listed in a `.npy` file of integer indices, with a clear error for a bad file."""
    try:
        indices = np.load(indices_file)
    except (OSError, ValueError) as error:
        raise ValueError(f"--train_indices {indices_file}: not a readable .npy file ({error})") from error
    if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer) or not len(indices):
        raise ValueError(f"--train_indices {indices_file}: expected a non-empty 1-d array of integer row indices, got "
                         f"{indices.dtype} of shape {indices.shape}")
    report = Path(indices_file).with_name("report.json")  # examples/curate.py writes one beside the indices
    if report.is_file():
        rows = json.loads(report.read_text()).get("rows")
        if rows is not None and rows != len(dataset):
            raise ValueError(f"--train_indices {indices_file}: curated from {rows} rows ({report}), but this "
                             f"training split has {len(dataset)}: the same data arguments and --seed are needed")
    if (indices.min() < 0 or indices.max() >= len(dataset)):
        raise ValueError(f"--train_indices {indices_file}: indices must lie in [0, {len(dataset)}), the training "
                         f"split's rows; got {indices.min()}..{indices.max()} (made for another data set?)")
    return dataset.select(indices)
