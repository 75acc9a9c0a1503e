"""Evaluation: retrieval Recall@K with several captions per image, and zero-shot classification."""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm


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


def retrieval_recall(image_embeds: np.ndarray, text_embeds: np.ndarray, text_to_image: np.ndarray,
                     ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """
    Recall@K both ways (COCO convention). `image_embeds (images, dim)`, `text_embeds (texts, dim)`, normalised;
    `text_to_image[t]` is the image index of caption `t` (several captions may share an image).
    Image->text: a hit when any of the image's captions is in its top K. Text->image: the caption's image in top K.
    """
    similarity = torch.from_numpy(image_embeds) @ torch.from_numpy(text_embeds).t()  # (images, texts)
    text_to_image = torch.as_tensor(text_to_image)
    results = {}
    # rank of the true image for each caption = number of images scoring strictly higher
    true_scores = similarity[text_to_image, torch.arange(similarity.shape[1])]
    text_ranks = (similarity > true_scores[None, :]).sum(0)
    # rank of each image's best-scoring caption among all captions
    positive = text_to_image[None, :] == torch.arange(similarity.shape[0])[:, None]  # (images, texts)
    best_positive = similarity.masked_fill(~positive, float("-inf")).max(1).values
    image_ranks = (similarity > best_positive[:, None]).sum(1)
    for k in ks:
        results[f"image_retrieval_recall@{k}"] = float((text_ranks < k).float().mean())
        results[f"text_retrieval_recall@{k}"] = float((image_ranks < k).float().mean())
    return results


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
