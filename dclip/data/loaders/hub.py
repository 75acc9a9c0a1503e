"""The loader of anything `datasets` reads itself: a Hub data set, a local data folder, or a `save_to_disk` folder
(`load_hub_dataset`), its columns renamed to the common ones and its images checked by the shared pipeline of
`common`."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .common import LoadReport, _to_pairs


if TYPE_CHECKING:
    from datasets import Dataset, IterableDataset


HUB_CAPTION_COLUMNS = ("caption", "captions", "text", "sentences", "sentence")


def is_saved_to_disk(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk` (read with
    `load_from_disk`, not `load_dataset`)."""
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, name))
                                       for name in ("state.json", "dataset_dict.json"))


def load_hub_dataset(
    name: str, split: str = "train", image_column: str = "image", caption_column: str | None = None,
    image_id_column: str | None = None, streaming: bool = False, num_proc: int | None = None, **kwargs,
) -> tuple[Dataset | IterableDataset, LoadReport]:
    """
    Any dataset `datasets.load_dataset(name, split=split, **kwargs)` reads (a Hub name or a local data folder), or a
    folder written by `save_to_disk`; its columns are renamed to the common ones.

    `caption_column` defaults to the first of caption, captions, text, sentences, sentence; a column of lists gives
    one row per caption. `image_id_column` defaults to `image_id` when there is one, else each image's id comes from
    its content (`content_id`: a hash of its bytes, else its path), the same in a stream and in every process.
    `boxes` and `spans` columns are kept.
    """
    from datasets import DatasetDict, Image, load_dataset, load_from_disk

    if not split:
        raise ValueError(f"`split` must name one split of {name!r} (e.g. 'train'), got {split!r}.")
    if is_saved_to_disk(name):
        dataset = load_from_disk(name)
        if isinstance(dataset, DatasetDict):
            if split not in dataset:
                raise ValueError(f"{name}: no split {split!r}; it has {list(dataset)}.")
            dataset = dataset[split]
        dataset = dataset.to_iterable_dataset() if streaming else dataset
    else:
        dataset = load_dataset(name, split=split, streaming=streaming, **kwargs)
    columns = list(dataset.column_names or [])
    caption_column = caption_column or next((column for column in HUB_CAPTION_COLUMNS if column in columns), None)
    if image_id_column is None and "image_id" in columns:
        image_id_column = "image_id"
    for argument, column in (("image_column", image_column), ("caption_column", caption_column),
                             ("image_id_column", image_id_column)):
        if (column is None and argument == "caption_column") or (column is not None and column not in columns):
            raise ValueError(f"`{argument}`={column!r} is not a column of {name!r} [{split}]; its columns: {columns}.")
    dataset = dataset.cast_column(image_column, Image(decode=False))
    return _to_pairs(dataset, LoadReport(f"{name} [{split}]"), streaming, num_proc, image_column=image_column,
                     caption_column=caption_column, image_id_column=image_id_column, extra_columns=columns)
