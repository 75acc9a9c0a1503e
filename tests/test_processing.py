import json
import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, random_images, run_without_heavy_imports
from PIL import Image

from processing_dclip import DCLIPProcessor, RegionExtractor, SpanExtractor, crop_region, to_rgb_image


def pixels(processor, image):
    return processor(images=image)["pixel_values"]


# ----- images -------------------------------------------------------------------------------------------------


def test_truncated_image_file_names_the_file(processor, tmp_path):
    path = tmp_path / "broken.png"
    random_images(1, size=64)[0].save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"images\[1\]: cannot decode image file '.*broken.png'"):
        processor(images=[random_images(1)[0], str(path)])


def test_missing_image_file_names_the_file(processor, tmp_path):
    with pytest.raises(ValueError, match=r"images\[0\]: file '.*nope.jpg' does not exist"):
        processor(images=[str(tmp_path / "nope.jpg")])


def test_grayscale_image_is_replicated_to_rgb(processor):
    gray = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40), dtype=np.uint8), mode="L")
    result = pixels(processor, gray)
    assert result.shape == (1, 3, 32, 32)
    torch.testing.assert_close(result, pixels(processor, gray.convert("RGB")))
    # the three channels carry the same gray values (up to the per-channel normalisation)
    mean = torch.tensor(processor.image_processor.image_mean)[:, None, None]
    std = torch.tensor(processor.image_processor.image_std)[:, None, None]
    raw = result[0] * std + mean
    torch.testing.assert_close(raw[0], raw[1], atol=1e-5, rtol=0)


def test_rgba_transparency_is_composited_on_white(processor):
    transparent_red = Image.new("RGBA", (40, 40), (255, 0, 0, 0))
    opaque_red = Image.new("RGBA", (40, 40), (255, 0, 0, 255))
    torch.testing.assert_close(
        pixels(processor, transparent_red), pixels(processor, Image.new("RGB", (40, 40), "white"))
    )
    torch.testing.assert_close(
        pixels(processor, opaque_red), pixels(processor, Image.new("RGB", (40, 40), (255, 0, 0)))
    )


def test_16_bit_image_is_scaled_not_clipped(processor, tmp_path):
    values = np.random.default_rng(1).integers(0, 256, (40, 40)).astype(np.uint16)
    sixteen = Image.fromarray(values * 257)  # full 16-bit range
    path = tmp_path / "sixteen.png"
    sixteen.save(path)
    assert Image.open(path).mode.startswith("I")
    expected = pixels(processor, Image.fromarray(values.astype(np.uint8), mode="L"))
    torch.testing.assert_close(pixels(processor, str(path)), expected)
    torch.testing.assert_close(pixels(processor, sixteen), expected)


def test_one_pixel_image(processor):
    tiny = Image.new("RGB", (1, 1), (10, 200, 30))
    out = processor(images=tiny, return_regions=True)
    assert out["pixel_values"].shape == (1, 3, 32, 32)
    assert torch.isfinite(out["pixel_values"]).all()
    assert out["region_mask"].tolist() == [[True]]
    assert out["region_source"] == ["whole_image:no_detector"]


def test_arrays_and_tensors_are_accepted(processor):
    image = random_images(1)[0]
    array = np.array(image)
    expected = pixels(processor, image)
    torch.testing.assert_close(pixels(processor, array), expected)
    torch.testing.assert_close(pixels(processor, torch.from_numpy(array).permute(2, 0, 1)), expected)
    with pytest.raises(ValueError, match=r"images\[0\]: expected an array of shape"):
        processor(images=[np.zeros((6, 6, 5), dtype=np.uint8)])
    with pytest.raises(TypeError, match=r"images\[0\]: expected a path"):
        processor(images=[123])


def test_float_arrays_in_unit_range_are_scaled_once(processor):
    """Float images are on the [0, 1] scale when their maximum is at most 1, else on the 0-255 scale: either way the
    pixels are those of the same uint8 image, never divided by 255 twice (or not at all)."""
    image = random_images(1)[0]
    array = np.array(image)
    expected = pixels(processor, image)
    unit = array.astype(np.float32) / 255.0
    assert unit.max() <= 1.0
    torch.testing.assert_close(pixels(processor, unit), expected)
    torch.testing.assert_close(pixels(processor, unit.astype(np.float64)), expected)
    torch.testing.assert_close(pixels(processor, torch.from_numpy(unit).permute(2, 0, 1)), expected)  # CHW tensor
    torch.testing.assert_close(pixels(processor, array.astype(np.float32)), expected)  # 0-255 floats: as they are
    np.testing.assert_array_equal(np.asarray(to_rgb_image(unit)), array)
    np.testing.assert_array_equal(np.asarray(to_rgb_image(array.astype(np.float64))), array)
    # the boundary: a maximum of exactly 1.0 is the [0, 1] scale (white), anything above is the 0-255 scale
    assert np.asarray(to_rgb_image(np.ones((3, 3, 3), np.float32))).tolist() == [[[255] * 3] * 3] * 3
    assert np.asarray(to_rgb_image(np.full((3, 3, 3), 0.5, np.float32))).max() == 128
    above = np.full((3, 3, 3), 1.0, np.float32)
    above[0, 0, 0] = np.nextafter(np.float32(1.0), np.float32(2.0))
    assert np.asarray(to_rgb_image(above))[1, 1].tolist() == [1, 1, 1]
    gray = to_rgb_image(np.array([[0.0, 0.25], [0.5, 1.0]], np.float32))  # 2-d: grayscale, same rule
    assert np.asarray(gray)[..., 0].tolist() == [[0, 64], [128, 255]]


def test_to_rgb_image_rejects_empty_images():
    with pytest.raises(ValueError, match="no pixels"):
        to_rgb_image(Image.new("RGB", (0, 5)), "sample 7")


# ----- argument order ------------------------------------------------------------------------------------------


def assert_same_features(first, second):
    assert first.keys() == second.keys()
    for key in first:
        if isinstance(first[key], torch.Tensor):
            torch.testing.assert_close(first[key], second[key], atol=0, rtol=0, msg=key)
        else:
            assert first[key] == second[key], key


def test_images_come_before_text_as_in_transformers_5(processor, tmp_path):
    images = random_images(2, size=64)
    texts = ["a small red circle to the left of two blue squares", "a purple square"]
    keyword = processor(text=texts, images=images, return_regions=True, return_spans=True)
    assert {"pixel_values", "input_ids", "region_pixel_values", "span_input_ids"} <= set(keyword)
    assert_same_features(processor(images, texts, return_regions=True, return_spans=True), keyword)
    assert_same_features(processor(images=images, text=texts, return_regions=True, return_spans=True), keyword)
    # one positional argument is images; images given as file paths still work positionally
    assert_same_features(processor(images), processor(images=images))
    paths = []
    for index, image in enumerate(images):
        paths.append(str(tmp_path / f"image{index}.png"))
        image.save(paths[-1])
    assert_same_features(processor(paths, texts), processor(images=images, text=texts))
    assert_same_features(processor(paths[0]), processor(images=images[:1]))
    # the rest is keyword-only: nothing binds silently to `return_regions`
    with pytest.raises(TypeError):
        processor(images, texts, True)


def test_old_text_images_order_is_refused_clearly(processor):
    images = random_images(2)
    texts = ["a red circle", "a blue square"]
    with pytest.raises(ValueError, match=r"arguments look swapped.*takes `images` first, then `text`"):
        processor(texts, images)
    with pytest.raises(ValueError, match=r"arguments look swapped"):
        processor("a red circle", images[0])
    # captions alone, positionally: they are read as file paths, which they are not
    with pytest.raises(ValueError, match=r"images\[0\]: file 'a red circle' does not exist.*pass captions as `text=`"):
        processor(texts)
    assert processor(text=texts)["input_ids"].shape[0] == 2


# ----- captions -----------------------------------------------------------------------------------------------


def test_empty_caption_gives_bos_eos_and_no_spans(processor, tokenizer):
    out = processor(text=[""], return_spans=True)
    assert out["input_ids"].tolist() == [[tokenizer.bos_token_id, tokenizer.eos_token_id]]
    assert out["span_mask"].shape == (1, 0)


def test_long_caption_is_truncated_with_a_warning(processor, tokenizer, caplog):
    caption = ("a small red circle " * 600)[:10_000]
    assert len(caption) == 10_000
    with caplog.at_level(logging.WARNING):
        out = processor(text=["a star", caption], return_spans=True)
    limit = tokenizer.model_max_length
    assert out["input_ids"].shape == (2, limit)
    assert out["input_ids"][1, -1].item() == tokenizer.eos_token_id
    assert "text[1] is longer than" in caplog.text
    assert out["span_mask"].shape[1] <= processor.max_spans
    assert out["span_input_ids"].shape[-1] <= processor.max_span_length


def test_non_string_caption_is_named(processor):
    with pytest.raises(TypeError, match=r"text\[1\] must be a string"):
        processor(text=["ok", None])


def test_spans_and_given_spans(processor, tokenizer):
    out = processor(text=["a red circle above two squares", "a star"], spans=[["a red circle"], []])
    assert out["span_mask"].tolist() == [[True], [False]]
    expected = tokenizer("a red circle")["input_ids"]
    assert out["span_input_ids"][0, 0, : len(expected)].tolist() == expected
    with pytest.raises(ValueError, match="`spans` has 1 entries for 2 captions"):
        processor(text=["a", "b"], spans=[["a"]])


@pytest.mark.parametrize(
    "caption, expected",
    [
        ("A small red circle to the left of two blue squares.", ["a small red circle", "two blue squares"]),
        ("three green triangles above a large yellow star on a gray background",
         ["three green triangles", "a large yellow star", "a gray background"]),
        ("There are two red squares and a blue circle", ["two red squares", "a blue circle"]),
        ("a cat, next to the dog", ["a cat", "the dog"]),
        ("", []),
        ("the the the", []),
    ],
)
def test_span_extractor(caption, expected):
    assert SpanExtractor()(caption) == expected


def test_span_extractor_limits_and_configuration():
    assert SpanExtractor(max_spans=1)("a red circle and a blue star") == ["a red circle"]
    assert SpanExtractor(boundaries=["beyond"])("a circle beyond a star") == ["a circle", "a star"]
    assert SpanExtractor(boundaries=["beyond"])("a circle above a star") == ["a circle above a star"]


# ----- regions ------------------------------------------------------------------------------------------------


def test_given_boxes_are_cropped(processor):
    image = random_images(1, size=64)[0]
    boxes = [[[0.0, 0.0, 0.5, 0.5], [0.25, 0.5, 1.0, 1.0]]]
    out = processor(images=[image], region_boxes=boxes)
    assert out["region_source"] == ["given"]
    assert out["region_mask"].tolist() == [[True, True]]
    expected = pixels(processor, crop_region(image, np.array(boxes[0][1])))
    torch.testing.assert_close(out["region_pixel_values"][0, 1], expected[0])
    torch.testing.assert_close(out["region_boxes"][0], torch.tensor(boxes[0]))


def test_mixed_region_counts_are_padded(processor):
    images = random_images(3, size=40)
    out = processor(images=images, region_boxes=[[], [[0, 0, 1, 1]], [[0, 0, 0.5, 0.5]] * 6])
    assert out["region_mask"].sum(1).tolist() == [0, 1, processor.max_regions]
    assert out["region_pixel_values"].shape == (3, processor.max_regions, 3, 32, 32)
    assert out["region_pixel_values"][0].abs().sum() == 0


def test_bad_boxes_are_named(processor):
    with pytest.raises(ValueError, match=r"region_boxes\[0\] must be normalised"):
        processor(images=random_images(1), region_boxes=[[[0.5, 0.5, 0.2, 0.9]]])


def test_region_boxes_must_match_the_images(processor):
    images = random_images(2, size=40)
    with pytest.raises(ValueError, match=r"`region_boxes` has 1 entries for 2 images"):
        processor(images=images, region_boxes=[[[0.0, 0.0, 1.0, 1.0]]])
    with pytest.raises(ValueError, match=r"`region_boxes` has 3 entries for 2 images"):
        processor(images=images, region_boxes=[[[0.0, 0.0, 1.0, 1.0]]] * 3)
    with pytest.raises(ValueError, match=r"`region_boxes` has 0 entries for 1 images"):
        processor(images=images[:1], region_boxes=[])
    # a box per image, the edges of the image included: accepted
    out = processor(images=images, region_boxes=[[[0.0, 0.0, 1.0, 1.0]], [[0.0, 0.5, 0.5, 1.0]]])
    assert out["region_mask"].tolist() == [[True], [True]]
    # boxes outside [0, 1] or of no width or height are refused, at the boundary too
    bad = ([[-1e-6, 0.0, 0.5, 0.5]], [[0.0, 0.0, 1.0 + 1e-6, 0.5]], [[0.25, 0.0, 0.25, 0.5]], [[0.0, 0.5, 0.5, 0.5]])
    for boxes in bad:
        with pytest.raises(ValueError, match=r"region_boxes\[1\] must be normalised"):
            processor(images=images, region_boxes=[[[0.0, 0.0, 1.0, 1.0]], boxes])


class FakeBoxes:
    def __init__(self, xyxy, conf):
        self.xyxy, self.conf = torch.tensor(xyxy, dtype=torch.float32), torch.tensor(conf, dtype=torch.float32)
        self.cls = torch.zeros(len(conf))


class FakeDetector:
    """Stands in for a YOLO model: returns fixed boxes (pixel coordinates) for each image."""

    def __init__(self, per_image):
        self.per_image, self.calls = per_image, []

    def predict(self, images, **kwargs):
        self.calls.append(kwargs)
        return [SimpleNamespace(boxes=FakeBoxes(*boxes)) for boxes in self.per_image[: len(images)]]


def test_region_extractor_filters_sorts_and_normalises():
    extractor = RegionExtractor(detector_path="unused.pt", max_regions=2, min_region_size=0.1)
    extractor._detector = FakeDetector([
        ([[0, 0, 50, 25], [10, 10, 12, 12], [50, 50, 100, 100], [0, 0, 100, 100]], [0.5, 0.99, 0.9, 0.3]),
        ([[1, 1, 3, 3]], [0.9]),  # too small: falls back to the whole image
    ])
    images = [Image.new("RGB", (100, 50)), Image.new("RGB", (100, 50))]
    first, second = extractor(images)
    assert first.source == "detector"
    # the 2x2 box is dropped (< 10% of 50 px), then the two most confident remain
    np.testing.assert_allclose(first.boxes, [[0.5, 1.0, 1.0, 1.0], [0.0, 0.0, 0.5, 0.5]])
    np.testing.assert_allclose(first.scores, [0.9, 0.5])
    assert second.source == "whole_image:no_detection"
    np.testing.assert_allclose(second.boxes, [[0, 0, 1, 1]])
    assert extractor._detector.calls[0]["max_det"] == 2


def test_missing_detector_weights_are_named(processor):
    broken = DCLIPProcessor(processor.image_processor, processor.tokenizer, detector_path="/no/such/yolo.pt")
    with pytest.raises(FileNotFoundError, match="/no/such/yolo.pt"):
        broken(images=random_images(1), return_regions=True)


def sighted_yolo(path, seed: int):
    """An untrained YOLOv8n that detects: a fresh one's outputs hardly depend on the image (its activations fade
    to ~1e-7 by the head, so every image gets the same scores, all below any threshold, and whole-image boxes).
    Here the convolutions are re-drawn (Kaiming), the head's last convolutions scaled to outputs of unit spread, and
    the box distances biased to a few strides: the boxes then depend on the image and on the weights."""
    from processing_dclip import import_yolo

    torch.manual_seed(seed)
    yolo = import_yolo()("yolov8n.yaml", task="detect")
    net = yolo.model.eval()
    head = net.model[-1]
    finals = [branch[-1] for branch in (*head.cv2, *head.cv3)]
    spreads = {}
    hooks = [conv.register_forward_hook(lambda module, inputs, output: spreads.__setitem__(module, output.std()))
             for conv in finals]
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.Conv2d) and module.weight.requires_grad:  # not the fixed DFL weights
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        for conv in finals:
            conv.bias.zero_()
        net(torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(seed)))
        for conv in finals:
            conv.weight.mul_(1.0 / spreads[conv])
        for branch in head.cv2:
            branch[-1].bias.copy_((-0.7 * torch.arange(head.reg_max)).repeat(4))
    for hook in hooks:
        hook.remove()
    yolo.save(str(path))
    return path


@pytest.fixture(scope="module")
def sighted_yolos(tmp_path_factory):
    pytest.importorskip("ultralytics")
    folder = tmp_path_factory.mktemp("yolo")
    return [sighted_yolo(folder / f"sighted{seed}.pt", seed) for seed in (0, 1)]


def test_processor_with_yolo_saves_and_reloads_the_detector(processor, sighted_yolos, tmp_path):
    settings = dict(max_regions=3, detector_image_size=64, detector_confidence=0.3, min_region_size=0.1)
    with_detector = DCLIPProcessor(processor.image_processor, processor.tokenizer,
                                   detector_path=str(sighted_yolos[0]), **settings)
    images = random_images(3, size=64)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # ultralytics would leave cpu_count - 1 behind
    try:
        out = with_detector(images=images, return_regions=True)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    # detections, not the whole-image fallback: several boxes per image, inside it, none of them the whole image
    assert out["region_source"] == ["detector"] * 3
    assert out["region_mask"].sum(1).tolist() == [3, 3, 3]
    boxes = out["region_boxes"][out["region_mask"]]
    assert boxes.min() >= 0 and boxes.max() <= 1
    assert ((boxes - torch.tensor([0.0, 0.0, 1.0, 1.0])).abs().sum(1) > 0.05).all()
    assert not torch.allclose(out["region_boxes"][0], out["region_boxes"][1])  # they follow the image...
    other = DCLIPProcessor(processor.image_processor, processor.tokenizer, detector_path=str(sighted_yolos[1]),
                           **settings)(images=images, return_regions=True)
    assert other["region_source"] == ["detector"] * 3
    assert other["region_boxes"].shape != out["region_boxes"].shape or not torch.allclose(
        other["region_boxes"], out["region_boxes"], atol=1e-3)  # ...and the weights

    with_detector.save_pretrained(tmp_path)  # the .pt (a pickle) converted: safetensors + the architecture's yaml
    assert {"detector.safetensors", "detector.yaml"} <= {path.name for path in tmp_path.iterdir()}
    assert not list(tmp_path.glob("*.pt"))
    assert with_detector.detector_path == str(sighted_yolos[0])  # saving does not change the live object
    reloaded = DCLIPProcessor.from_pretrained(tmp_path)
    assert reloaded.detector_path == str(tmp_path / "detector.safetensors")
    assert {name: getattr(reloaded.region_extractor, name) for name in ("max_regions", "confidence_threshold",
            "min_region_size", "detector_image_size")} == {
        "max_regions": 3, "confidence_threshold": 0.3, "min_region_size": 0.1, "detector_image_size": 64}
    again = reloaded(images=images, return_regions=True)
    assert again["region_source"] == out["region_source"]
    for name in ("region_boxes", "region_mask", "region_pixel_values"):
        torch.testing.assert_close(again[name], out[name], msg=name)


def test_the_remote_code_check_of_transformers_asks_for_nothing_beyond_transformers():
    """`AutoModel` / `AutoProcessor.from_pretrained(..., trust_remote_code=True)` first imports every package that a
    remote file imports outside a `try` (transformers' `check_imports`), and fails where one is missing: that must
    not import ultralytics (AGPL-3.0, with its side effects) or need anything a plain transformers install lacks."""
    import sys

    from transformers.dynamic_module_utils import get_imports

    allowed = {"PIL", "numpy", "torch", "transformers", "safetensors"} | set(sys.stdlib_module_names)
    for name in ("configuration_dclip.py", "modeling_dclip.py", "processing_dclip.py"):
        assert set(get_imports(REPO_ROOT / name)) <= allowed, name


def test_remote_code_imports_nothing_heavy():
    run_without_heavy_imports("configuration_dclip, modeling_dclip, processing_dclip",
                              ("ultralytics", "dclip", "datasets", "faiss", "cv2"))


def test_a_saved_processor_keeps_no_truncation_left_by_its_last_call(tmp_path, image_processor, tokenizer):
    import copy

    from processing_dclip import DCLIPProcessor

    processor = DCLIPProcessor(image_processor, copy.deepcopy(tokenizer), max_regions=4, max_spans=4)
    long_text = ["a red circle above two blue squares left of a green star " * 3]
    processor.tokenizer(long_text, truncation=True, max_length=5)  # leaves max_length 5 on the fast backend
    processor.save_pretrained(tmp_path)
    reloaded = DCLIPProcessor.from_pretrained(tmp_path, trust_remote_code=False)
    assert reloaded(text=long_text)["input_ids"].shape[1] == tokenizer.model_max_length
    assert json.loads((tmp_path / "tokenizer.json").read_text())["truncation"] is None
