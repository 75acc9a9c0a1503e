"""The embedded default data set: procedural captioned scenes with boxes, deterministic by seed.

Each image holds 1 to 4 coloured shapes on a textured background. Its caption names the objects with attributes,
a spatial relation or counts; text spans are aligned with object boxes; class labels (shape, colour, colour+shape
of the largest object) serve zero-shot tasks; hard-negative captions (swapped attribute, swapped relation, wrong
count) serve a fine-grained test. A redundancy knob injects exact duplicates, near duplicates and over-represented
concepts into the train split, so that semantic balance (CLIP-CID) has something real to remove.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm


SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon")
COLORS = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 215),
    "yellow": (240, 215, 40),
    "purple": (140, 60, 180),
    "orange": (245, 135, 25),
    "white": (248, 248, 248),
    "black": (22, 22, 22),
}
SIZES = {"small": 0.2, "medium": 0.28, "large": 0.38}  # side of the object's box, as a fraction of the image side
BACKGROUNDS = {"gray": (128, 128, 128), "sand": (200, 185, 150), "teal": (70, 125, 125), "pink": (225, 175, 190)}
COUNT_WORDS = {1: "a", 2: "two", 3: "three", 4: "four"}
RELATIONS = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}
TEMPLATES = ("attributes", "relation", "count")
SPLITS = ("train", "validation", "test")
# Over-represented concepts for the redundancy knob: (shape, colour, size) objects always drawn together.
POPULAR_CONCEPTS = (
    (("circle", "red", "large"),),
    (("square", "blue", "medium"), ("square", "blue", "medium")),
    (("star", "green", "medium"), ("triangle", "yellow", "medium")),
)


@dataclass
class SceneConfig:
    """Everything that determines the generated data set (its hash names the cache folder)."""

    image_size: int = 64
    num_train: int = 20_000
    num_validation: int = 1_000
    num_test: int = 1_000
    min_objects: int = 1
    max_objects: int = 4
    noise_std: float = 6.0
    seed: int = 0
    # redundancy knob (train split only): fractions of train samples that are...
    exact_duplicate_fraction: float = 0.0  # ...byte copies of an earlier sample
    near_duplicate_fraction: float = 0.0  # ...an earlier scene re-rendered with a small jitter and new noise
    concept_fraction: float = 0.0  # ...one of a few over-represented concepts at random places
    supersample: int = 2

    def __post_init__(self):
        if not 1 <= self.min_objects <= self.max_objects <= 4:
            raise ValueError(f"need 1 <= min_objects <= max_objects <= 4, got {self.min_objects}, {self.max_objects}.")
        if self.image_size < 16:
            raise ValueError(f"`image_size` must be at least 16, got {self.image_size}.")
        total = self.exact_duplicate_fraction + self.near_duplicate_fraction + self.concept_fraction
        if min(self.exact_duplicate_fraction, self.near_duplicate_fraction, self.concept_fraction) < 0 or total >= 1:
            raise ValueError(f"redundancy fractions must be >= 0 and sum to < 1, got {total}.")

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    def num_samples(self, split: str) -> int:
        return {"train": self.num_train, "validation": self.num_validation, "test": self.num_test}[split]


@dataclass
class SceneObject:
    shape: str
    color: str
    size: str
    box: tuple[float, float, float, float]  # normalised (x1, y1, x2, y2)

    @property
    def center(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2

    @property
    def area(self) -> float:
        return (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])

    @property
    def tight_box(self) -> tuple[float, float, float, float]:
        """The bounds of the drawn shape (a star or hexagon does not fill its layout box)."""
        points = _shape_points(self.shape, self.box, 1.0)
        if points is None:
            return self.box
        xs, ys = zip(*points)
        return (min(xs), min(ys), max(xs), max(ys))


@dataclass
class Mention:
    """A noun phrase of a caption: `count` objects of one colour and shape, optionally with a size word."""

    count: int
    color: str
    shape: str
    size: str | None
    objects: list[int] = field(default_factory=list)

    def text(self) -> str:
        noun = self.shape + ("s" if self.count > 1 else "")
        words = [COUNT_WORDS[self.count]] + ([self.size] if self.size else []) + [self.color, noun]
        if words[0] == "a" and words[1][0] in "aeiou":
            words[0] = "an"
        return " ".join(words)


@dataclass
class Caption:
    template: str
    mentions: list[Mention]
    relation: str | None = None  # between mentions[0] and mentions[1], for the relation template
    background: str | None = None

    def render(self) -> tuple[str, list[str]]:
        spans = [m.text() for m in self.mentions]
        if self.template == "relation":
            text = f"{spans[0]} {RELATIONS[self.relation]} {spans[1]}"
            if len(spans) > 2:  # the other objects, so that the caption names everything in the image
                text += " with " + (", ".join(spans[2:-1]) + " and " if len(spans) > 3 else "") + spans[-1]
        elif len(spans) == 1:
            text = spans[0]
        else:
            text = ", ".join(spans[:-1]) + " and " + spans[-1]
        if self.background:
            text += f" on a {self.background} background"
            spans = spans + [f"a {self.background} background"]
        return text, spans


# ----- sampling a scene ------------------------------------------------------------------------------------------


def _place_objects(rng: np.random.Generator, specs: list[tuple[str, str, str]], jitter: float = 0.0) -> list[SceneObject]:
    """Non-overlapping boxes for `(shape, colour, size)` specs, by rejection sampling (smaller sizes if crowded)."""
    for attempt in range(60):
        placed: list[SceneObject] = []
        for shape, color, size in specs:
            side = SIZES[size] * (0.85 if attempt > 30 else 1.0)
            for _ in range(40):
                x1, y1 = rng.uniform(0.02, 0.98 - side, size=2)
                box = (x1, y1, x1 + side, y1 + side)
                if all(_separated(box, other.box) for other in placed):
                    placed.append(SceneObject(shape, color, size, tuple(float(v) for v in box)))
                    break
            else:
                break
        if len(placed) == len(specs):
            return placed
    raise RuntimeError(f"could not place {len(specs)} objects without overlap")


def _separated(a, b, gap: float = 0.03) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _sample_specs(rng: np.random.Generator, config: SceneConfig) -> list[tuple[str, str, str]]:
    count = int(rng.integers(config.min_objects, config.max_objects + 1))
    specs = []
    for _ in range(count):
        if specs and rng.random() < 0.3:  # repeated objects make counting captions meaningful
            shape, color, _ = specs[int(rng.integers(len(specs)))]
        else:
            shape, color = SHAPES[int(rng.integers(len(SHAPES)))], list(COLORS)[int(rng.integers(len(COLORS)))]
        specs.append((shape, color, list(SIZES)[int(rng.integers(len(SIZES)))]))
    return _make_first_largest(specs)


def _make_first_largest(specs: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """Give the first object a size class strictly above the others', so the zero-shot labels are unambiguous."""
    names = list(SIZES)
    ranks = [names.index(size) for _, _, size in specs]
    first = max(ranks[0], 1 if len(specs) > 1 else 0)
    ranks = [first] + [min(rank, first - 1) for rank in ranks[1:]]
    return [(shape, color, names[rank]) for (shape, color, _), rank in zip(specs, ranks)]


def _relation(a: SceneObject, b: SceneObject) -> str:
    (ax, ay), (bx, by) = a.center, b.center
    if abs(ax - bx) >= abs(ay - by):
        return "left" if ax < bx else "right"
    return "above" if ay < by else "below"


def _groups(objects: list[SceneObject]) -> dict[tuple[str, str], list[int]]:
    groups: dict[tuple[str, str], list[int]] = {}
    for index in sorted(range(len(objects)), key=lambda i: objects[i].center[0]):
        groups.setdefault((objects[index].color, objects[index].shape), []).append(index)
    return groups


def _compose_caption(rng: np.random.Generator, objects: list[SceneObject], background: str) -> Caption:
    groups = _groups(objects)
    unique = [indices[0] for indices in groups.values() if len(indices) == 1]
    has_repeats = any(len(indices) > 1 for indices in groups.values())
    choices = ["attributes"] if not has_repeats else ["count"]
    if len(unique) >= 2:
        choices.append("relation")
    if has_repeats or len(objects) > 1:
        choices.append("count")
    template = choices[int(rng.integers(len(choices)))]
    with_size = rng.random() < 0.5
    if template == "relation":
        first, second = (unique[i] for i in rng.permutation(len(unique))[:2])
        mentions = [
            Mention(1, objects[i].color, objects[i].shape, objects[i].size if with_size else None, [i])
            for i in (first, second)
        ]
        rest = {key: [i for i in ix if i not in (first, second)] for key, ix in groups.items()}
        mentions += [Mention(len(ix), color, shape, None, ix) for (color, shape), ix in rest.items() if ix]
        caption = Caption(template, mentions, relation=_relation(objects[first], objects[second]))
    elif template == "count":
        mentions = [Mention(len(ix), color, shape, None, list(ix)) for (color, shape), ix in groups.items()]
        caption = Caption(template, mentions)
    else:
        order = sorted(range(len(objects)), key=lambda i: objects[i].center[0])
        mentions = [
            Mention(1, objects[i].color, objects[i].shape, objects[i].size if with_size else None, [i]) for i in order
        ]
        caption = Caption(template, mentions)
    if rng.random() < 0.5:
        caption.background = background
    return caption


def _hard_negatives(rng: np.random.Generator, caption: Caption) -> list[tuple[str, str]]:
    """`(type, caption)` pairs that contradict the image in one fine-grained way."""
    negatives = []
    mentions = caption.mentions
    # swapped attribute: exchange two mentions' colours, or recolour the only one
    swapped = [Mention(m.count, m.color, m.shape, m.size, m.objects) for m in mentions]
    pairs = [(i, j) for i in range(len(mentions)) for j in range(i + 1, len(mentions)) if mentions[i].color != mentions[j].color]
    if pairs:
        i, j = pairs[int(rng.integers(len(pairs)))]
        swapped[i].color, swapped[j].color = mentions[j].color, mentions[i].color
    else:
        others = [c for c in COLORS if c != mentions[0].color]
        swapped[0].color = others[int(rng.integers(len(others)))]
    negatives.append(("swap_attribute", Caption(caption.template, swapped, caption.relation, caption.background)))
    if caption.template == "relation":
        flipped = Caption(caption.template, mentions, OPPOSITE[caption.relation], caption.background)
        negatives.append(("swap_relation", flipped))
    # wrong count: one mention's count off by one (within 1..4)
    index = int(rng.integers(len(mentions)))
    miscounted = [Mention(m.count, m.color, m.shape, m.size, m.objects) for m in mentions]
    count = mentions[index].count
    miscounted[index].count = count + 1 if count == 1 or (count < 4 and rng.random() < 0.5) else count - 1
    if caption.template != "relation":
        negatives.append(("wrong_count", Caption(caption.template, miscounted, None, caption.background)))
    return [(kind, negative.render()[0]) for kind, negative in negatives]


# ----- rendering --------------------------------------------------------------------------------------------------


def _shape_points(shape: str, box: tuple[float, float, float, float], scale: float) -> list[tuple[float, float]] | None:
    x1, y1, x2, y2 = (v * scale for v in box)
    cx, cy, r = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2
    if shape == "square":
        return [(x1, y1), (x2, y1), (x2, y2), (x1, y2)]
    if shape == "triangle":
        return [(cx, y1), (x2, y2), (x1, y2)]
    if shape == "diamond":
        return [(cx, y1), (x2, cy), (cx, y2), (x1, cy)]
    if shape == "hexagon":
        angles = np.deg2rad(np.arange(6) * 60)
        return [(cx + r * np.cos(a), cy + r * np.sin(a)) for a in angles]
    if shape == "star":
        angles = np.deg2rad(np.arange(10) * 36 - 90)
        radii = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
        return [(cx + rad * np.cos(a), cy + rad * np.sin(a)) for a, rad in zip(angles, radii)]
    return None  # circle


def render_scene(objects: list[SceneObject], background: str, size: int, noise_std: float, rng: np.random.Generator,
                 supersample: int = 2) -> bytes:
    """PNG bytes of the scene."""
    big = size * supersample
    canvas = Image.new("RGB", (big, big), BACKGROUNDS[background])
    draw = ImageDraw.Draw(canvas)
    for obj in objects:
        points = _shape_points(obj.shape, obj.box, big)
        if points is None:
            draw.ellipse([v * big for v in obj.box], fill=COLORS[obj.color])
        else:
            draw.polygon(points, fill=COLORS[obj.color])
    image = canvas.resize((size, size), Image.Resampling.BOX) if supersample > 1 else canvas
    array = np.asarray(image, dtype=np.int16)
    if noise_std > 0:
        array = array + rng.normal(0.0, noise_std, size=array.shape).round().astype(np.int16)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


# ----- samples ----------------------------------------------------------------------------------------------------


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
        "hard_negatives": [negative for _, negative in negatives],
        "hard_negative_types": [kind for kind, _ in negatives],
        "label_shape": SHAPES.index(objects[primary].shape),
        "label_color": list(COLORS).index(objects[primary].color),
        "label_color_shape": list(COLORS).index(objects[primary].color) * len(SHAPES) + SHAPES.index(objects[primary].shape),
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
    from datasets import ClassLabel, Features, Image as ImageFeature, List, Value

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
        "hard_negatives": List(Value("string")),
        "hard_negative_types": List(Value("string")),
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


def load_scenes(config: SceneConfig | None = None, cache_dir: str | os.PathLike = "outputs/cache", num_proc: int | None = None):
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
