"""Distillation losses, each a small `nn.Module` (in the manner of open_clip's `loss.py`).

Features are expected L2-normalised. In a distributed run, contrastive terms gather features from every process
(with gradients flowing back to each process's own features), so each process sees the global batch.
"""

from __future__ import annotations

import math

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

    With `gather_with_grad`, gradients flow to every process's features (`_all_gather_with_grad`); without
    it, only this process's own slice carries gradients (open_clip's default, cheaper, same loss value).
    """
    rank, world_size = _world()
    if world_size == 1:
        return features
    if gather_with_grad:
        return _all_gather_with_grad(features)
    gathered = [torch.zeros_like(features) for _ in range(world_size)]
    dist.all_gather(gathered, features)
    gathered[rank] = features
    return torch.cat(gathered, dim=0)


def _all_gather_with_grad(features: torch.Tensor) -> torch.Tensor:
    """All processes' features, concatenated in rank order, with a backward that sums each process's gradient into
    its own slice: torch's functional collective (`all_gather_single_autograd`), or on a torch without it, the older
    `torch.distributed.nn.all_gather` (deprecated where the functional one exists)."""
    from torch.distributed import _functional_collectives as collectives

    gather = getattr(collectives, "all_gather_single_autograd", None)
    if gather is None:
        from torch.distributed.nn import all_gather

        return torch.cat(all_gather(features), dim=0)
    return gather(features.contiguous(), 0, dist.group.WORLD)


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

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor) -> torch.Tensor:
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


class ClusterMarginLoss(nn.Module):
    """
    CLIP-CID's cluster discrimination: the student's embedding is classified among fixed, L2-normalised cluster
    centres of the teacher's embeddings with an additive angular margin softmax (ArcFace):
    logit of the true centre `s * cos(theta_y + m)`, of every other centre `s * cos(theta_j)`.

    As in InsightFace, when `theta_y + m` would pass pi (cos(theta_y) <= cos(pi - m)) the target logit is
    `s * (cos(theta_y) - m * sin(m))` instead, which keeps it decreasing in theta_y.

    `sample_size` (PartialFC, for CLIP-CID's ~1M clusters): each step scores only the batch's own centres plus random
    others, `sample_size` in all (every centre when the batch holds more labels than that), so the logits are
    `(batch, sample_size)` instead of `(batch, num_clusters)`. None, or at least `num_clusters`: the full softmax.
    """

    def __init__(self, centers: torch.Tensor, scale: float = 16.0, margin: float = 0.2,
                 sample_size: int | None = None):
        super().__init__()
        if centers.dim() != 2:
            raise ValueError(f"`centers` must be (num_clusters, dim), got shape {tuple(centers.shape)}")
        if not 0 <= margin < math.pi / 2:
            raise ValueError(f"the angular margin must be in [0, pi/2), got {margin}")
        if sample_size is not None and sample_size < 1:
            raise ValueError(f"the sampled centres per step must be at least 1, got {sample_size}")
        self.register_buffer("centers", F.normalize(centers.detach().float(), dim=-1), persistent=False)
        self.scale = scale
        self.margin = margin
        self.sample_size = sample_size
        self.cos_m, self.sin_m = math.cos(margin), math.sin(margin)
        self.threshold = math.cos(math.pi - margin)
        self.fallback = math.sin(math.pi - margin) * margin

    def logits(self, features: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor | None = None) -> torch.Tensor:
        """`(batch, num_centres)` margin logits of L2-normalised `features` for the true `labels` (indices into
        `centers`, default every centre), in float32 even under autocast (`sqrt(1 - cos^2)` is ill-conditioned near
        cos = 1)."""
        with torch.autocast(features.device.type, enabled=False):
            return self._logits(features, labels, self.centers if centers is None else centers)

    def _logits(self, features: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
        cosine = F.normalize(features.float(), dim=-1) @ centers.t()
        target = cosine.gather(1, labels[:, None])
        sine = torch.sqrt((1.0 - target * target).clamp_min(1e-6))
        with_margin = target * self.cos_m - sine * self.sin_m
        with_margin = torch.where(target > self.threshold, with_margin, target - self.fallback)
        return self.scale * cosine.scatter(1, labels[:, None], with_margin)

    def sample(self, labels: torch.Tensor, generator: torch.Generator | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """The centres one step scores (`(sample_size,)` indices: every label of the batch, then random others) and
        the labels renumbered into them."""
        count = len(self.centers)
        priority = torch.rand(count, device=labels.device, generator=generator)
        priority[labels] = 2.0  # the batch's own centres first, as PartialFC does
        size = max(self.sample_size, int(labels.unique().numel()))
        chosen = priority.topk(min(size, count)).indices
        position = torch.full((count,), -1, dtype=torch.long, device=labels.device)
        position[chosen] = torch.arange(len(chosen), device=labels.device)
        return chosen, position[labels]

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels = labels.long()
        if self.sample_size is None or self.sample_size >= len(self.centers):
            return F.cross_entropy(self.logits(features, labels), labels)
        chosen, labels = self.sample(labels)
        return F.cross_entropy(self.logits(features, labels, self.centers[chosen]), labels)


class InstanceDistillLoss(nn.Module):
    """
    CLIP-CID's instance discrimination: each student embedding must pick out the teacher's embedding of the same
    sample among the (global) batch, across modalities: student image vs teacher text and student text vs teacher
    image (`cross_modal=True`), or each modality against its own (`cross_modal=False`). InfoNCE scaled by the
    student's `logit_scale`; the teacher's features are gathered without gradients and each process scores its own
    student rows against the global batch.
    """

    def __init__(self, cross_modal: bool = True):
        super().__init__()
        self.cross_modal = cross_modal

    def forward(self, student_image: torch.Tensor, student_text: torch.Tensor, teacher_image: torch.Tensor,
                teacher_text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        rank, _ = _world()
        scale = logit_scale.exp() if logit_scale.dim() == 0 or logit_scale.numel() == 1 else logit_scale
        teacher_image = gather_features(teacher_image.detach().to(student_image.dtype), gather_with_grad=False)
        teacher_text = gather_features(teacher_text.detach().to(student_text.dtype), gather_with_grad=False)
        image_targets, text_targets = ((teacher_text, teacher_image) if self.cross_modal
                                       else (teacher_image, teacher_text))
        labels = torch.arange(student_image.shape[0], device=student_image.device) + rank * student_image.shape[0]
        return (F.cross_entropy(scale * student_image @ image_targets.t(), labels)
                + F.cross_entropy(scale * student_text @ text_targets.t(), labels)) / 2


class AffinityDistillLoss(nn.Module):
    """
    TinyCLIP's affinity mimicking: the student's in-batch image->text and text->image distributions are pulled
    towards the teacher's, `KL(teacher || student)` per row, averaged over rows and the two directions. Unlike the
    cosine and instance terms it compares *relations* inside each model, so the two may have different widths and
    the student is read in its own space.

    Both models' similarities are scaled by the student's temperature (`logit_scale.exp()`), unless `teacher_scale`
    fixes the teacher's. Each process scores its own rows against the global batch; no gradient reaches the teacher.
    """

    def __init__(self, teacher_scale: float | None = None):
        super().__init__()
        self.teacher_scale = teacher_scale

    def forward(self, student_image: torch.Tensor, student_text: torch.Tensor, teacher_image: torch.Tensor,
                teacher_text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        scale = logit_scale.exp() if logit_scale.dim() == 0 or logit_scale.numel() == 1 else logit_scale
        teacher_scale = scale.detach() if self.teacher_scale is None else self.teacher_scale
        teacher_image = teacher_image.detach().to(student_image.dtype)
        teacher_text = teacher_text.detach().to(student_text.dtype)
        all_student_images, all_student_texts = gather_features(student_image), gather_features(student_text)
        all_teacher_images = gather_features(teacher_image, gather_with_grad=False)
        all_teacher_texts = gather_features(teacher_text, gather_with_grad=False)
        directions = ((student_image @ all_student_texts.t(), teacher_image @ all_teacher_texts.t()),
                      (student_text @ all_student_images.t(), teacher_text @ all_teacher_images.t()))
        return sum(F.kl_div(F.log_softmax(scale * student, dim=-1), F.log_softmax(teacher_scale * teacher, dim=-1),
                            reduction="batchmean", log_target=True)
                   for student, teacher in directions) / 2
