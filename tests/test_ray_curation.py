"""Curation on Ray (`examples/curate.py --engine ray`): the same rows kept as the local engine."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT

from dclip.arguments import DataArguments
from dclip.curation import (
    CAPPED,
    DUPLICATE,
    KEPT,
    SEMANTIC,
    SemanticBalanceConfig,
    dataset_pixel_pairs,
    kmeans_sample,
    semantic_balance,
)
from dclip.data.loading import load_data


pytest.importorskip("ray")


def test_ray_engine_with_two_workers_keeps_exactly_the_local_engines_rows(tmp_path):
    """The embedded scenes with injected exact copies, re-rendered near copies and repeated concepts, embedded by
    their centred pixels; settings under which every step has work: thresholds calibrated on a sample of the rows,
    pixel duplicates of the images, k-means on a subsample, duplicates searched over 2 clusters each, semantic
    redundancy and a cluster cap."""
    import pyarrow.parquet as pq

    data_args = dict(num_train_scenes=600, image_size=32, cache_dir=str(tmp_path / "cache"),
                     exact_duplicate_fraction=0.1, near_duplicate_fraction=0.1, concept_fraction=0.2)
    train = load_data(DataArguments(**data_args), seed=42)[0]["train"]  # curate.py's --data_seed
    pixels = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32).ravel() for image in train["image"]])
    np.save(tmp_path / "embeddings.npy", pixels - pixels.mean(0))
    settings = dict(num_clusters=8, max_points_per_centroid=40, duplicate_nprobe=2, duplicate_distance_ratio=0.5,
                    semantic_distance_ratio=0.75, max_per_cluster=60, calibration_samples=200, pixel_threshold=0.8)
    config = SemanticBalanceConfig(**settings)
    assert kmeans_sample(len(pixels), 8, 40, 0) is not None  # k-means trains on FAISS's subsample
    embeddings = np.load(tmp_path / "embeddings.npy")
    local = semantic_balance(embeddings, config, extra_pairs=dataset_pixel_pairs(train, config))
    counts = np.bincount(local.reason, minlength=4)
    assert counts[DUPLICATE] > 30 and counts[SEMANTIC] > 10 and counts[CAPPED] > 10 and counts[KEPT] > 200, counts
    assert local.thresholds["calibration_rows"] == 200 and local.thresholds["semantic_threshold"] < 1
    # the pixel pairs and the second probed cluster each change the result here
    without_pixels = semantic_balance(embeddings, config)
    assert (without_pixels.reason != local.reason).any()
    one_probe = semantic_balance(embeddings, SemanticBalanceConfig(**{**settings, "duplicate_nprobe": 1}))
    assert (one_probe.reason != without_pixels.reason).any()

    output = tmp_path / "curated"
    flags = [f"--{name}={value}" for name, value in {**data_args, **settings}.items()]
    command = [sys.executable, str(REPO_ROOT / "examples" / "curate.py"), "--embeddings",
               str(tmp_path / "embeddings.npy"), *flags, "--output_dir", str(output), "--engine", "ray",
               "--ray_num_cpus", "2", "--save_dataset", "true", "--allow_large_removal", "true"]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=400)
    assert completed.returncode == 0, completed.stderr[-3000:]
    kept = np.load(output / "kept_indices.npy")
    np.testing.assert_array_equal(kept, local.kept_indices)
    report = json.loads((output / "report.json").read_text())
    assert report["engine"] == "ray" and report["removed"] == local.report()["removed"]
    assert report["thresholds"] == local.thresholds and report["removed_fraction"] > 0.5  # allowed
    np.testing.assert_array_equal(np.load(output / "cluster_centers.npy"), local.centers)
    shards = sorted((output / "kept").glob("*.parquet"))
    assert shards and np.array_equal(np.sort(np.concatenate([pq.read_table(shard)["id"].to_numpy()
                                                             for shard in shards])), local.kept_indices)


def test_an_unknown_engine_is_named():
    command = [sys.executable, str(REPO_ROOT / "examples" / "curate.py"), "--embeddings", "x.npy", "--engine", "spark"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert completed.returncode != 0 and "--engine must be local or ray, got 'spark'" in completed.stderr


def test_ray_workers_embed_the_images_as_one_process_does(tmp_path, tiny_clip_dir):
    """`curate_dataset` with the Ray engine and a checkpoint: 2 actors embed blocks of rows (here 7 rows a block, out
    of order across workers), and the saved embeddings are the local embedding pass's, row for row."""
    from conftest import random_images
    from datasets import Dataset

    from dclip.curation import curate_dataset, embed_images_with
    from dclip.curation.ray_engine import RayEngine, connect, embed_images_ray

    dataset = Dataset.from_dict({"image": random_images(30, seed=4), "caption": ["a shape"] * 30})
    expected = embed_images_with(str(tiny_clip_dir), dataset, batch_size=5)
    connect(num_cpus=2)
    np.testing.assert_allclose(embed_images_ray(str(tiny_clip_dir), dataset, batch_size=5, workers=2, block_rows=7),
                               expected, atol=1e-5)
    report = curate_dataset(dataset, tmp_path / "curated", SemanticBalanceConfig(num_clusters=3),
                            model_name_or_path=str(tiny_clip_dir), batch_size=5, engine=RayEngine(num_cpus=2))
    np.testing.assert_allclose(np.load(tmp_path / "curated" / "image_embeddings.npy"), expected, atol=1e-5)
    assert report["engine"] == "ray" and report["samples"] == 30
