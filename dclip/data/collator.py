"""Batches of rows (`image`, `caption`, optional teacher targets, boxes, spans) for `DCLIPTrainer`."""

from __future__ import annotations

import numpy as np
import torch

from ..columns import (
    BOXES,
    CAPTION,
    CLUSTER_LABELS,
    IMAGE,
    NEGATIVE_FEATURE_COLUMNS,
    NEGATIVE_FEATURE_MASKS,
    ROW_COLUMNS,
    SPANS,
    TEACHER_FEATURE_COLUMNS,
    TEACHER_FEATURE_MASKS,
    TEACHER_INPUTS,
    TEACHER_TARGETS,
)


def teacher_inputs(processor, batch: dict, use_given_boxes: bool = True, use_given_spans: bool = True) -> dict:
    """Processor inputs for the teacher from a batch of rows (`image`, `caption`, optional `boxes`, `spans`): the
    rows' own boxes and spans where given and allowed, else the processor's detector and span extractor."""
    inputs = processor(
        images=batch[IMAGE],
        text=batch[CAPTION],
        return_regions=True,
        return_spans=True,
        region_boxes=batch[BOXES] if use_given_boxes and BOXES in batch else None,
        spans=batch[SPANS] if use_given_spans and SPANS in batch else None,
    )
    inputs.pop("region_source", None)
    return dict(inputs)


class DCLIPCollator:
    """
    Turns a list of rows into student inputs (`input_ids`, `attention_mask`, `pixel_values`) made by the student's
    `processor`, the precomputed teacher targets and `cluster_labels` when the rows carry them, and, with an online
    `teacher` (a `dclip.teachers.Teacher`), the teacher's own inputs under `teacher_inputs`: made by the teacher's
    processor (its image size and tokenizer), with the rows' `boxes` / `spans` when present and `use_given_boxes` /
    `use_given_spans`, else its detector and extractor, as the cached targets are. `with_teacher_inputs` makes the
    main inputs themselves a DCLIP teacher's ([`teacher_inputs`] of `processor`: training the teacher itself).
    """

    def __init__(self, processor, with_teacher_inputs: bool = False, use_given_boxes: bool = True,
                 use_given_spans: bool = True, teacher=None):
        self.processor = processor
        self.with_teacher_inputs = with_teacher_inputs
        self.use_given_boxes = use_given_boxes
        self.use_given_spans = use_given_spans
        self.teacher = teacher

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        columns = {name: [row[name] for row in rows] for name in ROW_COLUMNS if name in rows[0]}
        if self.with_teacher_inputs:
            batch = teacher_inputs(self.processor, columns, self.use_given_boxes, self.use_given_spans)
        else:
            batch = self.processor(images=columns[IMAGE], text=columns[CAPTION])
        batch = dict(batch)
        if self.teacher is not None:
            batch[TEACHER_INPUTS] = self.teacher.inputs(columns, self.use_given_boxes, self.use_given_spans)
        for name in TEACHER_TARGETS:
            if name in rows[0]:
                batch[name] = torch.from_numpy(np.stack([np.asarray(row[name], dtype=np.float32) for row in rows]))
        if CLUSTER_LABELS in rows[0]:
            batch[CLUSTER_LABELS] = torch.tensor([row[CLUSTER_LABELS] for row in rows], dtype=torch.long)
        return batch


class TeacherFeatureCollator:
    """Batches rows carrying the teacher towers' precomputed outputs (`compute_teacher_features`) for the fusion, and
    their captions' own hard negatives where the rows have them (`compute_negative_features`)."""

    def __init__(self, return_loss: bool = True):
        self.return_loss = return_loss

    def __call__(self, rows: list[dict]) -> dict:
        batch = {}
        for name in TEACHER_FEATURE_COLUMNS + tuple(name for name in NEGATIVE_FEATURE_COLUMNS if name in rows[0]):
            array = np.stack([np.asarray(row[name]) for row in rows])
            masks = name in TEACHER_FEATURE_MASKS or name in NEGATIVE_FEATURE_MASKS
            batch[name] = torch.from_numpy(array).bool() if masks else torch.from_numpy(array.astype(np.float32))
        if self.return_loss:
            batch["return_loss"] = True
        return batch
