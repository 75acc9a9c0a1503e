"""A teacher independent of the student, end to end through the public CLI (`examples/train.py`): tiny local
checkpoints saved here in the HF layout, each with its own image size, tokenizer and embedding width, teach a student
trained from a preset. One is a `CLIPModel` (whose towers the teacher stage fuses, and which CLIP-CID uses as is), one
a `SiglipModel`. The teacher must receive its own processor's pixels and token ids, never the student's."""

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    SiglipConfig,
    SiglipImageProcessor,
    SiglipModel,
    SiglipProcessor,
)

from dclip.data.scenes import SceneConfig, load_scenes, zero_shot_tasks
from dclip.data.tokenizer import train_clip_tokenizer
from dclip.teachers import Teacher
from modeling_dclip import DCLIPTeacherModel


REPO_ROOT = Path(__file__).resolve().parents[1]
TEACHER_SIZE, STUDENT_SIZE = 48, 32
COMMON = ["--num_train_scenes", "96", "--image_size", str(STUDENT_SIZE), "--student_preset", "clip-tiny",
          "--detector_epochs", "0", "--teacher_steps", "2", "--distill_steps", "2", "--max_eval_samples", "32",
          "--per_device_train_batch_size", "16", "--fusion_hidden_size", "32", "--num_clusters", "4",
          "--save_strategy", "no", "--report_to", "none", "--seed", "0"]


@pytest.fixture(scope="module")
def captions(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    scenes = load_scenes(SceneConfig(num_train=96, image_size=STUDENT_SIZE), cache_dir=str(cache))
    prompts = [f"a photo of a {name}." for names in zero_shot_tasks().values() for name in names]  # evaluation's
    negatives = [negative for split in scenes.values() if "hard_negatives" in split.column_names
                 for row in split["hard_negatives"] for negative in row]  # the fused teacher's hard-negative scores
    return cache, [caption for split in scenes.values() for caption in split["caption"]] + prompts + negatives


@pytest.fixture(scope="module")
def teachers(tmp_path_factory, captions):
    """A 48 px CLIP of width 48 and a 48 px SigLIP of width 40, each with its own 600-token BPE (the student's
    has 1,024) and normalisation, saved with their processors as `save_pretrained` writes them."""
    root = tmp_path_factory.mktemp("teachers")
    tokenizer = train_clip_tokenizer(captions[1], vocab_size=600, model_max_length=24)
    tower = dict(intermediate_size=96, num_hidden_layers=1, num_attention_heads=2)
    clip = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=48, max_position_embeddings=24, **tower,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=48, image_size=TEACHER_SIZE, patch_size=16, **tower), projection_dim=48))
    image_processor = CLIPImageProcessor(size={"shortest_edge": TEACHER_SIZE},
                                         crop_size={"height": TEACHER_SIZE, "width": TEACHER_SIZE},
                                         image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.25, 0.25])
    clip.save_pretrained(root / "clip")
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(root / "clip")
    siglip = SiglipModel(SiglipConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=40, max_position_embeddings=24, **tower),
        vision_config=dict(hidden_size=40, image_size=TEACHER_SIZE, patch_size=16, **tower)))
    siglip.save_pretrained(root / "siglip")
    SiglipProcessor(image_processor=SiglipImageProcessor(size={"height": TEACHER_SIZE, "width": TEACHER_SIZE}),
                    tokenizer=tokenizer).save_pretrained(root / "siglip")
    return root, tokenizer


@pytest.fixture
def seen(monkeypatch):
    """What every teacher received: the pixels and token ids of `Teacher.embed` (dual encoders, and the DCLIP
    teacher online) and of the DCLIP teacher's towers (the cached tower pass)."""
    calls = {"pixels": [], "ids": [], "masks": []}
    embed, image_side, text_side = Teacher.embed, DCLIPTeacherModel.encode_image_side, \
        DCLIPTeacherModel.encode_text_side

    def spy_embed(self, inputs):
        calls["pixels"].append(inputs["pixel_values"].shape)
        calls["ids"].append(inputs["input_ids"])
        calls["masks"].append("attention_mask" in inputs)
        return embed(self, inputs)

    def spy_image(self, pixel_values, *args, **kwargs):
        calls["pixels"].append(pixel_values.shape)
        return image_side(self, pixel_values, *args, **kwargs)

    def spy_text(self, input_ids, *args, **kwargs):
        calls["ids"].append(input_ids)
        return text_side(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(Teacher, "embed", spy_embed)
    monkeypatch.setattr(DCLIPTeacherModel, "encode_image_side", spy_image)
    monkeypatch.setattr(DCLIPTeacherModel, "encode_text_side", spy_text)
    return calls


def train(monkeypatch, output: Path, cache: Path, *arguments: str) -> dict:
    monkeypatch.setattr(sys, "argv", ["train.py", "--output_dir", str(output), "--cache_dir", str(cache), *COMMON,
                                      *arguments])
    runpy.run_path(str(REPO_ROOT / "examples" / "train.py"), run_name="__main__")
    return json.loads((output / "summary.json").read_text())


def _words(text: str) -> str:
    return " ".join(text.replace(".", " .").replace(",", " ,").split())


def assert_teacher_read_its_own_inputs(seen, tokenizer, captions, student_tokenizer):
    assert seen["pixels"] and seen["ids"]
    assert all(shape[-2:] == (TEACHER_SIZE, TEACHER_SIZE) for shape in seen["pixels"])
    known = {_words(caption) for caption in captions}

    def is_caption(text: str) -> bool:  # whole, or cut at the teacher's maximum length
        return any(caption.startswith(_words(text)) for caption in known) and len(text.split()) > 1

    for ids in seen["ids"]:
        rows = ids.reshape(-1, ids.shape[-1])[:4]
        assert all(map(is_caption, tokenizer.batch_decode(rows, skip_special_tokens=True)))
        # the same ids read by the student's tokenizer are not these captions: they could not pass for its ids
        assert not any(map(is_caption, student_tokenizer.batch_decode(rows, skip_special_tokens=True)))


def student_tokenizer(output: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(output / "processor")


def test_clip_teacher_of_another_size_tokenizer_and_width(monkeypatch, tmp_path, captions, teachers, seen):
    cache, texts = captions
    root, tokenizer = teachers
    summary = train(monkeypatch, tmp_path / "out", cache, "--teacher_model", str(root / "clip"),
                    "--compare_methods", "clip_cid")
    assert_teacher_read_its_own_inputs(seen, tokenizer, texts, student_tokenizer(tmp_path / "out"))
    assert set(summary["training"]) == {"teacher", "distill", "distill_clip_cid"}  # no base CLIP needed
    assert not (tmp_path / "out" / "base_clip").exists()
    # the DCLIP teacher fused the CLIP's own towers (width 48) and projects into the student's width (64)
    teacher = DCLIPTeacherModel.from_pretrained(summary["artefacts"]["teacher"])
    assert teacher.config.vision_config.image_size == TEACHER_SIZE and teacher.config.embed_dim == 64
    for name in ("student", "student_clip_cid"):  # saved without the heads that bridged 64 -> 48 for CLIP-CID
        config = json.loads(Path(summary["artefacts"][name], "config.json").read_text())
        assert config["vision_config"]["image_size"] == STUDENT_SIZE and config.get("teacher_embed_dim") is None
        assert not any("teacher_" in key for key in load_file(Path(summary["artefacts"][name], "model.safetensors")))
    cid = json.loads(Path(summary["artefacts"]["student_clip_cid"], "config.json").read_text())
    assert cid["teacher_name_or_path"] == str(root / "clip")
    assert {"teacher", "student", "student_clip_cid"} <= set(summary["metrics"])


def test_siglip_teacher_online(monkeypatch, tmp_path, captions, teachers, seen):
    cache, texts = captions
    root, tokenizer = teachers
    summary = train(monkeypatch, tmp_path / "out", cache, "--teacher_model", str(root / "siglip"),
                    "--teacher_kind", "clip", "--compare_methods", "", "--online_teacher")
    assert_teacher_read_its_own_inputs(seen, tokenizer, texts, student_tokenizer(tmp_path / "out"))
    assert all(ids.shape[-1] == 24 for ids in seen["ids"])  # SigLIP: padded to its maximum length, no mask
    assert not any(seen["masks"])
    assert set(summary["training"]) == {"distill"} and "teacher" in summary["metrics"]  # SigLIP evaluated as is
    student = load_file(Path(summary["artefacts"]["student"], "model.safetensors"))
    assert not any("teacher_" in key for key in student)
    assert torch.isfinite(torch.tensor(summary["metrics"]["student"]["image_retrieval_recall@1"]))
