"""The staged recipe end to end on a tiny configuration (the real default is measured by running train.py)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainingArguments

from dclip.pipeline import DataArguments, DistillationArguments, ModelArguments, run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    training_args = TrainingArguments(
        output_dir=str(root / "out"), per_device_train_batch_size=16, report_to=[], use_cpu=True, save_steps=2,
        logging_steps=1, dataloader_num_workers=0, seed=0,
    )
    summary = run(
        ModelArguments(preset="clip-tiny", fusion_hidden_size=32, fusion_num_heads=4),
        DataArguments(num_train_scenes=200, cache_dir=str(root / "cache"), max_eval_samples=50, image_size=32),
        DistillationArguments(pretrain_steps=3, teacher_steps=3, distill_steps=3),
        training_args,
    )
    return root, summary


def test_every_stage_writes_a_hub_ready_folder(tiny_run):
    root, summary = tiny_run
    assert set(summary["artefacts"]) == {"base_clip", "teacher", "student"}
    for folder in summary["artefacts"].values():
        names = {p.name for p in Path(folder).iterdir()}
        assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json"} <= names
    student_config = json.loads(open(f"{summary['artefacts']['student']}/config.json").read())
    assert student_config["distillation_method"] == "dclip"
    assert student_config["teacher_name_or_path"] == summary["artefacts"]["teacher"]
    assert json.loads(open(root / "out" / "summary.json").read())["metrics"].keys() == {"base_clip", "student"}


def test_stages_change_what_they_train_and_nothing_else(tiny_run):
    _, summary = tiny_run
    base = load_file(f"{summary['artefacts']['base_clip']}/model.safetensors")
    teacher = load_file(f"{summary['artefacts']['teacher']}/model.safetensors")
    student = load_file(f"{summary['artefacts']['student']}/model.safetensors")
    # the teacher's towers are frozen: identical to the base CLIP
    for name, tensor in base.items():
        torch.testing.assert_close(teacher[name], tensor, atol=0, rtol=0)
    # the student was trained away from the base CLIP
    assert any((student[name] - tensor).abs().max() > 0 for name, tensor in base.items())


def test_metrics_are_probabilities(tiny_run):
    _, summary = tiny_run
    for metrics in summary["metrics"].values():
        assert set(metrics) >= {"image_retrieval_recall@1", "text_retrieval_recall@10", "zeroshot_label_shape"}
        assert all(0.0 <= value <= 1.0 for value in metrics.values())


def test_unknown_stage_is_named():
    with pytest.raises(ValueError, match="--stage must be one of"):
        DistillationArguments(stage="finetune")
