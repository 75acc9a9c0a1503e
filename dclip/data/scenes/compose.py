"""Composing one scene: its objects (`SceneObject`, their outlines, non-overlapping placement, the sampled shape /
colour / size specs), its caption (`Mention`, `Caption`: attributes, a spatial relation or counts, with the text spans
that name each object) and the hard-negative captions that contradict it in one fine-grained way."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .config import COLORS, COUNT_WORDS, OPPOSITE, RELATIONS, SHAPES, SIZES, SceneConfig


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


def _place_objects(rng: np.random.Generator, specs: list[tuple[str, str, str]],
                   jitter: float = 0.0) -> list[SceneObject]:
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
    pairs = [(i, j) for i in range(len(mentions)) for j in range(i + 1, len(mentions))
             if mentions[i].color != mentions[j].color]
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
