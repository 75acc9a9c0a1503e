import numpy as np
import pytest
from PIL import Image

from dclip.data.scenes import SHAPES, SceneConfig, generate_scenes
from dclip.detector import count_accuracy, export_yolo_dataset
from processing_dclip import Regions


@pytest.fixture(scope="module")
def scenes():
    return generate_scenes(SceneConfig(num_train=6, num_validation=3, num_test=4, seed=5), num_proc=1)


def test_yolo_export_writes_centre_width_height_labels(scenes, tmp_path):
    yaml_path = export_yolo_dataset(
        {"train": scenes["train"], "val": scenes["validation"]}, tmp_path, list(SHAPES), max_samples={"train": 4}
    )
    text = open(yaml_path).read()
    assert "train: images/train" in text and "5: hexagon" in text
    assert len(list((tmp_path / "images" / "train").glob("*.png"))) == 4
    row = scenes["train"][2]
    lines = (tmp_path / "labels" / "train" / "0000002.txt").read_text().split("\n")[:-1]
    assert len(lines) == row["num_objects"]
    for line, box, cls in zip(lines, row["boxes"], row["object_shapes"]):
        values = [float(v) for v in line.split()]
        x1, y1, x2, y2 = box
        assert int(values[0]) == cls
        np.testing.assert_allclose(values[1:], [(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], atol=1e-5)
    exported = Image.open(tmp_path / "images" / "train" / "0000002.png")
    assert np.array_equal(np.asarray(exported), np.asarray(row["image"]))


class CountingExtractor:
    """Finds `num_objects` boxes on even rows and one fewer on odd rows."""

    def __init__(self, counts):
        self.counts, self.offset = counts, 0

    def __call__(self, images):
        out = []
        for _ in images:
            n = self.counts[self.offset]
            found = n if self.offset % 2 == 0 else n - 1
            out.append(
                Regions(np.zeros((found, 4)), np.ones(found), "detector" if found else "whole_image:no_detection")
            )
            self.offset += 1
        return out


def test_count_accuracy_counts_exact_matches(scenes):
    test = scenes["test"]
    accuracy = count_accuracy(CountingExtractor(test["num_objects"]), test, batch_size=3)
    assert accuracy == pytest.approx(2 / 4)
