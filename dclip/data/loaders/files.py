"""Loaders of metadata files that list local image files: COCO / Flickr30k Karpathy-split JSON
(`load_coco_karpathy`), Flickr30k `results.csv` (`load_flickr30k`), Conceptual-Captions-style TSV (`load_cc_tsv`) and
the Hugging Face `imagefolder` layout with `metadata.jsonl` (`load_imagefolder`). Each reads its metadata into entries
and hands them to the shared pipeline of `common`."""

from __future__ import annotations

import json
import os
import re
from typing import TYPE_CHECKING

from .common import CAPTION_KEYS, LoadReport, _add_entry, _entries_to_pairs, _new_entries, _single_split


if TYPE_CHECKING:
    from datasets import Dataset, IterableDataset


KARPATHY_SPLITS = ("train", "restval", "val", "test")
CSV_HEADER = "image_name| comment_number| comment"  # Flickr30k results.csv


def load_coco_karpathy(
    json_path: str | os.PathLike, image_root: str | os.PathLike | None = None, split: str | None = "train",
    include_restval: bool = True, streaming: bool = False, num_proc: int | None = None,
) -> tuple[Dataset | IterableDataset, LoadReport]:
    """
    A Karpathy-split JSON (`dataset_coco.json`, also `dataset_flickr30k.json`): `{"images": [{"filepath",
    "filename", "split", "cocoid", "sentences": [{"raw"}, ...]}, ...]}`.

    The image is `image_root/filepath/filename` (`image_root/filename` without `filepath`; `image_root` defaults to
    the JSON's folder). `split` is "train", "val", "test", "restval" or None (all); "train" includes "restval"
    unless `include_restval=False`. `image_id` is the `cocoid` where there is one, else the file name.
    """
    json_path = os.fspath(json_path)
    root = os.fspath(image_root) if image_root is not None else os.path.dirname(json_path)
    if split == "validation":
        split = "val"
    if split is not None and split not in KARPATHY_SPLITS:
        raise ValueError(f"`split` must be one of {KARPATHY_SPLITS} or None (all), got {split!r}.")
    wanted = {"train", "restval"} if split == "train" and include_restval else {split}
    try:
        with open(json_path, encoding="utf-8") as handle:
            images = json.load(handle)["images"]
    except json.JSONDecodeError as error:
        raise ValueError(f"{json_path} line {error.lineno}, column {error.colno}: "
                         f"invalid JSON ({error.msg}).") from None
    except (KeyError, TypeError):
        raise ValueError(f"{json_path}: expected a Karpathy-split JSON object with an 'images' list.") from None
    entries = _new_entries()
    for index, image in enumerate(images):
        where = f"{json_path} images[{index}]"
        required = ("filename", "sentences") if split is None else ("filename", "sentences", "split")
        if not isinstance(image, dict) or any(key not in image for key in required):
            found = sorted(image) if isinstance(image, dict) else type(image).__name__
            raise ValueError(f"{where}: expected an object with keys {required}, got {found}.")
        if split is None or image["split"] in wanted:
            path = os.path.join(root, image.get("filepath", ""), image["filename"])
            _add_entry(entries, path, image["sentences"], str(image.get("cocoid", image["filename"])), where)
    return _entries_to_pairs(entries, LoadReport(f"{os.path.basename(json_path)} [{split}]"), streaming, num_proc)


def load_flickr30k(
    path: str | os.PathLike, image_root: str | os.PathLike | None = None, split: str | None = "train",
    streaming: bool = False, num_proc: int | None = None,
) -> tuple[Dataset | IterableDataset, LoadReport]:
    """
    Flickr30k captions, from the Karpathy `dataset_flickr30k.json` (see `load_coco_karpathy`) or from `results.csv`
    (`image_name| comment_number| comment`, a header line, 5 captions per image).

    `results.csv` has no splits: it is read whole, as "train" (`split` must be "train" or None); use the Karpathy
    JSON for the usual train/val/test. `image_id` is the image file name in both formats; `image_root` defaults to
    the file's folder.
    """
    path = os.fspath(path)
    if path.lower().endswith(".json"):
        return load_coco_karpathy(path, image_root, split=split, streaming=streaming, num_proc=num_proc)
    if not path.lower().endswith(".csv"):
        raise ValueError(f"`path` must be a Karpathy `dataset_flickr30k.json` or a `results.csv`, got {path!r}.")
    _single_split(split, path)
    root = os.fspath(image_root) if image_root is not None else os.path.dirname(path)
    groups: dict[str, list] = {}  # image name -> [first line, last line, captions]
    with open(path, encoding="utf-8-sig") as handle:
        header = handle.readline()
        if [name.strip() for name in header.split("|")] != ["image_name", "comment_number", "comment"]:
            raise ValueError(f"{path} line 1: expected the header {CSV_HEADER!r}, got {header.strip()!r}.")
        for number, line in enumerate(handle, start=2):
            if not line.strip():
                continue
            fields = line.rstrip("\r\n").split("|", 2)
            if len(fields) == 2 and (match := re.fullmatch(r"\s*(\d+)\s+(.*)", fields[1])):
                fields = [fields[0], *match.groups()]  # a row of the public file lacks its second "|"
            if len(fields) != 3 or not fields[0].strip():
                raise ValueError(f"{path} line {number}: expected {CSV_HEADER!r} fields, got {line.strip()!r}.")
            group = groups.setdefault(fields[0].strip(), [number, number, []])
            group[1] = number
            group[2].append(fields[2])
    entries = _new_entries()
    for name, (first, last, captions) in groups.items():
        where = f"{path} line {first}" if first == last else f"{path} lines {first}-{last}"
        _add_entry(entries, os.path.join(root, name), captions, name, where)
    return _entries_to_pairs(entries, LoadReport(os.path.basename(path)), streaming, num_proc)


def load_cc_tsv(
    tsv_path: str | os.PathLike, image_root: str | os.PathLike | None = None, caption_column: int | str = 0,
    path_column: int | str = 1, has_header: bool | None = None, streaming: bool = False, num_proc: int | None = None,
) -> tuple[Dataset | IterableDataset, LoadReport]:
    """
    A Conceptual-Captions-style TSV with local image paths: by default `caption<TAB>path` lines and no header.

    Columns are positions, or names read from a header line (`has_header` defaults to True when either column is
    given by name). Relative paths are resolved against `image_root` (default: the TSV's folder). Each line is one
    row; `image_id` is the path as written, so lines naming the same image share it.
    """
    tsv_path = os.fspath(tsv_path)
    root = os.fspath(image_root) if image_root is not None else os.path.dirname(tsv_path)
    has_header = isinstance(caption_column, str) or isinstance(path_column, str) if has_header is None else has_header
    entries = _new_entries()
    with open(tsv_path, encoding="utf-8") as handle:
        lines = enumerate(handle, start=1)
        names = next(lines, (1, ""))[1].rstrip("\r\n").split("\t") if has_header else []
        positions = []
        for argument, column in (("caption_column", caption_column), ("path_column", path_column)):
            if isinstance(column, str) and column not in names:
                raise ValueError(f"{tsv_path} line 1: no column {column!r} (`{argument}`); the header has {names}"
                                 + ("." if has_header else " (pass `has_header=True` to read column names)."))
            positions.append(names.index(column) if isinstance(column, str) else column)
        caption_position, path_position = positions
        for number, line in lines:
            if not line.strip():
                continue
            fields = line.rstrip("\r\n").split("\t")
            if len(fields) <= max(positions):
                raise ValueError(f"{tsv_path} line {number}: expected at least {max(positions) + 1} tab-separated "
                                 f"fields, got {len(fields)}: {line.strip()!r}.")
            image = fields[path_position].strip()
            _add_entry(entries, os.path.join(root, image) if image else "", fields[caption_position], image,
                       f"{tsv_path} line {number}")
    return _entries_to_pairs(entries, LoadReport(os.path.basename(tsv_path)), streaming, num_proc)


def load_imagefolder(
    folder: str | os.PathLike, split: str | None = "train", caption_column: str | None = None,
    streaming: bool = False, num_proc: int | None = None,
) -> tuple[Dataset | IterableDataset, LoadReport]:
    """
    The Hugging Face `imagefolder` layout: `folder/<split>/metadata.jsonl` (or `folder/metadata.jsonl` for a single
    "train" split), one JSON object a line with `file_name` (relative to the metadata file) and `caption` or `text`
    (or `caption_column`), a string or a list of captions; optional `image_id`, `boxes` and `spans` are kept.

    The metadata is read here rather than by `load_dataset("imagefolder")`, which rejects a caption column mixing
    strings and lists and cannot say which listed file is missing.
    """
    folder = os.fspath(folder)
    if split and os.path.isfile(os.path.join(folder, split, "metadata.jsonl")):
        directory = os.path.join(folder, split)
    elif split in (None, "train") and os.path.isfile(os.path.join(folder, "metadata.jsonl")):
        directory = folder
    else:
        found = sorted(name for name in os.listdir(folder)
                       if os.path.isfile(os.path.join(folder, name, "metadata.jsonl")))
        raise ValueError(f"{folder}: no metadata.jsonl for split {split!r} (expected {folder}/{split}/metadata.jsonl, "
                         f"or {folder}/metadata.jsonl for 'train'); splits with one: {found}.")
    metadata = os.path.join(directory, "metadata.jsonl")
    records = []
    with open(metadata, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{metadata} line {number}: invalid JSON ({error.msg}).") from None
            record = record if isinstance(record, dict) else {}
            column = caption_column or next((key for key in CAPTION_KEYS if key in record), CAPTION_KEYS[0])
            if "file_name" not in record or column not in record:
                expected = repr(caption_column) if caption_column else " or ".join(map(repr, CAPTION_KEYS))
                raise ValueError(f"{metadata} line {number}: expected an object with 'file_name' and {expected}, "
                                 f"got {line.strip()[:120]!r}.")
            records.append((number, record, record[column]))
    extra_columns = [name for name in ("boxes", "spans") if any(name in record for _, record, _ in records)]
    entries = _new_entries(extra_columns)
    for number, record, captions in records:
        _add_entry(entries, os.path.join(directory, record["file_name"]), captions,
                   str(record.get("image_id", record["file_name"])), f"{metadata} line {number}",
                   **{name: record.get(name) for name in extra_columns})
    report = LoadReport(f"{os.path.basename(os.path.normpath(folder))} [{split or 'train'}]")
    return _entries_to_pairs(entries, report, streaming, num_proc, extra_columns)
