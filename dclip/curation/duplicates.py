"""Perceptual duplicates as pairs of sample ids: FAISS range searches over an inverted file whose lists are
k-means clusters, pairs merged from any source, and the in-order rule that keeps the earlier sample of a pair."""

from __future__ import annotations

import numpy as np
from tqdm.auto import tqdm


def ivf_index(embeddings: np.ndarray, centers: np.ndarray):
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


def find_duplicate_pairs(index, embeddings: np.ndarray, threshold: float, nprobe: int,
                         chunk_size: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """Every pair `(first < second)` of `embeddings` (the entries of `index`, an inverted file) whose similarity
    reaches `threshold`, by range searches of `nprobe` lists, chunk by chunk. With `nprobe` below the number of lists
    the search is not symmetric (j may find i while i's lists miss j): a pair found from either side counts, and a
    pair may be listed twice."""
    index.nprobe = nprobe
    found = [duplicate_pairs(index, embeddings[start : start + chunk_size], threshold,
                             np.arange(start, min(start + chunk_size, len(embeddings))))
             for start in tqdm(range(0, len(embeddings), chunk_size), desc="duplicates", unit="chunk",
                               disable=len(embeddings) <= chunk_size)]
    if not found:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    firsts, seconds = (np.concatenate(part) for part in zip(*found))
    return firsts, seconds


def find_duplicates(index, embeddings: np.ndarray, threshold: float, nprobe: int,
                    chunk_size: int = 65_536) -> np.ndarray:
    """Boolean mask of perceptual duplicates: visiting samples in order, a sample not yet dropped keeps its place and
    drops every later sample whose similarity to it reaches `threshold` ([`find_duplicate_pairs`])."""
    return drop_later_duplicates(*find_duplicate_pairs(index, embeddings, threshold, nprobe, chunk_size),
                                 len(embeddings))


def concat_pairs(*pairs: tuple[np.ndarray, np.ndarray] | None) -> tuple[np.ndarray, np.ndarray]:
    """Lists of duplicate pairs `(firsts, seconds)` as one (None for none)."""
    pairs = [p for p in pairs if p is not None] or [(np.zeros(0, np.int64), np.zeros(0, np.int64))]
    return tuple(np.concatenate([np.asarray(part[side], dtype=np.int64) for part in pairs]) for side in (0, 1))


def duplicate_pairs(index, vectors: np.ndarray, threshold: float, query_ids: np.ndarray,
                    index_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The pairs `(first < second)` of sample ids whose similarity reaches `threshold`, by a FAISS range search of
    `vectors` (samples `query_ids`) in `index` (whose entries are samples `index_ids`, default their own numbers),
    a sample's pair with itself left out. Both curation engines find their duplicates through this."""
    if threshold is None:
        raise ValueError("the duplicate threshold is unset: calibrate the config first (dclip.curation.calibrate)")
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
