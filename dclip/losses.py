"""Distillation losses, each a small `nn.Module` (in the manner of open_clip's `loss.py`).

Features are expected L2-normalised. In a distributed run, contrastive terms gather features from every process
(with gradients flowing back to each process's own features), so each process sees the global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_features(features: torch.Tensor, gather_with_grad: bool = True) -> torch.Tensor:
    """
    Concatenate `(local_batch, dim)` features from all processes into `(global_batch, dim)`, in rank order.

    With `gather_with_grad`, gradients flow to every process's features (`torch.distributed.nn.all_gather`); without
    it, only this process's own slice carries gradients (open_clip's default, cheaper, same loss value).
    """
    rank, world_size = _world()
    if world_size == 1:
        return features
    if gather_with_grad:
        import torch.distributed.nn

        return torch.cat(torch.distributed.nn.all_gather(features), dim=0)
    gathered = [torch.zeros_like(features) for _ in range(world_size)]
    dist.all_gather(gathered, features)
    gathered[rank] = features
    return torch.cat(gathered, dim=0)


class ClipLoss(nn.Module):
    """
    CLIP's symmetric InfoNCE: cross-entropy of image->text and text->image similarity logits (scaled by the
    learnable temperature `logit_scale.exp()`) towards the matching pair, averaged over the two directions.

    `local_loss=False` (default): every process computes the loss over the full global batch;
    `local_loss=True`: each process scores only its own rows against the global batch (open_clip's memory saver).
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = True):
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        rank, world_size = _world()
        scale = logit_scale.exp() if logit_scale.dim() == 0 or logit_scale.numel() == 1 else logit_scale
        all_images = gather_features(image_features, self.gather_with_grad)
        all_texts = gather_features(text_features, self.gather_with_grad)
        batch = image_features.shape[0]
        if self.local_loss:
            logits_per_image = scale * image_features @ all_texts.t()
            logits_per_text = scale * text_features @ all_images.t()
            labels = torch.arange(batch, device=image_features.device) + rank * batch
        else:
            logits_per_image = scale * all_images @ all_texts.t()
            logits_per_text = logits_per_image.t()
            labels = torch.arange(all_images.shape[0], device=image_features.device)
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


class CosineDistillLoss(nn.Module):
    """DCLIP's distillation term: `1 - cos(student, teacher)`, averaged over the batch. No gradient to the teacher."""

    def forward(self, student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
        teacher_features = teacher_features.detach().to(student_features.dtype)
        return (1.0 - F.cosine_similarity(student_features, teacher_features, dim=-1)).mean()
