"""`benchmarks/paper_tables.py` on made-up run folders laid out as `paper_tables.sh` leaves them: every table is
written, and each interval is the paired bootstrap of the two models' own per-query outcomes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from dclip.evaluation import paired_bootstrap


ROOT = Path(__file__).resolve().parents[1]
KEYS = ("image_retrieval_recall@1", "text_retrieval_recall@1", "zeroshot_mean_acc1", "linear_probe_mean_acc1")


@pytest.fixture(scope="module")
def paper_tables():
    spec = importlib.util.spec_from_file_location("paper_tables", ROOT / "benchmarks" / "paper_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_run(folder: Path, models: dict[str, float], seed: int) -> None:
    """A run folder whose models hit each query with the given probability (the same rate for every metric)."""
    rng = np.random.default_rng(seed)
    (folder / "eval").mkdir(parents=True)
    metrics = {}
    for model, rate in models.items():
        outcomes = {key: (rng.random(400) < rate).astype(np.float32) for key in KEYS}
        np.savez_compressed(folder / "eval" / f"{model}.npz", **outcomes)
        metrics[model] = {key: float(value.mean()) for key, value in outcomes.items()}
    (folder / "summary.json").write_text(json.dumps({"metrics": metrics}))


def test_paper_tables_from_run_folders(tmp_path, paper_tables):
    default, runs = tmp_path / "default", tmp_path / "runs"
    _write_run(default, {"base_clip": 0.3, "teacher": 0.5, "student": 0.45, "student_none": 0.3,
                         "student_clip_cid": 0.3, "student_instance": 0.3}, seed=0)
    for seed, run in enumerate(["dclip", "dclip_clip_cid", "clip_cid_image", "clip_cid_region_k64", "finetune_teacher",
                                "finetune_none",
                                "redundant_full", "redundant_balanced_0.5"], start=1):
        _write_run(runs / run, {"student": 0.35}, seed=seed)
    (runs / "curated_0.5").mkdir()
    (runs / "curated_0.5" / "report.json").write_text(json.dumps(
        {"kept": 13000, "removed_fraction": 0.35, "removed_by_injected_kind": {"exact": {"perceptual_duplicate": 9}}}))

    results = paper_tables.load_results(default, runs, ["0.5"])
    text = paper_tables.markdown(results, "bash benchmarks/paper_tables.sh", seconds=125)

    with np.load(default / "eval" / "student.npz") as a, np.load(default / "eval" / "student_none.npz") as b:
        expected = paired_bootstrap(a["image_retrieval_recall@1"], b["image_retrieval_recall@1"])
    assert expected["excludes_zero"]  # 0.45 against 0.3 on 400 queries
    cell = f"{expected['difference']:+.3f} [{expected['low']:+.3f}, {expected['high']:+.3f}] **"
    published = "| DCLIP + instance student (published) |"
    row = next(line for line in text.splitlines() if line.startswith(published) and "[" in line)
    assert row.split(" | ")[1] == cell
    for heading in ("**Retrieval and classification**", "**CLIP-CID: cluster discrimination**",
                    "**The fine-tuning mode**", "**Image semantic balance**"):
        assert heading in text
    assert "13,000 (-35.0%)" in text and "2 min 5 s" in text and "exact 0 / 9 / 0" in text
    start = results["metrics"]["default:student_none"]["zeroshot_mean_acc1"]
    tuned = results["metrics"]["finetune_teacher:student"]["zeroshot_mean_acc1"]
    assert f"{tuned / start:.1%}" in text  # zero-shot retention against the starting point
