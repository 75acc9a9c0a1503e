"""Evaluation: retrieval Recall@K and mAP with several captions per image (exact, or FAISS for large galleries),
zero-shot classification (prompt templates, top-1 / top-5, per class), linear probe, hard-negative accuracy.
Metric names follow CLIP_benchmark where they overlap (`image_retrieval_recall@5`, `acc1`, `mean_per_class_recall`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm


logger = logging.getLogger(__name__)


def load_clip_towers(name_or_path: str):
    """A [`DCLIPModel`] or [`DCLIPTeacherModel`] folder as itself, any CLIP checkpoint (local or Hub) as a
    [`DCLIPModel`]: each has `get_image_features` / `get_text_features` returning tensors. On the GPU if there is one."""
    from transformers import PretrainedConfig

    from modeling_dclip import DCLIPModel, DCLIPTeacherModel

    model_type = PretrainedConfig.get_config_dict(name_or_path)[0].get("model_type")  # no remote code loaded
    if model_type == "dclip":
        model = DCLIPModel.from_pretrained(name_or_path)
    elif model_type == "dclip_teacher":
        model = DCLIPTeacherModel.from_pretrained(name_or_path)
    else:
        model = DCLIPModel.from_clip(name_or_path)
    return model.to("cuda" if torch.cuda.is_available() else "cpu").eval()


@torch.no_grad()
def _embed(model, encode, batches, device: str | torch.device | None, **progress) -> np.ndarray:
    """L2-normalised float32 features `(rows, dim)` of `encode(model, batch, device)` over `batches`."""
    device = torch.device(device or next(model.parameters()).device)
    model.eval()
    chunks = [torch.nn.functional.normalize(_features(encode(batch, device)).float(), dim=-1).cpu()
              for batch in tqdm(batches, **progress)]
    return torch.cat(chunks).numpy() if chunks else np.empty((0, 0), dtype=np.float32)


def embed_images(model, processor, dataset, batch_size: int = 256, image_column: str = "image",
                 device: str | torch.device | None = None) -> np.ndarray:
    """L2-normalised image embeddings `(rows, dim)` float32 of `dataset[image_column]` with `get_image_features`."""
    def encode(start, device):
        images = dataset[start : start + batch_size][image_column]
        return model.get_image_features(processor(images=images)["pixel_values"].to(device))

    return _embed(model, encode, range(0, len(dataset), batch_size), device, desc="image embeddings", unit="batch")


def linear_probe_accuracy(train_features: np.ndarray, train_labels, test_features: np.ndarray, test_labels,
                          regularization: float = 1.0, max_iter: int = 1000) -> float:
    """Top-1 accuracy on `test_*` of a logistic regression (L-BFGS, inverse regularisation `regularization`) fitted
    on frozen `train_*` features, as in CLIP's linear-probe evaluation."""
    from sklearn.linear_model import LogisticRegression

    classifier = LogisticRegression(C=regularization, max_iter=max_iter)
    classifier.fit(train_features, np.asarray(train_labels))
    return float((classifier.predict(test_features) == np.asarray(test_labels)).mean())


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


# ----- retrieval: Recall@K and mAP, both directions ------------------------------------------------------------------
# Conventions (CLIP_benchmark's names): "image_retrieval" ranks images for each caption (text->image), "text_retrieval"
# ranks captions for each image (image->text; a hit when any of the image's captions is in the top K). A rank is the
# number of *other* candidates scoring strictly higher (0 = first). Both directions are kept as one rank per caption:
# `image_ranks[t]`, the rank of caption t's image among all images for query t, and `text_ranks[t]`, the rank of
# caption t among all captions for the query "its image". Ranks past a search depth are `inf`.


def retrieval_metrics(image_embeds: np.ndarray, text_embeds: np.ndarray, text_to_image,
                      ks: tuple[int, ...] = (1, 5, 10), backend: str = "auto", exact_max_pairs: int = 10_000_000_000,
                      sample_pairs: int = 2_500_000_000, seed: int = 0, faiss_depth: int = 100,
                      faiss_nprobe: int = 8, faiss_exact_below: int = 50_000) -> dict[str, float]:
    """
    Recall@K and mAP both ways (COCO convention: several captions per image). `image_embeds (images, dim)` and
    `text_embeds (texts, dim)` are L2-normalised; `text_to_image[t]` is the image of caption `t`.

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
        return metrics_from_ranks(image_ranks, text_ranks, text_to_image, ks)
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
        metrics = metrics_from_ranks(image_ranks, text_ranks, sampled_owner, ks, with_stderr=True)
        metrics["image_retrieval_queries"] = len(caption_sample)
        metrics["text_retrieval_queries"] = len(image_sample)
        return metrics
    if backend == "faiss":
        logger.warning("retrieval over %d x %d pairs with FAISS: approximate where the gallery needs an inverted "
                       "file; backend='exact' for exact figures", len(image_embeds), len(text_embeds))
        image_ranks, text_ranks = faiss_positive_ranks(image_embeds, text_embeds, text_to_image, faiss_depth,
                                                       faiss_nprobe, faiss_exact_below)
        return metrics_from_ranks(image_ranks, text_ranks, text_to_image, ks, depth=faiss_depth)
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
                  max_block_elements: int = 1 << 24, block_queries: int = 1024) -> tuple[torch.Tensor, torch.Tensor | None]:
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
            passes = [lo + np.flatnonzero(place[lo:hi] == j) for j in range(int(place[lo:hi].max()) + 1 if hi > lo else 0)]
        for pairs in passes:
            local = query_of_pair[pairs] - start
            own = scores if len(local) == stop - start else scores[local]  # every query has a j-th pair: no copy
            pair_counts[pairs] += np.count_nonzero(own > pair_threshold[pairs, None], axis=1)
    return torch.from_numpy(pair_counts), None if gallery_counts is None else torch.from_numpy(gallery_counts)


def exact_positive_ranks(image_embeds: np.ndarray, text_embeds: np.ndarray, text_to_image: np.ndarray,
                         max_block_elements: int = 1 << 24, tie_tolerance: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
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
                       with_stderr: bool = False) -> dict[str, float]:
    """Recall@K and mAP both ways from per-caption ranks (see above): `image_ranks` of captions (text-to-image) and
    `text_ranks` of captions whose images are `text_to_image` (image-to-text; the two may cover different captions
    when queries are sampled). With a search `depth`, mAP counts positives past it as never retrieved and its key
    says `mAP@<depth>`; `with_stderr` adds each figure's standard error over queries as `<key>_stderr`."""
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
                       ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Recall@K and mAP both ways from dense scores (see `ranks_from_scores`)."""
    image_ranks, text_ranks = ranks_from_scores(image_query_scores, text_query_scores, text_to_image)
    return metrics_from_ranks(image_ranks, text_ranks, text_to_image, ks)


def rerank_scores(scores: torch.Tensor, pair_score, top_k: int, batch_size: int = 4096) -> torch.Tensor:
    """
    `scores (queries, candidates)` with each query's `top_k` candidates re-scored by `pair_score(query_index,
    candidate_index) -> scores` (1-D index tensors) and placed above every other candidate, whose order is kept.
    """
    top_k = min(top_k, scores.shape[1])
    if top_k <= 0:
        return scores.float()
    candidates = scores.topk(top_k, dim=1).indices  # (queries, top_k)
    queries = torch.arange(scores.shape[0])[:, None].expand_as(candidates)
    flat_queries, flat_candidates = queries.reshape(-1), candidates.reshape(-1)
    new_scores = torch.cat([
        pair_score(flat_queries[start : start + batch_size], flat_candidates[start : start + batch_size]).float().cpu()
        for start in range(0, len(flat_queries), batch_size)
    ]).reshape(candidates.shape)
    # shift the rest below the lowest re-scored candidate, keeping their order
    rest = scores.float() - (scores.max() - new_scores.min() + 1.0)
    return rest.scatter(1, candidates, new_scores)


# ----- classification and hard negatives ------------------------------------------------------------------------

DEFAULT_TEMPLATES = ("a photo of a {}.",)


def _features(output) -> torch.Tensor:
    """`get_*_features` of a DCLIP model returns a tensor; a plain transformers 5 `CLIPModel` an output object."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def embed_texts(model, processor, texts: list[str], batch_size: int = 256,
                device: str | torch.device | None = None) -> np.ndarray:
    """L2-normalised text embeddings `(len(texts), dim)` float32 with `get_text_features`."""
    def encode(start, device):
        inputs = processor(text=list(texts[start : start + batch_size]))
        return model.get_text_features(**{k: v.to(device) for k, v in inputs.items()})

    return _embed(model, encode, range(0, len(texts), batch_size), device, disable=True)


def zero_shot_classifier(model, processor, class_names: list[str], templates=DEFAULT_TEMPLATES,
                         device: str | torch.device | None = None) -> np.ndarray:
    """`(classes, dim)` class embeddings: each class's prompts (`template.format(name)` for every template) embedded,
    averaged and re-normalised, as in CLIP's prompt ensembling."""
    if not class_names or not templates:
        raise ValueError(f"zero-shot classification needs class names and templates, got {len(class_names)} and "
                         f"{len(templates)}")
    prompts = [template.format(name) for name in class_names for template in templates]
    embeds = embed_texts(model, processor, prompts, device=device).reshape(len(class_names), len(templates), -1)
    mean = embeds.mean(1)
    return mean / np.linalg.norm(mean, axis=1, keepdims=True)


def classification_metrics(scores: np.ndarray, labels, class_names: list[str],
                           ks: tuple[int, ...] = (1, 5)) -> dict:
    """From `scores (samples, classes)` and integer `labels`: top-K accuracy `acc<K>` (K below the class count),
    `mean_per_class_recall` over the classes present, and `per_class_recall` by class name (CLIP_benchmark names)."""
    labels = np.asarray(labels, dtype=np.int64)
    order = np.argsort(-scores, axis=1, kind="stable")
    results: dict = {}
    for k in ks:
        if k == 1 or k < scores.shape[1]:
            results[f"acc{k}"] = float(np.mean((order[:, :k] == labels[:, None]).any(1)))
    top1 = order[:, 0]
    per_class = {name: float(np.mean(top1[labels == c] == c)) for c, name in enumerate(class_names)
                 if np.any(labels == c)}
    results["mean_per_class_recall"] = float(np.mean(list(per_class.values()))) if per_class else float("nan")
    results["per_class_recall"] = per_class
    return results


@torch.no_grad()
def zero_shot_classification(model, processor, dataset, label_column: str, class_names: list[str],
                             templates=DEFAULT_TEMPLATES, image_embeds: np.ndarray | None = None,
                             batch_size: int = 256, device: str | torch.device | None = None) -> dict:
    """Zero-shot classification of `dataset`'s images among `class_names` (see `classification_metrics`);
    `image_embeds` (normalised, a row per dataset row) saves embedding the images again."""
    if image_embeds is None:
        image_embeds = embed_images(model, processor, dataset, batch_size=batch_size, device=device)
    classifier = zero_shot_classifier(model, processor, class_names, templates, device=device)
    return classification_metrics(image_embeds @ classifier.T, dataset[label_column], class_names)


def zero_shot_accuracy(model, processor, dataset, label_column: str, class_names: list[str],
                       template: str = "a photo of a {}.", batch_size: int = 256,
                       device: str | torch.device | None = None) -> float:
    """Top-1 accuracy of classifying `dataset` images among `class_names` prompts."""
    return zero_shot_classification(model, processor, dataset, label_column, class_names, (template,),
                                    batch_size=batch_size, device=device)["acc1"]


def hard_negative_accuracy(model, processor, dataset, image_embeds: np.ndarray, text_embeds: np.ndarray,
                           device: str | torch.device | None = None) -> dict[str, float]:
    """
    How often each image scores its own caption above each of its hard-negative captions (`hard_negatives`,
    with kinds in `hard_negative_types`: swapped attribute, swapped relation, wrong count): `hard_negative_accuracy`
    over all (image, negative) pairs and `hard_negative_accuracy_<kind>` per kind. `image_embeds` / `text_embeds`:
    normalised, a row per dataset row (the row's image and caption).
    """
    negatives = dataset["hard_negatives"]
    kinds = dataset["hard_negative_types"] if "hard_negative_types" in dataset.column_names else \
        [["all"] * len(row) for row in negatives]
    rows = np.repeat(np.arange(len(negatives)), [len(row) for row in negatives])
    if not len(rows):
        return {}
    flat_negatives = [text for row in negatives for text in row]
    flat_kinds = np.array([kind for row in kinds for kind in row])
    negative_embeds = embed_texts(model, processor, flat_negatives, device=device)
    positive_scores = np.einsum("nd,nd->n", image_embeds[rows], text_embeds[rows])
    negative_scores = np.einsum("nd,nd->n", image_embeds[rows], negative_embeds)
    correct = positive_scores > negative_scores
    results = {"hard_negative_accuracy": float(correct.mean())}
    for kind in sorted(set(flat_kinds)):
        results[f"hard_negative_accuracy_{kind}"] = float(correct[flat_kinds == kind].mean())
    return results


@torch.no_grad()
def teacher_retrieval(teacher, features, top_k: int = 16, ks: tuple[int, ...] = (1, 5, 10),
                      image_rows: np.ndarray | None = None, text_to_image: np.ndarray | None = None,
                      device: str | torch.device | None = None) -> dict[str, float]:
    """
    Recall@K of the cross-modal teacher on image-caption pairs, from the towers' cached outputs
    (`dclip.targets.compute_teacher_features` columns, a row per pair; `image_rows` / `text_to_image` as from
    `image_groups`, default: row `i` is image `i` and its caption). Fusion scores pairs, not single items, so
    retrieval is two-stage, as with ITM models: the towers' global similarity shortlists `top_k` candidates per
    query and the fused pair score re-ranks them. Candidates beyond the shortlist keep their global order.
    """
    from modeling_dclip import DCLIPTeacherImageFeatures, DCLIPTeacherTextFeatures

    from .targets import TEACHER_FEATURE_COLUMNS

    device = torch.device(device or next(teacher.parameters()).device)
    teacher.eval()
    columns = features.with_format("torch", columns=list(TEACHER_FEATURE_COLUMNS))[:]
    columns = {name: value.to(device) for name, value in columns.items()}
    if image_rows is None:
        image_rows = text_to_image = np.arange(len(features))
    rows = torch.as_tensor(image_rows, device=device)
    image_features = DCLIPTeacherImageFeatures(
        global_embeds=columns["image_global_features"][rows].float(),
        region_embeds=columns["region_features"][rows].float(),
        region_boxes=columns["region_boxes"][rows].float(), region_mask=columns["region_mask"][rows].bool(),
    )
    text_features = DCLIPTeacherTextFeatures(
        global_embeds=columns["text_global_features"].float(), span_embeds=columns["span_features"].float(),
        span_mask=columns["span_mask"].bool(),
    )
    image_global = torch.nn.functional.normalize(image_features.global_embeds, dim=-1)
    text_global = torch.nn.functional.normalize(text_features.global_embeds, dim=-1)
    similarity = (image_global @ text_global.t()).float().cpu()  # (images, texts)

    def fused(image_index: torch.Tensor, text_index: torch.Tensor) -> torch.Tensor:
        return teacher.pair_logits(image_features, text_features, image_index.to(device), text_index.to(device))

    image_query_scores = rerank_scores(similarity, fused, top_k)
    text_query_scores = rerank_scores(similarity.t(), lambda text, image: fused(image, text), top_k)
    return recall_from_scores(image_query_scores, text_query_scores, text_to_image, ks)


# ----- whole evaluations ------------------------------------------------------------------------------------------


@dataclass
class EvaluationResult:
    """Flat `metrics` (name -> value; the keys of summary tables and model cards) and `per_class_recall`
    (zero-shot task -> class -> recall), with the sizes evaluated."""

    metrics: dict[str, float]
    per_class_recall: dict[str, dict[str, float]] = field(default_factory=dict)
    num_images: int = 0
    num_texts: int = 0


def evaluate_model(model, processor, test, probe_train=None, tasks: dict[str, list[str]] | None = None,
                   templates=DEFAULT_TEMPLATES, ks: tuple[int, ...] = (1, 5, 10), retrieval_backend: str = "auto",
                   batch_size: int = 256) -> EvaluationResult:
    """
    Evaluate a dual encoder (`DCLIPModel`, `DCLIPTeacherModel` towers, or a CLIP wrapped by `load_clip_towers`) on
    `test` (`image`, `caption`, optional `image_id` for several captions per image): retrieval both ways; for each
    `tasks` label column present (column -> class names) zero-shot classification and, with `probe_train`, a linear
    probe fitted on its images; hard-negative accuracy where `test` has `hard_negatives`.
    """
    image_rows, text_to_image = image_groups(test)
    images = test.select(image_rows) if len(image_rows) != len(test) else test
    image_embeds = embed_images(model, processor, images, batch_size=batch_size)
    text_embeds = embed_texts(model, processor, test["caption"], batch_size=batch_size)
    metrics = retrieval_metrics(image_embeds, text_embeds, text_to_image, ks, backend=retrieval_backend)
    result = EvaluationResult(metrics, num_images=len(image_embeds), num_texts=len(text_embeds))
    tasks = {column: names for column, names in (tasks or {}).items() if column in test.column_names}
    probe_embeds = None
    if tasks and probe_train is not None:
        probe_images = probe_train.select(image_groups(probe_train)[0])
        probe_embeds = embed_images(model, processor, probe_images, batch_size=batch_size)
    for column, names in tasks.items():
        zero_shot = zero_shot_classification(model, processor, images, column, names, templates,
                                             image_embeds=image_embeds)
        for name in ("acc1", "acc5", "mean_per_class_recall"):
            if name in zero_shot:
                metrics[f"zeroshot_{column}_{name}"] = zero_shot[name]
        result.per_class_recall[column] = zero_shot["per_class_recall"]
        if probe_embeds is not None:
            metrics[f"linear_probe_{column}_acc1"] = linear_probe_accuracy(
                probe_embeds, probe_images[column], image_embeds, images[column])
    if "hard_negatives" in test.column_names and len(image_rows) == len(test):  # one caption per image
        metrics.update(hard_negative_accuracy(model, processor, test, image_embeds, text_embeds))
    return result


def evaluate_teacher(teacher, processor, test, top_k: int = 16, ks: tuple[int, ...] = (1, 5, 10),
                     batch_size: int = 256) -> EvaluationResult:
    """The cross-modal teacher's retrieval Recall@K and mAP: global shortlist, fused re-ranking (`teacher_retrieval`);
    regions from the processor's detector (if any) and spans from its extractor, as at test time."""
    from .targets import compute_teacher_features

    features = compute_teacher_features(test, teacher, processor, batch_size=batch_size, use_given_boxes=False,
                                        use_given_spans=False)
    image_rows, text_to_image = image_groups(test)
    metrics = teacher_retrieval(teacher, features, top_k=top_k, ks=ks, image_rows=image_rows,
                                text_to_image=text_to_image)
    return EvaluationResult(metrics, num_images=len(image_rows), num_texts=len(test))


def evaluate_checkpoint(name_or_path: str, test, probe_train=None, tasks: dict[str, list[str]] | None = None,
                        processor=None, templates=DEFAULT_TEMPLATES, ks: tuple[int, ...] = (1, 5, 10),
                        retrieval_backend: str = "auto", teacher_top_k: int = 16) -> EvaluationResult:
    """
    Evaluate a saved model, local or on the Hub: a `DCLIPTeacherModel` folder by its fused retrieval
    (`evaluate_teacher`), anything else (a `DCLIPModel` folder, any CLIP checkpoint) with `evaluate_model`.
    `processor`: default, the checkpoint's own (a `DCLIPProcessor` around its tokenizer and image processor).
    """
    from transformers import PretrainedConfig

    from modeling_dclip import DCLIPTeacherModel
    from processing_dclip import DCLIPProcessor

    processor = processor or DCLIPProcessor.from_pretrained(name_or_path, trust_remote_code=False)  # our class
    if PretrainedConfig.get_config_dict(name_or_path)[0].get("model_type") == "dclip_teacher":
        teacher = DCLIPTeacherModel.from_pretrained(name_or_path).to("cuda" if torch.cuda.is_available() else "cpu")
        return evaluate_teacher(teacher, processor, test, top_k=teacher_top_k, ks=ks)
    return evaluate_model(load_clip_towers(name_or_path), processor, test, probe_train=probe_train, tasks=tasks,
                          templates=templates, ks=ks, retrieval_backend=retrieval_backend)


def zero_shot_top1_keys(metrics: dict[str, float]) -> list[str]:
    """The zero-shot top-1 accuracies among `metrics` (one per task)."""
    return [key for key in metrics if key.startswith("zeroshot_") and key.endswith("_acc1")]


def format_metrics_table(metrics: dict[str, dict[str, float]]) -> str:
    """A plain-text table of `metrics` (model -> metric -> value): a row per metric, retrieval first, a column per
    model ("-" where a model lacks the metric)."""
    names = sorted({key for values in metrics.values() for key in values if not is_estimate_detail(key)},
                   key=lambda key: (not key.startswith(("image_", "text_")), key))
    width = max([len(name) for name in names] + [6])
    lines = [f"{'metric':<{width}}" + "".join(f"{model:>16}" for model in metrics)]
    for name in names:
        cells = "".join(f"{format_estimate(values, name):>16}" if name in values else f"{'-':>16}"
                        for values in metrics.values())
        lines.append(f"{name:<{width}}{cells}")
    return "\n".join(lines)


def is_estimate_detail(key: str) -> bool:
    """A sampled evaluation's standard error (`<metric>_stderr`) or query count (`*_queries`): a detail of another
    metric's estimate, not a metric of its own."""
    return key.endswith(("_stderr", "_queries"))


def format_estimate(metrics: dict[str, float], key: str, digits: int = 4, separator: str = "±") -> str:
    """`metrics[key]`, with `separator` and its standard error where a sampled evaluation gave a finite one."""
    stderr = metrics.get(f"{key}_stderr")
    text = f"{metrics[key]:.{digits}f}"
    return text + (f"{separator}{stderr:.{digits}f}" if stderr is not None and np.isfinite(stderr) else "")
