"""The staged recipe end to end on a tiny configuration (the real default is measured by running train.py)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import TrainingArguments

from dclip.arguments import DataArguments, DistillationArguments, ModelArguments
from dclip.data.processor import build_processor
from dclip.pipeline import run
from dclip.reporting import paper_claims
from dclip.trainer import DCLIPTrainer
from dclip.training import cpu_threads_per_process


TINY_MODEL = dict(preset="clip-tiny", fusion_hidden_size=32, fusion_num_heads=4)
TINY_DATA = dict(num_train_scenes=200, max_eval_samples=50, image_size=32)


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
        DistillationArguments(pretrain_steps=3, teacher_steps=3, distill_steps=3, detector_epochs=1,
                              detector_train_samples=64),
        training_args,
    )
    return root, summary


def test_the_runs_base_clip_teaches_as_a_dual_encoder_without_remote_code(tiny_run, monkeypatch):
    """The base CLIP folder is a transformers CLIP with this package's processor: `load_teacher` reads that processor
    from the package (the path `examples/compute_targets.py --teacher_model` takes), never asking to trust the
    folder's copy of its code."""
    from dclip.teachers import DUAL_ENCODER, load_teacher
    from processing_dclip import DCLIPProcessor

    monkeypatch.setattr("builtins.input", lambda *args: pytest.fail("asked to trust remote code"))
    root, summary = tiny_run
    teacher = load_teacher(summary["artefacts"]["base_clip"], DUAL_ENCODER)
    assert teacher.kind == DUAL_ENCODER and type(teacher.processor) is DCLIPProcessor
    assert type(teacher.model).__name__ == "CLIPModel"


def test_every_stage_writes_a_hub_ready_folder(tiny_run):
    root, summary = tiny_run
    students = {"student", "student_none", "student_clip_cid", "student_instance"}
    assert set(summary["artefacts"]) == {"detector", "base_clip", "teacher", "model_card"} | students
    # the student folder carries its card: valid metadata, the run's own numbers against the base CLIP
    from huggingface_hub import ModelCard

    card = ModelCard.load(summary["artefacts"]["model_card"], ignore_metadata_errors=False)
    assert Path(summary["artefacts"]["model_card"]).parent == Path(summary["artefacts"]["student"])
    values = {result.metric_name: result.metric_value for result in card.data.eval_results}
    assert values["text-to-image Recall@1"] == round(summary["metrics"]["student"]["image_retrieval_recall@1"], 4)
    assert "accelerate launch examples/train.py" in card.text and "stage distill: 3 steps" in card.text
    assert Path(summary["artefacts"]["detector"]).is_file()
    for name in ("base_clip", "teacher", "student"):
        folder = summary["artefacts"][name]
        names = {p.name for p in Path(folder).iterdir()}
        assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json"} <= names
    student_config = json.loads(open(f"{summary['artefacts']['student']}/config.json").read())
    # the published method, dclip+instance: DCLIP's terms and CLIP-CID's instance term, both against the fused teacher
    assert student_config["distillation_method"] == "dclip+clip_cid"
    # the default student: the clip-tiny preset trained from scratch, not the base CLIP fine-tuned
    assert student_config["base_model_name_or_path"] is None and student_config["projection_dim"] == 64
    assert student_config["teacher_name_or_path"] == summary["artefacts"]["teacher"]
    for name, method in (("student_none", None), ("student_clip_cid", "clip_cid"), ("student_instance", "clip_cid")):
        config = json.loads(open(f"{summary['artefacts'][name]}/config.json").read())
        assert config["distillation_method"] == method and config.get("teacher_embed_dim") is None
        # CLIP-CID's students learn from the teacher checkpoint's own embeddings (here the base CLIP), not fusion
        assert config["teacher_name_or_path"] == (summary["artefacts"]["base_clip"] if method else None)
    written = json.loads(open(root / "out" / "summary.json").read())
    assert written["metrics"].keys() == {"base_clip", "teacher"} | students
    assert set(written["training"]) == {"pretrain", "teacher", "distill", "distill_none", "distill_clip_cid",
                                        "distill_instance"}
    assert set(written["comparisons"]) == {"student vs student_none", "student_clip_cid vs student_none",
                                           "student_instance vs student_none", "teacher vs student_none",
                                           "student_clip_cid vs student_instance", "student vs base_clip"}
    for name in written["metrics"]:  # per-query outcomes, for paired bootstraps across runs
        assert len(np.load(root / "out" / "eval" / f"{name}.npz")["image_retrieval_recall@1"]) == 50
    assert all(stage["global_step"] == 3 for stage in written["training"].values())
    # every stage reads the one processor saved for the run
    assert (root / "out" / "processor" / "tokenizer.json").is_file()


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
    from dclip.data.scenes import zero_shot_tasks

    _, summary = tiny_run
    for name, metrics in summary["metrics"].items():
        assert set(metrics) >= {"image_retrieval_recall@1", "text_retrieval_recall@10"}
        if name != "teacher":
            assert {"zeroshot_label_shape_acc1", "zeroshot_label_color_shape_acc5", "linear_probe_label_color_acc1",
                    "hard_negative_accuracy_swap_attribute", "image_retrieval_mAP"} <= set(metrics)
            assert set(summary["per_class_recall"][name]["label_color"]) <= set(zero_shot_tasks()["label_color"])
        assert all(0.0 <= value <= 1.0 for value in metrics.values())
        assert metrics["image_retrieval_recall@1"] <= metrics["image_retrieval_recall@5"]


def test_claims_are_read_from_the_metrics():
    base = {"image_retrieval_recall@1": 0.2, "text_retrieval_recall@1": 0.3, "zeroshot_a_acc1": 0.5,
            "zeroshot_b_acc1": 0.7, "zeroshot_b_acc5": 0.1}
    student = {"image_retrieval_recall@1": 0.25, "text_retrieval_recall@1": 0.31, "zeroshot_a_acc1": 0.5,
               "zeroshot_b_acc1": 0.62, "zeroshot_b_acc5": 0.9}
    teacher = {"image_retrieval_recall@1": 0.4, "text_retrieval_recall@1": 0.29}
    claims = paper_claims({"base_clip": base, "student": student, "teacher": teacher})
    assert claims["student_beats_base_recall@1"] and not claims["teacher_beats_base_recall@1"]
    assert claims["student_text_to_image_recall@1_relative_gain"] == pytest.approx(0.25)
    assert claims["student_zero_shot_retention"] == pytest.approx(1.12 / 1.2)
    assert not claims["student_keeps_94%_zero_shot"]


def test_lora_student_changes_only_attention_and_saves_merged(tiny_run, tmp_path):
    import shutil

    from transformers import AutoModel

    root, summary = tiny_run
    shutil.copytree(root / "out", tmp_path / "out")
    stale = tmp_path / "out" / "student" / "checkpoint-999"  # an earlier run's: a fresh run must not resume it
    stale.mkdir(parents=True)
    (stale / "trainer_state.json").write_text("{}")
    training_args = TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=16, report_to=[], use_cpu=True,
        save_strategy="no", dataloader_num_workers=0, seed=0,
    )
    result = run(
        ModelArguments(preset="clip-tiny", fusion_hidden_size=32, fusion_num_heads=4, lora_rank=4,
                       student_preset="none"),
        DataArguments(num_train_scenes=200, cache_dir=str(root / "cache"), max_eval_samples=50, image_size=32),
        DistillationArguments(compare_methods="", stage="distill", distill_steps=3, distill_learning_rate=1e-2,
                              detector_epochs=1, detector_train_samples=64),
        training_args,
    )
    assert not stale.exists() and result["training"]["distill"]["global_step"] == 3
    base = load_file(f"{summary['artefacts']['base_clip']}/model.safetensors")
    student = load_file(f"{result['artefacts']['student']}/model.safetensors")
    assert set(student) == set(base)  # merged: no adapter weights left
    adapted = ("q_proj", "k_proj", "v_proj", "out_proj")
    changed = {name for name, tensor in base.items() if (student[name] - tensor).abs().max() > 0}
    assert changed and all(any(part in name for part in adapted) for name in changed)
    model = AutoModel.from_pretrained(result["artefacts"]["student"], trust_remote_code=True)
    assert type(model).__name__ == "DCLIPModel"


def test_clip_cid_student_on_curated_rows(tiny_run, tmp_path):
    """--method dclip+clip_cid --train_indices: k-means centres of the teacher's embeddings saved once, every term
    logged, the student trained on the listed rows only."""
    import shutil

    import numpy as np

    root, _ = tiny_run
    shutil.copytree(root / "out", tmp_path / "out")
    np.save(tmp_path / "kept.npy", np.arange(0, 200, 2))
    training_args = TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=16, report_to=[], use_cpu=True,
        save_strategy="no", logging_steps=1, dataloader_num_workers=0, seed=0,
    )
    arguments = DistillationArguments(compare_methods="", stage="distill", method="dclip+clip_cid", distill_steps=2,
                                      num_clusters=5, detector_epochs=1, detector_train_samples=64)
    assert {term for term, weight in arguments.loss_weights().items() if weight} == {
        "contrastive", "cosine_image", "cosine_text", "cluster_image", "cluster_text", "instance"}
    result = run(
        ModelArguments(preset="clip-tiny", fusion_hidden_size=32, fusion_num_heads=4),
        DataArguments(num_train_scenes=200, cache_dir=str(root / "cache"), max_eval_samples=50, image_size=32,
                      train_indices=str(tmp_path / "kept.npy")),
        arguments, training_args,
    )
    assert result["training"]["distill"]["global_step"] == 2 and result["training"]["distill"]["train_rows"] == 100
    centers = np.load(tmp_path / "out" / "student" / "cluster_centers.npy")
    state = json.loads((tmp_path / "out" / "student" / "final" / "config.json").read_text())
    assert centers.shape == (5, state["projection_dim"]) and np.allclose(np.linalg.norm(centers, axis=1), 1, atol=1e-5)
    assert state["distillation_method"] == "dclip+clip_cid"
    with pytest.raises(ValueError, match="--online_teacher"):
        DistillationArguments(method="clip_cid", online_teacher=True)
    with pytest.raises(ValueError, match="--method must be one of"):
        DistillationArguments(method="cid")
    with pytest.raises(ValueError, match="--cluster_sample_size must be at least 1"):
        DistillationArguments(method="clip_cid", cluster_sample_size=0)
    assert DistillationArguments(method="clip_cid", cluster_text_weight=0.0).loss_weights() == {
        "contrastive": 0.0, "cosine_image": 0.0, "cosine_text": 0.0, "cluster_image": 1.0, "cluster_text": 0.0,
        "instance": 1.0, "affinity": 0.0}


def test_clip_cid_clusters_on_the_teachers_largest_regions(tiny_run, tmp_path, monkeypatch):
    """--method clip_cid --cluster_on region: k-means runs on the DCLIP teacher's embedding of each training image's
    largest region (read here from its tower features), although the CLIP-CID student's own teacher is the base CLIP;
    the classifier centres are in that teacher's space, one per non-empty cluster."""
    import shutil

    import dclip.curation
    from dclip.data.loading import load_data
    from dclip.targets import compute_teacher_features
    from dclip.teachers import FUSION, load_teacher

    root, summary = tiny_run
    shutil.copytree(root / "out", tmp_path / "out")
    clustered = []
    real_kmeans = dclip.curation.spherical_kmeans
    monkeypatch.setattr(dclip.curation, "spherical_kmeans",
                        lambda x, *a, **k: clustered.append(np.array(x)) or real_kmeans(x, *a, **k))
    training_args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=16, report_to=[],
                                      use_cpu=True, save_strategy="no", dataloader_num_workers=0, seed=0)
    data_args = DataArguments(num_train_scenes=200, cache_dir=str(root / "cache"), max_eval_samples=50, image_size=32)
    run(ModelArguments(preset="clip-tiny", fusion_hidden_size=32, fusion_num_heads=4), data_args,
        DistillationArguments(compare_methods="", stage="distill", method="clip_cid", cluster_on="region",
                              num_clusters=6, distill_steps=1, detector_epochs=1, detector_train_samples=64),
        training_args)
    teacher = load_teacher(str(tmp_path / "out" / "teacher" / "final"), FUSION)
    data, _ = load_data(data_args, seed=0)
    features = compute_teacher_features(data["train"], teacher.model, teacher.processor, batch_size=64,
                                        **data_args.region_settings()).with_format("numpy")
    boxes, mask = np.stack(features["region_boxes"]), np.stack(features["region_mask"])
    area = np.where(mask, (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1]), -1.0)
    largest = np.stack(features["region_features"])[np.arange(len(area)), area.argmax(1)]
    (embeddings,) = clustered
    np.testing.assert_allclose(embeddings, largest / np.linalg.norm(largest, axis=1, keepdims=True), atol=1e-5)
    centers = np.load(tmp_path / "out" / "student" / "cluster_centers.npy")
    assert centers.shape == (6, embeddings.shape[1])  # the k-means centres, in the region embeddings' space
    shutil.rmtree(tmp_path / "out" / "teacher")
    with pytest.raises(ValueError, match="--cluster_on region embeds each image's largest region"):
        run(ModelArguments(preset="clip-tiny", fusion_hidden_size=32, fusion_num_heads=4), data_args,
            DistillationArguments(compare_methods="", stage="distill", method="clip_cid", cluster_on="region",
                                  num_clusters=6, distill_steps=1, detector_epochs=1, detector_train_samples=64),
            training_args)
    # by default, a run without a DCLIP teacher clusters the CLIP-CID teacher's whole-image embeddings instead
    clustered.clear()
    run(ModelArguments(preset="clip-tiny", fusion_hidden_size=32, fusion_num_heads=4), data_args,
        DistillationArguments(compare_methods="", stage="distill", method="clip_cid", num_clusters=6,
                              distill_steps=1, detector_epochs=1, detector_train_samples=64), training_args)
    whole = np.stack(features["image_global_features"])  # the teacher's towers are that base CLIP
    np.testing.assert_allclose(clustered[0], whole / np.linalg.norm(whole, axis=1, keepdims=True), atol=1e-4)


def test_unknown_stage_is_named():
    with pytest.raises(ValueError, match="--stage must be one of"):
        DistillationArguments(stage="finetune")


def test_real_recipe_on_local_checkpoints_and_an_imagefolder(tiny_clip_dir, tmp_path):
    """--student_model / --teacher_model / --dataset_name: no pretraining, no detector stage, the checkpoint's own
    tokenizer and image processor; a corrupt image is skipped and counted, not a crash."""
    from dclip.data.scenes import SceneConfig, generate_scenes

    scenes = generate_scenes(SceneConfig(num_train=24, num_validation=1, num_test=8, image_size=32, seed=3),
                             num_proc=1)
    for split in ("train", "test"):
        folder = tmp_path / "data" / split
        folder.mkdir(parents=True)
        lines = []
        for index, row in enumerate(scenes[split]):
            row["image"].save(folder / f"{index}.png")
            lines.append(json.dumps({"file_name": f"{index}.png", "caption": row["caption"]}))
        if split == "train":
            (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
            lines.append(json.dumps({"file_name": "broken.png", "caption": "a red circle"}))
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    training_args = TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, report_to=[], use_cpu=True,
        save_strategy="no", dataloader_num_workers=0, seed=0,
    )
    summary = run(
        ModelArguments(student_model=str(tiny_clip_dir), teacher_model=str(tiny_clip_dir), fusion_hidden_size=32,
                       fusion_num_heads=4),
        DataArguments(dataset_name=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache")),
        DistillationArguments(compare_methods="", teacher_steps=2, distill_steps=2),
        training_args,
    )
    assert summary["artefacts"]["base_clip"] == str(tiny_clip_dir) and "detector" not in summary["artefacts"]
    assert set(summary["training"]) == {"teacher", "distill"}
    assert summary["data"]["train"]["rows"] == 24 and summary["data"]["train"]["skipped"] == {"corrupt_image": 1}
    assert set(summary["metrics"]) == {"base_clip", "teacher", "student"}
    assert not any(key.startswith("zeroshot_") for key in summary["metrics"]["student"])  # no labels in this data
    student_config = json.loads((Path(summary["artefacts"]["student"]) / "config.json").read_text())
    assert student_config["base_model_name_or_path"] == str(tiny_clip_dir)
    teacher_config = json.loads((Path(summary["artefacts"]["teacher"]) / "config.json").read_text())
    assert teacher_config["embed_dim"] == student_config["projection_dim"]


def test_dataset_without_student_checkpoint_is_refused(tmp_path):
    training_args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="--dataset_name needs --student_model"):
        run(ModelArguments(), DataArguments(dataset_name="somewhere"), DistillationArguments(), training_args)


def test_cpu_threads_are_shared_among_local_processes(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert cpu_threads_per_process() == 4
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert cpu_threads_per_process() == 8 and cpu_threads_per_process(3) == 3
    with pytest.raises(ValueError, match="--cpu_threads"):
        cpu_threads_per_process(0)


def test_student_folder_runs_in_the_zero_shot_pipeline(tiny_run):
    from transformers import pipeline

    _, summary = tiny_run
    classifier = pipeline("zero-shot-image-classification", model=summary["artefacts"]["student"],
                          trust_remote_code=True)
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    scores = classifier(image, candidate_labels=["red circle", "blue square", "green star"])
    assert {score["label"] for score in scores} == {"red circle", "blue square", "green star"}
    assert sum(score["score"] for score in scores) == pytest.approx(1.0, abs=1e-5)
    assert type(classifier.model).__name__ == "DCLIPModel"


def test_saved_processor_is_reused_only_for_the_same_source(tmp_path):
    from dclip.data.scenes import SceneConfig, generate_scenes

    data = generate_scenes(SceneConfig(num_train=40, num_validation=1, num_test=1, image_size=32, seed=1), num_proc=1)
    folder = tmp_path / "processor"
    first = build_processor(ModelArguments(), DataArguments(image_size=32, vocab_size=600), data, None, folder)
    again = build_processor(ModelArguments(), DataArguments(image_size=32, vocab_size=600), data, None, folder)
    assert again.tokenizer.get_vocab() == first.tokenizer.get_vocab()
    other = build_processor(ModelArguments(), DataArguments(image_size=64, vocab_size=600), data, None, folder)
    assert other.image_processor.crop_size["height"] == 64  # not the saved 32 px one


def test_ultralytics_is_imported_as_one_process_under_a_distributed_launch():
    import subprocess
    import sys

    script = ("import os; from dclip.detector import import_ultralytics_as_one_process as f; f(); "
              "import ultralytics.utils as u; print(u.RANK, u.LOCAL_RANK, os.environ['WORLD_SIZE'])")
    env = {**__import__("os").environ, "WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-3:] == ["-1", "-1", "2"]


# ----- a stage run again on a copy of the tiny run ------------------------------------------------------------------


def _copy_of_tiny_run(tiny_run, tmp_path, keep_cached_maps: bool = True) -> Path:
    """The tiny run's outputs and data cache, copied; without `keep_cached_maps`, not the cached `datasets.map`
    results (teacher features and targets), so that a stage run on the copy computes them afresh."""
    import shutil

    root, _ = tiny_run
    shutil.copytree(root / "out", tmp_path / "out")
    ignore = None if keep_cached_maps else shutil.ignore_patterns("cache-*.arrow")
    shutil.copytree(root / "cache", tmp_path / "cache", ignore=ignore)
    return tmp_path


def _run_stage(folder: Path, data_kwargs: dict | None = None, resume: bool = False, **distill_kwargs) -> dict:
    training_args = TrainingArguments(
        output_dir=str(folder / "out"), per_device_train_batch_size=16, report_to=[], use_cpu=True, save_steps=2,
        logging_steps=1, dataloader_num_workers=0, seed=0, resume_from_checkpoint="true" if resume else None,
    )
    arguments = dict(pretrain_steps=3, teacher_steps=3, distill_steps=3, detector_epochs=1, detector_train_samples=64)
    return run(ModelArguments(**TINY_MODEL),
               DataArguments(cache_dir=str(folder / "cache"), **TINY_DATA, **(data_kwargs or {})),
               DistillationArguments(compare_methods="", **{**arguments, **distill_kwargs}), training_args)


class Recorder:
    """Wraps a method on its class and records each call's keyword arguments (then calls the original)."""

    def __init__(self, monkeypatch, owner, name: str):
        self.calls: list[dict] = []
        original = getattr(owner, name)

        def wrapper(this, *args, **kwargs):
            self.calls.append({"self": this, "args": args, **kwargs})
            return original(this, *args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)


def _region_calls(processor_calls: list[dict]) -> list[dict]:
    """The processor calls that made teacher inputs (regions and spans)."""
    return [call for call in processor_calls if call.get("return_regions") or call.get("region_boxes") is not None]


def test_resumed_stage_continues_from_its_checkpoint_and_matches_an_uninterrupted_run(tiny_run, tmp_path,
                                                                                    monkeypatch):
    """The student stage killed after its step-2 checkpoint: resuming trains only the last step, from that
    checkpoint's weights, optimizer and data position, and ends with the uninterrupted run's weights."""
    import shutil

    _, summary = tiny_run
    folder = _copy_of_tiny_run(tiny_run, tmp_path)
    shutil.rmtree(folder / "out" / "student" / "final")
    shutil.rmtree(folder / "out" / "student" / "checkpoint-3")  # killed between the step-2 and step-3 saves
    steps = Recorder(monkeypatch, DCLIPTrainer, "training_step")
    result = _run_stage(folder, resume=True, stage="distill")
    distill = result["training"]["distill"]
    assert distill["resumed_from"] is not None and Path(distill["resumed_from"]).name == "checkpoint-2"
    assert distill["global_step"] == 3
    assert len(steps.calls) == 1  # one step run: from step 2 to 3
    resumed = load_file(f"{result['artefacts']['student']}/model.safetensors")
    uninterrupted = load_file(f"{summary['artefacts']['student']}/model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, atol=1e-6, rtol=1e-5, msg=name)


def test_distillation_trains_every_term_of_the_method(tiny_run):
    """The published method, dclip+instance: each logged student step has DCLIP's contrastive and cosine terms and
    CLIP-CID's instance term, and the loss is their weighted sum (contrastive 1, cosine 10 on the image, 3 on the
    text, instance 0.3); DCLIP alone has no instance term; the base CLIP is trained on the contrastive term alone."""
    root, _ = tiny_run
    assert DistillationArguments().method == "dclip+instance"
    assert DistillationArguments().loss_weights() == {
        "contrastive": 1.0, "cosine_image": 10.0, "cosine_text": 3.0, "cluster_image": 0.0, "cluster_text": 0.0,
        "instance": 0.3, "affinity": 0.0}
    assert DistillationArguments(method="dclip").loss_weights()["instance"] == 0.0
    # the 0.3 is dclip+instance's own: CLIP-CID keeps its instance term at 1, also beside a 0.3 published student
    assert DistillationArguments(method="clip_cid").loss_weights()["instance"] == 1.0
    assert DistillationArguments().loss_weights("instance")["instance"] == 1.0
    assert DistillationArguments(cosine_text_weight=0.25).loss_weights()["cosine_text"] == 0.25
    logs = {}
    for stage in ("base_clip", "student"):
        state = json.loads((root / "out" / stage / "checkpoint-3" / "trainer_state.json").read_text())
        logs[stage] = [entry for entry in state["log_history"] if "loss" in entry]
    assert [entry["step"] for entry in logs["student"]] == [1, 2, 3]
    for entry in logs["student"]:
        terms = {key: value for key, value in entry.items() if key.startswith("loss_")}
        assert set(terms) == {"loss_contrastive", "loss_cosine_image", "loss_cosine_text", "loss_instance"}
        assert terms["loss_cosine_image"] > 0 and terms["loss_cosine_text"] > 0 and terms["loss_instance"] > 0
        expected = (terms["loss_contrastive"] + 10 * terms["loss_cosine_image"] + 3 * terms["loss_cosine_text"]
                    + 0.3 * terms["loss_instance"])
        assert entry["loss"] == pytest.approx(expected, abs=1e-4)
    for entry in logs["base_clip"]:
        assert {key for key in entry if key.startswith("loss_")} == {"loss_contrastive"}
        assert entry["loss"] == pytest.approx(entry["loss_contrastive"], abs=1e-5)


@pytest.mark.parametrize("annotated", [True, False], ids=["annotated", "detected"])
@pytest.mark.parametrize("stage", ["teacher", "distill"])
def test_use_annotated_regions_decides_the_teacher_inputs(tiny_run, tmp_path, monkeypatch, stage, annotated):
    """--use_annotated_regions: the teacher stage's tower features and the student stage's teacher targets are made
    from the rows' own boxes and spans; without it, from the detector's boxes and the extractor's spans."""
    from processing_dclip import DCLIPProcessor

    folder = _copy_of_tiny_run(tiny_run, tmp_path, keep_cached_maps=False)
    calls = Recorder(monkeypatch, DCLIPProcessor, "__call__")
    _run_stage(folder, data_kwargs={"use_annotated_regions": annotated, "max_train_samples": 48}, stage=stage)
    made = _region_calls(calls.calls)
    assert sum(len(call["images"]) for call in made) >= 48  # every training row
    for call in made:
        if annotated:
            assert call["region_boxes"] is not None and len(call["region_boxes"]) == len(call["images"])
            assert call["spans"] is not None and len(call["spans"]) == len(call["text"])
            assert any(len(boxes) > 1 for boxes in call["region_boxes"])  # the scenes' objects
        else:
            assert call["region_boxes"] is None and call["spans"] is None


@pytest.mark.parametrize("count", [None, 0])
def test_teacher_caption_negatives_reach_the_pairwise_loss(tiny_run, tmp_path, monkeypatch, count):
    """--teacher_caption_negatives (default on the embedded scenes, which have hard negatives: 2): every training
    step of the teacher gets each row's two own hard negatives through its text tower, and those features are the
    rows' negatives encoded by the teacher's processor; 0: none."""
    from datasets import Dataset

    from dclip.targets import compute_negative_features
    from modeling_dclip import DCLIPTeacherModel
    from processing_dclip import DCLIPProcessor

    folder = _copy_of_tiny_run(tiny_run, tmp_path)
    calls = Recorder(monkeypatch, DCLIPTeacherModel, "forward")
    training_args = TrainingArguments(output_dir=str(folder / "out"), per_device_train_batch_size=16, report_to=[],
                                      use_cpu=True, save_steps=2, logging_steps=1, dataloader_num_workers=0, seed=0)
    run(ModelArguments(**TINY_MODEL, teacher_caption_negatives=count),
        DataArguments(cache_dir=str(folder / "cache"), **TINY_DATA, max_train_samples=32),
        DistillationArguments(compare_methods="", stage="teacher", teacher_steps=2), training_args)
    steps = [call for call in calls.calls if call.get("return_loss")]
    assert len(steps) == 2
    if count == 0:
        assert not any("negative_text_global_features" in call for call in steps)
        return
    for call in steps:
        assert call["negative_text_global_features"].shape[:2] == (16, 2) and call["negative_mask"].all()
        assert call["negative_span_features"].shape[:3] == call["negative_span_mask"].shape

    teacher_folder = folder / "out" / "teacher" / "final"
    teacher = DCLIPTeacherModel.from_pretrained(teacher_folder).eval()
    processor = DCLIPProcessor.from_pretrained(teacher_folder)
    rows = Dataset.from_dict({"caption": ["a red circle", "two blue squares"],
                              "hard_negatives": [["a blue circle", "a red square"], ["three blue squares"]]})
    features = compute_negative_features(rows, teacher, processor, count=2).with_format("torch")[:]
    assert features["negative_mask"].tolist() == [[True, True], [True, False]]
    with torch.no_grad():
        inputs = processor(text=["a blue circle", "a red square", "three blue squares"], return_spans=True)
        expected = teacher.encode_text_side(inputs["input_ids"], inputs["attention_mask"], inputs["span_input_ids"],
                                            inputs["span_attention_mask"], inputs["span_mask"])
    got = features["negative_text_global_features"]
    torch.testing.assert_close(torch.stack([got[0, 0], got[0, 1], got[1, 0]]), expected.global_embeds,
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="hard_negatives"):
        compute_negative_features(rows.remove_columns("hard_negatives"), teacher, processor, count=2)


@pytest.mark.parametrize("annotated", [True, False], ids=["annotated", "detected"])
def test_online_teacher_gets_the_rows_regions_and_spans(tiny_run, tmp_path, monkeypatch, annotated):
    """--online_teacher: each batch's teacher forward gets region crops, boxes and spans: with
    --use_annotated_regions the rows' own, else the detector's and the extractor's."""
    from modeling_dclip import DCLIPTeacherModel
    from processing_dclip import DCLIPProcessor

    folder = _copy_of_tiny_run(tiny_run, tmp_path)
    processor_calls = Recorder(monkeypatch, DCLIPProcessor, "__call__")
    teacher_calls = Recorder(monkeypatch, DCLIPTeacherModel, "forward")
    result = _run_stage(folder, data_kwargs={"use_annotated_regions": annotated, "max_train_samples": 32},
                        stage="distill", online_teacher=True, distill_steps=2)
    assert result["training"]["distill"]["global_step"] == 2
    assert len(teacher_calls.calls) == 2  # one teacher forward per batch, nothing cached
    for call in teacher_calls.calls:
        for name in ("region_pixel_values", "region_boxes", "span_input_ids", "span_attention_mask"):
            assert call.get(name) is not None, name
        assert call["region_mask"].sum(1).min() >= 1 and call["span_mask"].sum(1).min() >= 1
        if annotated:
            assert (call["region_mask"].sum(1) > 1).any()  # the scenes' objects, not the whole image
    made = _region_calls(processor_calls.calls)
    assert len(made) >= 2
    for call in made:
        assert (call["region_boxes"] is not None) == annotated and (call["spans"] is not None) == annotated


def test_resume_from_a_named_checkpoint_folder(tiny_run, tmp_path, monkeypatch):
    """--resume_from_checkpoint <folder> resumes from that folder, not from the stage's last checkpoint (here made
    unloadable, so a run that ignored the path would fail)."""
    import shutil

    root, _ = tiny_run
    shutil.copytree(root / "out", tmp_path / "out")
    arguments = (
        ModelArguments(preset="clip-tiny", fusion_hidden_size=32, fusion_num_heads=4),
        DataArguments(num_train_scenes=200, cache_dir=str(root / "cache"), max_eval_samples=50, image_size=32),
        DistillationArguments(compare_methods="", stage="distill", distill_steps=3, detector_epochs=1,
                              detector_train_samples=64),
    )

    def distill(**overrides):
        training_args = TrainingArguments(
            output_dir=str(tmp_path / "out"), per_device_train_batch_size=16, report_to=[], use_cpu=True,
            save_steps=1, logging_steps=1, dataloader_num_workers=0, seed=0, **overrides)
        return run(*arguments, training_args)

    first = distill()["training"]["distill"]
    assert first["resumed_from"] is None and first["global_step"] == 3
    student = tmp_path / "out" / "student"
    assert (student / "checkpoint-1").is_dir() and (student / "checkpoint-3").is_dir()
    (student / "checkpoint-3" / "model.safetensors").unlink()  # its trainer_state.json stays: "complete"
    # the stage finished (its final folder is there), but resuming it by name trains it again
    named = str(student / "checkpoint-1")
    steps = Recorder(monkeypatch, DCLIPTrainer, "training_step")
    second = distill(resume_from_checkpoint=named)["training"]["distill"]
    assert len(steps.calls) == 2  # steps 2 and 3, from the named checkpoint
    assert second["resumed_from"] == named and second["global_step"] == 3
    state = json.loads((student / "checkpoint-3" / "trainer_state.json").read_text())
    new_steps = [entry["step"] for entry in state["log_history"] if "loss" in entry]
    assert new_steps == [1, 2, 3]  # step 1 from the named checkpoint's history, then 2 and 3 trained again
    with pytest.raises(ValueError, match="not a complete Trainer checkpoint"):
        distill(resume_from_checkpoint=str(tmp_path / "nowhere"))
    elsewhere = tmp_path / "elsewhere" / "checkpoint-1"
    shutil.copytree(student / "checkpoint-1", elsewhere)
    with pytest.raises(ValueError, match="run its stage alone with --stage"):
        run(arguments[0], arguments[1], DistillationArguments(compare_methods="", stage="all", detector_epochs=1),
            TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True,
                              resume_from_checkpoint=str(elsewhere)))
