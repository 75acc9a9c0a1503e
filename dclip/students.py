"""Students smaller than their teacher: a `SMALL_CLIP_PRESETS` size trained from scratch, a smaller CLIP checkpoint,
or the base CLIP cut to a subset of its layers (weight inheritance, as TinyCLIP's manual inheritance does); and the
existing mode, a student initialised from the base CLIP and fine-tuned. Where the teacher's embedding width differs
from the student's, the student gets a distillation head (`DCLIPConfig.teacher_embed_dim`), dropped when it is saved.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def inherit_layers(model, num_layers: int):
    """Keep `num_layers` evenly spaced transformer layers of each tower of a CLIP-style `model` (the first and the
    last among them), with their weights: the embeddings, final norms and projections are kept whole. In place;
    returns `model`."""
    for tower, config in ((model.vision_model, model.config.vision_config),
                          (model.text_model, model.config.text_config)):
        layers = tower.encoder.layers
        if not 1 <= num_layers <= len(layers):
            raise ValueError(f"--student_inherit_layers must be between 1 and the {len(layers)} layers of the "
                             f"checkpoint's towers, got {num_layers}")
        keep = np.unique(np.round(np.linspace(0, len(layers) - 1, num_layers)).astype(int))
        tower.encoder.layers = nn.ModuleList(layers[int(index)] for index in keep)
        config.num_hidden_layers = len(keep)
    return model


def build_student(student_model: str | None, base_clip: str, processor, image_size: int, preset: str | None = None,
                  inherit: int | None = None, teacher_embed_dim: int | None = None, seed: int = 0,
                  **config_kwargs):
    """
    The student: `preset` trained from scratch (vocabulary and image size from `processor` / `image_size`), else the
    CLIP checkpoint `student_model` (default `base_clip`), cut to `inherit` layers per tower if given. With a
    `teacher_embed_dim` other than its own width, it carries a distillation head into the teacher's space.
    `config_kwargs` are `DCLIPConfig` fields (`distillation_method`, `teacher_name_or_path`). The towers' initial
    weights depend only on `seed`, not on whether the student has a head.
    """
    from configuration_dclip import DCLIPConfig
    from modeling_dclip import DCLIPModel, _clip_architecture_kwargs

    from .presets import small_clip_config

    if preset is not None and (student_model is not None or inherit):
        raise ValueError("--student_preset trains a student from scratch: it cannot be combined with "
                         "--student_model or --student_inherit_layers")
    torch.manual_seed(seed)
    if preset is not None:
        architecture = _clip_architecture_kwargs(small_clip_config(processor.tokenizer, image_size, preset))
        width = architecture["projection_dim"]
        head = teacher_embed_dim if teacher_embed_dim not in (None, width) else None
        return DCLIPModel(DCLIPConfig(**architecture, teacher_embed_dim=head, **config_kwargs))
    from transformers import PretrainedConfig

    width = PretrainedConfig.get_config_dict(student_model or base_clip)[0]["projection_dim"]
    head = teacher_embed_dim if teacher_embed_dim not in (None, width) else None
    student = DCLIPModel.from_clip(student_model or base_clip, teacher_embed_dim=head, **config_kwargs)
    return inherit_layers(student, inherit) if inherit else student
