"""Thresholds that fit the embeddings they are given. How close two CLIP embeddings of distinct images sit depends on
the model and the data (a web-trained CLIP spreads photos out; a small model trained on similar scenes packs them
within 0.003 of each other), so a fixed cosine threshold that suits one removes almost everything from another.

A threshold left unset is calibrated from the typical spacing of the data: the median cosine distance from a
random sample of rows to their exact nearest neighbours among all rows (exact copies skipped, so that a data set
full of copies does not shrink it to 0). The duplicate threshold is `1 - duplicate_distance_ratio x` that
distance (never stricter than `EXACT_COPY_DISTANCE`, so that copies whose embeddings differ by rounding still
count), the semantic one `1 - semantic_distance_ratio x` it. Both engines calibrate here, from the rows as given,
so they apply the same thresholds.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from .vectors import normalize_embeddings, read_rows


logger = logging.getLogger(__name__)
EXACT_COPY_DISTANCE = 1e-5  # cosine distance under which two embeddings are taken to be of the same image


def nearest_neighbour_distances(embeddings: np.ndarray, rows: np.ndarray, neighbours: int = 8,
                                block_rows: int = 16_384) -> np.ndarray:
    """For each of `rows`, the cosine distance from its embedding to the nearest other row's that is not an exact
    copy of it (distance over `EXACT_COPY_DISTANCE`), by an exact search over every row of `embeddings` (an array
    or memmap, any scale, read block by block); NaN where the `neighbours` nearest are all copies."""
    import faiss

    queries = normalize_embeddings(read_rows(embeddings, rows), row_ids=rows)
    heap = faiss.ResultHeap(len(rows), neighbours + 1, keep_max=True)
    for start in range(0, len(embeddings), block_rows):
        block = normalize_embeddings(embeddings[start : start + block_rows],
                                     row_ids=np.arange(start, min(start + block_rows, len(embeddings))))
        scores, ids = faiss.knn(queries, block, min(neighbours + 1, len(block)), metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(scores, ids + start)
    heap.finalize()
    distance = 1.0 - heap.D.astype(np.float64)
    usable = (heap.I >= 0) & (heap.I != rows[:, None]) & (distance > EXACT_COPY_DISTANCE)
    first = usable.argmax(1)
    return np.where(usable.any(1), distance[np.arange(len(rows)), first], np.nan)


def calibration_rows(num_samples: int, count: int, seed: int) -> np.ndarray:
    """The rows whose nearest neighbours calibrate: `count` drawn without replacement (all when fewer), sorted."""
    if num_samples <= count:
        return np.arange(num_samples, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(num_samples, count, replace=False)).astype(np.int64)


def calibrate(embeddings: np.ndarray, config):
    """`config` (a `SemanticBalanceConfig`) with its unset thresholds calibrated to `embeddings` (see the module),
    and a record of the thresholds applied and of the calibration, for the report."""
    embeddings = np.asarray(embeddings)
    if embeddings.ndim != 2 or not len(embeddings):
        raise ValueError(f"embeddings must be a non-empty (samples, dim) array, got shape {embeddings.shape}")
    record: dict = {}
    unset = [name for name in ("duplicate_threshold", "semantic_threshold") if getattr(config, name) is None]
    if unset:
        rows = calibration_rows(len(embeddings), config.calibration_samples, config.kmeans_seed)
        distances = nearest_neighbour_distances(embeddings, rows)
        known = distances[np.isfinite(distances)]
        spacing = float(np.median(known)) if len(known) else None
        record = {"calibrated": unset, "calibration_rows": len(rows), "median_nearest_neighbour_distance": spacing}
        values = {}
        if config.duplicate_threshold is None:
            distance = config.duplicate_distance_ratio * spacing if spacing is not None else 0.0
            values["duplicate_threshold"] = 1.0 - max(distance, EXACT_COPY_DISTANCE)
        if config.semantic_threshold is None:  # no spacing: every sampled row has only copies near it, so off
            values["semantic_threshold"] = 1.0 - config.semantic_distance_ratio * spacing if spacing else 1.0
        config = dataclasses.replace(config, **{name: max(-1.0, value) for name, value in values.items()})
        logger.info("calibrated from the median nearest-neighbour distance %s of %d rows: %s", spacing, len(rows),
                    ", ".join(f"{name} {value:.6f}" for name, value in values.items()))
    thresholds = {"duplicate_threshold": config.duplicate_threshold, "semantic_threshold": config.semantic_threshold}
    return config, {**thresholds, **record}
