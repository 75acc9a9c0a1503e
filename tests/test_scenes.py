import hashlib

import numpy as np
import pytest

from dclip.data.scenes import (
    COLORS,
    SHAPES,
    SIZES,
    SceneConfig,
    _groups,
    _relation,
    generate_scenes,
    load_scenes,
    zero_shot_tasks,
)


SMALL = SceneConfig(num_train=120, num_validation=20, num_test=20, seed=3)


@pytest.fixture(scope="module")
def scenes():
    return generate_scenes(SMALL, num_proc=1, chunk_size=50)


def digest(dataset) -> str:
    raw = dataset.cast_column("image", type(dataset.features["image"])(decode=False))
    h = hashlib.sha256()
    for row in raw:
        h.update(row["image"]["bytes"])
        h.update(row["caption"].encode())
    return h.hexdigest()


def test_same_seed_same_bytes_any_process_count(scenes):
    again = generate_scenes(SMALL, num_proc=2, chunk_size=30)  # other chunking, other processes
    for split in ("train", "validation", "test"):
        assert digest(again[split]) == digest(scenes[split])
    other = generate_scenes(SceneConfig(num_train=120, num_validation=20, num_test=20, seed=4), num_proc=1)
    assert digest(other["train"]) != digest(scenes["train"])


def test_splits_and_image_size(scenes):
    assert {k: len(v) for k, v in scenes.items()} == {"train": 120, "validation": 20, "test": 20}
    assert scenes["train"][0]["image"].size == (64, 64)
    big = generate_scenes(SceneConfig(image_size=96, num_train=2, num_validation=1, num_test=1), num_proc=1)
    assert big["train"][0]["image"].size == (96, 96)


def test_objects_boxes_and_spans_agree(scenes):
    for row in scenes["train"]:
        n = row["num_objects"]
        assert 1 <= n <= 4 and len(row["boxes"]) == n == len(row["object_shapes"]) == len(row["object_colors"])
        boxes = np.array(row["boxes"])
        assert (boxes >= 0).all() and (boxes <= 1).all() and (boxes[:, 2:] > boxes[:, :2]).all()
        # every object is referred to by exactly one span; the background span refers to none
        referred = sorted(i for objects in row["span_objects"] for i in objects)
        assert referred == list(range(n)), row["caption"]
        assert len(row["spans"]) == len(row["span_objects"])
        for span, objects in zip(row["spans"], row["span_objects"]):
            assert span in row["caption"]
            for i in objects:
                assert SHAPES[row["object_shapes"][i]] in span and list(COLORS)[row["object_colors"][i]] in span


def test_object_pixels_have_the_named_colour(scenes):
    """The centre pixel of each object's box (inside every shape) carries its colour, up to the noise."""
    for row in list(scenes["test"])[:10]:
        image = np.asarray(row["image"], dtype=float)
        for box, color in zip(row["boxes"], row["object_colors"]):
            x = int((box[0] + box[2]) / 2 * 64)
            y = int((box[1] + box[3]) / 2 * 64)
            assert np.abs(image[y, x] - COLORS[list(COLORS)[color]]).max() < 40


def test_relation_captions_are_true_and_negatives_flip_them(scenes):
    seen = 0
    for row in scenes["train"]:
        if row["template"] != "relation":
            continue
        seen += 1
        assert "swap_relation" in row["hard_negative_types"]
        negative = row["hard_negatives"][row["hard_negative_types"].index("swap_relation")]
        assert negative != row["caption"]
        first, second = row["span_objects"][0][0], row["span_objects"][1][0]
        (ax1, ay1, ax2, ay2), (bx1, by1, bx2, by2) = row["boxes"][first], row["boxes"][second]
        dx, dy = (ax1 + ax2 - bx1 - bx2) / 2, (ay1 + ay2 - by1 - by2) / 2
        if abs(dx) > abs(dy) + 0.05:
            assert ("to the left of" in row["caption"]) == (dx < 0)
        elif abs(dy) > abs(dx) + 0.05:
            assert ("above" in row["caption"]) == (dy < 0)
    assert seen > 5


def test_hard_negatives_differ_from_caption(scenes):
    for row in scenes["train"]:
        assert row["hard_negatives"] and len(row["hard_negatives"]) == len(row["hard_negative_types"])
        assert all(negative != row["caption"] for negative in row["hard_negatives"])
        assert set(row["hard_negative_types"]) <= {"swap_attribute", "swap_relation", "wrong_count"}


def test_labels_name_the_largest_object(scenes):
    tasks = zero_shot_tasks()
    for row in scenes["validation"]:
        areas = [(b[2] - b[0]) * (b[3] - b[1]) for b in row["boxes"]]
        sizes = row["object_sizes"]
        assert all(sizes[0] > other for other in sizes[1:])  # one object is strictly the largest
        assert int(np.argmax(areas)) == 0
        assert row["label_shape"] == row["object_shapes"][0] and row["label_color"] == row["object_colors"][0]
        name = tasks["label_color_shape"][row["label_color_shape"]]
        assert name == f"{list(COLORS)[row['label_color']]} {SHAPES[row['label_shape']]}"


def test_redundancy_knob_injects_what_it_says():
    config = SceneConfig(num_train=400, num_validation=10, num_test=10, exact_duplicate_fraction=0.1,
                         near_duplicate_fraction=0.1, concept_fraction=0.2, seed=1)
    data = generate_scenes(config, num_proc=1)
    train = data["train"]
    kinds = np.array(train["redundancy"])
    for kind, fraction in (("exact", 0.1), ("near", 0.1), ("concept", 0.2)):
        assert abs((kinds == kind).mean() - fraction) < 0.06, kind
    raw = train.cast_column("image", type(train.features["image"])(decode=False))
    for index in np.flatnonzero(kinds == "exact")[:10]:
        source = train[int(index)]["source_index"]
        assert raw[int(index)]["image"]["bytes"] == raw[source]["image"]["bytes"]
        assert train[int(index)]["caption"] == train[source]["caption"]
    for index in np.flatnonzero(kinds == "near")[:10]:
        row, source = train[int(index)], train[train[int(index)]["source_index"]]
        assert raw[int(index)]["image"]["bytes"] != raw[source["source_index"]]["image"]["bytes"]
        assert row["object_shapes"] == source["object_shapes"]
        assert np.abs(np.array(row["boxes"]) - np.array(source["boxes"])).max() <= 0.02 + 1e-6
    assert set(data["test"]["redundancy"]) == {"none"}  # evaluation splits stay clean


def test_config_validation():
    with pytest.raises(ValueError, match="min_objects"):
        SceneConfig(min_objects=0)
    with pytest.raises(ValueError, match="sum to < 1"):
        SceneConfig(exact_duplicate_fraction=0.5, concept_fraction=0.6)


def test_load_scenes_caches_by_config(tmp_path):
    config = SceneConfig(num_train=10, num_validation=2, num_test=2)
    first = load_scenes(config, cache_dir=tmp_path, num_proc=1)
    assert (tmp_path / f"scenes-{config.fingerprint()}" / "scene_config.json").exists()
    second = load_scenes(config, cache_dir=tmp_path, num_proc=1)
    assert digest(first["train"]) == digest(second["train"])


def test_relation_helper_and_groups():
    from dclip.data.scenes import SceneObject

    left = SceneObject("circle", "red", "small", (0.0, 0.4, 0.2, 0.6))
    right = SceneObject("star", "blue", "small", (0.7, 0.4, 0.9, 0.6))
    top = SceneObject("star", "blue", "small", (0.1, 0.0, 0.3, 0.2))
    assert _relation(left, right) == "left" and _relation(right, left) == "right"
    assert _relation(top, left) == "above"
    assert _groups([right, left, top]) == {("red", "circle"): [1], ("blue", "star"): [2, 0]}
    assert set(SIZES) == {"small", "medium", "large"}


@pytest.mark.slow
def test_default_size_generates_in_under_a_minute():
    import time

    start = time.perf_counter()
    data = generate_scenes(SceneConfig(num_validation=0, num_test=0))
    assert len(data["train"]) == 20_000
    assert time.perf_counter() - start < 60
