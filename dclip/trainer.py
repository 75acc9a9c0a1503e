"""`DCLIPTrainer`: a `transformers.Trainer` whose loss is a weighted sum of named terms, each logged on its own."""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn
from transformers import Trainer

from .columns import (
    CLUSTER_LABELS,
    STUDENT_INPUTS,
    TEACHER_IMAGE_EMBEDS,
    TEACHER_INPUTS,
    TEACHER_TARGETS,
    TEACHER_TEXT_EMBEDS,
)
from .losses import AffinityDistillLoss, ClipLoss, ClusterMarginLoss, CosineDistillLoss, InstanceDistillLoss


COSINE_TARGETS = {"cosine_image": TEACHER_IMAGE_EMBEDS, "cosine_text": TEACHER_TEXT_EMBEDS}
CLUSTER_TERMS = ("cluster_image", "cluster_text")
TEACHER_PAIR_TERMS = ("instance", "affinity")  # terms that read both of the teacher's embeddings
LOSS_TERMS = ("contrastive", *COSINE_TARGETS, *CLUSTER_TERMS, *TEACHER_PAIR_TERMS)
METHOD_LOSS_WEIGHTS = {  # each method's terms at weight 1
    "dclip": ("contrastive", "cosine_image", "cosine_text"),
    "clip_cid": ("cluster_image", "cluster_text", "instance"),
    "dclip+clip_cid": ("contrastive", "cosine_image", "cosine_text", "cluster_image", "cluster_text", "instance"),
    "dclip+instance": ("contrastive", "cosine_image", "cosine_text", "instance"),  # + CLIP-CID's instance term
    "instance": ("instance",),  # CLIP-CID without its cluster term
    "none": ("contrastive",),  # no teacher: the same student trained as a plain CLIP
}


class DCLIPTrainer(Trainer):
    """
    Trains a [`DCLIPModel`] student. `loss_weights` names the terms and their weights:

    - `contrastive`: CLIP's symmetric InfoNCE over the (gathered) batch, with the student's learnable temperature;
    - `cosine_image`, `cosine_text`: `1 - cos(student, teacher)` towards the teacher's enriched embeddings
      (DCLIP's hybrid loss is `contrastive` + `cosine_*`);
    - `cluster_image`, `cluster_text`: CLIP-CID's cluster discrimination, the student's image / text embedding
      classified among `cluster_centers` (k-means of the teacher's embeddings) with an additive angular margin
      softmax towards the sample's `cluster_labels` (from the batch, else the teacher image embedding's nearest
      centre);
    - `instance`: CLIP-CID's instance discrimination, student embeddings against the teacher's of the global batch,
      across modalities, at the student's temperature;
    - `affinity`: TinyCLIP's affinity mimicking, the student's in-batch image->text and text->image distributions
      towards the teacher's (KL), both at the student's temperature.

    Teacher embeddings come from the batch (`teacher_image_embeds`, `teacher_text_embeds`, precomputed once), or,
    if `teacher` is given and the batch lacks them, from a teacher forward per batch (online mode). Terms with
    weight 0 are not computed. Each term's running mean is logged as `loss_<name>`.
    """

    def __init__(self, *args, loss_weights: dict[str, float] | None = None, teacher: nn.Module | None = None,
                 local_loss: bool = False, cluster_centers: torch.Tensor | None = None, cluster_scale: float = 16.0,
                 cluster_margin: float = 0.2, cluster_sample_size: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        weights = loss_weights if loss_weights is not None else {"contrastive": 1.0}
        unknown = set(weights) - set(LOSS_TERMS)
        if unknown:
            raise ValueError(f"unknown loss terms {sorted(unknown)}; known: {list(LOSS_TERMS)}")
        self.loss_weights = {name: float(weight) for name, weight in weights.items() if weight}
        if not self.loss_weights:
            raise ValueError("`loss_weights` gives every term weight 0: nothing to train.")
        if teacher is not None and not hasattr(teacher, "embed"):
            raise TypeError(f"`teacher` must be a `dclip.teachers.Teacher` (a model with its own processor: "
                            f"`load_teacher` or `as_teacher(model, processor)`), got {type(teacher).__name__}")
        self.teacher = teacher.to(self.args.device) if teacher is not None else None
        self.clip_loss = ClipLoss(local_loss=local_loss)
        self.cosine_loss = CosineDistillLoss()
        self.instance_loss = InstanceDistillLoss()
        self.affinity_loss = AffinityDistillLoss()
        self.cluster_loss = None
        if any(term in self.loss_weights for term in CLUSTER_TERMS):
            if cluster_centers is None:
                raise ValueError("the cluster terms need `cluster_centers` (k-means of the teacher's embeddings).")
            self.cluster_loss = ClusterMarginLoss(torch.as_tensor(cluster_centers), cluster_scale, cluster_margin,
                                                  cluster_sample_size)
        self._term_sums: dict[str, torch.Tensor | float] = defaultdict(float)
        self._term_steps = 0

    def _teacher_targets(self, inputs: dict) -> dict[str, torch.Tensor]:
        targets = {name: inputs.pop(name) for name in TEACHER_TARGETS if name in inputs}
        teacher_inputs = inputs.pop(TEACHER_INPUTS, None)
        needed = {target for term, target in COSINE_TARGETS.items() if term in self.loss_weights}
        if any(term in self.loss_weights for term in TEACHER_PAIR_TERMS):
            needed |= set(TEACHER_TARGETS)
        if CLUSTER_LABELS in inputs:
            targets[CLUSTER_LABELS] = inputs.pop(CLUSTER_LABELS)
        elif self.cluster_loss is not None:
            needed.add(TEACHER_IMAGE_EMBEDS)
        if needed - set(targets):
            if self.teacher is None or teacher_inputs is None:
                raise ValueError(f"the teacher's terms need {sorted(needed - set(targets))} in the batch, or a "
                                 "`teacher` and its own inputs under `teacher_inputs` (`DCLIPCollator(teacher=...)`) "
                                 "for online targets.")
            image, text = self.teacher.embed(teacher_inputs)
            targets.update({TEACHER_IMAGE_EMBEDS: image, TEACHER_TEXT_EMBEDS: text})
        if self.cluster_loss is not None and CLUSTER_LABELS not in targets:
            centers = self.cluster_loss.centers
            targets[CLUSTER_LABELS] = (targets[TEACHER_IMAGE_EMBEDS].to(centers) @ centers.t()).argmax(-1)
        return targets

    def compute_terms(self, model: nn.Module, inputs: dict) -> tuple[dict[str, torch.Tensor], object]:
        """The unweighted loss terms of a batch, and the student's outputs. The terms against the teacher read the
        student's embeddings in the teacher's space: through its distillation head when the widths differ
        (`distill_*_embeds`), else as they are."""
        targets = self._teacher_targets(inputs)
        outputs = model(**{k: inputs[k] for k in STUDENT_INPUTS if k in inputs})
        in_teacher_space = {
            "image": _first_present(outputs, "distill_image_embeds", "image_embeds"),
            "text": _first_present(outputs, "distill_text_embeds", "text_embeds"),
        }
        terms = {}
        if "contrastive" in self.loss_weights:
            logit_scale = self.accelerator.unwrap_model(model).logit_scale
            terms["contrastive"] = self.clip_loss(outputs.image_embeds, outputs.text_embeds, logit_scale)
        for term, target in COSINE_TARGETS.items():
            if term in self.loss_weights:
                student_embeds = in_teacher_space["image" if term == "cosine_image" else "text"]
                terms[term] = self.cosine_loss(student_embeds, targets[target])
        if self.cluster_loss is not None and self.cluster_loss.centers.device != outputs.image_embeds.device:
            self.cluster_loss.to(outputs.image_embeds.device)
        for term in CLUSTER_TERMS:
            if term in self.loss_weights:
                student_embeds = in_teacher_space["image" if term == "cluster_image" else "text"]
                terms[term] = self.cluster_loss(student_embeds, targets[CLUSTER_LABELS].to(student_embeds.device))
        if "instance" in self.loss_weights:
            terms["instance"] = self.instance_loss(
                in_teacher_space["image"], in_teacher_space["text"], targets[TEACHER_IMAGE_EMBEDS],
                targets[TEACHER_TEXT_EMBEDS], self.accelerator.unwrap_model(model).logit_scale)
        if "affinity" in self.loss_weights:  # relations inside each model: the student in its own space
            terms["affinity"] = self.affinity_loss(
                outputs.image_embeds, outputs.text_embeds, targets[TEACHER_IMAGE_EMBEDS], targets[TEACHER_TEXT_EMBEDS],
                self.accelerator.unwrap_model(model).logit_scale)
        return terms, outputs

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        terms, outputs = self.compute_terms(model, dict(inputs))
        self.last_terms = terms  # for `dclip.training.guard_finite_loss`'s message
        loss = sum(self.loss_weights[name] * value for name, value in terms.items())
        if model.training:  # summed on the device: one host sync per logging step, not one per term per step
            for name, value in terms.items():
                self._term_sums[name] = self._term_sums[name] + value.detach().float()
            self._term_steps += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self._term_steps and "loss" in logs:
            for name, total in self._term_sums.items():
                logs[f"loss_{name}"] = round(float(total) / self._term_steps, 6)
            self._term_sums.clear()
            self._term_steps = 0
        super().log(logs, *args, **kwargs)


def _first_present(outputs, *names: str) -> torch.Tensor:
    """The first of `outputs`' fields `names` that is set (a student without a distillation head has no
    `distill_*_embeds`)."""
    return next(value for value in (getattr(outputs, name, None) for name in names) if value is not None)
