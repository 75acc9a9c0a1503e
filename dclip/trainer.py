"""`DCLIPTrainer`: a `transformers.Trainer` whose loss is a weighted sum of named terms, each logged on its own."""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn
from transformers import Trainer

from .losses import ClipLoss, CosineDistillLoss


STUDENT_INPUTS = ("input_ids", "attention_mask", "pixel_values")
TEACHER_TARGETS = ("teacher_image_embeds", "teacher_text_embeds")
COSINE_TARGETS = {"cosine_image": "teacher_image_embeds", "cosine_text": "teacher_text_embeds"}


class DCLIPTrainer(Trainer):
    """
    Trains a [`DCLIPModel`] student. `loss_weights` names the terms and their weights:

    - `contrastive`: CLIP's symmetric InfoNCE over the (gathered) batch, with the student's learnable temperature;
    - `cosine_image`, `cosine_text`: `1 - cos(student, teacher)` towards the teacher's enriched embeddings
      (DCLIP's hybrid loss is `contrastive` + `cosine_*`).

    Teacher embeddings come from the batch (`teacher_image_embeds`, `teacher_text_embeds`, precomputed once), or,
    if `teacher` is given and the batch lacks them, from a teacher forward per batch (online mode). Terms with
    weight 0 are not computed. Each term's running mean is logged as `loss_<name>`.
    """

    def __init__(self, *args, loss_weights: dict[str, float] | None = None, teacher: nn.Module | None = None,
                 local_loss: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        weights = loss_weights if loss_weights is not None else {"contrastive": 1.0}
        known = {"contrastive", "cosine_image", "cosine_text"}
        unknown = set(weights) - known
        if unknown:
            raise ValueError(f"unknown loss terms {sorted(unknown)}; known: {sorted(known)}")
        self.loss_weights = {name: float(weight) for name, weight in weights.items() if weight}
        if not self.loss_weights:
            raise ValueError("`loss_weights` gives every term weight 0: nothing to train.")
        self.teacher = teacher.eval().requires_grad_(False) if teacher is not None else None
        self.clip_loss = ClipLoss(local_loss=local_loss)
        self.cosine_loss = CosineDistillLoss()
        self._term_sums: dict[str, float] = defaultdict(float)
        self._term_steps = 0

    def _teacher_targets(self, inputs: dict) -> dict[str, torch.Tensor]:
        targets = {name: inputs.pop(name) for name in TEACHER_TARGETS if name in inputs}
        teacher_inputs = {k: inputs.pop(k) for k in list(inputs) if k.startswith(("region_", "span_"))}
        needed = {target for term, target in COSINE_TARGETS.items() if term in self.loss_weights}
        if needed - set(targets):
            if self.teacher is None:
                raise ValueError(f"the cosine terms need {sorted(needed - set(targets))} in the batch or a "
                                 "`teacher` for online targets.")
            with torch.no_grad():
                out = self.teacher(**{k: inputs[k] for k in STUDENT_INPUTS if k in inputs}, **teacher_inputs)
            targets = {"teacher_image_embeds": out.image_embeds, "teacher_text_embeds": out.text_embeds}
        return targets

    def compute_terms(self, model: nn.Module, inputs: dict) -> tuple[dict[str, torch.Tensor], object]:
        """The unweighted loss terms of a batch, and the student's outputs."""
        targets = self._teacher_targets(inputs)
        outputs = model(**{k: inputs[k] for k in STUDENT_INPUTS if k in inputs})
        terms = {}
        if "contrastive" in self.loss_weights:
            logit_scale = self.accelerator.unwrap_model(model).logit_scale
            terms["contrastive"] = self.clip_loss(outputs.image_embeds, outputs.text_embeds, logit_scale)
        for term, target in COSINE_TARGETS.items():
            if term in self.loss_weights:
                student_embeds = outputs.image_embeds if term == "cosine_image" else outputs.text_embeds
                terms[term] = self.cosine_loss(student_embeds, targets[target])
        return terms, outputs

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        terms, outputs = self.compute_terms(model, dict(inputs))
        loss = sum(self.loss_weights[name] * value for name, value in terms.items())
        if model.training:
            for name, value in terms.items():
                self._term_sums[name] += value.detach().float().item()
            self._term_steps += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self._term_steps and "loss" in logs:
            for name, total in self._term_sums.items():
                logs[f"loss_{name}"] = round(total / self._term_steps, 6)
            self._term_sums.clear()
            self._term_steps = 0
        super().log(logs, *args, **kwargs)
