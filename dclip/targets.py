"""Teacher targets computed once: a `datasets.map` pass stores the teacher's enriched embeddings as columns.

The pass is cached by fingerprint (data set + teacher weights + processor settings), so student training never runs
the teacher, and a second run with the same teacher reads the Arrow cache instead of recomputing.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch
from datasets import Dataset


def model_fingerprint(model: torch.nn.Module) -> str:
    """A hash of a model's config and weights (changes whenever either does)."""
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        digest.update(config.to_json_string(use_diff=False).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def teacher_inputs(processor, batch: dict, use_given_boxes: bool = True, use_given_spans: bool = True) -> dict:
    """Processor inputs for the teacher from a batch of rows (`image`, `caption`, optional `boxes`, `spans`)."""
    inputs = processor(
        text=batch["caption"],
        images=batch["image"],
        return_regions=True,
        return_spans=True,
        region_boxes=batch["boxes"] if use_given_boxes and "boxes" in batch else None,
        spans=batch["spans"] if use_given_spans and "spans" in batch else None,
    )
    inputs.pop("region_source", None)
    return dict(inputs)


def compute_teacher_targets(
    dataset: Dataset,
    teacher: torch.nn.Module,
    processor,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    use_given_boxes: bool = True,
    use_given_spans: bool = True,
    desc: str = "teacher targets",
) -> Dataset:
    """
    `dataset` plus float32 columns `teacher_image_embeds` and `teacher_text_embeds` (`embed_dim` each).

    Boxes and spans come from the data when it has them (`use_given_*`), else from the processor's detector and span
    extractor. The result is cached by a fingerprint of the data, the teacher's weights and these settings.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    teacher = teacher.to(device).eval()
    settings = {
        "teacher": model_fingerprint(teacher),
        "processor": processor.to_json_string() if hasattr(processor, "to_json_string") else repr(processor),
        "boxes": use_given_boxes,
        "spans": use_given_spans,
        "data": dataset._fingerprint,
    }
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]

    def embed(batch: dict) -> dict:
        inputs = teacher_inputs(processor, batch, use_given_boxes, use_given_spans)
        with torch.no_grad():
            out = teacher(**{k: v.to(device) for k, v in inputs.items()})
        return {
            "teacher_image_embeds": out.image_embeds.float().cpu().numpy().astype(np.float32),
            "teacher_text_embeds": out.text_embeds.float().cpu().numpy().astype(np.float32),
        }

    return dataset.map(embed, batched=True, batch_size=batch_size, new_fingerprint=fingerprint, desc=desc)
