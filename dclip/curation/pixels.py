"""Perceptual duplicates from the images' own pixels, where the images are at hand: an image re-encoded, resized a
little, shifted by a pixel or two or with fresh sensor noise is still nearly the same picture at 16 x 16, while a CLIP
embedding may place it no nearer to its original than to a different picture of the same things.

Each image becomes an RGB thumbnail (`pixel_size` square, box-filtered), mean-centred and L2-normalised, so the
cosine of two thumbnails compares their layout of colour, not their brightness; two images are duplicates from
`pixel_threshold` on. The pairs are found as the embeddings' are: k-means lists of an inverted file, range searches
of `duplicate_nprobe` lists each. A uniformly grey image has no layout and pairs with nothing here (its exact copies
are still found by their embeddings); one of a single colour pairs with others of about that hue.
"""

from __future__ import annotations

import logging

import numpy as np
from tqdm.auto import tqdm

from .duplicates import find_duplicate_pairs, ivf_index
from .vectors import cluster_count, fit_centers


logger = logging.getLogger(__name__)


def thumbnail_vectors(images, size: int = 16) -> np.ndarray:
    """`(images, 3 * size * size)` float32: each PIL image's box-filtered RGB thumbnail, centred on its mean over
    pixels and channels, L2-normalised (a uniformly grey image gives zeros)."""
    from PIL import Image

    out = np.empty((len(images), 3 * size * size), dtype=np.float32)
    for row, image in enumerate(images):
        out[row] = np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BOX), np.float32).ravel()
    out -= out.mean(1, keepdims=True)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return np.divide(out, norms, out=np.zeros_like(out), where=norms > 1e-3)


def dataset_thumbnails(dataset, size: int = 16, image_column: str = "image", batch_size: int = 512) -> np.ndarray:
    """[`thumbnail_vectors`] of a `datasets.Dataset`'s images, decoded batch by batch."""
    parts = [thumbnail_vectors(batch[image_column], size)
             for batch in tqdm(dataset.select_columns([image_column]).iter(batch_size=batch_size),
                               total=-(-len(dataset) // batch_size), desc="thumbnails", unit="batch")]
    return np.concatenate(parts) if parts else np.zeros((0, 3 * size * size), np.float32)


def pixel_duplicate_pairs(thumbnails: np.ndarray, config) -> tuple[np.ndarray, np.ndarray]:
    """The pairs `(first < second)` of samples whose thumbnails' cosine reaches `config.pixel_threshold`, searched
    over an inverted file of k-means lists as `config` (a `SemanticBalanceConfig`) clusters the embeddings."""
    if len(thumbnails) < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    centers = fit_centers(thumbnails, cluster_count(len(thumbnails), config), config)
    index, _ = ivf_index(thumbnails, centers)
    return find_duplicate_pairs(index, thumbnails, config.pixel_threshold, config.duplicate_nprobe)


def dataset_pixel_pairs(dataset, config, image_column: str = "image") -> tuple[np.ndarray, np.ndarray] | None:
    """[`pixel_duplicate_pairs`] of a data set's images; None where `config.pixel_duplicates` is off or the data set
    has no images."""
    if not config.pixel_duplicates or dataset is None or image_column not in dataset.column_names:
        return None
    gib = 2 * len(dataset) * 3 * config.pixel_size**2 * 4 / 2**30  # the thumbnails and their inverted-file copy
    if gib > 8:
        logger.warning("pixel duplicates over %d images hold about %.0f GiB of thumbnails in memory; "
                       "--pixel_duplicates false skips them (the embeddings still find exact copies)",
                       len(dataset), gib)
    pairs = pixel_duplicate_pairs(dataset_thumbnails(dataset, config.pixel_size, image_column), config)
    logger.info("pixel duplicates: %d pairs at thumbnail cosine >= %s", len(pairs[0]), config.pixel_threshold)
    return pairs
