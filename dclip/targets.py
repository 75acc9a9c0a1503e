"""Teacher targets computed once: a `datasets.map` pass stores the teacher's enriched embeddings as columns.

The pass is cached by fingerprint (data set + teacher weights + processor settings), so student training never runs
the teacher, and a second run with the same teacher reads the Arrow cache instead of recomputing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

import numpy as np
import pyarrow as pa
import torch
from datasets import Dataset

from .columns import (
    CAPTION,
    HARD_NEGATIVES,
    REGION_FEATURE_COLUMNS,
    TEACHER_FEATURE_COLUMNS,
    TEACHER_FEATURE_MASKS,
    TEACHER_IMAGE_EMBEDS,
    TEACHER_TEXT_EMBEDS,
    TEACHER_TEXT_SIDE_INPUTS,
)
from .data.collator import teacher_inputs
from .folders import file_hash


logger = logging.getLogger(__name__)


TOWER_PREFIXES = ("text_model.", "vision_model.", "text_projection.", "visual_projection.")


def model_fingerprint(model: torch.nn.Module, prefixes: tuple[str, ...] | None = None) -> str:
    """A hash of a model's config and weights (only the weights under `prefixes`, if given, and then no config); not
    of where it was loaded from (the config's `_name_or_path`), so a copied folder keeps its fingerprint."""
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None and prefixes is None:
        settings = json.loads(config.to_json_string(use_diff=False))
        settings.pop("_name_or_path", None)
        digest.update(json.dumps(settings, sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        if prefixes is not None and not name.startswith(prefixes):
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _place_teacher(teacher: torch.nn.Module, device) -> tuple[torch.nn.Module, torch.device]:
    """The teacher in eval mode on `device` (default: CUDA when there is one)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return teacher.to(device).eval(), device


def _file_digest(path: str | None) -> str | None:
    if path is None or not os.path.isfile(path):
        return path
    return file_hash(path).hexdigest()[:16]


def _processor_key(processor) -> str:
    """The processor's settings, with its detector named by the weights' content rather than their path (the same
    detector copied elsewhere keeps the cache; other weights at the same path do not)."""
    if not hasattr(processor, "to_dict"):
        return repr(processor)
    settings = processor.to_dict()
    for part in (settings, settings.get("image_processor") or {}):  # written by save_pretrained, not a setting
        part.pop("auto_map", None)
    settings["detector_path"] = _file_digest(getattr(processor, "detector_path", None))
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is not None:  # to_dict leaves the tokenizer out
        backend = getattr(tokenizer, "backend_tokenizer", None)
        # the model part only (vocabulary and merges): padding / truncation state changes as the tokenizer is used
        model = json.loads(backend.to_str())["model"] if backend is not None else sorted(tokenizer.get_vocab().items())
        vocabulary = json.dumps(model, sort_keys=True) + str(tokenizer.model_max_length)
        settings["tokenizer"] = hashlib.sha256(vocabulary.encode()).hexdigest()[:16]
    return json.dumps(settings, sort_keys=True, default=str)


def _map_fingerprint(dataset: Dataset, processor, weights: str, use_given_boxes: bool, use_given_spans: bool) -> str:
    """Cache key of a teacher `datasets.map` pass: the data, the weights' hash and the processing settings."""
    settings = {
        "weights": weights,
        "processor": _processor_key(processor),
        "boxes": use_given_boxes,
        "spans": use_given_spans,
        "data": dataset._fingerprint,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def compute_teacher_targets(
    dataset: Dataset,
    teacher,
    processor=None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    use_given_boxes: bool = True,
    use_given_spans: bool = True,
    desc: str = "teacher targets",
) -> Dataset:
    """
    `dataset` plus float32 columns `teacher_image_embeds` and `teacher_text_embeds` (the teacher's width each).

    `teacher`: a `dclip.teachers.Teacher` (any CLIP-family dual encoder or DCLIP teacher, with its own processor), or
    a model with the `processor` it reads. The teacher runs on its own processor's pixels and token ids. For a DCLIP
    teacher, boxes and spans come from the data when it has them (`use_given_*`), else from the processor's detector
    and span extractor. The result is cached by a fingerprint of the data, the teacher's weights and these settings.
    """
    from .teachers import as_teacher

    teacher = as_teacher(teacher, processor)
    model, device = _place_teacher(teacher.model, device)
    settings = (use_given_boxes, use_given_spans) if teacher.kind == "dclip" else (False, False)
    fingerprint = _map_fingerprint(dataset, teacher.processor, f"{teacher.kind}:{model_fingerprint(model)}", *settings)

    def embed(batch: dict) -> dict:
        image, text = teacher.embed(teacher.inputs(batch, use_given_boxes, use_given_spans))
        return {TEACHER_IMAGE_EMBEDS: image.float().cpu().numpy(), TEACHER_TEXT_EMBEDS: text.float().cpu().numpy()}

    return cached_map(dataset, embed, fingerprint, batched=True, batch_size=batch_size, desc=desc)


def _pad(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """Pad or cut dimension 1 of `(batch, items, ...)` to `length`."""
    tensor = tensor[:, :length]
    if tensor.shape[1] < length:
        padding = tensor.new_zeros(tensor.shape[0], length - tensor.shape[1], *tensor.shape[2:])
        tensor = torch.cat([tensor, padding], dim=1)
    return tensor


def compute_teacher_features(
    dataset: Dataset,
    teacher: torch.nn.Module,
    processor,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    use_given_boxes: bool = True,
    use_given_spans: bool = True,
) -> Dataset:
    """
    `dataset` plus the teacher towers' outputs as columns (`TEACHER_FEATURE_COLUMNS`, regions and spans padded to
    the processor's `max_regions` / `max_spans`), so that the fusion block can be trained and run without the
    towers. Valid while the towers are frozen; cached by a fingerprint of the data and the towers' weights only.
    """
    teacher, device = _place_teacher(teacher, device)
    towers = model_fingerprint(teacher, TOWER_PREFIXES)
    fingerprint = _map_fingerprint(dataset, processor, "towers:" + towers, use_given_boxes, use_given_spans)

    def encode(batch: dict) -> dict:
        inputs = {k: v.to(device)
                  for k, v in teacher_inputs(processor, batch, use_given_boxes, use_given_spans).items()}
        with torch.no_grad():
            image = teacher.encode_image_side(
                inputs["pixel_values"], inputs["region_pixel_values"], inputs["region_boxes"], inputs["region_mask"]
            )
            text = teacher.encode_text_side(
                inputs["input_ids"], inputs["attention_mask"], inputs["span_input_ids"],
                inputs["span_attention_mask"], inputs["span_mask"],
            )
        regions, spans = processor.max_regions, processor.max_spans
        columns = {
            "image_global_features": image.global_embeds,
            "region_features": _pad(image.region_embeds, regions),
            "region_boxes": _pad(image.region_boxes, regions),
            "region_mask": _pad(image.region_mask, regions),
            "text_global_features": text.global_embeds,
            "span_features": _pad(text.span_embeds, spans),
            "span_mask": _pad(text.span_mask, spans),
        }
        return {k: v.cpu().numpy() if v.dtype == torch.bool else v.float().cpu().numpy() for k, v in columns.items()}

    return cached_map(dataset, encode, fingerprint, batched=True, batch_size=batch_size, desc="teacher tower features")


def largest_region_features(dataset: Dataset, batch_size: int = 4096) -> np.ndarray:
    """`(rows, dim)` float32: each row's teacher region embedding (`region_features`, from `compute_teacher_features`)
    of its largest region box, the most prominent detected object. Read in batches, so only one region per row is
    held; a row without any region is an error naming it."""
    missing = [c for c in REGION_FEATURE_COLUMNS if c not in dataset.column_names]
    if missing:
        raise ValueError(f"the teacher's region embeddings are not in the data (missing {missing}): they come from "
                         "a DCLIP teacher with frozen towers and cached targets")
    rows, start = [], 0
    columns = dataset.select_columns(list(REGION_FEATURE_COLUMNS)).with_format("numpy")
    for batch in columns.iter(batch_size=batch_size):
        boxes, mask = np.asarray(batch["region_boxes"], np.float32), np.asarray(batch["region_mask"], bool)
        if not mask.any(1).all():
            raise ValueError(f"row {start + int(np.flatnonzero(~mask.any(1))[0])} has no region to cluster on")
        area = np.where(mask, (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1]), -np.inf)
        features = np.asarray(batch["region_features"], np.float32)
        rows.append(features[np.arange(len(features)), area.argmax(1)])
        start += len(features)
    return np.concatenate(rows)


def encode_teacher_texts(teacher: torch.nn.Module, processor, texts: list[str], device) -> object:
    """A DCLIP teacher's text side (`DCLIPTeacherTextFeatures`: global and span embeddings) of `texts`, spans from
    the processor's extractor."""
    inputs = processor(text=texts, return_spans=True)
    return teacher.encode_text_side(**{name: inputs[name].to(device) for name in TEACHER_TEXT_SIDE_INPUTS})


def compute_negative_features(dataset: Dataset, teacher: torch.nn.Module, processor, count: int,
                              batch_size: int = 256, device: str | torch.device | None = None) -> Dataset:
    """
    `dataset` plus the teacher text tower's outputs for each row's first `count` own hard negatives (its
    `hard_negatives` column; spans from the processor's extractor) as `NEGATIVE_FEATURE_COLUMNS`: `(count, ...)` per
    row, padded with `negative_mask` false where a row has fewer. Cached by the data, the towers and `count`.
    """
    if HARD_NEGATIVES not in dataset.column_names:
        raise ValueError("--teacher_caption_negatives needs a `hard_negatives` column (a list of captions per row) "
                         f"in the training data; it has {dataset.column_names}")
    teacher, device = _place_teacher(teacher, device)
    towers = model_fingerprint(teacher, TOWER_PREFIXES)
    fingerprint = _map_fingerprint(dataset, processor, f"negatives-{count}:{towers}", False, False)

    def encode(batch: dict) -> dict:
        texts, mask = [], []
        for caption, negatives in zip(batch[CAPTION], batch[HARD_NEGATIVES]):
            own = list(negatives or [])[:count]
            texts += own + [caption] * (count - len(own))  # padding, masked out
            mask.append([True] * len(own) + [False] * (count - len(own)))
        with torch.no_grad():
            text = encode_teacher_texts(teacher, processor, texts, device)
        rows, spans = len(mask), processor.max_spans
        columns = {"negative_text_global_features": text.global_embeds.reshape(rows, count, -1),
                   "negative_span_features": _pad(text.span_embeds, spans).reshape(rows, count, spans, -1),
                   "negative_span_mask": _pad(text.span_mask, spans).reshape(rows, count, spans)}
        arrays = {k: v.cpu().numpy() if v.dtype == torch.bool else v.float().cpu().numpy() for k, v in columns.items()}
        return {**arrays, "negative_mask": np.array(mask, dtype=bool)}

    return cached_map(dataset, encode, fingerprint, batched=True, batch_size=batch_size,
                      desc="teacher caption negatives")


def fuse_teacher_targets(features: Dataset, teacher: torch.nn.Module, batch_size: int = 256,
                         device: str | torch.device | None = None) -> Dataset:
    """Teacher targets (`teacher_image_embeds`, `teacher_text_embeds`) from `compute_teacher_features` columns:
    the fusion block only, no tower. Cached by a fingerprint of the data and the whole teacher."""
    teacher, device = _place_teacher(teacher, device)
    fingerprint = hashlib.sha256(f"{features._fingerprint}-{model_fingerprint(teacher)}".encode()).hexdigest()[:16]

    def fuse(batch: dict) -> dict:  # numpy columns (the format below): no per-row Python objects
        inputs = {name: torch.from_numpy(np.asarray(batch[name])) for name in TEACHER_FEATURE_COLUMNS}
        inputs = {name: value.bool() if name in TEACHER_FEATURE_MASKS else value.float()
                  for name, value in inputs.items()}
        with torch.no_grad():
            out = teacher(**{k: v.to(device) for k, v in inputs.items()})
        return {
            TEACHER_IMAGE_EMBEDS: out.image_embeds.float().cpu().numpy(),
            TEACHER_TEXT_EMBEDS: out.text_embeds.float().cpu().numpy(),
        }

    numeric = features.with_format("numpy", columns=list(TEACHER_FEATURE_COLUMNS), output_all_columns=True)
    fused = cached_map(numeric, fuse, fingerprint, batched=True, batch_size=batch_size, desc="teacher targets")
    return fused.with_format(None)


def cached_map(dataset: Dataset, function, fingerprint: str, **kwargs) -> Dataset:
    """`dataset.map(function, new_fingerprint=fingerprint, **kwargs)`, cached by `datasets` under that fingerprint.
    `datasets` writes a cache file aside and renames it when complete, so a pass killed mid-way leaves no cache to
    read, and a rerun computes it again. A cache file that no longer reads whole (truncated or corrupt: it fails to
    load, or has fewer rows than the data) is named in a warning, removed and computed again."""
    path = dataset._get_cache_file_path(fingerprint) if dataset.cache_files else None
    try:
        mapped = dataset.map(function, new_fingerprint=fingerprint, **kwargs)
        if len(mapped) == len(dataset) or not (path and os.path.isfile(path)):
            return mapped
        problem = f"{len(mapped)} rows instead of {len(dataset)}"
    except (OSError, pa.ArrowException) as error:
        if not (path and os.path.isfile(path)):
            raise  # not the cache: the computation's own error
        problem = f"{type(error).__name__}: {error}"
    logger.warning("%s: a truncated or corrupt cache (%s): removed and computed again", path, problem)
    os.remove(path)
    return dataset.map(function, new_fingerprint=fingerprint, **kwargs)
