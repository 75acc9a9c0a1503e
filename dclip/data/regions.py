"""Object-level (region crop, phrase) pairs from a captioned data set with annotated boxes and spans, for region-aware
pretraining of the base CLIP (the teacher's towers), in the manner of RegionCLIP: a scene's small objects are hard to
tell apart from the whole image, but the crop of one object paired with the phrase that names it ("a small red
circle") teaches the towers each object's shape, which the DCLIP teacher's region crops then read."""

from __future__ import annotations

import numpy as np
from datasets import Dataset, concatenate_datasets

from ..columns import BOXES, CAPTION, IMAGE, SPANS


SPAN_OBJECTS = "span_objects"  # the embedded scenes' column: the objects (indices into `boxes`) each span names


def bare_phrase(phrase: str, words: frozenset[str]) -> str:
    """`phrase` without `words` (e.g. colours and sizes: "a small red circle" -> "a circle"), its article fixed."""
    kept = [word for word in phrase.split() if word not in words]
    if len(kept) > 1 and kept[0] in ("a", "an"):
        kept[0] = "an" if kept[1][0] in "aeiou" else "a"
    return " ".join(kept)


def _crops(batch: dict, indices: list[int], bare_words: frozenset[str], bare_fraction: float, seed: int) -> dict:
    from processing_dclip import crop_region

    images, captions = [], []
    rows = zip(indices, batch[IMAGE], batch[BOXES], batch[SPANS], batch[SPAN_OBJECTS])
    for index, image, boxes, spans, objects in rows:
        image, draws = image.convert("RGB"), np.random.default_rng([seed, index]).random(len(spans))
        for span, named, draw in zip(spans, objects, draws):
            if len(named) == 1:  # a phrase that names one object: its crop
                images.append(crop_region(image, np.asarray(boxes[named[0]], dtype=np.float32)))
                captions.append(bare_phrase(span, bare_words) if draw < bare_fraction else span)
    return {IMAGE: images, CAPTION: captions}


def region_pairs(dataset: Dataset, bare_words=(), bare_fraction: float = 0.0, seed: int = 0,
                 batch_size: int = 500) -> Dataset:
    """One row (`image`: the crop of the object's box, `caption`: the span) per span that names exactly one object,
    from rows with `boxes`, `spans` and `span_objects` (cached by `datasets.map`'s fingerprint). A `bare_fraction`
    of the phrases (drawn by `seed`) lose their `bare_words` ("a small red circle" -> "a circle"), so that the crop
    must be matched by what is left: the object's shape."""
    missing = {BOXES, SPANS, SPAN_OBJECTS} - set(dataset.column_names)
    if missing:
        raise ValueError(f"region pairs need the columns {sorted(missing)} (annotated boxes and the spans naming them)")
    settings = {"bare_words": frozenset(bare_words), "bare_fraction": bare_fraction, "seed": seed}
    return dataset.map(_crops, batched=True, batch_size=batch_size, with_indices=True, fn_kwargs=settings,
                       remove_columns=dataset.column_names, desc="region pairs")


def with_region_pairs(dataset: Dataset, fraction: float, seed: int = 0, bare_words=(),
                      bare_fraction: float = 0.0) -> Dataset:
    """`dataset`'s (image, caption) rows followed by region pairs (`region_pairs`; a sample of them drawn by `seed`),
    so that about `fraction` of the result are region pairs (as many as there are, at most). The Trainer's sampler
    shuffles."""
    if not 0 <= fraction < 1:
        raise ValueError(f"the fraction of region pairs must be in [0, 1), got {fraction}")
    if fraction == 0:
        return dataset
    regions = region_pairs(dataset, bare_words, bare_fraction, seed)
    wanted = min(len(regions), int(round(len(dataset) * fraction / (1 - fraction))))
    regions = regions.shuffle(seed=seed).select(range(wanted))
    whole = dataset.select_columns([IMAGE, CAPTION])
    regions = regions.cast(whole.features)
    return concatenate_datasets([whole, regions])
