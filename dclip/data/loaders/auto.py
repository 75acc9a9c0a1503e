"""One entry point for every source: `infer_format` tells the format of a path, glob or Hub name, and
`load_caption_dataset` calls the loader of that format (`LOADERS`, by the names in `FORMATS`)."""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .common import LoadReport, _single_split
from .files import load_cc_tsv, load_coco_karpathy, load_flickr30k, load_imagefolder
from .hub import load_hub_dataset
from .webdataset import load_webdataset


if TYPE_CHECKING:
    from datasets import Dataset, IterableDataset


FORMATS = ("coco_karpathy", "flickr30k", "cc_tsv", "imagefolder", "webdataset", "hub")


LOADERS = {
    "coco_karpathy": load_coco_karpathy, "flickr30k": load_flickr30k, "cc_tsv": load_cc_tsv,
    "imagefolder": load_imagefolder, "webdataset": load_webdataset, "hub": load_hub_dataset,
}
FILE_FORMATS = {".csv": "flickr30k", ".tsv": "cc_tsv", ".tar": "webdataset"}


def infer_format(name_or_path: str | os.PathLike | Sequence[str | os.PathLike]) -> str:
    """
    The loader format for a path or name: a JSON with an "images" key -> coco_karpathy, .csv -> flickr30k, .tsv ->
    cc_tsv, a folder with metadata.jsonl (or <split>/metadata.jsonl) -> imagefolder, .tar or a glob, brace range, URL
    or list of them -> webdataset, any other folder or a Hub-style name ("owner/name") -> hub.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        return "webdataset"
    path = os.fspath(name_or_path)
    suffix = os.path.splitext(path)[1].lower()
    expected = f"pass `format`, one of {FORMATS}"
    if os.path.isdir(path):
        split_metadata = glob.glob(os.path.join(glob.escape(path), "*", "metadata.jsonl"))
        if os.path.isfile(os.path.join(path, "metadata.jsonl")) or split_metadata:
            return "imagefolder"
        return "hub"  # a local data folder or `save_to_disk` output, read by `datasets`
    if os.path.isfile(path):
        if suffix == ".json":
            with open(path, encoding="utf-8") as handle:
                if re.search(r'"images"\s*:', handle.read(1 << 16)):
                    return "coco_karpathy"
            raise ValueError(f"{path!r} is JSON without an 'images' key, so not a Karpathy-split file; {expected}.")
        if suffix in FILE_FORMATS:
            return FILE_FORMATS[suffix]
        raise ValueError(f"Cannot tell the format of {path!r} from its suffix {suffix!r}; {expected}.")
    if suffix == ".tar" and (glob.has_magic(path) or "{" in path or "://" in path):  # a glob, brace range or URL
        return "webdataset"
    if suffix in (".json", ".jsonl", *FILE_FORMATS):
        raise FileNotFoundError(f"{path!r} does not exist.")
    if re.fullmatch(r"[\w.-]+(/[\w.-]+)?", path):
        return "hub"
    raise ValueError(f"{path!r} is not an existing file or folder, a glob of .tar shards or a Hub name; {expected}.")


def load_caption_dataset(
    name_or_path: str | os.PathLike | Sequence[str | os.PathLike], format: str | None = None,
    split: str | None = "train", streaming: bool = False, **kwargs,
) -> tuple[Dataset | IterableDataset, LoadReport]:
    """
    Load any supported source into the common columns; returns `(dataset, report)` like every loader here.

    `format` is one of `FORMATS`, or inferred by `infer_format`. `split` goes to the loader; sources without splits
    (CC TSV, webdataset shards, Flickr `results.csv`) are one "train" split. Other keyword arguments go to the loader
    (e.g. `image_root`, `num_proc`, `caption_column`).
    """
    format = format or infer_format(name_or_path)
    if format not in LOADERS:
        raise ValueError(f"Unknown `format` {format!r}; expected one of {FORMATS}.")
    source = name_or_path if format == "webdataset" else os.fspath(name_or_path)
    if format in ("cc_tsv", "webdataset"):
        _single_split(split, f"{format} source {source!r}")
        return LOADERS[format](source, streaming=streaming, **kwargs)
    return LOADERS[format](source, split=split, streaming=streaming, **kwargs)
