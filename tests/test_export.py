"""`dclip.export.export_clip_folder`: a saved student folder becomes a plain CLIPModel folder that loads with no remote
code and gives the student's own inputs, embeddings and zero-shot scores."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_images
from PIL import Image
from transformers import AutoModel, AutoProcessor, CLIPModel, CLIPProcessor, pipeline

from dclip.export import export_clip_folder
from modeling_dclip import DCLIPModel


TEXTS = ["a circle", "a small red circle to the left of two blue squares",
         "three green triangles above a large yellow star on a gray background " * 3]  # the last one is truncated
LABELS = ["red circle", "blue square", "green triangle", "yellow star"]
CARD_FILES = {"README.md": b"---\nlicense: apache-2.0\n---\n# tiny student\n", "eval_results.json": b'{"metrics": {}}'}


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, tiny_clip, image_processor, tokenizer):
    """A trained-looking student folder as the recipe leaves it: weights, remote code, processor with a detector,
    card, plots, widget images, and training leftovers that must not travel."""
    from processing_dclip import DCLIPProcessor, import_yolo

    root = tmp_path_factory.mktemp("export")
    detector = root / "yolo.pt"
    import_yolo()("yolov8n.yaml", task="detect").save(str(detector))  # saved with the processor as safetensors
    folder = root / "student"
    student = DCLIPModel.from_clip(tiny_clip, distillation_method="dclip")
    torch.manual_seed(1)
    with torch.no_grad():  # weights of its own, not the tiny CLIP's
        for parameter in student.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    student.save_pretrained(folder)
    DCLIPProcessor(image_processor, tokenizer, detector_path=str(detector), max_regions=4, max_spans=4) \
        .save_pretrained(folder)
    for name, data in CARD_FILES.items():
        (folder / name).write_bytes(data)
    random_images(1, seed=5)[0].save(folder / "retrieval.png")
    (folder / "examples").mkdir()
    random_images(1, seed=6)[0].save(folder / "examples" / "scene.png")
    (folder / "training_args.bin").write_bytes(b"pickle")
    return folder


@pytest.fixture(scope="module")
def exported(student_dir, tmp_path_factory):
    return export_clip_folder(student_dir, tmp_path_factory.mktemp("exported") / "clip")


@pytest.fixture(scope="module")
def student(student_dir):
    model = AutoModel.from_pretrained(student_dir, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(student_dir, trust_remote_code=True)
    assert type(model).__name__ == "DCLIPModel" and type(processor).__name__ == "DCLIPProcessor"
    return model, processor


def test_export_is_a_plain_clip_folder_with_the_card(student_dir, exported):
    files = {path.relative_to(exported).as_posix() for path in exported.rglob("*") if path.is_file()}
    assert not [name for name in files if name.endswith((".py", ".pt", ".bin", ".pth", ".pkl"))], files
    assert {"config.json", "model.safetensors", "tokenizer_config.json", "processor_config.json"} <= files
    for name in [*CARD_FILES, "retrieval.png", "examples/scene.png"]:
        assert (exported / name).read_bytes() == (student_dir / name).read_bytes(), name
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == "clip" and config["architectures"] == ["CLIPModel"]
    for name in files:
        if name.endswith(".json"):
            assert "auto_map" not in (exported / name).read_text(), name
    assert "detector" not in (exported / "processor_config.json").read_text()
    # plain transformers classes, nothing trusted
    assert type(AutoModel.from_pretrained(exported)) is CLIPModel
    assert type(AutoProcessor.from_pretrained(exported)) is CLIPProcessor


def test_plain_processor_gives_the_student_processors_inputs(exported, student):
    _, student_processor = student
    processor = CLIPProcessor.from_pretrained(exported)
    rgba = Image.fromarray(np.random.default_rng(2).integers(0, 256, (40, 52, 4), dtype=np.uint8))
    images = [*random_images(2, seed=3), rgba, random_images(1, seed=4)[0].convert("L")]
    for kwargs in ({}, {"padding": "max_length"}, {"return_tensors": "pt", "padding": True, "truncation": True}):
        ours, theirs = processor(images=images, text=TEXTS, **kwargs), student_processor(images=images, text=TEXTS,
                                                                                         **kwargs)
        assert set(ours) == {"input_ids", "attention_mask", "pixel_values"}, kwargs
        for key in ours:
            assert torch.equal(ours[key], theirs[key]), (key, kwargs)
    assert ours["input_ids"].shape[1] == student_processor.tokenizer.model_max_length  # padded, and truncated


def test_export_gives_the_students_embeddings(exported, student):
    student_model, student_processor = student
    clip = CLIPModel.from_pretrained(exported).eval()
    processor = CLIPProcessor.from_pretrained(exported)
    images = random_images(3, seed=7)
    ours, theirs = processor(images=images, text=TEXTS), student_processor(images=images, text=TEXTS)
    with torch.no_grad():
        pairs = [
            (clip.get_image_features(pixel_values=ours["pixel_values"]).pooler_output,
             student_model.get_image_features(theirs["pixel_values"])),
            (clip.get_text_features(input_ids=ours["input_ids"], attention_mask=ours["attention_mask"]).pooler_output,
             student_model.get_text_features(theirs["input_ids"], theirs["attention_mask"])),
        ]
    for exported_features, student_features in pairs:
        assert exported_features.shape == student_features.shape
        torch.testing.assert_close(exported_features, student_features, atol=1e-5, rtol=0)


def test_zero_shot_pipeline_runs_without_remote_code_and_agrees_with_the_student(exported, student):
    student_model, student_processor = student
    classifier = pipeline("zero-shot-image-classification", model=str(exported))
    assert type(classifier.model) is CLIPModel
    template = "a photo of a {}."
    for image in random_images(3, seed=11):
        results = classifier(image, candidate_labels=LABELS, hypothesis_template=template)
        inputs = student_processor(images=[image], text=[template.format(label) for label in LABELS])
        with torch.no_grad():
            probabilities = student_model(**inputs).logits_per_image.softmax(dim=-1)[0]
        assert results[0]["label"] == LABELS[int(probabilities.argmax())]
        scores = {result["label"]: result["score"] for result in results}
        assert [scores[label] for label in LABELS] == pytest.approx(probabilities.tolist(), abs=1e-5)


def test_export_refuses_what_is_not_a_student_or_would_overwrite_it(student_dir, tmp_path, tiny_clip,
                                                                      tiny_clip_dir, processor):
    from modeling_dclip import DCLIPTeacherModel

    teacher_dir = tmp_path / "teacher"
    DCLIPTeacherModel.from_clip(tiny_clip, fusion_hidden_size=32, fusion_num_heads=4).save_pretrained(teacher_dir)
    processor.save_pretrained(teacher_dir)
    for folder, what in ((teacher_dir, "a DCLIP teacher"), (tiny_clip_dir, "already a plain CLIP"),
                         (tmp_path, "no config.json")):
        with pytest.raises(ValueError, match=what) as error:
            export_clip_folder(folder, tmp_path / "out")
        assert str(folder) in str(error.value)
    for output in (student_dir, student_dir.parent):
        with pytest.raises(ValueError, match="the student folder"):
            export_clip_folder(student_dir, output)
    assert (student_dir / "model.safetensors").is_file()
    output = tmp_path / "taken"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_clip_folder(student_dir, output)
    assert (output / "keep.txt").read_text() == "mine"
    assert export_clip_folder(student_dir, output, overwrite=True) == output
    assert not (output / "keep.txt").exists() and (output / "model.safetensors").is_file()
    assert not (tmp_path / "taken.partial").exists()


def test_an_error_while_exporting_leaves_the_previous_export_whole(student_dir, tmp_path, monkeypatch):
    import dclip.export

    output = export_clip_folder(student_dir, tmp_path / "clip")
    before = {path.relative_to(output): path.read_bytes() for path in output.rglob("*") if path.is_file()}

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dclip.export, "_check_plain_clip_folder", disk_full)  # after every file is written
    with pytest.raises(OSError, match="No space left"):
        export_clip_folder(student_dir, output, overwrite=True)
    after = {path.relative_to(output): path.read_bytes() for path in output.rglob("*") if path.is_file()}
    assert after == before and "model.safetensors" in {str(name) for name in after}
    monkeypatch.undo()

    real_rename = Path.rename

    def failing_swap(self, target):  # the new folder written, the old one moved aside, then the last rename fails
        if self.name.endswith(".partial"):
            raise OSError(5, "Input/output error")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", failing_swap)
    with pytest.raises(OSError, match="Input/output error"):
        export_clip_folder(student_dir, output, overwrite=True)
    monkeypatch.undo()
    after = {path.relative_to(output): path.read_bytes() for path in output.rglob("*") if path.is_file()}
    assert after == before and not (tmp_path / "clip.previous").exists()


def test_export_refuses_a_student_without_its_processor(tmp_path, tiny_clip):
    folder = tmp_path / "bare"
    DCLIPModel.from_clip(tiny_clip).save_pretrained(folder)
    with pytest.raises(ValueError, match="processor is missing") as error:
        export_clip_folder(folder, tmp_path / "out")
    assert str(folder) in str(error.value)


def test_a_swap_killed_half_way_is_finished_by_the_next_write(tmp_path):
    """The states a kill can leave between the two renames of `write_whole`: the next call puts the newest complete
    folder in place before it writes, and a stray `.previous` file does not stop it."""
    from dclip.folders import write_whole

    def writer(text):
        return lambda partial: (partial / "weights.txt").write_text(text)

    folder = tmp_path / "final"
    write_whole(folder, writer("one"))
    folder.rename(tmp_path / "final.previous")  # killed after moving the old folder aside...
    (tmp_path / "final.partial").mkdir()  # ...with the new one written whole
    (tmp_path / "final.partial" / "weights.txt").write_text("two")

    def look(partial):
        assert (folder / "weights.txt").read_text() == "two"  # the swap was finished before this write
        (partial / "weights.txt").write_text("three")

    write_whole(folder, look)
    assert (folder / "weights.txt").read_text() == "three"
    assert not (tmp_path / "final.previous").exists() and not (tmp_path / "final.partial").exists()
    folder.rename(tmp_path / "final.previous")  # killed with only the old folder left
    write_whole(folder, lambda partial: (folder / "weights.txt").read_text() == "three" or 1 / 0)
    (tmp_path / "final.previous").write_text("a stray file")
    assert write_whole(folder, writer("four")) == folder and (folder / "weights.txt").read_text() == "four"
