"""The Gradio demo in `examples/demo/`: its predictions agree with the zero-shot pipeline and with a naive cosine
ranking, for a DCLIP student (remote code) and for its plain CLIP export; it imports nothing of dclip."""

import ast
import importlib.util
import math

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT
from PIL import Image
from transformers import AutoModel, AutoProcessor, pipeline

from dclip.export import export_clip_folder
from modeling_dclip import DCLIPModel


DEMO = REPO_ROOT / "examples" / "demo"
LABELS = "red circle, blue square, green triangle, yellow star, purple hexagon"
QUERIES = ["a large red circle", "two blue squares", "three black circles"]


def load_by_path(name: str):
    spec = importlib.util.spec_from_file_location(f"demo_{name}", DEMO / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def app():
    return load_by_path("app")


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_clip, processor):
    """A tiny student folder (weights of its own) and its plain CLIP export."""
    root = tmp_path_factory.mktemp("demo")
    student = DCLIPModel.from_clip(tiny_clip)
    torch.manual_seed(2)
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    student.save_pretrained(root / "student")
    processor.save_pretrained(root / "student")
    return {"student": root / "student", "exported": export_clip_folder(root / "student", root / "exported")}


@pytest.fixture(scope="module", params=["student", "exported"])
def loaded(request, app, folders):
    """(kind, folder, the demo on it)."""
    folder = folders[request.param]
    return request.param, folder, app.ZeroShotDemo.from_pretrained(str(folder), DEMO / "gallery")


def test_app_imports_only_what_a_space_has():
    allowed = {"__future__", "argparse", "os", "pathlib", "numpy", "torch", "PIL", "transformers", "gradio"}
    tree = ast.parse((DEMO / "app.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= allowed, imported - allowed
    top_level = {alias.name for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
    assert "gradio" not in top_level  # imported where the UI is built, so the predictions work without it


def test_classify_agrees_with_the_zero_shot_pipeline(app, loaded):
    kind, folder, demo = loaded
    classifier = pipeline("zero-shot-image-classification", model=str(folder), trust_remote_code=kind == "student")
    labels = app.parse_labels(LABELS)
    for _, image in demo.gallery:
        probabilities = demo.classify(image, LABELS)
        assert list(probabilities) == sorted(probabilities, key=probabilities.get, reverse=True)  # best first
        assert math.fsum(probabilities.values()) == pytest.approx(1.0, abs=1e-6)
        results = classifier(image, candidate_labels=labels, hypothesis_template=app.DEFAULT_TEMPLATE)
        assert next(iter(probabilities)) == results[0]["label"]
        assert {r["label"]: r["score"] for r in results} == pytest.approx(probabilities, abs=1e-5)


def naive_ranking(kind, folder, gallery, query):
    """Cosine similarity of the query with each gallery image, one image at a time, written out."""
    model = AutoModel.from_pretrained(folder, trust_remote_code=kind == "student").eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=kind == "student")

    def features(output):
        return (output if kind == "student" else output.pooler_output)[0].tolist()

    def cosine(a, b):
        return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    with torch.no_grad():
        text = processor(text=[query], return_tensors="pt", padding=True)
        text_features = features(model.get_text_features(input_ids=text["input_ids"],
                                                         attention_mask=text["attention_mask"]))
        scores = [cosine(features(model.get_image_features(**processor(images=[image], return_tensors="pt"))),
                         text_features) for _, image in gallery]
    return sorted(enumerate(scores), key=lambda item: -item[1])


def test_search_ranks_the_gallery_as_a_naive_cosine_loop(loaded):
    kind, folder, demo = loaded
    assert len(demo.gallery) >= 6
    for query in QUERIES:
        ranking = demo.rank(query)
        expected = naive_ranking(kind, folder, demo.gallery, query)
        assert [index for index, _ in ranking] == [index for index, _ in expected], query
        assert [score for _, score in ranking] == pytest.approx([score for _, score in expected], abs=1e-5)
        found = demo.search(query, k=3)
        assert [image for image, _ in found] == [demo.gallery[index][1] for index, _ in ranking[:3]]
        assert [score for _, score in found] == [score for _, score in ranking[:3]]


def test_predictions_refuse_empty_inputs(app, loaded):
    _, _, demo = loaded
    with pytest.raises(ValueError, match="at least one label"):
        demo.classify(demo.gallery[0][1], " , ,")
    with pytest.raises(ValueError, match="an image"):
        demo.classify(None, LABELS)
    with pytest.raises(ValueError, match="a query"):
        demo.search("  ")
    assert app.parse_labels(" red circle,blue square , red circle,") == ["red circle", "blue square"]


def test_gallery_is_the_rendered_scenes_and_small(tmp_path):
    files = sorted((DEMO / "gallery").glob("*.png"))
    assert len(files) >= 6 and all(path.stat().st_size < 16_000 for path in files)
    rendered = sorted(load_by_path("make_gallery").render_gallery(tmp_path))
    assert [path.name for path in rendered] == [path.name for path in files]
    for shipped, fresh in zip(files, rendered):
        assert np.array_equal(np.asarray(Image.open(shipped).convert("RGB")), np.asarray(Image.open(fresh)))


def test_ui_builds_without_launching(app, loaded):
    gradio = pytest.importorskip("gradio")
    _, _, demo = loaded
    blocks = app.build_ui(demo)
    assert isinstance(blocks, gradio.Blocks)
    assert len(blocks.fns) >= 2  # the classify and search events
