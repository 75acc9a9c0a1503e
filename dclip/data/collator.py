"""Batches of rows (`image`, `caption`, optional teacher targets, boxes, spans) for `DCLIPTrainer`."""

from __future__ import annotations

import numpy as np
import torch


TEACHER_TARGET_COLUMNS = ("teacher_image_embeds", "teacher_text_embeds")


class DCLIPCollator:
    """
    Turns a list of rows into student inputs (`input_ids`, `attention_mask`, `pixel_values`), the precomputed
    teacher targets and `cluster_labels` when the rows carry them, and, with `with_teacher_inputs` (online teacher), the teacher's region
    and span inputs (from the rows' `boxes` / `spans` when present, else the processor's detector and extractor).
    """

    def __init__(self, processor, with_teacher_inputs: bool = False):
        self.processor = processor
        self.with_teacher_inputs = with_teacher_inputs

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        captions = [row["caption"] for row in rows]
        images = [row["image"] for row in rows]
        if self.with_teacher_inputs:
            batch = self.processor(
                text=captions, images=images, return_regions=True, return_spans=True,
                region_boxes=[row["boxes"] for row in rows] if "boxes" in rows[0] else None,
                spans=[row["spans"] for row in rows] if "spans" in rows[0] else None,
            )
            batch.pop("region_source", None)
        else:
            batch = self.processor(text=captions, images=images)
        batch = dict(batch)
        for name in TEACHER_TARGET_COLUMNS:
            if name in rows[0]:
                batch[name] = torch.from_numpy(np.stack([np.asarray(row[name], dtype=np.float32) for row in rows]))
        if "cluster_labels" in rows[0]:
            batch["cluster_labels"] = torch.tensor([row["cluster_labels"] for row in rows], dtype=torch.long)
        return batch


class TeacherFeatureCollator:
    """Batches rows carrying the teacher towers' precomputed outputs (`compute_teacher_features`) for the fusion."""

    def __init__(self, return_loss: bool = True):
        self.return_loss = return_loss

    def __call__(self, rows: list[dict]) -> dict:
        from ..targets import TEACHER_FEATURE_COLUMNS

        batch = {}
        for name in TEACHER_FEATURE_COLUMNS:
            array = np.stack([np.asarray(row[name]) for row in rows])
            batch[name] = torch.from_numpy(array if name.endswith("_mask") else array.astype(np.float32))
        batch["region_mask"], batch["span_mask"] = batch["region_mask"].bool(), batch["span_mask"].bool()
        if self.return_loss:
            batch["return_loss"] = True
        return batch
