"""CLIP-CID's image semantic balance: drop perceptual duplicates and semantically redundant pairs by clustering
image embeddings with FAISS, so that over-represented concepts are thinned and rare ones kept.

1. thresholds left unset are calibrated to the embeddings (`dclip.curation.calibration`): multiples of the median
   distance from a sample to its nearest neighbour;
2. k-means (spherical, FAISS) over the L2-normalised image embeddings;
3. perceptual duplicates: pairs whose cosine similarity reaches `duplicate_threshold`, found by a FAISS range
   search over an inverted-file index on those centres (`duplicate_nprobe` clusters per sample), together with any
   pairs found otherwise (`dclip.curation.pixels`: from the images' own pixels); the earlier sample of a pair is kept;
4. semantic redundancy: within each cluster, members are visited from the centre outwards (or the reverse), and a
   member whose similarity to an already kept one reaches `semantic_threshold` is dropped;
5. optionally at most `max_per_cluster` kept per cluster.

Everything runs on arrays (a `np.memmap` works) in time about linear in the number of samples for a fixed cluster
size; `benchmarks/semantic_balance.py` measures 1,000,000 x 512 embeddings.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from .calibration import calibrate
from .duplicates import concat_pairs, drop_later_duplicates, find_duplicate_pairs, ivf_index
from .vectors import cluster_count, fit_centers, normalize_embeddings


logger = logging.getLogger(__name__)
KEPT, DUPLICATE, SEMANTIC, CAPPED = 0, 1, 2, 3
REASONS = {DUPLICATE: "perceptual_duplicate", SEMANTIC: "semantic_redundant", CAPPED: "cluster_cap"}


@dataclass
class SemanticBalanceConfig:
    """Settings of [`semantic_balance`] (all thresholds are cosine similarities of L2-normalised embeddings)."""

    num_clusters: int | None = field(default=None, metadata={"help": "k-means clusters; default: samples / "
                                                             "samples_per_cluster"})
    samples_per_cluster: int = field(default=400, metadata={"help": "mean cluster size when num_clusters is unset "
                                                            "(the paper: ~1M clusters for LAION-400M)"})
    kmeans_iterations: int = 20
    max_points_per_centroid: int = field(default=128, metadata={"help": "k-means trains on at most this many "
                                                                "samples per centre (FAISS subsampling)"})
    duplicate_threshold: float | None = field(default=None, metadata={
        "help": "similarity from which two images are perceptual duplicates; default: calibrated, 1 - "
                "duplicate_distance_ratio x the median nearest-neighbour distance (exact copies always count)"})
    duplicate_distance_ratio: float = field(default=0.1, metadata={"help": "the calibrated duplicate distance, as a "
                                                                   "fraction of the median nearest-neighbour one"})
    duplicate_nprobe: int = field(default=2, metadata={"help": "clusters searched for each sample's duplicates"})
    semantic_threshold: float | None = field(default=None, metadata={
        "help": "similarity to a kept member of the same cluster from which a sample is redundant; 1: off; "
                "default: calibrated, 1 - semantic_distance_ratio x the median nearest-neighbour distance"})
    semantic_distance_ratio: float = field(default=0.25, metadata={"help": "the calibrated semantic distance, as a "
                                                                   "fraction of the median nearest-neighbour one"})
    calibration_samples: int = field(default=1024, metadata={"help": "random samples whose exact nearest "
                                                             "neighbours calibrate the unset thresholds"})
    pixel_duplicates: bool = field(default=True, metadata={"help": "where the images are at hand, also pair images "
                                                           "whose downsampled pixels match (pixel_threshold)"})
    pixel_threshold: float = field(default=0.97, metadata={"help": "cosine of two images' mean-centred "
                                                           "pixel_size x pixel_size RGB thumbnails from which they "
                                                           "are perceptual duplicates"})
    pixel_size: int = field(default=16, metadata={"help": "side of the thumbnails compared for pixel duplicates"})
    max_per_cluster: int | None = field(default=None, metadata={"help": "keep at most this many per cluster"})
    keep_order: str = field(default="central", metadata={"help": "visit each cluster from its centre outwards "
                                                         "(central) or from its edge inwards (outlying)"})
    kmeans_seed: int = 0

    def __post_init__(self):
        if self.keep_order not in ("central", "outlying"):
            raise ValueError(f"keep_order must be 'central' or 'outlying', got {self.keep_order!r}")
        for name in ("duplicate_threshold", "semantic_threshold", "pixel_threshold"):
            if getattr(self, name) is not None and not -1.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is a cosine similarity in [-1, 1], got {getattr(self, name)}")
        for name in ("duplicate_distance_ratio", "semantic_distance_ratio"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} is a fraction of a distance, at least 0, got {getattr(self, name)}")
        for name in ("calibration_samples", "pixel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.samples_per_cluster < 1:
            raise ValueError(f"samples_per_cluster must be at least 1, got {self.samples_per_cluster}")
        if self.num_clusters is not None and self.num_clusters < 1:
            raise ValueError(f"num_clusters must be at least 1, got {self.num_clusters}")
        if self.max_per_cluster is not None and self.max_per_cluster < 1:
            raise ValueError(f"max_per_cluster must be at least 1, got {self.max_per_cluster}")


@dataclass
class BalanceResult:
    """Per sample: `reason` (0 kept, else the first reason it was dropped) and `cluster`; the centres; timings."""

    reason: np.ndarray  # (num_samples,) int8
    cluster: np.ndarray  # (num_samples,) int64
    centers: np.ndarray  # (num_clusters, dim) float32, L2-normalised
    seconds: dict[str, float]
    thresholds: dict = field(default_factory=dict)  # the thresholds applied, and how the unset ones were calibrated

    @property
    def kept_indices(self) -> np.ndarray:
        return np.flatnonzero(self.reason == KEPT)

    def report(self) -> dict:
        """Counts removed per reason, cluster sizes before and after, and timings, as JSON-ready values."""
        total = int(self.reason.size)
        removed = {name: int((self.reason == code).sum()) for code, name in REASONS.items()}
        num_clusters = len(self.centers)
        before = np.bincount(self.cluster, minlength=num_clusters)
        after = np.bincount(self.cluster[self.reason == KEPT], minlength=num_clusters)
        return {
            "samples": total, "kept": int((self.reason == KEPT).sum()), "removed": removed,
            "removed_fraction": round(1 - float((self.reason == KEPT).mean()), 6) if total else 0.0,
            "num_clusters": num_clusters,
            "cluster_size_before": _size_summary(before), "cluster_size_after": _size_summary(after),
            "thresholds": self.thresholds, "seconds": self.seconds,
        }


def _size_summary(sizes: np.ndarray) -> dict:
    return {"max": int(sizes.max()), "mean": round(float(sizes.mean()), 3), "median": float(np.median(sizes)),
            "p99": float(np.percentile(sizes, 99)), "empty": int((sizes == 0).sum())}


def greedy_diverse_subset(embeddings: np.ndarray, threshold: float, block_size: int = 1024) -> np.ndarray:
    """
    Boolean mask of the members kept by visiting `embeddings` (L2-normalised, in visiting order) and keeping each
    one whose similarity to every member kept before it stays below `threshold`. Blocked: one matrix product per
    block against the kept set, then the greedy pass inside the block.
    """
    keep = np.zeros(len(embeddings), dtype=bool)
    kept_matrix = np.empty((0, embeddings.shape[1]), dtype=np.float32)
    for start in range(0, len(embeddings), block_size):
        block = embeddings[start : start + block_size]
        alive = np.ones(len(block), dtype=bool)
        if len(kept_matrix):
            alive &= (block @ kept_matrix.T).max(1) < threshold
        similarity = block @ block.T
        for row in range(len(block)):
            if alive[row]:
                keep[start + row] = True
                alive[row + 1 :] &= similarity[row, row + 1 :] < threshold
        kept_matrix = np.concatenate([kept_matrix, block[keep[start : start + len(block)]]])
    return keep


def balance_cluster(vectors: np.ndarray, center: np.ndarray, config: SemanticBalanceConfig) -> np.ndarray:
    """The reason code (`KEPT`, `SEMANTIC` or `CAPPED`) of each of one cluster's remaining members (`vectors`,
    L2-normalised, in sample order): visited from the centre outwards (or the reverse), a member redundant with one
    kept before it is dropped, then at most `max_per_cluster` stay."""
    if config.semantic_threshold is None:
        raise ValueError("the semantic threshold is unset: calibrate the config first (dclip.curation.calibrate)")
    reason = np.full(len(vectors), KEPT, dtype=np.int8)
    centrality = vectors @ center
    visit = np.argsort(-centrality if config.keep_order == "central" else centrality, kind="stable")
    if config.semantic_threshold < 1.0:
        keep = greedy_diverse_subset(vectors[visit], config.semantic_threshold)
        reason[visit[~keep]] = SEMANTIC
        visit = visit[keep]
    if config.max_per_cluster is not None and len(visit) > config.max_per_cluster:
        reason[visit[config.max_per_cluster:]] = CAPPED
    return reason


def semantic_balance(embeddings: np.ndarray, config: SemanticBalanceConfig | None = None, verbose: bool = False,
                     extra_pairs: tuple[np.ndarray, np.ndarray] | None = None) -> BalanceResult:
    """Image semantic balance of `(samples, dim)` image embeddings (any scale; normalised here). See the module.
    `extra_pairs`: duplicate pairs `(firsts, seconds)` found otherwise (e.g. `dclip.curation.pixels`), dropped with
    the embeddings' own."""
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    embeddings = np.asarray(embeddings)  # a memmap stays one; a tensor or a list becomes an array
    config, thresholds = calibrate(embeddings, config or SemanticBalanceConfig())  # from the rows as given
    seconds["calibration"] = round(time.perf_counter() - started, 2)
    mark = time.perf_counter()
    embeddings = normalize_embeddings(embeddings)
    num_clusters = cluster_count(len(embeddings), config)
    logger.info("k-means: %d clusters of %d rows", num_clusters, len(embeddings))  # (FAISS's own log: stdout)
    centers = fit_centers(embeddings, num_clusters, config)
    seconds["kmeans"] = round(time.perf_counter() - mark, 2)

    mark = time.perf_counter()
    index, cluster = ivf_index(embeddings, centers)
    pairs = find_duplicate_pairs(index, embeddings, config.duplicate_threshold, config.duplicate_nprobe)
    del index
    reason = np.zeros(len(embeddings), dtype=np.int8)
    reason[drop_later_duplicates(*concat_pairs(pairs, extra_pairs), len(embeddings))] = DUPLICATE
    seconds["duplicates"] = round(time.perf_counter() - mark, 2)

    mark = time.perf_counter()
    order = np.argsort(cluster, kind="stable")
    bounds = np.flatnonzero(np.diff(cluster[order])) + 1
    for members in tqdm(np.split(order, bounds), desc="semantic balance", unit="cluster", disable=not verbose):
        members = members[reason[members] == KEPT]
        if len(members):
            reason[members] = balance_cluster(embeddings[members], centers[cluster[members[0]]], config)
    seconds["semantic"] = round(time.perf_counter() - mark, 2)
    seconds["total"] = round(time.perf_counter() - started, 2)
    return BalanceResult(reason=reason, cluster=cluster, centers=centers, seconds=seconds, thresholds=thresholds)
