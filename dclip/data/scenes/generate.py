"""Generating and loading the data set: each sample drawn from its own `(seed, split, index)` random stream (with
exact duplicates, near duplicates and concept repeats for the redundancy knob), the `datasets` features, the
train / validation / test `DatasetDict` (`generate_scenes`, in parallel chunks), its cache on disk (`load_scenes`) and
the zero-shot tasks of its label columns."""

from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict

import numpy as np
from tqdm.auto import tqdm

from ...columns import HARD_NEGATIVE_TYPES, HARD_NEGATIVES
from .compose import Caption, SceneObject, _compose_caption, _hard_negatives, _place_objects, _relation, _sample_specs
from .config import BACKGROUNDS, COLORS, POPULAR_CONCEPTS, SHAPES, SIZES, SPLITS, SceneConfig
from .render import render_scene


def _shift(box, delta):
    dx = float(np.clip(delta[0], -box[0], 1 - box[2]))
    dy = float(np.clip(delta[1], -box[1], 1 - box[3]))
    return (box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy)


def _record(rng, config: SceneConfig, objects: list[SceneObject], background: str, redundancy: str, source: int,
            caption: Caption | None = None) -> dict:
    caption = caption or _compose_caption(rng, objects, background)
    text, spans = caption.render()
    span_objects = [m.objects for m in caption.mentions] + ([[]] if caption.background else [])
    negatives = _hard_negatives(rng, caption)
    primary = max(range(len(objects)), key=lambda i: (list(SIZES).index(objects[i].size), -i))
    image = render_scene(objects, background, config.image_size, config.noise_std, rng, config.supersample)
    return {
        "image": {"bytes": image, "path": None},
        "caption": text,
        "spans": spans,
        "span_objects": span_objects,
        "boxes": [[float(v) for v in o.tight_box] for o in objects],
        "object_shapes": [SHAPES.index(o.shape) for o in objects],
        "object_colors": [list(COLORS).index(o.color) for o in objects],
        "object_sizes": [list(SIZES).index(o.size) for o in objects],
        "num_objects": len(objects),
        "background": background,
        "template": caption.template,
        HARD_NEGATIVES: [negative for _, negative in negatives],
        HARD_NEGATIVE_TYPES: [kind for kind, _ in negatives],
        "label_shape": SHAPES.index(objects[primary].shape),
        "label_color": list(COLORS).index(objects[primary].color),
        "label_color_shape": (list(COLORS).index(objects[primary].color) * len(SHAPES)
                              + SHAPES.index(objects[primary].shape)),
        "redundancy": redundancy,
        "source_index": source,
        "_caption": caption,
        "_objects": objects,
    }


def _generate_split(config: SceneConfig, split: str, start: int, stop: int) -> list[dict]:
    """Samples `start..stop` of `split`. Each draws from its own `(seed, split, index)` stream: order-independent."""
    split_id = SPLITS.index(split)
    records: list[dict] = []
    cache: dict[int, dict] = {}
    for index in range(start, stop):
        rng = np.random.default_rng([config.seed, split_id, index])
        kind = _redundancy_kind(config, split, index, rng)
        background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
        if kind in ("exact", "near"):
            source = int(rng.integers(index))
            while _redundancy_kind(config, split, source) != "none":  # copy an original, not a copy
                source -= 1
            original = cache.get(source) or _base_sample(config, split, source)
            if kind == "exact":
                record = {**original, "redundancy": "exact", "source_index": source}
            else:
                jitter = 0.02
                objects = [
                    SceneObject(o.shape, o.color, o.size, _shift(o.box, rng.uniform(-jitter, jitter, size=2)))
                    for o in original["_objects"]
                ]
                caption = original["_caption"]
                if caption.template == "relation":  # the jitter may move one object past the other
                    first, second = (m.objects[0] for m in caption.mentions[:2])
                    caption = Caption(caption.template, caption.mentions, _relation(objects[first], objects[second]),
                                      caption.background)
                record = _record(rng, config, objects, original["background"], "near", source, caption)
        elif kind == "concept":
            concept = POPULAR_CONCEPTS[int(rng.integers(len(POPULAR_CONCEPTS)))]
            record = _record(rng, config, _place_objects(rng, list(concept)), background, "concept", index)
        else:
            record = _record(rng, config, _place_objects(rng, _sample_specs(rng, config)), background, "none", index)
        if kind == "none":
            cache[index] = record
        records.append(record)
    return records


def _redundancy_kind(config: SceneConfig, split: str, index: int, rng: np.random.Generator | None = None) -> str:
    """Whether sample `index` is an original ("none") or an "exact" / "near" duplicate or a "concept" repeat."""
    if split != "train" or index == 0:
        return "none"
    rng = rng or np.random.default_rng([config.seed, SPLITS.index(split), index])
    u = rng.random()
    for kind, fraction in (
        ("exact", config.exact_duplicate_fraction),
        ("near", config.near_duplicate_fraction),
        ("concept", config.concept_fraction),
    ):
        if u < fraction:
            return kind
        u -= fraction
    return "none"


def _base_sample(config: SceneConfig, split: str, index: int) -> dict:
    """The sample at `index` as it would be without redundancy (what a duplicate copies)."""
    return _generate_split(
        SceneConfig(**{**asdict(config), "exact_duplicate_fraction": 0.0, "near_duplicate_fraction": 0.0,
                       "concept_fraction": 0.0}),
        split, index, index + 1,
    )[0]


def _public(record: dict) -> dict:
    return {k: v for k, v in record.items() if not k.startswith("_")}


def _generate_chunk(args) -> list[dict]:
    config, split, start, stop = args
    return [_public(r) for r in _generate_split(config, split, start, stop)]


def scene_features():
    from datasets import ClassLabel, Features, List, Value
    from datasets import Image as ImageFeature

    return Features({
        "image": ImageFeature(),
        "caption": Value("string"),
        "spans": List(Value("string")),
        "span_objects": List(List(Value("int32"))),
        "boxes": List(List(Value("float32"), length=4)),
        "object_shapes": List(ClassLabel(names=list(SHAPES))),
        "object_colors": List(ClassLabel(names=list(COLORS))),
        "object_sizes": List(ClassLabel(names=list(SIZES))),
        "num_objects": Value("int32"),
        "background": Value("string"),
        "template": Value("string"),
        HARD_NEGATIVES: List(Value("string")),
        HARD_NEGATIVE_TYPES: List(Value("string")),
        "label_shape": ClassLabel(names=list(SHAPES)),
        "label_color": ClassLabel(names=list(COLORS)),
        "label_color_shape": ClassLabel(names=[f"{c} {s}" for c in COLORS for s in SHAPES]),
        "redundancy": Value("string"),
        "source_index": Value("int64"),
    })


def generate_scenes(config: SceneConfig | None = None, num_proc: int | None = None, chunk_size: int = 1000):
    """A `datasets.DatasetDict` (train / validation / test) of procedural scenes. Same config, same bytes."""
    from datasets import Dataset, DatasetDict

    config = config or SceneConfig()
    num_proc = num_proc or min(2, os.cpu_count() or 1)
    features = scene_features()
    splits = {}
    for split in SPLITS:
        total = config.num_samples(split)
        jobs = [(config, split, start, min(start + chunk_size, total)) for start in range(0, total, chunk_size)]
        rows: list[dict] = []
        progress = tqdm(total=total, desc=f"scenes/{split}", unit="img", disable=total < 2000)
        if num_proc > 1 and len(jobs) > 1:
            with ProcessPoolExecutor(num_proc) as pool:
                for chunk in pool.map(_generate_chunk, jobs):
                    rows.extend(chunk)
                    progress.update(len(chunk))
        else:
            for job in jobs:
                chunk = _generate_chunk(job)
                rows.extend(chunk)
                progress.update(len(chunk))
        progress.close()
        columns = {name: [row[name] for row in rows] for name in features}
        splits[split] = Dataset.from_dict(columns, features=features)
    return DatasetDict(splits)


def load_scenes(config: SceneConfig | None = None, cache_dir: str | os.PathLike = "outputs/cache",
                num_proc: int | None = None):
    """`generate_scenes`, saved to `cache_dir/scenes-<config hash>` on first use and reloaded from there after."""
    from datasets import load_from_disk

    config = config or SceneConfig()
    path = os.path.join(os.fspath(cache_dir), f"scenes-{config.fingerprint()}")
    if os.path.isdir(path):
        return load_from_disk(path)
    dataset = generate_scenes(config, num_proc=num_proc)
    dataset.save_to_disk(path)
    with open(os.path.join(path, "scene_config.json"), "w") as handle:
        json.dump(asdict(config), handle, indent=2)
    return load_from_disk(path)


def zero_shot_tasks() -> dict[str, list[str]]:
    """Zero-shot classification tasks of the scenes: label column -> class names."""
    return {
        "label_shape": list(SHAPES),
        "label_color": list(COLORS),
        "label_color_shape": [f"{c} {s}" for c in COLORS for s in SHAPES],
    }
