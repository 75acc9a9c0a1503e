"""Teacher targets as a sharded, resumable job (`dclip.shards`)."""

import json
import logging

import numpy as np
import pytest
from conftest import fused_teacher
from datasets import Dataset, load_from_disk

from dclip.data.scenes import SceneConfig, generate_scenes
from dclip.shards import (
    compute_target_shards,
    image_batches,
    load_target_shards,
    shard_name,
    stored_image_keys,
    write_manifest,
)
from dclip.targets import compute_teacher_targets
from dclip.teachers import as_teacher


CAPTIONS_PER_IMAGE = 5


@pytest.fixture(scope="module")
def coco_style(tmp_path_factory):
    """4 scenes, each image with 5 captions in adjacent rows (COCO's layout), saved and reloaded as a run's data
    is (a stable fingerprint)."""
    scenes = generate_scenes(SceneConfig(num_train=8, num_validation=1, num_test=1, seed=3), num_proc=1)["train"]
    rows = {"image": [], "caption": [], "boxes": [], "spans": []}
    for image in range(4):
        for caption in range(CAPTIONS_PER_IMAGE):
            source = scenes[(image + caption) % len(scenes)]  # another scene's caption for all but the first
            rows["image"].append(scenes[image]["image"])
            rows["boxes"].append(scenes[image]["boxes"])
            rows["caption"].append(source["caption"])
            rows["spans"].append(source["spans"])
    path = tmp_path_factory.mktemp("coco") / "train"
    Dataset.from_dict(rows, features=scenes.select_columns(list(rows)).features).save_to_disk(path)
    return load_from_disk(str(path))


@pytest.fixture(params=["clip", "dclip"])
def teacher(request, tiny_clip, processor):
    model = fused_teacher(tiny_clip) if request.param == "dclip" else tiny_clip
    return as_teacher(model, processor)


def count_vision_rows(teacher):
    """Images through the teacher's vision tower, counted by a hook (regions included for a DCLIP teacher)."""
    counted = []

    def hook(module, args, kwargs):
        pixels = kwargs.get("pixel_values", args[0] if args else None)
        counted.append(pixels.shape[0])

    handle = teacher.model.vision_model.register_forward_pre_hook(hook, with_kwargs=True)
    return counted, handle


def test_sharded_targets_equal_the_per_pair_pass_with_each_image_encoded_once(coco_style, teacher, tmp_path):
    counted, handle = count_vision_rows(teacher)
    try:
        expected = compute_teacher_targets(coco_style, teacher, batch_size=7, device="cpu")
        per_pair = sum(counted)
        counted.clear()
        # batches of 7 rows would split an image's captions: they are cut where the image changes instead
        stats = compute_target_shards(coco_style, teacher, tmp_path, shard_size=10, batch_size=7,
                                      process_index=0, num_processes=1)
        sharded = sum(counted)
    finally:
        handle.remove()
    # once per image: 4 images (and their regions), against once per caption in the per-pair pass
    assert stats["images_encoded"] == 4 and stats["computed"] == 2 and stats["rows"] == 20
    assert sharded * CAPTIONS_PER_IMAGE == per_pair
    write_manifest(coco_style, teacher, tmp_path, shard_size=10)
    joined = load_target_shards(tmp_path, coco_style, teacher=teacher)
    assert joined.column_names == [*coco_style.column_names, "teacher_image_embeds", "teacher_text_embeds"]
    for column in ("teacher_image_embeds", "teacher_text_embeds"):
        np.testing.assert_allclose(np.array(joined[column]), np.array(expected[column]), atol=1e-5)


def test_two_processes_write_the_same_targets_as_one(coco_style, tiny_clip, processor, tmp_path):
    teacher = as_teacher(fused_teacher(tiny_clip), processor)
    compute_target_shards(coco_style, teacher, tmp_path / "one", shard_size=6, batch_size=4,
                          process_index=0, num_processes=1)
    shares = [compute_target_shards(coco_style, teacher, tmp_path / "two", shard_size=6, batch_size=4,
                                    process_index=rank, num_processes=2) for rank in range(2)]
    assert [share["computed"] for share in shares] == [2, 2]  # shards 0, 2 and 1, 3
    for folder in ("one", "two"):
        write_manifest(coco_style, teacher, tmp_path / folder, shard_size=6)
    one, two = load_target_shards(tmp_path / "one"), load_target_shards(tmp_path / "two")
    assert one["sample_id"] == two["sample_id"] == list(range(20))
    for column in ("teacher_image_embeds", "teacher_text_embeds"):
        np.testing.assert_allclose(np.array(two[column]), np.array(one[column]), atol=1e-6)


def test_a_rerun_recomputes_only_unfinished_or_corrupt_shards(coco_style, tiny_clip, processor, tmp_path,
                                                              monkeypatch, caplog):
    import dclip.shards as shards

    teacher = as_teacher(tiny_clip, processor)
    written = []
    real_write = shards._write_shard

    def killed_after_two(output_dir, number, *args):
        if len(written) == 2:
            raise KeyboardInterrupt("killed")
        written.append(number)
        real_write(output_dir, number, *args)

    monkeypatch.setattr(shards, "_write_shard", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        compute_target_shards(coco_style, teacher, tmp_path, shard_size=4, process_index=0, num_processes=1)
    with pytest.raises(RuntimeError, match="3 shard\\(s\\) missing"):
        write_manifest(coco_style, teacher, tmp_path, shard_size=4)
    monkeypatch.setattr(shards, "_write_shard", real_write)
    stats = compute_target_shards(coco_style, teacher, tmp_path, shard_size=4, process_index=0, num_processes=1)
    assert (stats["skipped"], stats["computed"]) == (2, 3)

    # a corrupt shard (its bytes changed after its sidecar) is recomputed, and so is every shard after a change of
    # settings (here the stored dtype)
    path = tmp_path / shard_name(1)
    path.write_bytes(path.read_bytes()[:-7] + b"corrupt")
    with caplog.at_level(logging.WARNING, logger="dclip.shards"):
        stats = compute_target_shards(coco_style, teacher, tmp_path, shard_size=4, process_index=0, num_processes=1)
    assert (stats["skipped"], stats["computed"]) == (4, 1)
    assert f"{path} does not match its checksum" in caplog.text  # named
    write_manifest(coco_style, teacher, tmp_path, shard_size=4)
    full = load_target_shards(tmp_path)
    stats = compute_target_shards(coco_style, teacher, tmp_path, shard_size=4, dtype="float16", process_index=0,
                                  num_processes=1)
    assert (stats["skipped"], stats["computed"]) == (0, 5)
    write_manifest(coco_style, teacher, tmp_path, shard_size=4, dtype="float16")
    half = load_target_shards(tmp_path)
    assert half.features["teacher_image_embeds"].feature.dtype == "float32"
    np.testing.assert_allclose(np.array(half["teacher_image_embeds"]), np.array(full["teacher_image_embeds"]),
                               atol=2e-3)


def test_targets_refuse_other_data_teachers_and_corrupt_files_by_name(coco_style, tiny_clip, processor, tmp_path):
    teacher = as_teacher(tiny_clip, processor)
    compute_target_shards(coco_style, teacher, tmp_path, shard_size=8, process_index=0, num_processes=1)
    write_manifest(coco_style, teacher, tmp_path, shard_size=8)
    with pytest.raises(ValueError, match="computed on other data"):
        load_target_shards(tmp_path, coco_style.select(range(10)))
    other = as_teacher(fused_teacher(tiny_clip), processor)
    with pytest.raises(ValueError, match="other teacher weights"):
        load_target_shards(tmp_path, coco_style, teacher=other)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["settings"]["rows"] == 20 and len(manifest["shards"]) == 3
    path = tmp_path / shard_name(2)
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(ValueError, match=shard_name(2)):
        load_target_shards(tmp_path, coco_style)
    with pytest.raises(FileNotFoundError, match="compute_targets"):
        load_target_shards(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="--shard_size"):
        compute_target_shards(coco_style, teacher, tmp_path, shard_size=0, process_index=0, num_processes=1)


def test_teacher_targets_and_an_online_teacher_are_refused_together():
    from dclip.arguments import DistillationArguments

    with pytest.raises(ValueError, match="--online_teacher and --teacher_targets"):
        DistillationArguments(online_teacher=True, teacher_targets="outputs/targets")


def test_batches_are_cut_where_the_image_changes(coco_style):
    keys = stored_image_keys(coco_style, 0, 20)
    assert len(set(keys)) == 4 and keys[:5] == [keys[0]] * 5 and keys[5] != keys[4]  # from the stored PNG bytes
    assert image_batches(0, 20, 7, keys) == [(0, 10), (10, 20)]
    assert image_batches(0, 20, 5, keys) == [(0, 5), (5, 10), (10, 15), (15, 20)]
    assert image_batches(3, 12, 4, keys[3:12]) == [(3, 10), (10, 12)]
    assert image_batches(0, 5, 2, None) == [(0, 2), (2, 4), (4, 5)]
    with_ids = coco_style.add_column("image_id", [f"coco-{row // 5}" for row in range(20)])
    assert stored_image_keys(with_ids, 4, 6) == ["coco-0", "coco-1"]


def _together_worker(rank, store, queue):
    import torch.distributed as dist

    from dclip.shards import together

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)

    def step():
        if rank == 1:
            raise MemoryError("out of memory on rank 1")
        return "done"

    try:
        together(step)
        queue.put((rank, "returned"))
    except Exception as error:  # noqa: BLE001
        queue.put((rank, f"{type(error).__name__}: {error}"))
    dist.destroy_process_group()


def test_a_failure_in_one_process_stops_every_process_without_waiting(tmp_path):
    """The targets job's steps run `together`: rank 1 fails, rank 0 raises too (naming rank 1) instead of waiting at
    a barrier until the collective timeout."""
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    queue = context.Queue()
    processes = [context.Process(target=_together_worker, args=(rank, str(tmp_path / "store"), queue))
                 for rank in range(2)]
    for process in processes:
        process.start()
    outcomes = dict(queue.get(timeout=60) for _ in range(2))
    for process in processes:
        process.join(timeout=30)
    assert outcomes[1] == "MemoryError: out of memory on rank 1"
    assert outcomes[0] == "RuntimeError: process 1 failed (see its log); this one stops with it"


def test_equal_image_ids_apart_are_not_merged(tiny_clip, processor):
    """Only adjacent rows with one key share an encoding: an id reused further on (another shard's member name)
    names another image."""
    from conftest import random_images

    from dclip.shards import embed_rows

    teacher = as_teacher(tiny_clip, processor)
    images = random_images(3, seed=9)
    batch = {"image": images, "caption": ["a", "b", "c"], "image_id": ["x", "y", "x"]}
    image, _, encoded = embed_rows(teacher, batch)
    alone, _, _ = embed_rows(teacher, {"image": images, "caption": ["a", "b", "c"]})
    assert encoded == 3
    np.testing.assert_allclose(image.numpy(), alone.numpy(), atol=1e-5)


def test_targets_refuse_another_processor_or_region_setting(coco_style, tiny_clip, processor, tmp_path):
    from processing_dclip import DCLIPProcessor

    teacher = as_teacher(fused_teacher(tiny_clip), processor)
    compute_target_shards(coco_style, teacher, tmp_path, shard_size=10, process_index=0, num_processes=1,
                          use_given_boxes=True, use_given_spans=True)
    write_manifest(coco_style, teacher, tmp_path, shard_size=10, use_given_boxes=True, use_given_spans=True)
    assert len(load_target_shards(tmp_path, coco_style, teacher=teacher, use_given_boxes=True)) == 20
    with pytest.raises(ValueError, match="use_given_boxes=True, this run asks for False"):
        load_target_shards(tmp_path, coco_style, teacher=teacher, use_given_boxes=False)
    other = DCLIPProcessor(processor.image_processor, processor.tokenizer, max_regions=2, max_spans=4)
    with pytest.raises(ValueError, match="another processor"):
        load_target_shards(tmp_path, coco_style, teacher=as_teacher(teacher.model, other))
