"""Curation defaults that cannot quietly throw data away: thresholds calibrated to the embeddings, pixel duplicates
from the images, and a guard that refuses to keep a result removing more than a stated fraction."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT, unit_rows

from dclip.curation import (
    DUPLICATE,
    EXACT_COPY_DISTANCE,
    KEPT,
    RemovalRefused,
    SemanticBalanceConfig,
    calibrate,
    curate_dataset,
    drop_later_duplicates,
    nearest_neighbour_distances,
    normalize_embeddings,
    pixel_duplicate_pairs,
    semantic_balance,
    thumbnail_vectors,
)


def naive_nearest_distances(embeddings, rows):
    """Brute force: for each row, the smallest cosine distance to another row above the exact-copy distance."""
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    out = []
    for row in rows:
        distances = [1.0 - float(unit[row] @ unit[other]) for other in range(len(unit)) if other != row]
        far_enough = [d for d in distances if d > EXACT_COPY_DISTANCE]
        out.append(min(far_enough) if far_enough else np.nan)
    return np.array(out)


def test_nearest_neighbour_distances_match_brute_force_and_skip_copies():
    embeddings = 5.0 * unit_rows(300, 6, seed=0)
    embeddings[10] = embeddings[3]  # an exact copy: neither counts the other as its neighbour
    rows = np.array([0, 3, 10, 57, 299])
    found = nearest_neighbour_distances(embeddings, rows, block_rows=64)  # several blocks merged
    np.testing.assert_allclose(found, naive_nearest_distances(embeddings, rows), atol=1e-6)
    assert found[1] > EXACT_COPY_DISTANCE and found[2] > EXACT_COPY_DISTANCE
    copies = np.repeat(unit_rows(1, 6, seed=1), 5, axis=0)  # nothing but copies: no distance to calibrate from
    assert np.isnan(nearest_neighbour_distances(copies, np.arange(5))).all()


def packed(embeddings, spread):
    """The same points packed around one direction, `spread` apart: pairwise order kept, distances shrunk."""
    direction = np.zeros(embeddings.shape[1], dtype=np.float32)
    direction[0] = 1.0
    return normalize_embeddings(direction + spread * embeddings)


def test_calibrated_thresholds_fit_the_spacing_of_the_embeddings():
    """A fixed threshold that suits spread-out embeddings removes nearly everything from tightly packed ones; the
    calibrated thresholds remove about the same rows from both."""
    rng = np.random.default_rng(2)
    originals = unit_rows(1500, 32, seed=3)
    sources = rng.integers(0, 1500, size=300)
    copies = normalize_embeddings(originals[sources] + 0.02 * rng.standard_normal((300, 32)))
    spread = np.concatenate([originals, copies])
    config = SemanticBalanceConfig(num_clusters=4, calibration_samples=400)
    removed = {}
    for name, spacing in (("spread", None), ("packed", 0.05)):
        embeddings = spread if spacing is None else packed(spread, spacing)
        resolved, record = calibrate(embeddings, config)
        rows = np.sort(np.random.default_rng(0).choice(len(embeddings), 400, replace=False))
        median = float(np.nanmedian(naive_nearest_distances(embeddings, rows)))
        assert record["median_nearest_neighbour_distance"] == pytest.approx(median, rel=1e-4, abs=2e-7)  # float32
        assert resolved.duplicate_threshold == pytest.approx(1 - 0.1 * median, abs=1e-7)
        assert resolved.semantic_threshold == pytest.approx(1 - 0.25 * median, abs=1e-7)
        result = semantic_balance(embeddings, config)
        assert result.thresholds["duplicate_threshold"] == resolved.duplicate_threshold
        removed[name] = result.reason != KEPT
        fixed = semantic_balance(embeddings, SemanticBalanceConfig(num_clusters=4, duplicate_threshold=0.98,
                                                                   semantic_threshold=0.9))
        if name == "packed":
            assert (fixed.reason != KEPT).mean() > 0.95  # what the old fixed default did to packed embeddings
    assert removed["spread"][1500:].mean() > 0.9 and removed["spread"][:1500].mean() < 0.05
    assert (removed["spread"] != removed["packed"]).mean() < 0.02
    # a threshold given by the user is applied as given
    given, record = calibrate(spread, SemanticBalanceConfig(duplicate_threshold=0.5, semantic_threshold=1.0))
    assert (given.duplicate_threshold, given.semantic_threshold) == (0.5, 1.0) and "calibrated" not in record


def test_exact_copies_count_even_when_rounding_moved_them():
    """Copies whose embeddings differ by rounding (as across batches on a GPU) are duplicates at any spacing, and a
    data set made mostly of copies still calibrates from its distinct rows."""
    rng = np.random.default_rng(4)
    originals = unit_rows(100, 16, seed=5)
    copies = normalize_embeddings(np.repeat(originals, 4, axis=0) + 1e-4 * rng.standard_normal((400, 16)))
    assert (1 - (copies * np.repeat(originals, 4, axis=0)).sum(1)).max() < EXACT_COPY_DISTANCE  # rounding-size
    result = semantic_balance(np.concatenate([originals, copies]), SemanticBalanceConfig(num_clusters=2))
    assert (result.reason[:100] == KEPT).all() and (result.reason[100:] == DUPLICATE).all()
    assert result.thresholds["median_nearest_neighbour_distance"] > 0.1  # the originals' spacing, not the copies'


def test_a_row_that_is_not_finite_is_named_by_its_own_number():
    embeddings = unit_rows(1000, 8, seed=9)
    embeddings[700, 3] = np.inf
    for block_rows in (256, 4096):  # in a later block of the scan, and among the sampled rows
        with pytest.raises(ValueError, match="embedding of sample 700 is not finite"):
            nearest_neighbour_distances(embeddings, np.array([5, 700]) if block_rows > 1000 else np.array([5]),
                                        block_rows=block_rows)
    with pytest.raises(ValueError, match="sample 700"):
        semantic_balance(embeddings, SemanticBalanceConfig(num_clusters=2, calibration_samples=50))


def test_thumbnails_match_a_naive_computation_and_a_grey_image_pairs_with_nothing():
    from conftest import random_images
    from PIL import Image

    images = random_images(5, seed=1, size=40) + [Image.new("RGB", (40, 40), (90, 90, 90))]
    vectors = thumbnail_vectors(images, size=8)
    for image, vector in zip(images[:5], vectors):
        pixels = np.asarray(image.convert("RGB").resize((8, 8), Image.Resampling.BOX), np.float64).ravel()
        centred = pixels - pixels.mean()
        np.testing.assert_allclose(vector, centred / np.linalg.norm(centred), atol=1e-6)
    assert not vectors[5].any()


def test_pixel_pairs_match_brute_force():
    rng = np.random.default_rng(6)
    originals = unit_rows(800, 48, seed=7)
    sources = rng.integers(0, 800, size=200)
    thumbnails = np.concatenate([originals, normalize_embeddings(originals[sources]
                                                                 + 0.03 * rng.standard_normal((200, 48)))])
    config = SemanticBalanceConfig(num_clusters=6, duplicate_nprobe=6, pixel_threshold=0.97)  # all lists: exact
    dropped = drop_later_duplicates(*pixel_duplicate_pairs(thumbnails, config), len(thumbnails))
    similarity = thumbnails @ thumbnails.T
    expected = np.zeros(len(thumbnails), dtype=bool)
    for row in range(len(thumbnails)):
        if not expected[row]:
            expected[row + 1:] |= similarity[row, row + 1:] >= 0.97
    np.testing.assert_array_equal(dropped, expected)
    assert dropped[800:].mean() > 0.9


def test_a_large_removal_is_refused_unless_confirmed(tmp_path):
    embeddings = unit_rows(200, 8, seed=8)
    np.save(tmp_path / "embeddings.npy", embeddings)
    output = tmp_path / "curated"
    output.mkdir()
    np.save(output / "kept_indices.npy", np.arange(200))  # an earlier run's: must not pass for this one's
    greedy = SemanticBalanceConfig(num_clusters=2, duplicate_threshold=0.3, semantic_threshold=1.0)
    with pytest.raises(RemovalRefused, match=r"remove \d+ of 200 rows .* more than --max_removed_fraction 0.5"):
        curate_dataset(None, output, greedy, embeddings_file=str(tmp_path / "embeddings.npy"))
    report = json.loads((output / "report.json").read_text())
    assert report["removed_fraction"] > 0.5 and "allow_large_removal" in report["refused"]
    assert not (output / "kept_indices.npy").exists()
    report = curate_dataset(None, output, greedy, embeddings_file=str(tmp_path / "embeddings.npy"),
                            allow_large_removal=True)
    assert "refused" not in report and len(np.load(output / "kept_indices.npy")) == report["kept"] < 100
    report = curate_dataset(None, output, greedy, embeddings_file=str(tmp_path / "embeddings.npy"),
                            max_removed_fraction=0.99)
    assert report["kept"] == len(np.load(output / "kept_indices.npy"))


def test_default_curation_of_the_embedded_data_with_injected_redundancy(tmp_path, tiny_clip_dir):
    """examples/curate.py with its defaults on the embedded scenes with 10% exact copies, 15% jittered re-renders
    and 15% repeated concepts: every exact copy goes, at least half the re-renders go, at least 90% of the
    originals stay. The old default (a fixed duplicate threshold of 0.98) is refused, with exit status 4."""
    from dclip.cli import REFUSED

    def curate(*flags):
        command = [sys.executable, str(REPO_ROOT / "examples" / "curate.py"), "--model_name_or_path",
                   str(tiny_clip_dir), "--num_train_scenes", "1000", "--cache_dir", str(tmp_path / "cache"),
                   "--exact_duplicate_fraction", "0.1", "--near_duplicate_fraction", "0.15",
                   "--concept_fraction", "0.15", "--output_dir", str(tmp_path / "curated"), *flags]
        return subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=400)

    refused = curate("--duplicate_threshold", "0.98", "--semantic_threshold", "0.9")
    assert refused.returncode == REFUSED, refused.stderr[-3000:]
    assert "curate.py stopped: this curation would remove" in refused.stderr
    assert not (tmp_path / "curated" / "kept_indices.npy").exists()

    completed = curate()
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads((tmp_path / "curated" / "report.json").read_text())
    kinds = report["removed_by_injected_kind"]
    assert set(report["thresholds"]["calibrated"]) == {"duplicate_threshold", "semantic_threshold"}
    assert kinds["exact"]["kept"] == 0 and sum(kinds["exact"].values()) > 50
    assert kinds["near"]["kept"] <= 0.5 * sum(kinds["near"].values())
    assert kinds["none"]["kept"] >= 0.9 * sum(kinds["none"].values())
    assert report["pixel_duplicate_pairs"] > 0 and report["seconds"]["pixel_duplicates"] > 0
    assert len(np.load(tmp_path / "curated" / "kept_indices.npy")) == report["kept"]


def test_unset_thresholds_never_reach_the_search_and_any_array_is_taken(tmp_path):
    import torch

    from dclip.curation import balance_cluster, duplicate_pairs

    vectors = unit_rows(60, 8, seed=10)
    with pytest.raises(ValueError, match="semantic threshold is unset"):
        balance_cluster(vectors, vectors[0], SemanticBalanceConfig())
    with pytest.raises(ValueError, match="duplicate threshold is unset"):
        duplicate_pairs(None, vectors, None, np.arange(60))
    config = SemanticBalanceConfig(num_clusters=2)
    expected = semantic_balance(vectors, config).reason
    for given in (torch.from_numpy(vectors), vectors.tolist()):  # calibrated from them as from the array
        np.testing.assert_array_equal(semantic_balance(given, config).reason, expected)
    with pytest.raises(ValueError, match=r"\(samples, dim\) array, got shape \(8,\)"):
        semantic_balance(vectors[0], config)
    with pytest.raises(ValueError, match=r"max_removed_fraction is a fraction of the rows, in \[0, 1\], got 50"):
        curate_dataset(None, tmp_path, config, embeddings_file="unused.npy", max_removed_fraction=50)


def test_a_refusal_removes_an_earlier_runs_kept_rows_but_not_a_users_own_folders(tmp_path):
    from datasets import Dataset

    np.save(tmp_path / "embeddings.npy", unit_rows(200, 8, seed=8))
    output = tmp_path / "curated"
    greedy = SemanticBalanceConfig(num_clusters=2, duplicate_threshold=0.3, semantic_threshold=1.0)
    curate_dataset(None, output, greedy, embeddings_file=str(tmp_path / "embeddings.npy"), allow_large_removal=True)
    Dataset.from_dict({"caption": ["a kept row"]}).save_to_disk(str(output / "dataset"))  # --save_dataset's
    (output / "kept").mkdir()
    (output / "kept" / "part-0.parquet").write_bytes(b"the Ray engine's ids")
    curate_dataset(None, output, greedy, embeddings_file=str(tmp_path / "embeddings.npy"), allow_large_removal=True)
    assert not (output / "kept").exists() and not (output / "dataset").exists()  # not this run's: stale
    Dataset.from_dict({"caption": ["a kept row"]}).save_to_disk(str(output / "dataset"))
    (output / "kept").mkdir()
    (output / "kept" / "part-0.parquet").write_bytes(b"the Ray engine's ids")
    with pytest.raises(RemovalRefused):
        curate_dataset(None, output, greedy, embeddings_file=str(tmp_path / "embeddings.npy"))
    assert not [name for name in ("kept_indices.npy", "kept", "dataset") if (output / name).exists()]
    (output / "dataset").mkdir()  # a user's own folders of those names: not ours, left alone
    (output / "dataset" / "notes.txt").write_text("mine")
    (output / "kept").mkdir()
    (output / "kept" / "notes.txt").write_text("mine")
    with pytest.raises(RemovalRefused):
        curate_dataset(None, output, greedy, embeddings_file=str(tmp_path / "embeddings.npy"))
    assert (output / "dataset" / "notes.txt").is_file() and (output / "kept" / "notes.txt").is_file()
