"""Retrieval metrics: Recall@K and mAP both ways with several captions per image (CLIP_benchmark's names), from
embeddings (`retrieval_metrics`: exact, sampled or FAISS backends, each counting ranks in tiles) or from dense score
matrices (`recall_from_scores`), and the pieces they share: `image_groups` (which rows are one image), the rank counts
of each backend and `metrics_from_ranks`."""

from __future__ import annotations

import logging

import numpy as np
import torch
from tqdm.auto import tqdm

from .bootstrap import GROUPS_SUFFIX


logger = logging.getLogger(__package__)  # "dclip.evaluation", the logger of the module before it became a package


# Conventions (CLIP_benchmark's names): "image_retrieval" ranks images for each caption (text->image), "text_retrieval"
# ranks captions for each image (image->text; a hit when any of the image's captions is in the top K). A rank is the
# number of *other* candidates scoring strictly higher (0 = first). Both directions are kept as one rank per caption:
# `image_ranks[t]`, the rank of caption t's image among all images for query t, and `text_ranks[t]`, the rank of
# caption t among all captions for the query "its image". Ranks past a search depth are `inf`.


def retrieval_metrics(image_embeds: np.ndarray, text_embeds: np.ndarray, text_to_image,
                      ks: tuple[int, ...] = (1, 5, 10), backend: str = "auto", exact_max_pairs: int = 10_000_000_000,
                      sample_pairs: int = 2_500_000_000, seed: int = 0, faiss_depth: int = 100,
                      faiss_nprobe: int = 8, faiss_exact_below: int = 50_000,
                      outcomes: dict | None = None) -> dict[str, float]:
    """
    Recall@K and mAP both ways (COCO convention: several captions per image). `image_embeds (images, dim)` and
    `text_embeds (texts, dim)` are L2-normalised; `text_to_image[t]` is the image of caption `t`. A dict given as
    `outcomes` receives each metric's per-query values (see `metrics_from_ranks`), for paired bootstraps.

    `backend`:
    - "exact": every query ranked against the whole gallery (blocked matrix products), full-ranking mAP;
    - "sampled": a uniform sample of queries each way (captions for text-to-image, images for image-to-text), each
      ranked exactly against the whole gallery, about `sample_pairs` query-gallery pairs per direction (`seed`
      picks them): unbiased estimates, each with its standard error as `<metric>_stderr`, and the sample sizes as
      `image_retrieval_queries` / `text_retrieval_queries`;
    - "faiss": each query's top `faiss_depth` candidates from FAISS (`nearest_neighbours`: exact flat search for a
      gallery under `faiss_exact_below`, else an inverted-file index with `faiss_nprobe` lists probed, approximate
      and only as good as the embeddings' cluster structure: on unclustered vectors it misses most true neighbours,
      BENCHMARKS.md); mAP is truncated at the depth and reported as `..._mAP@<depth>`;
    - "auto": exact up to `exact_max_pairs` image-caption pairs (about 100 s on 2 CPU cores at dim 512), sampled
      above.
    """
    image_embeds, text_embeds, text_to_image = _check_retrieval_inputs(image_embeds, text_embeds, text_to_image)
    if backend == "auto":
        backend = "exact" if len(image_embeds) * len(text_embeds) <= exact_max_pairs else "sampled"
    if backend == "exact":
        image_ranks, text_ranks = exact_positive_ranks(image_embeds, text_embeds, text_to_image)
        return metrics_from_ranks(image_ranks, text_ranks, text_to_image, ks, outcomes=outcomes)
    if backend == "sampled":
        rng = np.random.default_rng(seed)
        images_with_captions = np.unique(text_to_image)
        caption_count = min(len(text_embeds), max(1, sample_pairs // max(len(image_embeds), 1)))
        image_count = min(len(images_with_captions), max(1, sample_pairs // max(len(text_embeds), 1)))
        caption_sample = np.sort(rng.choice(len(text_embeds), caption_count, replace=False))
        image_sample = np.sort(rng.choice(images_with_captions, image_count, replace=False))
        logger.info("retrieval over %d x %d pairs: exact ranks of %d sampled captions and %d sampled images",
                    len(image_embeds), len(text_embeds), len(caption_sample), len(image_sample))
        image_ranks, text_ranks, sampled_owner = sampled_positive_ranks(image_embeds, text_embeds, text_to_image,
                                                                        caption_sample, image_sample)
        metrics = metrics_from_ranks(image_ranks, text_ranks, sampled_owner, ks, with_stderr=True, outcomes=outcomes,
                                     query_images=np.asarray(text_to_image)[caption_sample])
        metrics["image_retrieval_queries"] = len(caption_sample)
        metrics["text_retrieval_queries"] = len(image_sample)
        return metrics
    if backend == "faiss":
        logger.warning("retrieval over %d x %d pairs with FAISS: approximate where the gallery needs an inverted "
                       "file; backend='exact' for exact figures", len(image_embeds), len(text_embeds))
        image_ranks, text_ranks = faiss_positive_ranks(image_embeds, text_embeds, text_to_image, faiss_depth,
                                                       faiss_nprobe, faiss_exact_below)
        return metrics_from_ranks(image_ranks, text_ranks, text_to_image, ks, depth=faiss_depth, outcomes=outcomes)
    raise ValueError(f"backend must be 'auto', 'exact', 'sampled' or 'faiss', got {backend!r}")


def _check_retrieval_inputs(image_embeds, text_embeds, text_to_image):
    image_embeds = np.ascontiguousarray(image_embeds, dtype=np.float32)
    text_embeds = np.ascontiguousarray(text_embeds, dtype=np.float32)
    text_to_image = np.asarray(text_to_image, dtype=np.int64)
    if image_embeds.ndim != 2 or text_embeds.ndim != 2 or image_embeds.shape[1] != text_embeds.shape[1]:
        raise ValueError(f"expected image_embeds (images, dim) and text_embeds (texts, dim) of one dim, got "
                         f"{image_embeds.shape} and {text_embeds.shape}")
    if text_to_image.shape != (len(text_embeds),):
        raise ValueError(f"text_to_image needs one image index per caption ({len(text_embeds)}), got shape "
                         f"{text_to_image.shape}")
    if len(text_to_image) and (text_to_image.min() < 0 or text_to_image.max() >= len(image_embeds)):
        raise ValueError(f"text_to_image must index the {len(image_embeds)} images, got values "
                         f"{text_to_image.min()}..{text_to_image.max()}")
    return image_embeds, text_embeds, text_to_image


def _positive_scores(images: torch.Tensor, texts: torch.Tensor, owner: torch.Tensor, captions: torch.Tensor,
                     tie_tolerance: float, chunk: int = 65536) -> torch.Tensor:
    """`(len(captions),)` the score of each of `captions` with its own image, plus `tie_tolerance`: a candidate counts
    as higher only above this. The positive's own score comes from a dot product whose rounding differs from the
    matrix product's, and identical captions (or images) must tie, not outrank each other by rounding noise."""
    return torch.cat([(texts[part] * images[owner[part]]).sum(1) for part in captions.split(chunk)]) + tie_tolerance


@torch.no_grad()
def _count_higher(queries: torch.Tensor, gallery: torch.Tensor, query_of_pair: torch.Tensor,
                  pair_threshold: torch.Tensor, gallery_threshold: torch.Tensor | None = None,
                  max_block_elements: int = 1 << 24,
                  block_queries: int = 1024) -> tuple[torch.Tensor, torch.Tensor | None]:
    """
    One pass of `(block_queries, gallery chunk)` score tiles of at most `max_block_elements`, never the whole
    `(queries, gallery)` matrix (tiles with many query rows keep the matrix products near the machine's peak). For
    each pair `p` (`query_of_pair` sorted), the number of gallery items that query `query_of_pair[p]` scores above
    `pair_threshold[p]`; with `gallery_threshold`, also for each gallery item `g` the number of queries that score
    it above `gallery_threshold[g]` (the other direction, from the same products). The counting is numpy's: its
    compare-and-count runs about ten times faster than torch's reductions over booleans.
    """
    query_of_pair = query_of_pair.numpy()
    pair_threshold = pair_threshold.numpy()
    pair_counts = np.zeros(len(query_of_pair), dtype=np.int64)
    gallery_counts = None
    if gallery_threshold is not None:
        gallery_threshold = gallery_threshold.numpy()
        gallery_counts = np.zeros(len(gallery), dtype=np.int64)
    # each pair's place among its query's pairs: pass j compares every query with its j-th pair's threshold
    if np.any(np.diff(query_of_pair) < 0):
        raise ValueError("_count_higher needs `query_of_pair` sorted (pairs grouped by query)")
    first = np.flatnonzero(np.r_[True, query_of_pair[1:] != query_of_pair[:-1]]) if len(query_of_pair) \
        else np.zeros(0, dtype=np.int64)
    place = np.arange(len(query_of_pair)) - np.repeat(first, np.diff(np.r_[first, len(query_of_pair)]))
    rows = max(1, min(block_queries, len(queries), max_block_elements))
    chunk = max(1, max_block_elements // rows)
    tiles = [(start, begin) for start in range(0, len(queries), rows) for begin in range(0, len(gallery), chunk)]
    passes = None
    for start, begin in tqdm(tiles, desc="retrieval", unit="tile", disable=len(tiles) <= 1):
        stop, end = min(start + rows, len(queries)), min(begin + chunk, len(gallery))
        scores = (queries[start:stop] @ gallery[begin:end].t()).numpy()  # (rows, chunk)
        if gallery_counts is not None:
            gallery_counts[begin:end] += np.count_nonzero(scores > gallery_threshold[None, begin:end], axis=0)
        if begin == 0:  # this block's pairs, split by their place: pass j covers each query's j-th pair
            lo, hi = np.searchsorted(query_of_pair, [start, stop])
            passes = [lo + np.flatnonzero(place[lo:hi] == j)
                      for j in range(int(place[lo:hi].max()) + 1 if hi > lo else 0)]
        for pairs in passes:
            local = query_of_pair[pairs] - start
            own = scores if len(local) == stop - start else scores[local]  # every query has a j-th pair: no copy
            pair_counts[pairs] += np.count_nonzero(own > pair_threshold[pairs, None], axis=1)
    return torch.from_numpy(pair_counts), None if gallery_counts is None else torch.from_numpy(gallery_counts)


def exact_positive_ranks(image_embeds: np.ndarray, text_embeds: np.ndarray, text_to_image: np.ndarray,
                         max_block_elements: int = 1 << 24,
                         tie_tolerance: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """`(image_ranks, text_ranks)` (see above), exact, both from one pass of image-by-caption score blocks."""
    images, texts = torch.from_numpy(image_embeds), torch.from_numpy(text_embeds)
    owner = torch.from_numpy(text_to_image)
    threshold = _positive_scores(images, texts, owner, torch.arange(len(texts)), tie_tolerance)
    by_image = torch.argsort(owner, stable=True)
    ranks_by_image, image_ranks = _count_higher(images, texts, owner[by_image], threshold[by_image], threshold,
                                                max_block_elements)
    text_ranks = torch.empty_like(ranks_by_image)
    text_ranks[by_image] = ranks_by_image
    return image_ranks.numpy().astype(np.float64), text_ranks.numpy().astype(np.float64)


def sampled_positive_ranks(image_embeds: np.ndarray, text_embeds: np.ndarray, text_to_image: np.ndarray,
                           caption_sample: np.ndarray, image_sample: np.ndarray, max_block_elements: int = 1 << 24,
                           tie_tolerance: float = 1e-6) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact ranks against the whole gallery for sampled queries: `image_ranks` of the captions `caption_sample`
    (text-to-image), and `text_ranks` of every caption of the images `image_sample` (image-to-text) with the image
    of each of those captions (`sampled_owner`)."""
    images, texts = torch.from_numpy(image_embeds), torch.from_numpy(text_embeds)
    owner = torch.from_numpy(text_to_image)
    captions = torch.from_numpy(np.asarray(caption_sample, dtype=np.int64))
    image_ranks, _ = _count_higher(texts[captions], images, torch.arange(len(captions)),
                                   _positive_scores(images, texts, owner, captions, tie_tolerance),
                                   max_block_elements=max_block_elements)
    sampled_images = torch.from_numpy(np.asarray(image_sample, dtype=np.int64))
    # the captions of the sampled images, grouped by image; `query` is each one's image's row in the sample
    their_captions = torch.nonzero(torch.isin(owner, sampled_images)).squeeze(1)
    query = torch.searchsorted(sampled_images, owner[their_captions])
    order = torch.argsort(query, stable=True)
    their_captions, query = their_captions[order], query[order]
    text_ranks, _ = _count_higher(images[sampled_images], texts, query,
                                  _positive_scores(images, texts, owner, their_captions, tie_tolerance),
                                  max_block_elements=max_block_elements)
    return (image_ranks.numpy().astype(np.float64), text_ranks.numpy().astype(np.float64),
            text_to_image[their_captions.numpy()])


def faiss_positive_ranks(image_embeds: np.ndarray, text_embeds: np.ndarray, text_to_image: np.ndarray, depth: int,
                         nprobe: int = 8, exact_below: int = 50_000) -> tuple[np.ndarray, np.ndarray]:
    """`(image_ranks, text_ranks)` (see above) from each query's top `depth` candidates in a FAISS index
    (`nearest_neighbours`); a positive not among them gets rank `inf`."""
    found_images = nearest_neighbours(image_embeds, text_embeds, depth, nprobe, exact_below)  # (texts, depth)
    image_ranks = _position(found_images, text_to_image)
    found_texts = nearest_neighbours(text_embeds, image_embeds, depth, nprobe, exact_below)  # (images, depth)
    text_ranks = _position(found_texts[text_to_image], np.arange(len(text_embeds)))
    return image_ranks, text_ranks


def nearest_neighbours(database: np.ndarray, queries: np.ndarray, depth: int, nprobe: int = 8,
                       exact_below: int = 50_000) -> np.ndarray:
    """Ids `(queries, depth)` of each query's highest inner products in `database`: FAISS flat (exact) search for a
    database under `exact_below` vectors, else an inverted-file index of about 4 sqrt(n) lists (at least 40
    vectors each), `nprobe` probed."""
    import faiss

    depth = min(depth, len(database))
    dim = database.shape[1]
    if len(database) < exact_below:
        index = faiss.IndexFlatIP(dim)
    else:
        lists = max(1, min(int(4 * np.sqrt(len(database))), len(database) // 40))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(0).choice(len(database), min(len(database), 40 * lists), replace=False)
        index.train(database[np.sort(sample)])
        index.nprobe = nprobe
    index.add(database)
    return index.search(queries, depth)[1]


def _position(found: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Where `targets[q]` stands in row `q` of `found` (0-based), `inf` where it is absent."""
    match = found == np.asarray(targets)[:, None]
    return np.where(match.any(1), match.argmax(1), np.inf)


def ranks_from_scores(image_query_scores: torch.Tensor, text_query_scores: torch.Tensor,
                      text_to_image) -> tuple[np.ndarray, np.ndarray]:
    """`(image_ranks, text_ranks)` (see above) from dense scores: `image_query_scores (images, texts)` ranks captions
    for each image, `text_query_scores (texts, images)` images for each caption (the two may differ, e.g. after
    re-ranking)."""
    owner = torch.as_tensor(np.asarray(text_to_image), dtype=torch.long)
    captions = torch.arange(text_query_scores.shape[0])
    true_image = text_query_scores[captions, owner]
    image_ranks = (text_query_scores > true_image[:, None]).sum(1)
    text_ranks = torch.empty(len(captions), dtype=torch.long)
    for chunk in captions.split(4096):
        own_rows = image_query_scores[owner[chunk]]  # (chunk, texts): the ranking each caption's image makes
        own = own_rows[torch.arange(len(chunk)), chunk]
        text_ranks[chunk] = (own_rows > own[:, None]).sum(1)
    return image_ranks.numpy().astype(np.float64), text_ranks.numpy().astype(np.float64)


def metrics_from_ranks(image_ranks: np.ndarray, text_ranks: np.ndarray, text_to_image,
                       ks: tuple[int, ...] = (1, 5, 10), depth: int | None = None,
                       with_stderr: bool = False, outcomes: dict | None = None,
                       query_images: np.ndarray | None = None) -> dict[str, float]:
    """Recall@K and mAP both ways from per-caption ranks (see above): `image_ranks` of captions (text-to-image) and
    `text_ranks` of captions whose images are `text_to_image` (image-to-text; the two may cover different captions
    when queries are sampled). With a search `depth`, mAP counts positives past it as never retrieved and its key
    says `mAP@<depth>`; `with_stderr` adds each figure's standard error over queries as `<key>_stderr`. A dict given
    as `outcomes` receives each metric's per-query values: per caption for `image_retrieval_*`, per image (in image
    order) for `text_retrieval_*`; where images have several captions, also each caption's image as
    `image_retrieval_*:groups`, so that a bootstrap resamples an image's captions together. `query_images`: the
    image of each caption of `image_ranks` (default `text_to_image`, for ranks of every caption; sampled queries
    must give theirs)."""
    owner = np.asarray(text_to_image, dtype=np.int64)
    best_text_rank = np.full(owner.max() + 1 if len(owner) else 0, np.inf)
    np.minimum.at(best_text_rank, owner, text_ranks)
    best_text_rank = best_text_rank[np.bincount(owner, minlength=len(best_text_rank)) > 0]  # images with captions
    per_query = {}
    for k in ks:
        per_query[f"image_retrieval_recall@{k}"] = image_ranks < k
        per_query[f"text_retrieval_recall@{k}"] = best_text_rank < k
    suffix = "mAP" if depth is None else f"mAP@{depth}"
    per_query[f"image_retrieval_{suffix}"] = _average_precisions(image_ranks, np.arange(len(image_ranks)))
    per_query[f"text_retrieval_{suffix}"] = _average_precisions(text_ranks, owner)
    if outcomes is not None:
        outcomes.update({key: np.asarray(values, dtype=np.float64) for key, values in per_query.items()})
        queries = owner if query_images is None else np.asarray(query_images, dtype=np.int64)
        if len(queries) != len(image_ranks):
            raise ValueError(f"query_images names {len(queries)} images for {len(image_ranks)} caption queries")
        if len(np.unique(queries)) < len(queries):  # captions sharing an image: resampled together
            outcomes.update({key + GROUPS_SUFFIX: queries for key in per_query if key.startswith("image_retrieval_")})
    results = {}
    for key, values in per_query.items():
        results[key] = float(np.mean(values)) if len(values) else float("nan")
        if with_stderr:
            results[f"{key}_stderr"] = float(np.std(values, ddof=1) / np.sqrt(len(values))) if len(values) > 1 \
                else float("nan")
    return results


def _average_precisions(ranks: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Average precision of each query present in `queries`, from the rank of each (query, positive) pair: the j-th
    best positive at rank r adds precision j / (r + 1) (tied positives are ordered, so r >= j - 1), divided by the
    query's count of positives; a positive at rank `inf` adds 0."""
    if not len(ranks):
        return np.zeros(0)
    order = np.lexsort((ranks, queries))
    queries, ranks = queries[order], ranks[order]
    starts = np.flatnonzero(np.r_[True, queries[1:] != queries[:-1]])
    position = np.arange(len(queries)) - np.repeat(starts, np.diff(np.r_[starts, len(queries)])) + 1
    precision = np.where(np.isfinite(ranks), position / (np.maximum(ranks, position - 1) + 1), 0.0)
    counts = np.bincount(queries)
    present = counts > 0
    return np.bincount(queries, weights=precision)[present] / counts[present]


def recall_from_scores(image_query_scores: torch.Tensor, text_query_scores: torch.Tensor, text_to_image,
                       ks: tuple[int, ...] = (1, 5, 10), outcomes: dict | None = None) -> dict[str, float]:
    """Recall@K and mAP both ways from dense scores (see `ranks_from_scores`; `outcomes` as in
    `metrics_from_ranks`)."""
    image_ranks, text_ranks = ranks_from_scores(image_query_scores, text_query_scores, text_to_image)
    return metrics_from_ranks(image_ranks, text_ranks, text_to_image, ks, outcomes=outcomes)


def image_groups(dataset) -> tuple[np.ndarray, np.ndarray]:
    """
    For a data set of image-caption pairs: `image_rows`, the row of each distinct image (first by `image_id`), and
    `text_to_image`, the image of each row's caption. Without an `image_id` column every row is its own image.
    """
    if "image_id" not in dataset.column_names:
        rows = np.arange(len(dataset))
        return rows, rows
    first: dict = {}
    text_to_image = np.array([first.setdefault(image_id, len(first)) for image_id in dataset["image_id"]])
    image_rows = np.unique(text_to_image, return_index=True)[1]  # the first row of each image
    return image_rows, text_to_image
