"""Streaming distillation (`--streaming`): webdataset shards read as a stream, each row's teacher targets found by its
key among the sharded targets (`examples/compute_targets.py`), the same losses as the map-style run in the same order,
and a resumed run continuing at the right sample."""

import dataclasses
import io
import json
import shutil
import tarfile

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainingArguments

from dclip.arguments import DataArguments, DistillationArguments, ModelArguments
from dclip.data.loading import load_data
from dclip.data.scenes import SceneConfig, generate_scenes
from dclip.pipeline import run
from dclip.shards import compute_target_shards, write_manifest
from dclip.teachers import load_teacher


@pytest.fixture(scope="module")
def webdataset_shards(tmp_path_factory):
    """2 tar shards of 20 scenes each; every 4th sample has a second caption (two rows of one image)."""
    root = tmp_path_factory.mktemp("wds")
    scenes = generate_scenes(SceneConfig(num_train=40, num_validation=1, num_test=1, seed=5), num_proc=1)["train"]
    for shard in range(2):
        with tarfile.open(root / f"scenes-{shard:03d}.tar", "w") as tar:
            for index in range(shard * 20, shard * 20 + 20):
                buffer = io.BytesIO()
                scenes[index]["image"].save(buffer, format="PNG")
                captions = [scenes[index]["caption"]] + ([f"another view: {scenes[index]['caption']}"]
                                                         if index % 4 == 0 else [])
                for name, data in ((f"{index:05d}.png", buffer.getvalue()),
                                   (f"{index:05d}.json", json.dumps({"caption": captions}).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return root


def _data_args(shards, cache, streaming):
    return DataArguments(dataset_name=str(shards / "scenes-*.tar"), dataset_format="webdataset", eval_split="train",
                         cache_dir=str(cache), max_eval_samples=16, streaming=streaming)


def _distill(tiny_clip_dir, data_args, targets, output, steps=3, resume=False, **training):
    teacher = targets.parent / "teacher"
    training_args = TrainingArguments(output_dir=str(output), per_device_train_batch_size=8, report_to=[],
                                      use_cpu=True, logging_steps=1, save_steps=training.pop("save_steps", steps),
                                      dataloader_num_workers=0, seed=0, resume_from_checkpoint=resume or None,
                                      **training)
    return run(ModelArguments(student_model=str(tiny_clip_dir), teacher_model=str(teacher), teacher_kind="clip"),
               data_args, DistillationArguments(stage="distill", method="dclip", compare_methods="",
                                                distill_steps=steps, distill_learning_rate=1e-2,
                                                teacher_targets=str(targets)), training_args)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tokenizer, image_processor):
    """Another tiny CLIP (other weights, the same processor) as the teacher."""
    from conftest import tiny_clip_config_kwargs
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    path = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(1)
    CLIPModel(CLIPConfig(**tiny_clip_config_kwargs(tokenizer))).save_pretrained(path)
    CLIPProcessor(image_processor, tokenizer).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def targets(webdataset_shards, teacher_dir):
    """The teacher's targets on the map-style read of the shards, in shards of 16 rows."""
    folder = webdataset_shards / "targets"
    train = load_data(_data_args(webdataset_shards, webdataset_shards / "cache", False), seed=0)[0]["train"]
    assert len(train) == 50  # 40 images, 10 of them with two captions
    shutil.copytree(teacher_dir, webdataset_shards / "teacher")
    teacher = load_teacher(str(webdataset_shards / "teacher"), "clip")
    compute_target_shards(train, teacher, folder, shard_size=16, process_index=0, num_processes=1)
    write_manifest(train, teacher, folder, shard_size=16)
    return folder


def _logged(output):
    state = json.loads(next((output / "student").glob("checkpoint-*/trainer_state.json")).read_text())
    return [entry for entry in state["log_history"] if "loss" in entry]


def test_a_streamed_run_has_the_map_style_runs_losses_in_the_same_order(webdataset_shards, targets, tiny_clip_dir,
                                                                        tmp_path, monkeypatch):
    from torch.utils.data import SequentialSampler

    from dclip.trainer import DCLIPTrainer

    # the map-style run reads its rows in order here, as a stream does
    monkeypatch.setattr(DCLIPTrainer, "_get_train_sampler", lambda self, *args: SequentialSampler(self.train_dataset))
    cache = webdataset_shards / "cache"
    mapped = _distill(tiny_clip_dir, _data_args(webdataset_shards, cache, False), targets, tmp_path / "map")
    streamed = _distill(tiny_clip_dir, _data_args(webdataset_shards, cache, True), targets, tmp_path / "stream")
    assert streamed["training"]["distill"]["train_rows"] is None and mapped["training"]["distill"]["train_rows"] == 50
    steps = {name: _logged(tmp_path / name) for name in ("map", "stream")}
    assert len(steps["map"]) == len(steps["stream"]) == 3
    for mapped_step, streamed_step in zip(steps["map"], steps["stream"]):
        for term in ("loss", "loss_contrastive", "loss_cosine_image", "loss_cosine_text"):
            assert streamed_step[term] == pytest.approx(mapped_step[term], rel=1e-4), term
    assert steps["stream"][0]["loss_cosine_image"] > 0.05  # the targets were read: the student is not the teacher


def test_a_resumed_stream_continues_at_the_right_sample(webdataset_shards, targets, tiny_clip_dir, tmp_path):
    cache = webdataset_shards / "cache"
    data_args = _data_args(webdataset_shards, cache, True)
    _distill(tiny_clip_dir, data_args, targets, tmp_path / "whole", steps=4, save_steps=2)
    # the same run killed after its step-2 checkpoint, then resumed
    _distill(tiny_clip_dir, data_args, targets, tmp_path / "killed", steps=4, save_steps=2)
    shutil.rmtree(tmp_path / "killed" / "student" / "checkpoint-4")
    shutil.rmtree(tmp_path / "killed" / "student" / "final")
    resumed = _distill(tiny_clip_dir, data_args, targets, tmp_path / "killed", steps=4, save_steps=2, resume=True)
    assert resumed["training"]["distill"]["resumed_from"].endswith("checkpoint-2")
    whole = load_file(tmp_path / "whole" / "student" / "final" / "model.safetensors")
    again = load_file(tmp_path / "killed" / "student" / "final" / "model.safetensors")
    for name, tensor in whole.items():
        torch.testing.assert_close(again[name], tensor, atol=1e-6, rtol=1e-5, msg=name)


def test_streaming_refuses_what_needs_the_whole_split(webdataset_shards, tiny_clip_dir, targets):
    from dclip.pipeline import check_streaming_arguments

    data_args = _data_args(webdataset_shards, webdataset_shards / "cache", True)
    model_args = ModelArguments(student_model=str(tiny_clip_dir), teacher_model=str(tiny_clip_dir))
    with pytest.raises(ValueError, match="--stage distill") as error:
        check_streaming_arguments(model_args, data_args, DistillationArguments(method="clip_cid", compare_methods=""))
    assert "no cluster terms (clip_cid" in str(error.value)
    with pytest.raises(ValueError, match="no --train_indices or --max_train_samples"):
        check_streaming_arguments(model_args, dataclasses.replace(data_args, max_train_samples=10),
                                  DistillationArguments(stage="distill", method="none", compare_methods=""))
    with pytest.raises(ValueError, match="--teacher_targets or --online_teacher for the dclip student"):
        check_streaming_arguments(model_args, data_args, DistillationArguments(stage="distill", method="dclip",
                                                                               compare_methods=""))
    check_streaming_arguments(model_args, data_args, DistillationArguments(stage="distill", method="dclip",
                                                                           compare_methods="none",
                                                                           teacher_targets=str(targets)))


def test_a_streamed_row_without_targets_is_named(webdataset_shards, targets):
    from dclip.streaming import TargetLookup

    train = load_data(_data_args(webdataset_shards, webdataset_shards / "cache", False), seed=0)[0]["train"]
    lookup = TargetLookup(targets)
    found = lookup(train[:3])
    assert found["teacher_image_embeds"].shape == (3, 16) and np.isfinite(found["teacher_text_embeds"]).all()
    with pytest.raises(KeyError, match="image_id '00001' and caption 'a new caption'"):
        lookup({"image_id": ["00001"], "caption": ["a new caption"]})


def test_each_process_streams_its_own_rows_with_their_targets(webdataset_shards, targets):
    """The streamed split as the Trainer's data loader reaches 2 processes (accelerate's `prepare_data_loader`, not
    dispatching): disjoint parts that together are the whole stream, each row with the targets of its own key."""
    from types import SimpleNamespace

    from accelerate.data_loader import prepare_data_loader
    from torch.utils.data import DataLoader

    from dclip.shards import load_target_shards
    from dclip.streaming import streamed_train

    data_args = _data_args(webdataset_shards, webdataset_shards / "cache", True)
    stream = load_data(data_args, seed=0)[0]["train"]
    mapped = load_target_shards(targets, load_data(_data_args(webdataset_shards, webdataset_shards / "cache", False),
                                                   seed=0)[0]["train"])
    expected = {(row["image_id"], row["caption"]): row["teacher_image_embeds"] for row in mapped}
    teacher = load_teacher(str(webdataset_shards / "teacher"), "clip")
    context = SimpleNamespace(args=SimpleNamespace(teacher_targets=str(targets)), data={"train": stream})
    train = streamed_train(context, teacher, "dclip")
    seen = []
    for rank in range(2):
        loader = prepare_data_loader(DataLoader(train, batch_size=4, collate_fn=list), num_processes=2,
                                     process_index=rank, dispatch_batches=False, split_batches=False,
                                     put_on_device=False)
        rows = [row for batch in loader for row in batch]
        seen.append([(row["image_id"], row["caption"]) for row in rows])
        for row in rows:
            np.testing.assert_allclose(row["teacher_image_embeds"], expected[(row["image_id"], row["caption"])],
                                       atol=1e-6)
    assert seen[0] and seen[1] and not set(seen[0]) & set(seen[1])
    assert len(seen[0]) + len(seen[1]) == len(expected) and set(seen[0]) | set(seen[1]) == set(expected)


def test_hub_data_without_an_id_column_streams_with_its_targets(tmp_path, teacher_dir):
    """A Hub-layout parquet set with no `image_id` (one image stored twice, under two captions): each image's id
    comes from its bytes, the same read map-style and streamed, so that streamed rows find the targets computed on
    the map-style read; the rows of the twice-stored image share one id."""
    import hashlib

    from datasets import Dataset
    from datasets import Image as ImageFeature

    from dclip.shards import compute_target_shards, write_manifest
    from dclip.streaming import TargetLookup

    scenes = generate_scenes(SceneConfig(num_train=12, num_validation=1, num_test=1, seed=7), num_proc=1)["train"]
    images = [scenes[i]["image"] for i in range(12)] + [scenes[3]["image"]]
    captions = [scenes[i]["caption"] for i in range(12)] + ["the same picture, described again"]
    (tmp_path / "hub" / "data").mkdir(parents=True)
    Dataset.from_dict({"image": images, "caption": captions}).cast_column("image", ImageFeature()).to_parquet(
        str(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet"))
    args = dict(dataset_name=str(tmp_path / "hub"), eval_split="train", cache_dir=str(tmp_path / "cache"),
                max_eval_samples=4)
    mapped = load_data(DataArguments(**args), seed=0)[0]["train"]
    streamed = list(load_data(DataArguments(**args, streaming=True), seed=0)[0]["train"])
    assert [row["image_id"] for row in streamed] == mapped["image_id"] and len(mapped) == 13
    stored = mapped.cast_column("image", ImageFeature(decode=False))["image"]
    assert mapped["image_id"][0] == "sha1:" + hashlib.sha1(stored[0]["bytes"]).hexdigest()[:20]
    assert mapped["image_id"][3] == mapped["image_id"][12] and len(set(mapped["image_id"])) == 12
    teacher = load_teacher(str(teacher_dir), "clip")
    compute_target_shards(mapped, teacher, tmp_path / "targets", shard_size=5, process_index=0, num_processes=1)
    write_manifest(mapped, teacher, tmp_path / "targets", shard_size=5)
    found = TargetLookup(tmp_path / "targets")({"image_id": [row["image_id"] for row in streamed],
                                               "caption": [row["caption"] for row in streamed]})
    assert found["teacher_image_embeds"].shape[0] == 13 and np.isfinite(found["teacher_image_embeds"]).all()
