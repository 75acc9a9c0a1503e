"""Retrieval by the cross-modal teacher: its fused pair score cannot embed items one by one, so `teacher_retrieval`
shortlists candidates by the towers' global similarity and re-ranks them with the fused score (`rerank_scores`),
then counts Recall@K and mAP from the re-ranked scores."""

from __future__ import annotations

import numpy as np
import torch

from .classification import classification_metrics, hard_negative_outcomes
from .retrieval import recall_from_scores


def _feature_sides(teacher, features, image_rows: np.ndarray, device: torch.device):
    """The cached tower outputs (`compute_teacher_features` columns) as the teacher's image side (rows
    `image_rows`) and text side (every row)."""
    from modeling_dclip import DCLIPTeacherImageFeatures, DCLIPTeacherTextFeatures

    from ..targets import TEACHER_FEATURE_COLUMNS

    columns = features.with_format("torch", columns=list(TEACHER_FEATURE_COLUMNS))[:]
    columns = {name: value.to(device) for name, value in columns.items()}
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
    return image_features, text_features


@torch.no_grad()
def teacher_retrieval(teacher, features, top_k: int = 16, ks: tuple[int, ...] = (1, 5, 10),
                      image_rows: np.ndarray | None = None, text_to_image: np.ndarray | None = None,
                      device: str | torch.device | None = None, outcomes: dict | None = None) -> dict[str, float]:
    """
    Recall@K of the cross-modal teacher on image-caption pairs, from the towers' cached outputs
    (`dclip.targets.compute_teacher_features` columns, a row per pair; `image_rows` / `text_to_image` as from
    `image_groups`, default: row `i` is image `i` and its caption). Fusion scores pairs, not single items, so
    retrieval is two-stage, as with ITM models: the towers' global similarity shortlists `top_k` candidates per
    query and the fused pair score re-ranks them. Candidates beyond the shortlist keep their global order.
    `outcomes` as in `metrics_from_ranks`.
    """
    device = torch.device(device or next(teacher.parameters()).device)
    teacher.eval()
    if image_rows is None:
        image_rows = text_to_image = np.arange(len(features))
    image_features, text_features = _feature_sides(teacher, features, image_rows, device)
    image_global = torch.nn.functional.normalize(image_features.global_embeds, dim=-1)
    text_global = torch.nn.functional.normalize(text_features.global_embeds, dim=-1)
    similarity = (image_global @ text_global.t()).float().cpu()  # (images, texts)

    def fused(image_index: torch.Tensor, text_index: torch.Tensor) -> torch.Tensor:
        return teacher.pair_logits(image_features, text_features, image_index.to(device), text_index.to(device))

    image_query_scores = rerank_scores(similarity, fused, top_k)
    text_query_scores = rerank_scores(similarity.t(), lambda text, image: fused(image, text), top_k)
    return recall_from_scores(image_query_scores, text_query_scores, text_to_image, ks, outcomes=outcomes)


@torch.no_grad()
def teacher_zero_shot(teacher, processor, features, image_rows: np.ndarray, labels, class_names: list[str],
                      templates=("a photo of a {}.",), batch_size: int = 4096) -> dict:
    """
    Zero-shot classification by the cross-modal teacher: each image (its cached tower outputs, rows `image_rows` of
    `features`) is fused with every class prompt (`template.format(name)`, spans from the processor's extractor) and
    scored by the fused pair score, averaged over the templates; `classification_metrics` of those scores.
    """
    device = next(teacher.parameters()).device
    teacher.eval()
    image_features, _ = _feature_sides(teacher, features, image_rows, device)
    prompts = [template.format(name) for name in class_names for template in templates]
    text_features = _encode_prompts(teacher, processor, prompts, device)
    pairs = torch.cartesian_prod(torch.arange(len(image_rows)), torch.arange(len(prompts))).to(device)
    scores = torch.cat([
        teacher.pair_logits(image_features, text_features, chunk[:, 0], chunk[:, 1]).float().cpu()
        for chunk in pairs.split(batch_size)
    ]).reshape(len(image_rows), len(class_names), len(templates)).mean(-1)
    return classification_metrics(scores.numpy(), labels, class_names)


def _encode_prompts(teacher, processor, texts: list[str], device, batch_size: int = 1024):
    """The teacher's text side (global and span embeddings) of `texts`, spans from the processor's extractor."""
    from modeling_dclip import DCLIPTeacherTextFeatures

    from ..targets import encode_teacher_texts

    parts = [encode_teacher_texts(teacher, processor, texts[start : start + batch_size], device)
             for start in range(0, len(texts), batch_size)]
    if len(parts) == 1:
        return parts[0]
    widest = max(part.span_embeds.shape[1] for part in parts)  # batches may find different numbers of spans

    def pad(tensor: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(tensor, (0, 0) * (tensor.dim() - 2) + (0, widest - tensor.shape[1]))
    return DCLIPTeacherTextFeatures(
        global_embeds=torch.cat([part.global_embeds for part in parts]),
        span_embeds=torch.cat([pad(part.span_embeds) for part in parts]),
        span_mask=torch.cat([pad(part.span_mask) for part in parts]))


@torch.no_grad()
def teacher_hard_negatives(teacher, processor, features, negatives: list[list[str]], kinds: list[list[str]],
                           batch_size: int = 4096, outcomes: dict | None = None) -> dict[str, float]:
    """
    Hard-negative accuracy of the cross-modal teacher: how often the fused score of each image (row `i` of the cached
    tower outputs `features`) with its own caption (row `i`) beats its fused score with each of its hard-negative
    captions (`negatives[i]`, kinds `kinds[i]`); the same figures, names and per-pair `outcomes` as
    `hard_negative_accuracy` for a dual encoder.
    """
    device = next(teacher.parameters()).device
    teacher.eval()
    rows = np.repeat(np.arange(len(negatives)), [len(row) for row in negatives])
    if not len(rows):
        return {}
    image_features, text_features = _feature_sides(teacher, features, np.arange(len(negatives)), device)
    negative_features = _encode_prompts(teacher, processor, [text for row in negatives for text in row], device)
    index = torch.as_tensor(rows, device=device)
    own = torch.arange(len(negatives), device=device)
    positive = torch.cat([teacher.pair_logits(image_features, text_features, chunk, chunk).float().cpu()
                          for chunk in own.split(batch_size)])[rows]
    negative = torch.cat([
        teacher.pair_logits(image_features, negative_features, index[start : start + batch_size],
                            torch.arange(start, min(start + batch_size, len(rows)), device=device)).float().cpu()
        for start in range(0, len(rows), batch_size)])
    return hard_negative_outcomes((positive > negative).numpy(), kinds, outcomes)


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
