"""The embedded default data set: procedural captioned scenes with boxes, deterministic by seed.

Each image holds 1 to 4 coloured shapes on a textured background. Its caption names the objects with attributes,
a spatial relation or counts; text spans are aligned with object boxes; class labels (shape, colour, colour+shape
of the largest object) serve zero-shot tasks; hard-negative captions (swapped attribute, swapped relation, wrong
count) serve a fine-grained test. A redundancy knob injects exact duplicates, near duplicates and over-represented
concepts into the train split, so that semantic balance (CLIP-CID) has something real to remove.

The package holds one module per step: `config` (the vocabulary and `SceneConfig`), `compose` (objects, captions and
hard negatives of one scene), `render` (its PNG) and `generate` (samples, splits, the cached `DatasetDict` and the
zero-shot tasks); it re-exports their public names.
"""

from .compose import Caption, Mention, SceneObject, _groups, _relation  # noqa: F401 - tests import the private two
from .config import (
    BACKGROUNDS,
    COLORS,
    COUNT_WORDS,
    GENERATOR_VERSION,
    OPPOSITE,
    POPULAR_CONCEPTS,
    RELATIONS,
    SHAPES,
    SIZES,
    SPLITS,
    TEMPLATES,
    SceneConfig,
)
from .generate import generate_scenes, load_scenes, scene_features, zero_shot_tasks
from .render import render_scene


__all__ = [
    "BACKGROUNDS", "COLORS", "COUNT_WORDS", "Caption", "GENERATOR_VERSION", "Mention", "OPPOSITE", "POPULAR_CONCEPTS",
    "RELATIONS", "SHAPES", "SIZES", "SPLITS", "SceneConfig", "SceneObject", "TEMPLATES", "generate_scenes",
    "load_scenes", "render_scene", "scene_features", "zero_shot_tasks",
]
