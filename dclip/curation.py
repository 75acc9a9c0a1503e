"""CLIP-CID's image semantic balance: drop perceptual duplicates and semantically redundant pairs by clustering
image embeddings with FAISS, so that over-represented concepts are thinned and rare ones kept.

1. k-means (spherical, FAISS) over the L2-normalised image embeddings;
2. perceptual duplicates: pairs whose cosine similarity reaches `duplicate_threshold`, found by a FAISS range
   search over an inverted-file index on those centres (`duplicate_nprobe` clusters per sample); the earlier sample
   of a duplicate pair is kept;
3. semantic redundancy: within each cluster, members are visited from the centre outwards (or the reverse), and a
   member whose similarity to an already kept one reaches `semantic_threshold` is dropped;
4. optionally at most `max_per_cluster` kept per cluster.

Everything runs on arrays (a `np.memmap` works) in time about linear in the number of samples for a fixed cluster
size; `benchmarks/semantic_balance.py` measures 1,000,000 x 512 embeddings.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm


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
    duplicate_threshold: float = field(default=0.98, metadata={"help": "similarity from which two images are "
                                                               "perceptual duplicates"})
    duplicate_nprobe: int = field(default=2, metadata={"help": "clusters searched for each sample's duplicates"})
    semantic_threshold: float = field(default=0.9, metadata={"help": "similarity to a kept member of the same "
                                                             "cluster from which a sample is redundant; 1: off"})
    max_per_cluster: int | None = field(default=None, metadata={"help": "keep at most this many per cluster"})
    keep_order: str = field(default="central", metadata={"help": "visit each cluster from its centre outwards "
                                                         "(central) or from its edge inwards (outlying)"})
    kmeans_seed: int = 0

    def __post_init__(self):
        if self.keep_order not in ("central", "outlying"):
            raise ValueError(f"keep_order must be 'central' or 'outlying', got {self.keep_order!r}")
        for name in ("duplicate_threshold", "semantic_threshold"):
            if not -1.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is a cosine similarity in [-1, 1], got {getattr(self, name)}")
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
            "seconds": self.seconds,
        }


def _size_summary(sizes: np.ndarray) -> dict:
    return {"max": int(sizes.max()), "mean": round(float(sizes.mean()), 3), "median": float(np.median(sizes)),
            "p99": float(np.percentile(sizes, 99)), "empty": int((sizes == 0).sum())}


def normalize_embeddings(embeddings: np.ndarray, chunk_size: int = 262_144) -> np.ndarray:
    """A float32, C-contiguous, L2-normalised copy (chunked, so a memmap needs no second full-size temporary)."""
    embeddings_2d = np.asarray(embeddings)
    if embeddings_2d.ndim != 2 or len(embeddings_2d) == 0:
        raise ValueError(f"embeddings must be a non-empty (samples, dim) array, got shape {embeddings_2d.shape}")
    out = np.empty(embeddings_2d.shape, dtype=np.float32)
    for start in range(0, len(out), chunk_size):
        block = np.asarray(embeddings_2d[start : start + chunk_size], dtype=np.float32)
        if not np.isfinite(block).all():
            bad = start + int(np.flatnonzero(~np.isfinite(block).all(1))[0])
            raise ValueError(f"embedding of sample {bad} is not finite")
        norms = np.linalg.norm(block, axis=1, keepdims=True)
        out[start : start + chunk_size] = block / np.maximum(norms, 1e-12)
    return out


def spherical_kmeans(embeddings: np.ndarray, num_clusters: int, iterations: int = 20, seed: int = 0,
                     max_points_per_centroid: int = 128, verbose: bool = False) -> np.ndarray:
    """FAISS k-means on L2-normalised `embeddings`; returns `(num_clusters, dim)` L2-normalised centres."""
    import faiss

    if num_clusters > len(embeddings):
        raise ValueError(f"cannot make {num_clusters} clusters of {len(embeddings)} samples")
    kmeans = faiss.Kmeans(embeddings.shape[1], num_clusters, niter=iterations, seed=seed, spherical=True,
                          max_points_per_centroid=max_points_per_centroid, verbose=verbose)
    kmeans.train(embeddings)
    return normalize_embeddings(kmeans.centroids)


def assign_clusters(embeddings: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """The nearest centre (largest cosine) of each L2-normalised embedding, `(samples,)` int64."""
    import faiss

    index = faiss.IndexFlatIP(centers.shape[1])
    index.add(np.ascontiguousarray(centers, dtype=np.float32))
    return index.search(np.ascontiguousarray(embeddings, dtype=np.float32), 1)[1][:, 0].astype(np.int64)


def _ivf_index(embeddings: np.ndarray, centers: np.ndarray):
    """An inverted-file index whose lists are the k-means clusters; returns it and each sample's cluster."""
    import faiss

    quantizer = faiss.IndexFlatIP(centers.shape[1])
    quantizer.add(centers)
    index = faiss.IndexIVFFlat(quantizer, centers.shape[1], len(centers), faiss.METRIC_INNER_PRODUCT)
    index.is_trained = True  # the quantizer holds the k-means centres already
    index.add(embeddings)
    cluster = np.empty(len(embeddings), dtype=np.int64)
    for list_no in range(len(centers)):
        size = index.invlists.list_size(list_no)
        if size:
            ids = faiss.rev_swig_ptr(index.invlists.get_ids(list_no), size)
            cluster[np.asarray(ids)] = list_no
    return index, cluster


def find_duplicates(index, embeddings: np.ndarray, threshold: float, nprobe: int,
                    chunk_size: int = 65_536) -> np.ndarray:
    """
    Boolean mask of perceptual duplicates: visiting samples in order, a sample not yet dropped keeps its place and
    drops every later sample whose similarity to it reaches `threshold` (FAISS range search, `nprobe` lists). With
    `nprobe` below the number of lists the search is not symmetric (j may find i while i's lists miss j), so a pair
    found from either side counts.
    """
    index.nprobe = nprobe
    found = [duplicate_pairs(index, embeddings[start : start + chunk_size], threshold,
                             np.arange(start, min(start + chunk_size, len(embeddings))))
             for start in tqdm(range(0, len(embeddings), chunk_size), desc="duplicates", unit="chunk",
                               disable=len(embeddings) <= chunk_size)]
    firsts, seconds = (np.concatenate(part) for part in zip(*found)) if found else (np.zeros(0, np.int64),) * 2
    return drop_later_duplicates(firsts, seconds, len(embeddings))


def duplicate_pairs(index, vectors: np.ndarray, threshold: float, query_ids: np.ndarray,
                    index_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The pairs `(first < second)` of sample ids whose similarity reaches `threshold`, by a FAISS range search of
    `vectors` (samples `query_ids`) in `index` (whose entries are samples `index_ids`, default their own numbers),
    a sample's pair with itself left out. Both curation engines find their duplicates through this."""
    radius = float(np.nextafter(np.float32(threshold), np.float32(-np.inf)))  # FAISS keeps scores > radius
    limits, _, neighbours = index.range_search(vectors, radius)
    queries = query_ids[np.repeat(np.arange(len(vectors)), np.diff(limits.astype(np.int64)))]
    neighbours = neighbours if index_ids is None else index_ids[neighbours]
    other = neighbours != queries
    return np.minimum(queries, neighbours)[other], np.maximum(queries, neighbours)[other]


def drop_later_duplicates(firsts: np.ndarray, seconds: np.ndarray, num_samples: int) -> np.ndarray:
    """Boolean mask of the samples dropped as duplicates, from duplicate pairs `(firsts[p] < seconds[p])` found in any
    order (and possibly more than once): visiting samples in order, one not yet dropped drops its later partners."""
    dropped = np.zeros(num_samples, dtype=bool)
    if not len(firsts):
        return dropped
    pairs = np.unique(np.stack([firsts, seconds], axis=1).astype(np.int64), axis=0)  # sorted by first
    bounds = np.flatnonzero(np.diff(pairs[:, 0])) + 1
    for group in np.split(pairs, bounds):  # each earlier sample, in order, with its later duplicates
        if not dropped[group[0, 0]]:
            dropped[group[:, 1]] = True
    return dropped


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


def kmeans_sample(num_samples: int, num_clusters: int, max_points_per_centroid: int, seed: int) -> np.ndarray | None:
    """The rows k-means trains on, in the order it reads them: FAISS's own subsample (`max_points_per_centroid` per
    centre, its `rand_perm` with `seed`), drawn here so that an engine reading the embeddings from files fetches just
    these rows and trains the very same centres; None for all of them."""
    import faiss

    size = num_clusters * max_points_per_centroid
    if num_samples <= size:
        return None
    permutation = np.empty(num_samples, dtype=np.int32 if num_samples < 2**31 else np.int64)
    faiss.rand_perm(faiss.swig_ptr(permutation), num_samples, seed)
    return permutation[:size].astype(np.int64)


def _read_rows(embeddings: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """`embeddings[rows]`, read in file order (a memmap seeks forward only), returned in `rows`' order."""
    order = np.argsort(rows, kind="stable")
    out = np.empty((len(rows), embeddings.shape[1]), dtype=embeddings.dtype)
    out[order] = embeddings[rows[order]]
    return out


def fit_centers(embeddings: np.ndarray, num_clusters: int, config: SemanticBalanceConfig, verbose: bool = False,
                normalize: bool = False) -> np.ndarray:
    """k-means centres of `embeddings` (an array or memmap; only `kmeans_sample`'s rows are read), L2-normalised
    already or, with `normalize`, here (row by row: the same values either way)."""
    sample = kmeans_sample(len(embeddings), num_clusters, config.max_points_per_centroid, config.kmeans_seed)
    rows = embeddings if sample is None else _read_rows(embeddings, sample)
    rows = normalize_embeddings(rows) if normalize else np.ascontiguousarray(rows)
    return spherical_kmeans(rows, num_clusters, config.kmeans_iterations, config.kmeans_seed,
                            config.max_points_per_centroid, verbose)


def cluster_count(num_samples: int, config: SemanticBalanceConfig) -> int:
    """`num_clusters`, else samples / `samples_per_cluster`, at most one per sample."""
    return min(config.num_clusters or max(1, round(num_samples / config.samples_per_cluster)), num_samples)


def semantic_balance(embeddings: np.ndarray, config: SemanticBalanceConfig | None = None,
                     verbose: bool = False) -> BalanceResult:
    """Image semantic balance of `(samples, dim)` image embeddings (any scale; normalised here). See the module."""
    config = config or SemanticBalanceConfig()
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    embeddings = normalize_embeddings(embeddings)
    centers = fit_centers(embeddings, cluster_count(len(embeddings), config), config, verbose)
    seconds["kmeans"] = round(time.perf_counter() - started, 2)

    mark = time.perf_counter()
    index, cluster = _ivf_index(embeddings, centers)
    reason = np.zeros(len(embeddings), dtype=np.int8)
    reason[find_duplicates(index, embeddings, config.duplicate_threshold, config.duplicate_nprobe)] = DUPLICATE
    del index
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
    return BalanceResult(reason=reason, cluster=cluster, centers=centers, seconds=seconds)


def plot_cluster_sizes(result: BalanceResult, path: str | Path) -> str:
    """Cluster-size histograms before and after balancing, and the sizes by rank, as a PNG."""
    from matplotlib.figure import Figure  # no pyplot: the process's matplotlib backend stays the user's

    num_clusters = len(result.centers)
    before = np.bincount(result.cluster, minlength=num_clusters)
    after = np.bincount(result.cluster[result.reason == KEPT], minlength=num_clusters)
    figure = Figure(figsize=(11, 4))
    histogram, ranks = figure.subplots(1, 2)
    bins = np.linspace(0, max(int(before.max()), 1), min(50, int(before.max()) + 1) + 1)
    histogram.hist(before, bins=bins, alpha=0.6, label=f"before ({int(before.sum()):,} pairs)")
    histogram.hist(after, bins=bins, alpha=0.6, label=f"after ({int(after.sum()):,} pairs)")
    histogram.set(xlabel="pairs per cluster", ylabel="clusters", title=f"{num_clusters:,} k-means clusters")
    histogram.legend()
    ranks.plot(np.sort(before)[::-1], label="before")
    ranks.plot(np.sort(after)[::-1], label="after")
    ranks.set(xlabel="cluster rank", ylabel="pairs per cluster", yscale="symlog", title="cluster sizes by rank")
    ranks.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return str(path)


def write_balance_outputs(result: BalanceResult, output_dir: str | Path, config: SemanticBalanceConfig,
                          extra: dict | None = None) -> dict:
    """`kept_indices.npy`, `cluster_centers.npy`, `report.json` (with `extra`) and `cluster_sizes.png`."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    np.save(output_dir / "kept_indices.npy", result.kept_indices.astype(np.int64))
    np.save(output_dir / "cluster_centers.npy", result.centers)
    report = {**result.report(), "config": asdict(config), **(extra or {})}
    report["plot"] = plot_cluster_sizes(result, output_dir / "cluster_sizes.png")
    (output_dir / "report.json").write_text(json.dumps(report, indent=2))
    return report


def embed_images_with(model_name_or_path: str, dataset, batch_size: int = 256) -> np.ndarray:
    """L2-normalised image embeddings of `dataset`'s images by a CLIP, student or teacher folder (its own
    processor), on the GPU if there is one."""
    from processing_dclip import DCLIPProcessor

    from .evaluation import embed_images, load_clip_towers

    model = load_clip_towers(model_name_or_path)
    processor = DCLIPProcessor.from_pretrained(model_name_or_path, trust_remote_code=False)
    return embed_images(model, processor, dataset, batch_size=batch_size)


def curate_dataset(dataset, output_dir: str | Path, config: SemanticBalanceConfig | None = None,
                   model_name_or_path: str | None = None, embeddings_file: str | None = None,
                   batch_size: int = 256, save_dataset: bool = False, engine=None) -> dict:
    """
    Image semantic balance of a captioned-image `dataset`: embed its images with `model_name_or_path` (a teacher,
    student or any CLIP; saved as `image_embeddings.npy`) or read `embeddings_file` (a `.npy`, memory-mapped), then
    write [`write_balance_outputs`]'s files and, with `save_dataset`, the kept rows as a data set (`dataset/`).
    `engine`: None for this process's [`semantic_balance`], or another engine with the same result, called as
    `engine(embeddings_file, config, output_dir)` (`dclip.ray_curation.RayEngine`: on a Ray cluster), which embeds
    the images too where it has an `embed(model_name_or_path, dataset, batch_size)`.
    """
    config = config or SemanticBalanceConfig()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if embeddings_file is not None:
        embeddings = np.load(embeddings_file, mmap_mode="r")
        source = embeddings_file
    elif model_name_or_path is not None:
        if hasattr(engine, "embed"):  # the engine's workers embed their parts of the data set
            embeddings = engine.embed(model_name_or_path, dataset, batch_size)
        else:
            embeddings = embed_images_with(model_name_or_path, dataset, batch_size)
        np.save(output_dir / "image_embeddings.npy", embeddings)
        embeddings_file, source = str(output_dir / "image_embeddings.npy"), model_name_or_path
    else:
        raise ValueError("semantic balance needs image embeddings: give --model_name_or_path or --embeddings")
    if dataset is not None and len(embeddings) != len(dataset):
        raise ValueError(f"{source}: {len(embeddings)} embeddings for a data set of {len(dataset)} rows")
    if engine is not None:
        result = engine(embeddings_file, config, output_dir)
    else:
        result = semantic_balance(embeddings, config, verbose=True)
    extra = {"embeddings_from": source, "rows": len(embeddings), "engine": getattr(engine, "name", "local")}
    if dataset is not None and "redundancy" in dataset.column_names:  # the embedded data: what was injected
        kinds = np.asarray(dataset["redundancy"])
        extra["removed_by_injected_kind"] = {
            kind: {REASONS.get(code, "kept"): int(((kinds == kind) & (result.reason == code)).sum())
                   for code in (KEPT, *REASONS)} for kind in np.unique(kinds)}
    report = write_balance_outputs(result, output_dir, config, extra)
    if save_dataset and dataset is not None:
        dataset.select(result.kept_indices).save_to_disk(str(output_dir / "dataset"))
        report["dataset"] = str(output_dir / "dataset")
    logger.info("semantic balance: kept %d of %d (%s)", report["kept"], report["samples"], report["removed"])
    return report
