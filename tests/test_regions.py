"""Region-aware pretraining pairs (`dclip.data.regions`): each phrase that names one object, with that object's crop."""

import numpy as np
import pytest
from datasets import Dataset, Image
from PIL import Image as PILImage

from dclip.data.regions import region_pairs, with_region_pairs


@pytest.fixture
def rows():
    canvas = np.zeros((40, 80, 3), dtype=np.uint8)
    canvas[0:20, 0:40] = (255, 0, 0)  # object 0: a red block in the top-left quarter
    canvas[20:40, 60:80] = (0, 0, 255)  # object 1: a blue block bottom right
    image = PILImage.fromarray(canvas)
    return Dataset.from_dict({
        "image": [image, image],
        "caption": ["a red square and a blue square", "two squares on a gray background"],
        "boxes": [[[0.0, 0.0, 0.5, 0.5], [0.75, 0.5, 1.0, 1.0]]] * 2,
        "spans": [["a red square", "a blue square"], ["two squares", "a gray background"]],
        "span_objects": [[[0], [1]], [[0, 1], []]],  # the second row names no single object
    }).cast_column("image", Image())


def test_each_phrase_of_one_object_gets_that_objects_crop(rows):
    pairs = region_pairs(rows)
    assert pairs["caption"] == ["a red square", "a blue square"]
    red, blue = (np.asarray(image) for image in pairs["image"])
    assert red.shape == (20, 40, 3) and (red == (255, 0, 0)).all()
    assert blue.shape == (20, 20, 3) and (blue == (0, 0, 255)).all()


def test_the_mix_holds_the_asked_fraction_of_region_pairs(rows):
    mixed = with_region_pairs(rows, 0.5)
    assert mixed.column_names == ["image", "caption"] and len(mixed) == 4
    assert mixed["caption"][:2] == rows["caption"] and sorted(mixed["caption"][2:]) == ["a blue square", "a red square"]
    assert len(with_region_pairs(rows, 0.2)) == 2 + 0  # round(2 * 0.25) = 0 region pairs
    assert with_region_pairs(rows, 0.0) is rows
    with pytest.raises(ValueError, match="span_objects"):
        region_pairs(rows.remove_columns("span_objects"))


def test_bare_phrases_name_the_shape_alone(rows):
    from dclip.data.regions import bare_phrase

    assert bare_phrase("a small orange hexagon", frozenset({"small", "orange"})) == "a hexagon"
    assert bare_phrase("an orange circle", frozenset({"orange"})) == "a circle"
    assert bare_phrase("a small egg", frozenset({"small"})) == "an egg"
    every = region_pairs(rows, bare_words={"red", "blue"}, bare_fraction=1.0)
    assert every["caption"] == ["a square", "a square"]
    some = [region_pairs(rows.select([0] * 50), {"red", "blue"}, 0.5, seed)["caption"] for seed in (0, 1)]
    assert some[0] != some[1] and 30 < sum(caption == "a square" for caption in some[0]) < 70  # of 100
