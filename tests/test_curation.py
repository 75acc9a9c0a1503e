import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT, unit_rows

from dclip.arguments import DataArguments
from dclip.clusters import cluster_teacher_embeddings
from dclip.curation import (
    CAPPED,
    DUPLICATE,
    KEPT,
    SEMANTIC,
    SemanticBalanceConfig,
    find_duplicates,
    greedy_diverse_subset,
    ivf_index,
    normalize_embeddings,
    semantic_balance,
    spherical_kmeans,
)
from dclip.data.loading import load_data, select_rows


def naive_greedy(vectors, threshold):
    """Keep each vector whose similarity to every earlier kept one stays below `threshold`, one pair at a time."""
    kept = []
    for i in range(len(vectors)):
        if all(float(vectors[i] @ vectors[j]) < threshold for j in kept):
            kept.append(i)
    mask = np.zeros(len(vectors), dtype=bool)
    mask[kept] = True
    return mask


@pytest.mark.parametrize("block_size", [1, 7, 1024])
def test_greedy_diverse_subset_matches_naive_loop(block_size):
    vectors = unit_rows(300, 4, seed=1)  # 4-d: many pairs above the threshold
    expected = naive_greedy(vectors, 0.8)
    assert 20 < expected.sum() < 290
    np.testing.assert_array_equal(greedy_diverse_subset(vectors, 0.8, block_size=block_size), expected)


def test_find_duplicates_matches_naive_greedy_and_keeps_the_first():
    rng = np.random.default_rng(0)
    originals = unit_rows(500, 16, seed=2)
    sources = rng.integers(0, 500, size=120)
    copies = normalize_embeddings(originals[sources] + 1e-3 * rng.standard_normal((120, 16)))
    embeddings = np.concatenate([originals, copies])
    centers = spherical_kmeans(embeddings, 8, seed=0)
    index, cluster = ivf_index(embeddings, centers)
    dropped = find_duplicates(index, embeddings, threshold=0.99, nprobe=8, chunk_size=97)  # nprobe = all: exact
    assert not dropped[:500].any() and dropped[500:].all()  # the original (earlier) is kept, every copy dropped
    np.testing.assert_array_equal(~dropped, naive_greedy(embeddings, 0.99))
    # every sample sits in the list of its nearest centre
    np.testing.assert_array_equal(cluster, (embeddings @ centers.T).argmax(1))


def test_semantic_balance_reasons_and_report(tmp_path):
    rng = np.random.default_rng(3)
    concepts = unit_rows(6, 32, seed=4)
    # one over-represented concept (600 samples) and five rare ones (40 each), then 50 exact copies
    labels = np.concatenate([np.zeros(600, dtype=int), np.repeat(np.arange(1, 6), 40)])
    samples = normalize_embeddings(concepts[labels] + 0.08 * rng.standard_normal((len(labels), 32)))
    embeddings = np.concatenate([samples, samples[:50]])
    config = SemanticBalanceConfig(num_clusters=6, semantic_threshold=0.9, max_per_cluster=60)
    result = semantic_balance(embeddings * 3.0, config)  # any scale: normalised inside
    report = result.report()
    assert (result.reason[800:] == DUPLICATE).all() and report["removed"]["perceptual_duplicate"] == 50
    # the crowded concept is thinned far more than the rare ones
    kept = result.reason[:800] == KEPT
    assert kept[:600].mean() < 0.25 and kept[600:].mean() > 0.5
    assert (result.reason == SEMANTIC).sum() == report["removed"]["semantic_redundant"] > 0
    assert report["kept"] + sum(report["removed"].values()) == report["samples"] == 850
    sizes = np.bincount(result.cluster[result.reason == KEPT], minlength=6)
    assert sizes.max() <= 60 and report["cluster_size_after"]["max"] == sizes.max()
    # the kept set obeys the rule: no two kept members of a cluster at or above the threshold
    unit = normalize_embeddings(embeddings)
    for c in range(6):
        members = unit[(result.cluster == c) & (result.reason == KEPT)]
        similarity = members @ members.T - 2 * np.eye(len(members))
        assert (similarity < 0.9 + 1e-5).all()


def test_semantic_balance_cap_and_keep_order():
    vectors = unit_rows(400, 8, seed=5)
    central = semantic_balance(vectors, SemanticBalanceConfig(num_clusters=1, semantic_threshold=1.0,
                                                              max_per_cluster=10))
    assert (central.reason == CAPPED).sum() == 390
    # "central" keeps the 10 most central samples, "outlying" the 10 least central
    centrality = vectors @ central.centers[0]
    np.testing.assert_array_equal(np.sort(central.kept_indices), np.sort(np.argsort(-centrality)[:10]))
    outlying = semantic_balance(vectors, SemanticBalanceConfig(num_clusters=1, semantic_threshold=1.0,
                                                               max_per_cluster=10, keep_order="outlying"))
    np.testing.assert_array_equal(np.sort(outlying.kept_indices), np.sort(np.argsort(centrality)[:10]))


# Unit vectors with dyadic coordinates: their norms and dot products are exact in float32, so a similarity can sit
# exactly on a threshold. e0 . h = e1 . h = 0.5, e0 . e1 = 0.
E0, E1, H = [1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5]
JUST_ABOVE_HALF = float(np.nextafter(np.float32(0.5), np.float32(1.0)))


@pytest.mark.parametrize("block_size", [1, 1024])  # compared across blocks, and inside one block
def test_greedy_subset_drops_a_similarity_equal_to_the_threshold(block_size):
    vectors = np.array([E0, H, E1], dtype=np.float32)
    assert float(vectors[0] @ vectors[1]) == 0.5
    assert greedy_diverse_subset(vectors, 0.5, block_size=block_size).tolist() == [True, False, True]
    assert greedy_diverse_subset(vectors, JUST_ABOVE_HALF, block_size=block_size).tolist() == [True, True, True]


def test_duplicate_and_semantic_thresholds_include_their_boundary():
    vectors = np.array([E0, E1, H], dtype=np.float32)  # H is 0.5 from both earlier ones
    exact = {"num_clusters": 1, "duplicate_nprobe": 1}
    duplicates = semantic_balance(vectors, SemanticBalanceConfig(**exact, duplicate_threshold=0.5,
                                                                 semantic_threshold=1.0))
    assert duplicates.reason.tolist() == [KEPT, KEPT, DUPLICATE]  # similarity == threshold: a duplicate
    below = semantic_balance(vectors, SemanticBalanceConfig(**exact, duplicate_threshold=JUST_ABOVE_HALF,
                                                            semantic_threshold=1.0))
    assert below.reason.tolist() == [KEPT, KEPT, KEPT]
    redundant = semantic_balance(vectors, SemanticBalanceConfig(**exact, duplicate_threshold=1.0,
                                                                semantic_threshold=0.5))
    # H, the most central, is visited first: both 0.5-neighbours are redundant with it
    assert redundant.reason.tolist() == [SEMANTIC, SEMANTIC, KEPT]
    kept = semantic_balance(vectors, SemanticBalanceConfig(**exact, duplicate_threshold=1.0,
                                                           semantic_threshold=JUST_ABOVE_HALF))
    assert kept.reason.tolist() == [KEPT, KEPT, KEPT]
    # identical vectors reach the largest threshold, 1.0
    copies = np.array([E0, E1, E0], dtype=np.float32)
    assert semantic_balance(copies, SemanticBalanceConfig(**exact, duplicate_threshold=1.0)).reason.tolist() == [
        KEPT, KEPT, DUPLICATE]


def test_config_bounds_are_inclusive():
    for threshold in (-1.0, 1.0):
        SemanticBalanceConfig(duplicate_threshold=threshold, semantic_threshold=threshold)
    for threshold in (float(np.nextafter(1.0, 2.0)), float(np.nextafter(-1.0, -2.0))):
        with pytest.raises(ValueError, match="duplicate_threshold"):
            SemanticBalanceConfig(duplicate_threshold=threshold)
        with pytest.raises(ValueError, match="semantic_threshold"):
            SemanticBalanceConfig(semantic_threshold=threshold)
    SemanticBalanceConfig(samples_per_cluster=1, num_clusters=1, max_per_cluster=1)
    for name in ("samples_per_cluster", "num_clusters", "max_per_cluster"):
        with pytest.raises(ValueError, match=name):
            SemanticBalanceConfig(**{name: 0})
    # as many clusters as samples is allowed, one more is not
    vectors = unit_rows(5, 4, seed=0)
    assert spherical_kmeans(vectors, 5).shape == (5, 4)
    with pytest.raises(ValueError, match="cannot make 6 clusters of 5 samples"):
        spherical_kmeans(vectors, 6)
    # a cluster of exactly `max_per_cluster` members keeps them all
    capped = semantic_balance(vectors, SemanticBalanceConfig(num_clusters=1, semantic_threshold=1.0,
                                                             duplicate_threshold=1.0, max_per_cluster=5))
    assert (capped.reason == KEPT).all()


def test_semantic_balance_rejects_bad_input():
    with pytest.raises(ValueError, match="keep_order"):
        SemanticBalanceConfig(keep_order="random")
    with pytest.raises(ValueError, match="semantic_threshold"):
        SemanticBalanceConfig(semantic_threshold=1.5)
    bad = unit_rows(20, 4, seed=0)
    bad[7, 2] = np.nan
    with pytest.raises(ValueError, match="sample 7"):
        semantic_balance(bad, SemanticBalanceConfig(num_clusters=2))


def test_curate_script_on_injected_redundancy(tmp_path):
    """examples/curate.py on scenes with injected byte copies, with image embeddings that tell the scenes apart
    (their centred pixels: distinct scenes stay below 0.96, copies are at 1): exactly the later copies go, as
    perceptual duplicates, and every other row is kept, as a brute-force greedy over all pairs says."""
    data_args = ["--num_train_scenes", "300", "--image_size", "32", "--cache_dir", str(tmp_path / "cache"),
                 "--exact_duplicate_fraction", "0.2", "--concept_fraction", "0.2"]
    data, _ = load_data(DataArguments(num_train_scenes=300, image_size=32, cache_dir=str(tmp_path / "cache"),
                                      exact_duplicate_fraction=0.2, concept_fraction=0.2), seed=42)  # --data_seed
    train = data["train"]
    pixels = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32).ravel() for image in train["image"]])
    embeddings = pixels - pixels.mean(0)
    np.save(tmp_path / "embeddings.npy", embeddings)
    expected_dropped = exact_duplicate_greedy(normalize_embeddings(embeddings), 0.98)
    kinds = np.asarray(train["redundancy"])
    assert expected_dropped.sum() == (kinds == "exact").sum() > 30  # the reference itself: the copies, only them

    output = tmp_path / "curated"
    command = [
        sys.executable, str(REPO_ROOT / "examples" / "curate.py"), "--embeddings", str(tmp_path / "embeddings.npy"),
        *data_args, "--num_clusters", "4", "--duplicate_nprobe", "4", "--duplicate_threshold", "0.98",
        "--semantic_threshold", "0.999", "--pixel_duplicates", "false", "--output_dir", str(output),
        "--save_dataset", "true",
    ]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads((output / "report.json").read_text())
    assert report["rows"] == report["samples"] == 300
    assert report["removed"] == {"perceptual_duplicate": int(expected_dropped.sum()), "semantic_redundant": 0,
                                 "cluster_cap": 0}
    kept = np.load(output / "kept_indices.npy")
    np.testing.assert_array_equal(kept, np.flatnonzero(~expected_dropped))
    assert report["kept"] == len(kept) == 300 - expected_dropped.sum()
    injected = report["removed_by_injected_kind"]
    assert injected["exact"]["kept"] == 0 and injected["exact"]["perceptual_duplicate"] == (kinds == "exact").sum()
    assert injected["none"]["kept"] == (kinds == "none").sum()
    assert injected["concept"]["kept"] == (kinds == "concept").sum()
    from datasets import load_from_disk
    from PIL import Image

    saved = load_from_disk(str(output / "dataset"))
    assert saved["caption"] == [train[int(i)]["caption"] for i in kept]
    assert Image.open(output / "cluster_sizes.png").size[0] > 500

    # train.py refuses the indices for another data set (report.json says 300 rows)
    with pytest.raises(ValueError, match="curated from 300 rows"):
        select_rows(list(range(200)), str(output / "kept_indices.npy"))


def test_curate_dataset_embeds_images_with_the_named_checkpoint(tmp_path, tiny_clip_dir, tiny_clip, processor):
    """--model_name_or_path: the saved image embeddings are the checkpoint's (normalised CLIP image features)."""
    import torch
    from conftest import random_images
    from datasets import Dataset

    from dclip.curation import curate_dataset

    dataset = Dataset.from_dict({"image": random_images(12, seed=2), "caption": ["a circle"] * 12})
    report = curate_dataset(dataset, tmp_path / "curated", SemanticBalanceConfig(num_clusters=2),
                            model_name_or_path=str(tiny_clip_dir), batch_size=5)
    saved = np.load(tmp_path / "curated" / "image_embeddings.npy")
    with torch.no_grad():
        features = tiny_clip.get_image_features(processor(images=dataset["image"])["pixel_values"])
    features = getattr(features, "pooler_output", features)
    expected = torch.nn.functional.normalize(features, dim=-1).numpy()
    np.testing.assert_allclose(saved, expected, atol=1e-5)
    assert report["samples"] == 12 and report["embeddings_from"] == str(tiny_clip_dir)


def exact_duplicate_greedy(embeddings, threshold, block=2000):
    """Brute force: every pair at or above `threshold` (blocked matrix products), then the in-order greedy."""
    later: dict[int, list[int]] = {}
    for start in range(0, len(embeddings), block):
        similarity = embeddings[start : start + block] @ embeddings.T
        rows, cols = np.nonzero(similarity >= threshold)
        for row, col in zip(rows + start, cols):
            if col > row:
                later.setdefault(int(row), []).append(int(col))
    dropped = np.zeros(len(embeddings), dtype=bool)
    for row in sorted(later):
        if not dropped[row]:
            dropped[later[row]] = True
    return dropped


def test_find_duplicates_uses_pairs_found_from_either_side():
    """With nprobe < lists the IVF search is asymmetric: a later copy may find its original while the original's
    probed lists miss the copy. Such pairs must still count (compared with brute force)."""
    rng = np.random.default_rng(1)
    originals = unit_rows(6000, 16, seed=7)
    sources = rng.integers(0, 6000, size=1500)
    copies = normalize_embeddings(originals[sources] + 0.04 * rng.standard_normal((1500, 16)))
    embeddings = np.concatenate([originals, copies])
    centers = spherical_kmeans(embeddings, 150, seed=0)
    index, _ = ivf_index(embeddings, centers)
    np.testing.assert_array_equal(find_duplicates(index, embeddings, 0.98, nprobe=3),
                                  exact_duplicate_greedy(embeddings, 0.98))


def test_train_indices_apply_after_max_train_samples(tmp_path):
    """curate.py and train.py with the same --max_train_samples: the indices refer to the shortened split."""
    np.save(tmp_path / "kept.npy", np.array([0, 5, 49]))
    (tmp_path / "report.json").write_text(json.dumps({"rows": 50}))
    data_args = DataArguments(num_train_scenes=120, image_size=32, cache_dir=str(tmp_path / "cache"),
                              max_train_samples=50, max_eval_samples=10, train_indices=str(tmp_path / "kept.npy"))
    data, _ = load_data(data_args, seed=0)
    full, _ = load_data(DataArguments(num_train_scenes=120, image_size=32, cache_dir=str(tmp_path / "cache"),
                                      max_eval_samples=10), seed=0)
    assert data["train"]["caption"] == [full["train"][i]["caption"] for i in (0, 5, 49)]
    np.save(tmp_path / "kept.npy", np.array([], dtype=np.int64))
    with pytest.raises(ValueError, match="non-empty"):
        load_data(data_args, seed=0)


def test_cluster_centres_are_redone_for_other_embeddings(tmp_path):
    import torch
    from datasets import Dataset
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], seed=0)
    first = Dataset.from_dict({"teacher_image_embeds": unit_rows(200, 8, seed=1).tolist()})
    centers, labels = cluster_teacher_embeddings(first, 4, args, tmp_path / "student")
    written = (tmp_path / "student" / "cluster_centers.npy").stat().st_mtime_ns
    again, _ = cluster_teacher_embeddings(first, 4, args, tmp_path / "student")  # same embeddings: read back
    assert (tmp_path / "student" / "cluster_centers.npy").stat().st_mtime_ns == written
    torch.testing.assert_close(again, centers)
    other = Dataset.from_dict({"teacher_image_embeds": (unit_rows(200, 8, seed=2) + 3.0).tolist()})
    new_centers, new_labels = cluster_teacher_embeddings(other, 4, args, tmp_path / "student")
    assert not torch.allclose(new_centers, centers) and len(np.unique(new_labels)) == 4
    with pytest.raises(ValueError, match="--num_clusters must be between 1 and the 200"):
        cluster_teacher_embeddings(other, 500, args, tmp_path / "student")


def test_cluster_on_text_or_joint_embeddings(tmp_path, monkeypatch):
    """Image embeddings scattered at random, text embeddings in 3 tight groups: clustered on the text, the labels are
    the text's groups, which clustering the image cannot find; `joint` clusters each pair's normalised sum."""
    from datasets import Dataset
    from transformers import TrainingArguments

    import dclip.curation

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], seed=0)
    groups = np.repeat(np.arange(3), 40)
    text = np.eye(8, dtype=np.float32)[groups] * 10 + np.random.default_rng(0).normal(0, 0.1, (120, 8))
    image = 0.3 * unit_rows(120, 8, seed=3)
    data = Dataset.from_dict({"teacher_image_embeds": image.tolist(), "teacher_text_embeds": text.tolist()})
    _, labels = cluster_teacher_embeddings(data, 3, args, tmp_path / "text", "text")
    _, image_labels = cluster_teacher_embeddings(data, 3, args, tmp_path / "image", "image")
    # the same partition as the text's groups, up to the names of the clusters
    assert len({(g, label) for g, label in zip(groups, labels)}) == 3
    assert len({(g, label) for g, label in zip(groups, image_labels)}) > 3
    clustered = []
    real_kmeans = dclip.curation.spherical_kmeans
    monkeypatch.setattr(dclip.curation, "spherical_kmeans", lambda x, *a, **k: clustered.append(x) or real_kmeans(
        x, *a, **k))
    cluster_teacher_embeddings(data, 3, args, tmp_path / "joint", "joint")

    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    np.testing.assert_allclose(clustered[0], unit(unit(image) + unit(text)), atol=1e-5)


def test_cluster_on_the_largest_region(tmp_path):
    """`region`: rows are grouped by the teacher's embedding of their largest region box (3 tight groups there,
    noise in the smaller boxes), and each group's classifier centre is the normalised mean of its rows'
    `teacher_image_embeds`; a row without a region is named."""
    from datasets import Dataset
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], seed=0)
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(3), 40)
    rng.shuffle(groups)
    regions = rng.normal(0, 1, (120, 3, 8)).astype(np.float32)
    small, large = (0.1, 0.1, 0.3, 0.3), (0.2, 0.2, 0.9, 0.8)
    boxes = np.array([[small, large, small]] * 120, dtype=np.float32)
    boxes[::2] = [large, small, small]  # the largest box is not always at the same place
    largest = np.where(np.arange(120) % 2 == 0, 0, 1)
    regions[np.arange(120), largest] = np.eye(8, dtype=np.float32)[groups] * 10 + rng.normal(0, 0.1, (120, 8))
    mask = np.ones((120, 3), dtype=bool)
    mask[:, 2] = False  # a padded slot: its (random) features and zero box are never chosen
    boxes[:, 2] = 0.0
    image = unit_rows(120, 6, seed=4)
    data = Dataset.from_dict({"teacher_image_embeds": image.tolist(), "region_features": regions.tolist(),
                              "region_boxes": boxes.tolist(), "region_mask": mask.tolist()})
    centers, labels = cluster_teacher_embeddings(data, 3, args, tmp_path / "region", "region")
    assert len({(g, label) for g, label in zip(groups, labels)}) == 3
    assert centers.shape == (3, 6)
    for label in range(3):
        mean = image[labels == label].mean(0)
        np.testing.assert_allclose(centers[label].numpy(), mean / np.linalg.norm(mean), atol=1e-5)
    mask[7] = False
    bad = data.remove_columns("region_mask").add_column("region_mask", mask.tolist())
    with pytest.raises(ValueError, match="row 7 has no region"):
        cluster_teacher_embeddings(bad, 3, args, tmp_path / "bad", "region")
    with pytest.raises(ValueError, match="region embeddings are not in the data"):
        cluster_teacher_embeddings(data.remove_columns("region_features"), 3, args, tmp_path / "none", "region")
