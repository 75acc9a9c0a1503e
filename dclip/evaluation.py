"""Evaluation: retrieval Recall@K with several captions per image, zero-shot classification, linear probe."""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm


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
def embed_pairs(model, processor, dataset, batch_size: int = 256, device: str | torch.device | None = None):
    """L2-normalised `(image_embeds, text_embeds)` of every row (`image`, `caption`) of `dataset`, as float32 numpy."""
    device = torch.device(device or next(model.parameters()).device)
    model.eval()
    images, texts = [], []
    for start in tqdm(range(0, len(dataset), batch_size), desc="embedding", unit="batch"):
        rows = dataset[start : start + batch_size]
        inputs = processor(text=rows["caption"], images=rows["image"])
        out = model(**{k: v.to(device) for k, v in inputs.items()})
        images.append(out.image_embeds.float().cpu())
        texts.append(out.text_embeds.float().cpu())
    return torch.cat(images).numpy(), torch.cat(texts).numpy()


@torch.no_grad()
def embed_images(model, processor, dataset, batch_size: int = 256, image_column: str = "image",
                 device: str | torch.device | None = None) -> np.ndarray:
    """L2-normalised image embeddings `(rows, dim)` float32 of `dataset[image_column]` with `get_image_features`."""
    device = torch.device(device or next(model.parameters()).device)
    model.eval()
    chunks = []
    for start in tqdm(range(0, len(dataset), batch_size), desc="image embeddings", unit="batch"):
        images = dataset[start : start + batch_size][image_column]
        pixels = processor(images=images)["pixel_values"].to(device)
        features = model.get_image_features(pixels)
        if not isinstance(features, torch.Tensor):  # a plain transformers 5 CLIPModel returns an output object
            features = features.pooler_output
        chunks.append(torch.nn.functional.normalize(features.float(), dim=-1).cpu())
    return torch.cat(chunks).numpy() if chunks else np.empty((0, 0), dtype=np.float32)


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


def retrieval_recall(image_embeds: np.ndarray, text_embeds: np.ndarray, text_to_image: np.ndarray,
                     ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """
    Recall@K both ways (COCO convention). `image_embeds (images, dim)`, `text_embeds (texts, dim)`, normalised;
    `text_to_image[t]` is the image index of caption `t` (several captions may share an image).
    Image->text: a hit when any of the image's captions is in its top K. Text->image: the caption's image in top K.
    """
    similarity = torch.from_numpy(image_embeds) @ torch.from_numpy(text_embeds).t()  # (images, texts)
    return recall_from_scores(similarity, similarity.t(), text_to_image, ks)


def recall_from_scores(image_query_scores: torch.Tensor, text_query_scores: torch.Tensor, text_to_image,
                       ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """
    Recall@K from a score per (query, candidate): `image_query_scores (images, texts)` ranks captions for each image,
    `text_query_scores (texts, images)` ranks images for each caption (the two may differ, e.g. after re-ranking).
    """
    text_to_image = torch.as_tensor(np.asarray(text_to_image))
    texts = torch.arange(text_query_scores.shape[0])
    # rank of the true image for each caption = number of images scoring strictly higher
    true_scores = text_query_scores[texts, text_to_image]
    text_ranks = (text_query_scores > true_scores[:, None]).sum(1)
    # rank of each image's best-scoring caption among all captions
    positive = text_to_image[None, :] == torch.arange(image_query_scores.shape[0])[:, None]  # (images, texts)
    best_positive = image_query_scores.masked_fill(~positive, float("-inf")).max(1).values
    image_ranks = (image_query_scores > best_positive[:, None]).sum(1)
    results = {}
    for k in ks:
        results[f"image_retrieval_recall@{k}"] = float((text_ranks < k).float().mean())
        results[f"text_retrieval_recall@{k}"] = float((image_ranks < k).float().mean())
    return results


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


@torch.no_grad()
def zero_shot_accuracy(model, processor, dataset, label_column: str, class_names: list[str],
                       template: str = "a photo of a {}.", batch_size: int = 256,
                       device: str | torch.device | None = None) -> float:
    """Top-1 accuracy of classifying `dataset` images among `class_names` prompts."""
    device = torch.device(device or next(model.parameters()).device)
    model.eval()
    prompts = processor(text=[template.format(name) for name in class_names])
    class_embeds = model.get_text_features(**{k: v.to(device) for k, v in prompts.items()})
    class_embeds = class_embeds / class_embeds.norm(dim=-1, keepdim=True)
    correct = 0
    for start in range(0, len(dataset), batch_size):
        rows = dataset[start : start + batch_size]
        pixels = processor(images=rows["image"])["pixel_values"].to(device)
        image_embeds = model.get_image_features(pixels)
        image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
        predictions = (image_embeds @ class_embeds.t()).argmax(1).cpu()
        correct += int((predictions == torch.as_tensor(rows[label_column])).sum())
    return correct / max(len(dataset), 1)


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
