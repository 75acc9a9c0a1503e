"""Arrays of embeddings for curation: L2 normalisation in chunks (a memmap needs no full-size temporary), rows
read in file order, and FAISS's spherical k-means with its own subsample of the rows."""

from __future__ import annotations

import numpy as np


def normalize_embeddings(embeddings: np.ndarray, chunk_size: int = 262_144,
                         row_ids: np.ndarray | None = None) -> np.ndarray:
    """A float32, C-contiguous, L2-normalised copy (chunked, so a memmap needs no second full-size temporary); a row
    that is not finite is named by its number (`row_ids[row]` where the rows are others' rows)."""
    embeddings_2d = np.asarray(embeddings)
    if embeddings_2d.ndim != 2 or len(embeddings_2d) == 0:
        raise ValueError(f"embeddings must be a non-empty (samples, dim) array, got shape {embeddings_2d.shape}")
    out = np.empty(embeddings_2d.shape, dtype=np.float32)
    for start in range(0, len(out), chunk_size):
        block = np.asarray(embeddings_2d[start : start + chunk_size], dtype=np.float32)
        if not np.isfinite(block).all():
            bad = start + int(np.flatnonzero(~np.isfinite(block).all(1))[0])
            raise ValueError(f"embedding of sample {bad if row_ids is None else int(row_ids[bad])} is not finite")
        norms = np.linalg.norm(block, axis=1, keepdims=True)
        out[start : start + chunk_size] = block / np.maximum(norms, 1e-12)
    return out


def read_rows(embeddings: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """`embeddings[rows]`, read in file order (a memmap seeks forward only), returned in `rows`' order."""
    order = np.argsort(rows, kind="stable")
    out = np.empty((len(rows), embeddings.shape[1]), dtype=embeddings.dtype)
    out[order] = embeddings[rows[order]]
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


def fit_centers(embeddings: np.ndarray, num_clusters: int, config, verbose: bool = False,
                normalize: bool = False) -> np.ndarray:
    """k-means centres of `embeddings` (an array or memmap; only `kmeans_sample`'s rows are read), L2-normalised
    already or, with `normalize`, here (row by row: the same values either way)."""
    sample = kmeans_sample(len(embeddings), num_clusters, config.max_points_per_centroid, config.kmeans_seed)
    rows = embeddings if sample is None else read_rows(embeddings, sample)
    rows = normalize_embeddings(rows) if normalize else np.ascontiguousarray(rows)
    return spherical_kmeans(rows, num_clusters, config.kmeans_iterations, config.kmeans_seed,
                            config.max_points_per_centroid, verbose)


def cluster_count(num_samples: int, config) -> int:
    """`num_clusters`, else samples / `samples_per_cluster`, at most one per sample."""
    return min(config.num_clusters or max(1, round(num_samples / config.samples_per_cluster)), num_samples)
