"""A curation run over a captioned-image data set: embed the images (or read embeddings), find pixel duplicates
where the images are at hand, balance (here or on another engine), refuse a result that would throw away more than
a stated fraction unless the user confirms it, and write what was kept with a report."""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .balance import KEPT, REASONS, BalanceResult, SemanticBalanceConfig, semantic_balance
from .pixels import dataset_pixel_pairs


logger = logging.getLogger(__name__)
DEFAULT_MAX_REMOVED_FRACTION = 0.5  # the paper removes 43.7% of LAION-400M


class RemovalRefused(ValueError):
    """A curation would remove more than the stated fraction of the data and the user has not confirmed it."""


def plot_cluster_sizes(result: BalanceResult, path: str | Path) -> str:
    """Cluster-size histograms before and after balancing, and the sizes by rank, as a PNG."""
    from matplotlib.figure import Figure  # no pyplot: the process's matplotlib backend stays the user's

    num_clusters = len(result.centers)
    before = np.bincount(result.cluster, minlength=num_clusters)
    after = np.bincount(result.cluster[result.reason == KEPT], minlength=num_clusters)
    figure = Figure(figsize=(11, 4))
    histogram, ranks = figure.subplots(1, 2)
    bins = np.linspace(0, max(int(before.max()), 1), min(50, int(before.max()) + 1) + 1)
    histogram.hist(before, bins=bins, alpha=0.6, label=f"before ({int(before.sum()):,} pairs)")
    histogram.hist(after, bins=bins, alpha=0.6, label=f"after ({int(after.sum()):,} pairs)")
    histogram.set(xlabel="pairs per cluster", ylabel="clusters", title=f"{num_clusters:,} k-means clusters")
    histogram.legend()
    ranks.plot(np.sort(before)[::-1], label="before")
    ranks.plot(np.sort(after)[::-1], label="after")
    ranks.set(xlabel="cluster rank", ylabel="pairs per cluster", yscale="symlog", title="cluster sizes by rank")
    ranks.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return str(path)


def write_balance_outputs(result: BalanceResult, output_dir: str | Path, config: SemanticBalanceConfig,
                          extra: dict | None = None, refused: str | None = None) -> dict:
    """`kept_indices.npy`, `cluster_centers.npy`, `report.json` (with `extra`) and `cluster_sizes.png`; when the
    result was `refused` (the reason), no `kept_indices.npy` (an earlier run's is removed) and the reason is in the
    report."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if refused is None:
        np.save(output_dir / "kept_indices.npy", result.kept_indices.astype(np.int64))
    else:  # an earlier run's kept rows must not pass for this run's
        remove_stale_outputs(output_dir, ("kept_indices.npy", "kept", "dataset"))
    np.save(output_dir / "cluster_centers.npy", result.centers)
    report = {**result.report(), "config": asdict(config), **(extra or {})}
    if refused is not None:
        report["refused"] = refused
    report["plot"] = plot_cluster_sizes(result, output_dir / "cluster_sizes.png")
    (output_dir / "report.json").write_text(json.dumps(report, indent=2))
    return report


def remove_stale_outputs(output_dir: Path, names: tuple[str, ...]) -> None:
    """Remove an earlier curation's kept rows from `output_dir`, by name: `kept_indices.npy`, the Ray engine's Parquet
    ids (`kept/`, removed only when it holds nothing but Parquet files) and the kept rows saved with `save_to_disk`
    (`dataset/`, removed only when it is such a folder): a user's own folder of that name is left alone."""
    from ..data.loaders import is_saved_to_disk

    if "kept_indices.npy" in names:
        (output_dir / "kept_indices.npy").unlink(missing_ok=True)
    kept = output_dir / "kept"
    if "kept" in names and kept.is_dir() and all(path.suffix == ".parquet" for path in kept.iterdir()):
        shutil.rmtree(kept)
    if "dataset" in names and is_saved_to_disk(output_dir / "dataset"):
        shutil.rmtree(output_dir / "dataset")


def embed_images_with(model_name_or_path: str, dataset, batch_size: int = 256) -> np.ndarray:
    """L2-normalised image embeddings of `dataset`'s images by a CLIP, student or teacher folder (its own
    processor), on the GPU if there is one."""
    from processing_dclip import DCLIPProcessor

    from ..evaluation import embed_images, load_clip_towers

    model = load_clip_towers(model_name_or_path)
    processor = DCLIPProcessor.from_pretrained(model_name_or_path, trust_remote_code=False)
    return embed_images(model, processor, dataset, batch_size=batch_size)


def check_max_removed_fraction(value: float) -> None:
    """Raise a `ValueError` unless `value` is a fraction of the rows, in [0, 1] (the CLI checks it before any work)."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"--max_removed_fraction is a fraction of the rows, in [0, 1], got {value}")


def removal_refusal(report: dict, max_removed_fraction: float) -> str | None:
    """Why a balance `report` is refused: it removes more than `max_removed_fraction` of the rows; else None."""
    if report["removed_fraction"] <= max_removed_fraction:
        return None
    thresholds = report.get("thresholds", {})
    removed = ", ".join(f"{name} {count:,}" for name, count in report["removed"].items() if count)
    return (f"this curation would remove {report['samples'] - report['kept']:,} of {report['samples']:,} rows "
            f"({report['removed_fraction']:.1%}: {removed}) at duplicate threshold "
            f"{thresholds.get('duplicate_threshold')} and semantic threshold {thresholds.get('semantic_threshold')}, "
            f"more than --max_removed_fraction {max_removed_fraction}. No kept_indices.npy was written; report.json "
            "and cluster_sizes.png were, to look at. Raise the thresholds (or leave them unset, to calibrate them "
            "to these embeddings), or pass --allow_large_removal true to keep this result.")


def _embeddings(dataset, output_dir: Path, model_name_or_path, embeddings_file, batch_size, engine):
    """The image embeddings (a memmap of `embeddings_file`, or computed and saved), their file and their source."""
    if embeddings_file is not None:
        return np.load(embeddings_file, mmap_mode="r"), embeddings_file, embeddings_file
    if model_name_or_path is None:
        raise ValueError("semantic balance needs image embeddings: give --model_name_or_path or --embeddings")
    if hasattr(engine, "embed"):  # the engine's workers embed their parts of the data set
        embeddings = engine.embed(model_name_or_path, dataset, batch_size)
    else:
        embeddings = embed_images_with(model_name_or_path, dataset, batch_size)
    np.save(output_dir / "image_embeddings.npy", embeddings)
    return embeddings, str(output_dir / "image_embeddings.npy"), model_name_or_path


def injected_kinds(dataset, result: BalanceResult) -> dict:
    """On the embedded data (a `redundancy` column): per injected kind, how many rows were kept or dropped why."""
    kinds = np.asarray(dataset["redundancy"])
    return {kind: {REASONS.get(code, "kept"): int(((kinds == kind) & (result.reason == code)).sum())
                   for code in (KEPT, *REASONS)} for kind in np.unique(kinds)}


def curate_dataset(dataset, output_dir: str | Path, config: SemanticBalanceConfig | None = None,
                   model_name_or_path: str | None = None, embeddings_file: str | None = None,
                   batch_size: int = 256, save_dataset: bool = False, engine=None,
                   max_removed_fraction: float = DEFAULT_MAX_REMOVED_FRACTION,
                   allow_large_removal: bool = False) -> dict:
    """
    Image semantic balance of a captioned-image `dataset`: embed its images with `model_name_or_path` (a teacher,
    student or any CLIP; saved as `image_embeddings.npy`) or read `embeddings_file` (a `.npy`, memory-mapped), pair
    pixel duplicates among its images (`dclip.curation.pixels`, where `dataset` has them), then write
    [`write_balance_outputs`]'s files and, with `save_dataset`, the kept rows as a data set (`dataset/`).
    A result that removes more than `max_removed_fraction` of the rows raises [`RemovalRefused`] (after writing the
    report, without `kept_indices.npy`) unless `allow_large_removal`.
    `engine`: None for this process's [`semantic_balance`], or another engine with the same result, called as
    `engine(embeddings_file, config, output_dir, extra_pairs)` (`dclip.curation.ray_engine.RayEngine`: on a Ray
    cluster), which embeds the images too where it has an `embed(model_name_or_path, dataset, batch_size)`.
    """
    config = config or SemanticBalanceConfig()
    check_max_removed_fraction(max_removed_fraction)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    embeddings, embeddings_file, source = _embeddings(dataset, output_dir, model_name_or_path, embeddings_file,
                                                      batch_size, engine)
    if dataset is not None and len(embeddings) != len(dataset):
        raise ValueError(f"{source}: {len(embeddings)} embeddings for a data set of {len(dataset)} rows")
    started = time.perf_counter()
    pixel_pairs = dataset_pixel_pairs(dataset, config)
    pixel_seconds = round(time.perf_counter() - started, 2)
    if engine is not None:
        result = engine(embeddings_file, config, output_dir, pixel_pairs)
    else:
        result = semantic_balance(embeddings, config, verbose=True, extra_pairs=pixel_pairs)
    if pixel_pairs is not None:  # the thumbnails and their pairs, before the balance proper
        result.seconds = {"pixel_duplicates": pixel_seconds, **result.seconds,
                          "total": round(result.seconds["total"] + pixel_seconds, 2)}
    extra = {"embeddings_from": source, "rows": len(embeddings), "engine": getattr(engine, "name", "local"),
             "pixel_duplicate_pairs": None if pixel_pairs is None else len(pixel_pairs[0])}
    if dataset is not None and "redundancy" in dataset.column_names:  # the embedded data: what was injected
        extra["removed_by_injected_kind"] = injected_kinds(dataset, result)
    refused = None if allow_large_removal else removal_refusal(result.report(), max_removed_fraction)
    report = write_balance_outputs(result, output_dir, config, extra, refused)
    if refused is not None:
        raise RemovalRefused(refused)
    # what this run did not write again is an earlier run's, and would disagree with kept_indices.npy
    remove_stale_outputs(output_dir, (() if getattr(engine, "writes_kept", False) else ("kept",))
                         + (() if save_dataset and dataset is not None else ("dataset",)))
    if save_dataset and dataset is not None:
        dataset.select(result.kept_indices).save_to_disk(str(output_dir / "dataset"))
        report["dataset"] = str(output_dir / "dataset")
    logger.info("semantic balance: kept %d of %d (%s)", report["kept"], report["samples"], report["removed"])
    return report
