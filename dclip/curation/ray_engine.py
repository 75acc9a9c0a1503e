"""
CLIP-CID's image semantic balance on a Ray cluster (`examples/curate.py --engine ray`): the steps of
`dclip.curation.semantic_balance`, with the same result, the per-sample and per-cluster work spread over Ray Data.

0. unset thresholds calibrated on the driver, as the local engine calibrates them (`dclip.curation.calibration`);
1. k-means (FAISS) on the driver, over `kmeans_sample`'s rows only (read from the embeddings file);
2. assignment: each block of rows finds its `duplicate_nprobe` nearest centres (the first is its cluster);
3. duplicates, group-wise: every row goes to each cluster it probes; in each cluster's group, the rows that probe it
   are range-searched against the cluster's own members (the pairs the inverted-file search of the local engine
   finds), and the driver drops the later sample of each pair in order (with any pairs found otherwise);
4. semantic redundancy and the cap, group-wise: each cluster's remaining members, by `balance_cluster`.

Workers read the rows they need from the `(samples, dim)` `.npy` file (memory-mapped; on several machines it must be
on storage they all see), so no step holds every embedding in one process besides a small-data k-means. Needs
`pip install -e ".[scale]"` (Ray).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .balance import DUPLICATE, KEPT, BalanceResult, SemanticBalanceConfig, balance_cluster
from .calibration import calibrate
from .duplicates import concat_pairs, drop_later_duplicates, duplicate_pairs
from .vectors import cluster_count, fit_centers, normalize_embeddings


logger = logging.getLogger(__name__)


def _rows(path: str, ids: np.ndarray) -> np.ndarray:
    """Rows `ids` of the embeddings file, L2-normalised (row by row, as the local engine normalises them)."""
    return normalize_embeddings(np.load(path, mmap_mode="r")[np.asarray(ids)], row_ids=np.asarray(ids))


def connect(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the Ray cluster at `address` (`ray.init`'s), else start a local one of `num_cpus` CPUs; once."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, num_cpus=None if address else num_cpus, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)


def _value(value):
    import ray

    return ray.get(value) if isinstance(value, ray.ObjectRef) else value


def _assign(batch: dict, path: str, centers, nprobe: int) -> dict:
    """Each row's cluster (a 1-nearest search, as the local engine's inverted file assigns it) and the `nprobe`
    clusters its duplicates are searched in (a k-nearest search, as the local range search probes them)."""
    import faiss

    centers = _value(centers)
    index = faiss.IndexFlatIP(centers.shape[1])
    index.add(centers)
    vectors = _rows(path, batch["id"])
    _, nearest = index.search(vectors, 1)
    _, probes = index.search(vectors, min(nprobe, len(centers)))
    return {"id": batch["id"], "cluster": nearest[:, 0].astype(np.int64), "probes": probes.astype(np.int64)}


def _explode(batch: dict) -> dict:
    """One row per (row, probed cluster)."""
    probes = batch["probes"]
    return {"probe": probes.T.reshape(-1), "id": np.tile(batch["id"], probes.shape[1]),
            "cluster": np.tile(batch["cluster"], probes.shape[1])}


def _pairs(group: dict, path: str, threshold: float) -> dict:
    """Duplicate pairs `(first < second)` of one probed cluster: its rows that probe it against its own members."""
    import faiss

    ids, probe = group["id"], group["probe"][0]
    own = group["cluster"] == probe
    if not own.any():
        return {"first": np.zeros(0, np.int64), "second": np.zeros(0, np.int64)}
    vectors = _rows(path, ids)  # the members are among the rows: read once
    # an inverted file of this one cluster, scanned as the local engine's is: the same scores, rounded the same way
    # (a flat index switches to BLAS for many queries, which rounds differently at the threshold)
    dim = vectors.shape[1]
    quantizer = faiss.IndexFlatIP(dim)
    quantizer.add(np.zeros((1, dim), dtype=np.float32))
    index = faiss.IndexIVFFlat(quantizer, dim, 1, faiss.METRIC_INNER_PRODUCT)
    index.is_trained = True
    index.add(np.ascontiguousarray(vectors[own]))
    index.nprobe = 1
    first, second = duplicate_pairs(index, vectors, threshold, ids, index_ids=ids[own])
    return {"first": first, "second": second}


def _balance(group: dict, path: str, centers, config: SemanticBalanceConfig) -> dict:
    ids = np.sort(group["id"])  # sample order, as the local engine visits a cluster
    center = _value(centers)[group["cluster"][0]]
    return {"id": ids, "reason": balance_cluster(_rows(path, ids), center, config)}


def _collect(dataset, columns: tuple[str, ...]) -> dict[str, np.ndarray]:
    parts: dict[str, list] = {name: [] for name in columns}
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        for name in columns:
            parts[name].append(batch[name])
    return {name: np.concatenate(values) if values else np.zeros(0, np.int64) for name, values in parts.items()}


def semantic_balance_ray(embeddings_file: str | Path, config: SemanticBalanceConfig | None = None,
                         address: str | None = None, num_cpus: int | None = None, block_rows: int = 65_536,
                         output_dir: str | Path | None = None,
                         extra_pairs: tuple[np.ndarray, np.ndarray] | None = None) -> BalanceResult:
    """
    `dclip.curation.semantic_balance` of the `(samples, dim)` embeddings in `embeddings_file` (`.npy`), on Ray: the
    cluster at `address` (`ray.init`'s; default: the one this process is connected to, else a local one with
    `num_cpus` CPUs). With `output_dir`, the kept sample ids are also written there as Parquet shards (`kept/`).
    `extra_pairs`: duplicate pairs found otherwise, as the local engine takes them.
    """
    import ray

    path = str(Path(embeddings_file).resolve())
    connect(address, num_cpus)
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    raw = np.load(path, mmap_mode="r")
    if raw.ndim != 2 or not len(raw):
        raise ValueError(f"{path}: expected a non-empty (samples, dim) array, got shape {raw.shape}")
    config, thresholds = calibrate(raw, config or SemanticBalanceConfig())
    seconds["calibration"] = round(time.perf_counter() - started, 2)
    mark = time.perf_counter()
    num_samples = len(raw)
    centers = fit_centers(raw, cluster_count(num_samples, config), config, normalize=True)
    centers_ref = ray.put(centers)
    seconds["kmeans"] = round(time.perf_counter() - mark, 2)

    mark = time.perf_counter()
    blocks = max(1, math.ceil(num_samples / block_rows))
    assigned = ray.data.range(num_samples, override_num_blocks=blocks).map_batches(
        _assign, fn_kwargs={"path": path, "centers": centers_ref, "nprobe": config.duplicate_nprobe},
        batch_format="numpy", batch_size=block_rows).materialize()
    pairs = _collect(assigned.map_batches(_explode, batch_format="numpy").groupby("probe").map_groups(
        _pairs, fn_kwargs={"path": path, "threshold": config.duplicate_threshold}, batch_format="numpy"),
        ("first", "second"))
    dropped = drop_later_duplicates(*concat_pairs((pairs["first"], pairs["second"]), extra_pairs), num_samples)
    seconds["duplicates"] = round(time.perf_counter() - mark, 2)

    mark = time.perf_counter()
    dropped_ref = ray.put(dropped)
    remaining = assigned.map_batches(
        lambda batch, dropped: {name: batch[name][~_value(dropped)[batch["id"]]] for name in ("id", "cluster")},
        fn_kwargs={"dropped": dropped_ref}, batch_format="numpy")
    balanced = remaining.groupby("cluster").map_groups(
        _balance, fn_kwargs={"path": path, "centers": centers_ref, "config": config},
        batch_format="numpy").materialize()
    reason = np.where(dropped, DUPLICATE, KEPT).astype(np.int8)
    decided = _collect(balanced, ("id", "reason"))
    reason[decided["id"]] = decided["reason"]
    cluster = np.empty(num_samples, dtype=np.int64)
    owners = _collect(assigned, ("id", "cluster"))
    cluster[owners["id"]] = owners["cluster"]
    if output_dir is not None:
        balanced.filter(expr=f"reason == {KEPT}").select_columns(["id"]).write_parquet(
            str(Path(output_dir).resolve() / "kept"), mode="overwrite")  # not appended to an earlier run's
    seconds["semantic"] = round(time.perf_counter() - mark, 2)
    seconds["total"] = round(time.perf_counter() - started, 2)
    return BalanceResult(reason=reason, cluster=cluster, centers=centers, seconds=seconds, thresholds=thresholds)


class _ImageEmbedder:
    """A Ray actor holding the embedding model: it embeds the rows of the data set that each batch of ids names."""

    def __init__(self, model_name_or_path: str, dataset, batch_size: int):
        from processing_dclip import DCLIPProcessor

        from ..evaluation import load_clip_towers

        self.model = load_clip_towers(model_name_or_path)
        self.processor = DCLIPProcessor.from_pretrained(model_name_or_path, trust_remote_code=False)
        self.dataset, self.batch_size = dataset, batch_size

    def __call__(self, batch: dict) -> dict:
        from ..evaluation import embed_images

        rows = self.dataset.select(batch["id"].tolist())
        return {"id": batch["id"], "embedding": embed_images(self.model, self.processor, rows, self.batch_size)}


def embed_images_ray(model_name_or_path: str, dataset, batch_size: int = 256, workers: int | None = None,
                     block_rows: int = 4096) -> np.ndarray:
    """`dclip.curation.embed_images_with` (the same embeddings) over a Ray cluster: `workers` actors (default: one
    per GPU, else 2), each with the model (on its GPU where the cluster has GPUs), embed blocks of `block_rows` rows;
    rows in order."""
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    workers = workers or gpus or 2
    embedded = ray.data.range(len(dataset), override_num_blocks=max(1, math.ceil(len(dataset) / block_rows))) \
        .map_batches(_ImageEmbedder, fn_constructor_kwargs={"model_name_or_path": model_name_or_path,
                                                            "dataset": dataset, "batch_size": batch_size},
                     batch_size=block_rows, batch_format="numpy", concurrency=workers, num_gpus=1 if gpus else 0,
                     num_cpus=1 if gpus else 0.5)  # half a CPU each: the reading tasks need CPUs beside the actors
    parts = _collect(embedded, ("id", "embedding"))
    out = np.empty_like(parts["embedding"])
    out[parts["id"]] = parts["embedding"]
    return out


@dataclass
class RayEngine:
    """`dclip.curation.curate_dataset`'s `engine` for a Ray cluster: at `address`, else a local one of `num_cpus`."""

    address: str | None = None
    num_cpus: int | None = None
    embed_workers: int | None = None  # model copies that embed images; default: one per GPU, else 2
    name: str = "ray"
    writes_kept: bool = True  # the kept ids, as Parquet shards under the output folder's `kept/`

    def embed(self, model_name_or_path: str, dataset, batch_size: int = 256) -> np.ndarray:
        connect(self.address, self.num_cpus)
        return embed_images_ray(model_name_or_path, dataset, batch_size, workers=self.embed_workers)

    def __call__(self, embeddings_file: str | Path, config: SemanticBalanceConfig,
                 output_dir: str | Path | None = None,
                 extra_pairs: tuple[np.ndarray, np.ndarray] | None = None) -> BalanceResult:
        return semantic_balance_ray(embeddings_file, config, address=self.address, num_cpus=self.num_cpus,
                                    output_dir=output_dir, extra_pairs=extra_pairs)
