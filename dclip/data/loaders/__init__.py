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

The package holds one module per concern: `common` (the report, the image check, caption lists and the shared
entries-to-pairs pipeline), `files` (COCO / Flickr30k Karpathy JSON, Flickr30k CSV, CC TSV, imagefolder), `webdataset`,
`hub` (anything `datasets` reads) and `auto` (`infer_format`, `load_caption_dataset`); it re-exports their public names.
"""

from .auto import FILE_FORMATS, FORMATS, LOADERS, infer_format, load_caption_dataset
from .common import CAPTION_KEYS, LoadReport, _expand_batch, _has_no_problem, caption_list, check_image  # noqa: F401 - their import path (see the end of `common`)
from .files import CSV_HEADER, KARPATHY_SPLITS, load_cc_tsv, load_coco_karpathy, load_flickr30k, load_imagefolder
from .hub import HUB_CAPTION_COLUMNS, is_saved_to_disk, load_hub_dataset
from .webdataset import IMAGE_EXTENSIONS, load_webdataset


__all__ = [
    "CAPTION_KEYS", "CSV_HEADER", "FILE_FORMATS", "FORMATS", "HUB_CAPTION_COLUMNS", "IMAGE_EXTENSIONS",
    "KARPATHY_SPLITS", "LOADERS", "LoadReport", "caption_list", "check_image", "infer_format", "is_saved_to_disk",
    "load_caption_dataset", "load_cc_tsv", "load_coco_karpathy", "load_flickr30k", "load_hub_dataset",
    "load_imagefolder", "load_webdataset",
]
