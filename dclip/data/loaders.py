"""Loaders that turn real image-caption formats into one common shape.

Every loader returns `(dataset, report)`: a `datasets.Dataset` (a `datasets.IterableDataset` with `streaming=True`)
of (image, caption) pairs, and a `LoadReport`. The columns are

- `image`: a `datasets.Image()` feature, a PIL image on access (stored as a path; as bytes for webdataset shards and
  for Hub datasets that hold bytes),
- `caption`: `str`, stripped of surrounding whitespace,
- `image_id`: `str`, shared by all the captions of one image (an image with 5 captions gives 5 rows),
- `boxes` (`[x1, y1, x2, y2]` in [0, 1]) and `spans` (`str`): only when the source has them.

Bad samples never stop a run: a missing or undecodable image (each is fully decoded, so truncated files are caught)
and an empty caption are skipped, counted in the report by reason and logged with the file and caption index.
Malformed metadata (bad JSON, a line with missing fields or columns) raises a `ValueError` naming the file and line.
Non-streaming loads check every image up front (`num_proc` processes); streaming loads check each sample when it is
met, and the report's counts grow as the dataset is iterated.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import os
import posixpath
import re
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from datasets import Dataset, IterableDataset


logger = logging.getLogger(__name__)

FORMATS = ("coco_karpathy", "flickr30k", "cc_tsv", "imagefolder", "webdataset", "hub")
KARPATHY_SPLITS = ("train", "restval", "val", "test")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # webdataset members holding the image, in order of preference
CAPTION_KEYS = ("caption", "text")  # imagefolder metadata / webdataset json keys holding the caption(s)
CSV_HEADER = "image_name| comment_number| comment"  # Flickr30k results.csv
HUB_CAPTION_COLUMNS = ("caption", "captions", "text", "sentences", "sentence")


@dataclass
class LoadReport:
    """
    What a loader kept and skipped.

    `skipped` maps a reason to a count: images for "missing_file" / "corrupt_image", unreadable tar shards for
    "corrupt_shard", captions for "empty_caption". `examples` holds the first `max_examples` offending samples (file,
    line or sample key, caption index, error). With `streaming=True` the counts grow as the dataset is iterated, in
    the process that iterates it (DataLoader workers keep their own copies), and add up over epochs; `num_images`
    then counts changes of `image_id` between consecutive rows.
    """

    source: str
    num_rows: int = 0
    num_images: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)
    max_examples: ClassVar[int] = 20
    _last_image_id: str | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def skip(self, reason: str, detail: str) -> None:
        """Count one skipped sample and log it (the first `max_examples` only, then one line saying so)."""
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if len(self.examples) < self.max_examples:
            self.examples.append(detail)
            logger.warning(f"{self.source}: skipping {detail} [{reason}]")
        elif self.num_skipped == self.max_examples + 1:
            logger.warning(f"{self.source}: more samples skipped; they are counted in the LoadReport, not logged.")

    def _keep_row(self, problem: str | None, image_id: str) -> bool:
        """Streaming filter: count a good row, or count and log a skipped one."""
        if problem is not None:
            self.skip(*problem.split("\t", 1))
            return False
        self.num_rows += 1
        if image_id != self._last_image_id:
            self.num_images += 1
            self._last_image_id = image_id
        return True

    def __str__(self) -> str:
        skipped = ", ".join(f"{count} {reason}" for reason, count in sorted(self.skipped.items())) or "nothing"
        return f"{self.source}: {self.num_rows} rows from {self.num_images} images; skipped {skipped}."


# ---------------------------------------------------------------------------------------------------------------------
# The two helpers shared by every loader: image check and caption-list expansion.


def check_image(image: dict | str | None) -> tuple[str | None, str, tuple[int, int] | None]:
    """
    Fully decode one image, given as a path or as the `{"bytes", "path"}` dict of `datasets.Image(decode=False)`.

    Returns `(reason, message, size)`: `reason` is None for a good image, else "missing_file" or "corrupt_image".
    PIL's `ImageFile.LOAD_TRUNCATED_IMAGES` must be False (its default) for truncated files to be caught.
    """
    from PIL import Image

    image = {"path": image} if isinstance(image, str) else (image or {})
    data, path = image.get("bytes"), image.get("path")
    if data is None and not (path and os.path.isfile(path)):
        return "missing_file", "no such file", None
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as opened:
            opened.load()  # decodes every pixel: a truncated file raises here, not at open
            return None, "", opened.size
    except Exception as error:  # noqa: BLE001 - whatever the decoder raises, the file is unusable
        return "corrupt_image", f"{type(error).__name__}: {error}", None


def caption_list(value: Any) -> list[str]:
    """
    The captions of one image as a list of stripped strings.

    Accepts a string, a list of them, or COCO-style dicts (`{"raw": ...}`, `{"caption": ...}`, `{"text": ...}`) and
    lists of those. None or an empty list is one empty caption, so that it is counted when skipped.
    """
    if value is None:
        return [""]
    if isinstance(value, str):
        return [value.strip()]
    if isinstance(value, dict):
        return caption_list(next((value[key] for key in ("raw", *CAPTION_KEYS) if key in value), None))
    if isinstance(value, (list, tuple)):
        return [caption for item in value for caption in caption_list(item)] or [""]
    return [str(value).strip()]


# ---------------------------------------------------------------------------------------------------------------------
# The shared pipeline: a table of "entries" (one per image, with its captions) -> checked (image, caption) rows.


def _pair_features(extra_columns: Sequence[str] = ()):
    from datasets import Features, Image, List, Value

    features = {"image": Image(decode=False), "caption": Value("string"), "image_id": Value("string")}
    if "boxes" in extra_columns:
        features["boxes"] = List(List(Value("float32"), length=4))
    if "spans" in extra_columns:
        features["spans"] = List(Value("string"))
    return Features({**features, "_problem": Value("string")})


def _entry_features(extra_columns: Sequence[str] = ()):
    from datasets import Features, Image, List, Value

    features = {
        "image": Image(decode=False), "caption": List(Value("string")), "image_id": Value("string"),
        "_where": Value("string"), "_problem": Value("string"),
    }
    if "boxes" in extra_columns:
        features["boxes"] = List(List(Value("float32")))
    if "spans" in extra_columns:
        features["spans"] = List(Value("string"))
    return Features(features)


def _normalised_boxes(boxes: Any, size: tuple[int, int], where: str) -> list[list[float]]:
    """Boxes as `[x1, y1, x2, y2]` in [0, 1]; boxes with any coordinate above 1 are taken as pixels."""
    boxes = [list(box) for box in boxes or []]
    if any(len(box) != 4 for box in boxes):
        raise ValueError(f"{where}: `boxes` must be a list of [x1, y1, x2, y2], got {boxes!r}.")
    width, height = size
    scale = (width, height, width, height) if any(value > 1.0 for box in boxes for value in box) else (1, 1, 1, 1)
    return [[min(max(value / side, 0.0), 1.0) for value, side in zip(box, scale)] for box in boxes]


def _expand_batch(
    batch: dict[str, list], indices: list[int], image_column: str, caption_column: str, image_id_column: str | None,
    source: str, extra_columns: Sequence[str],
) -> dict[str, list]:
    """`map` function: check each entry's image, then one row per caption; bad ones become rows with `_problem`."""
    rows: dict[str, list] = {name: [] for name in ("image", "caption", "image_id", *extra_columns, "_problem")}

    def add(image, caption, image_id, problem, extras=None):
        for name, value in (("image", image), ("caption", caption), ("image_id", image_id), ("_problem", problem)):
            rows[name].append(value)
        for name in extra_columns:
            rows[name].append((extras or {}).get(name, []))

    for row, index in enumerate(indices):
        where = batch["_where"][row] if "_where" in batch else f"{source} row {index}"
        image_id = str(batch[image_id_column][row]) if image_id_column else str(index)
        image = batch[image_column][row]
        problem = batch["_problem"][row] if "_problem" in batch else None  # set by the source, e.g. a bad tar
        if problem is None:
            reason, message, size = check_image(image)
            if reason is not None:
                problem = f"{reason}\t{where}: {(image or {}).get('path') or 'image bytes'} ({message})"
        if problem is not None:
            add(None, "", image_id, problem)
            continue
        extras = {}
        if "boxes" in extra_columns:
            extras["boxes"] = _normalised_boxes(batch["boxes"][row], size, where)
        if "spans" in extra_columns:
            extras["spans"] = [str(span) for span in batch["spans"][row] or []]
        for number, caption in enumerate(caption_list(batch[caption_column][row])):
            if caption:
                add(image, caption, image_id, None, extras)
            else:
                add(None, "", image_id, f"empty_caption\t{where}, caption {number}: empty caption")
    return rows


def _has_no_problem(problem: str | None) -> bool:
    return problem is None


def _to_pairs(
    entries: Dataset | IterableDataset, report: LoadReport, streaming: bool, num_proc: int | None = None,
    image_column: str = "image", caption_column: str = "caption", image_id_column: str | None = "image_id",
    extra_columns: Sequence[str] = (),
) -> tuple[Dataset | IterableDataset, LoadReport]:
    """Expand and check `entries` into the common columns; fill `report` (now, or while streaming)."""
    from datasets import Image
    from PIL import ImageFile

    if ImageFile.LOAD_TRUNCATED_IMAGES:
        logger.warning("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True: truncated images will not be detected.")
    extra_columns = [name for name in ("boxes", "spans") if name in extra_columns]
    map_kwargs = dict(
        batched=True, batch_size=256, with_indices=True, remove_columns=entries.column_names,
        features=_pair_features(extra_columns),
        fn_kwargs=dict(
            image_column=image_column, caption_column=caption_column, image_id_column=image_id_column,
            source=report.source, extra_columns=extra_columns,
        ),
    )
    if streaming:
        pairs = entries.map(_expand_batch, **map_kwargs)
        pairs = pairs.filter(report._keep_row, input_columns=["_problem", "image_id"])
    else:
        pairs = entries.map(_expand_batch, num_proc=num_proc, desc=f"Checking images ({report.source})", **map_kwargs)
        for problem in pairs["_problem"]:
            if problem is not None:
                report.skip(*problem.split("\t", 1))
        pairs = pairs.filter(_has_no_problem, input_columns="_problem", num_proc=num_proc)
        report.num_rows, report.num_images = len(pairs), len(pairs.unique("image_id"))
        (logger.warning if report.skipped else logger.info)(str(report))
    return pairs.remove_columns("_problem").cast_column("image", Image()), report


def _entries_to_pairs(
    entries: dict[str, list], report: LoadReport, streaming: bool, num_proc: int | None,
    extra_columns: Sequence[str] = (),
) -> tuple[Dataset | IterableDataset, LoadReport]:
    """Entries read from a metadata file (small: paths and captions, no pixels) -> checked pairs."""
    from datasets import Dataset

    entries["_problem"] = [None] * len(entries["image"])
    table = Dataset.from_dict(entries, features=_entry_features(extra_columns))
    return _to_pairs(table.to_iterable_dataset() if streaming else table, report, streaming, num_proc,
                     extra_columns=extra_columns)


def _new_entries(extra_columns: Sequence[str] = ()) -> dict[str, list]:
    return {name: [] for name in ("image", "caption", "image_id", "_where", *extra_columns)}


def _add_entry(entries: dict[str, list], path: str, captions: Any, image_id: str, where: str, **extras) -> None:
    image = {"path": os.path.abspath(path) if path else None, "bytes": None}  # absolute: valid from any cwd
    values = dict(image=image, caption=caption_list(captions), image_id=image_id, _where=where)
    for name, column in entries.items():
        column.append(values[name] if name in values else extras.get(name))


def _single_split(split: str | None, source: str) -> None:
    if split not in (None, "train"):
        raise ValueError(f"{source} has a single split, read as 'train'; got `split`={split!r}, expected 'train' or None.")


# ---------------------------------------------------------------------------------------------------------------------
# Loaders.


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
        raise ValueError(f"{json_path} line {error.lineno}, column {error.colno}: invalid JSON ({error.msg}).") from None
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
        found = sorted(name for name in os.listdir(folder) if os.path.isfile(os.path.join(folder, name, "metadata.jsonl")))
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


def _expand_shards(shards: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    patterns = [os.fspath(shards)] if isinstance(shards, (str, os.PathLike)) else [os.fspath(s) for s in shards]
    paths = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern))
            if not matches:
                raise ValueError(f"No webdataset shard matches {pattern!r}.")
            paths.extend(matches)
        elif os.path.isfile(pattern):
            paths.append(pattern)
        else:
            raise FileNotFoundError(f"Webdataset shard {pattern!r} does not exist.")
    if not paths:
        raise ValueError("`shards` is empty: expected .tar paths or a glob of them.")
    return paths


def _webdataset_entry(shard: str, key: str, members: dict[str, bytes]) -> dict:
    """One sample (the tar members sharing `key`) as an entry; no image -> an entry with its problem preset."""
    where = f"{shard}: sample {key!r}"
    extension = next((extension for extension in IMAGE_EXTENSIONS if extension in members), None)
    meta = {}
    if "json" in members:
        try:
            meta = json.loads(members["json"])
        except ValueError as error:
            raise ValueError(f"{shard}: member {key}.json is not valid JSON ({error}).") from None
    if "txt" in members:
        captions = members["txt"].decode("utf-8", errors="replace")
    else:
        captions = next((meta[name] for name in CAPTION_KEYS if name in meta), None) if isinstance(meta, dict) else None
    problem = None
    if extension is None:
        problem = f"missing_file\t{where}: no .{'/.'.join(IMAGE_EXTENSIONS)} member (has {sorted(members)})"
    image = {"bytes": members[extension], "path": f"{key}.{extension}"} if extension else None
    return {"image": image, "caption": caption_list(captions), "image_id": key, "_where": where, "_problem": problem}


def _webdataset_entries(shards: list[str]):
    """Entries of webdataset shards, read in order with `tarfile`; a shard that cannot be read is one skip."""
    for shard in shards:
        count = 0
        try:
            with tarfile.open(shard, mode="r|*") as tar:
                key, members = None, {}
                for member in tar:
                    directory, name = posixpath.split(member.name)
                    if not member.isfile() or "." not in name.lstrip("."):
                        continue
                    stem, extension = name.split(".", 1)
                    if posixpath.join(directory, stem) != key:
                        if key is not None:
                            count += 1
                            yield _webdataset_entry(shard, key, members)
                        key, members = posixpath.join(directory, stem), {}
                    members[extension.lower()] = tar.extractfile(member).read()
                if key is not None:
                    count += 1
                    yield _webdataset_entry(shard, key, members)
        except (tarfile.TarError, OSError, EOFError) as error:
            problem = f"corrupt_shard\t{shard}: unreadable after {count} samples ({type(error).__name__}: {error})"
            yield {"image": None, "caption": [], "image_id": "", "_where": shard, "_problem": problem}


def load_webdataset(
    shards: str | os.PathLike | Sequence[str | os.PathLike], streaming: bool = False, num_proc: int | None = None,
    cache_dir: str | None = None,
) -> tuple[Dataset | IterableDataset, LoadReport]:
    """
    Webdataset `.tar` shards (paths, or a glob), read with the standard library: members sharing a key (the path
    up to the first dot of the file name) form a sample; the image is the `.jpg`/`.jpeg`/`.png`/`.webp` member, the
    caption(s) the `.txt` member or the `caption`/`text` field of the `.json` member. `image_id` is the key.

    Images are kept as bytes. Non-streaming, the samples are written to the `datasets` cache (`cache_dir`), keyed by
    the shards' paths, sizes and modification times; with `streaming=True`, rows are read lazily, shard by shard.
    """
    from datasets import Dataset, IterableDataset
    from datasets.exceptions import DatasetGenerationError

    paths = _expand_shards(shards)
    report = LoadReport(os.path.basename(paths[0]) + (f" (+{len(paths) - 1} shards)" if len(paths) > 1 else ""))
    kwargs = dict(generator=_webdataset_entries, features=_entry_features(), gen_kwargs={"shards": paths})
    if streaming:
        entries = IterableDataset.from_generator(**kwargs)
    else:
        stats = [(path, os.path.getsize(path), os.path.getmtime(path)) for path in paths]
        fingerprint = hashlib.sha256(json.dumps(["webdataset-v1", stats]).encode()).hexdigest()[:16]
        try:
            entries = Dataset.from_generator(**kwargs, cache_dir=cache_dir, fingerprint=fingerprint,
                                             num_proc=min(num_proc, len(paths)) if num_proc else None)
        except DatasetGenerationError as error:  # let our own "malformed metadata" error through unwrapped
            if isinstance(error.__cause__, ValueError):
                raise error.__cause__ from None
            raise
    return _to_pairs(entries, report, streaming, num_proc)


def load_hub_dataset(
    name: str, split: str = "train", image_column: str = "image", caption_column: str | None = None,
    image_id_column: str | None = None, streaming: bool = False, num_proc: int | None = None, **kwargs,
) -> tuple[Dataset | IterableDataset, LoadReport]:
    """
    Any dataset `datasets.load_dataset(name, split=split, **kwargs)` reads (a Hub name or a local data folder), or a
    folder written by `save_to_disk`; its columns are renamed to the common ones.

    `caption_column` defaults to the first of caption, captions, text, sentences, sentence; a column of lists gives
    one row per caption. `image_id_column` defaults to `image_id` when there is one, else the row index is used.
    `boxes` and `spans` columns are kept.
    """
    from datasets import DatasetDict, Image, load_dataset, load_from_disk

    if not split:
        raise ValueError(f"`split` must name one split of {name!r} (e.g. 'train'), got {split!r}.")
    if os.path.isdir(name) and any(os.path.isfile(os.path.join(name, f)) for f in ("state.json", "dataset_dict.json")):
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


LOADERS = {
    "coco_karpathy": load_coco_karpathy, "flickr30k": load_flickr30k, "cc_tsv": load_cc_tsv,
    "imagefolder": load_imagefolder, "webdataset": load_webdataset, "hub": load_hub_dataset,
}
FILE_FORMATS = {".csv": "flickr30k", ".tsv": "cc_tsv", ".tar": "webdataset"}


def infer_format(name_or_path: str | os.PathLike | Sequence[str | os.PathLike]) -> str:
    """
    The loader format for a path or name: a JSON with an "images" key -> coco_karpathy, .csv -> flickr30k, .tsv ->
    cc_tsv, a folder with metadata.jsonl (or <split>/metadata.jsonl) -> imagefolder, .tar or a glob or list of them
    -> webdataset, any other folder or a Hub-style name ("owner/name") -> hub.
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
    if glob.has_magic(path) and suffix == ".tar":
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
