"""What every loader shares: the `LoadReport` of rows kept and samples skipped, the full-decode image check
(`check_image`), caption lists (`caption_list`), and the pipeline each loader ends in, a table of "entries" (one per
image, with its captions) expanded into checked (image, caption) rows with the common `datasets` features
(`_to_pairs`, `_entries_to_pairs`)."""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from ...folders import file_hash


if TYPE_CHECKING:
    from datasets import Dataset, IterableDataset


logger = logging.getLogger(__package__)  # "dclip.data.loaders", the logger of the module before it became a package


CAPTION_KEYS = ("caption", "text")  # imagefolder metadata / webdataset json keys holding the caption(s)


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


def content_id(image: dict | None, index: int, boxes=None) -> str:
    """The id of an image from its content, where the data names none: a hash of its stored bytes (of the file's,
    where only a path is stored) and of the row's `boxes`, so that every process, split, stream and machine gives a
    row the same id (a row number or a path would not), and rows of one image and its regions share it. A row whose
    image cannot be read (refused anyway) keeps its number."""
    if image and image.get("bytes"):
        digest = hashlib.sha1(image["bytes"])
    elif image and image.get("path") and os.path.isfile(image["path"]):
        digest = file_hash(image["path"], "sha1")
    else:
        return f"row:{index}"
    if boxes is not None:  # one image under other regions is another input to the teacher
        digest.update(repr(boxes).encode())
    return "sha1:" + digest.hexdigest()[:20]


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
        image_id = str(batch[image_id_column][row]) if image_id_column else content_id(
            batch[image_column][row], index, batch["boxes"][row] if "boxes" in extra_columns else None)
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
        raise ValueError(f"{source} has a single split, read as 'train'; got `split`={split!r}, "
                         "expected 'train' or None.")


# `datasets` fingerprints a `map` / `filter` function by its import path, and a loaded data set's fingerprint keys the
# caches built on it (dclip.targets' teacher features): these two keep the path they had before the package split,
# `dclip.data.loaders._expand_batch` and `dclip.data.loaders._has_no_problem` (the package re-exports both).
_expand_batch.__module__ = _has_no_problem.__module__ = __package__
