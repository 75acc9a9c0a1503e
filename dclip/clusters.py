"""CLIP-CID's cluster discrimination targets: k-means of the teacher's embeddings (or of the DCLIP teacher's largest
regions), each training row's cluster, and the fixed centres the student's embeddings are classified among."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from transformers import TrainingArguments

from .arguments import CLUSTER_SOURCES, REGION_CLUSTER_SOURCE
from .columns import TEACHER_IMAGE_EMBEDS
from .targets import largest_region_features
from .training import wait_for_everyone


def cluster_teacher_embeddings(train, num_clusters: int, training_args: TrainingArguments, folder: Path,
                               cluster_on: str = "image", regions=None) -> tuple[torch.Tensor, np.ndarray]:
    """
    CLIP-CID's clusters: spherical k-means (FAISS) of the teacher's embeddings, each row's nearest centre, and the
    centres the student's embeddings are classified among.
    `cluster_on`: the image embeddings (`teacher_image_embeds`, the paper's), the text embeddings, or `joint`, each
    pair's normalised sum of both (all in the one space the student's image and text embeddings are classified in,
    so the k-means centres are the classifier); or `region`, the DCLIP teacher's embedding of each image's largest
    region (its most prominent object; `regions`: the same rows with `compute_teacher_features` columns, default
    `train`): the rows are grouped by those, and each group's classifier centre is the normalised mean of its rows'
    `teacher_image_embeds` (empty groups dropped, labels renumbered).
    The main process runs k-means once and saves `cluster_centers.npy` in `folder` with `cluster_centers.json`, a
    fingerprint of the clustered embeddings, K and the seed: a resumed run and the other processes read them back (so
    every process and restart agrees); centres made from other embeddings are redone.
    """
    from .curation import assign_clusters, normalize_embeddings, spherical_kmeans

    def column(name: str) -> np.ndarray:
        return normalize_embeddings(np.asarray(train[name], dtype=np.float32))

    if cluster_on == REGION_CLUSTER_SOURCE:
        embeddings = normalize_embeddings(largest_region_features(train if regions is None else regions))
    else:
        parts = [column(name) for name in CLUSTER_SOURCES[cluster_on]]
        embeddings = parts[0] if len(parts) == 1 else normalize_embeddings(sum(parts))
    if not 1 <= num_clusters <= len(embeddings):  # on every process, before any of them waits for the main one
        raise ValueError(f"--num_clusters must be between 1 and the {len(embeddings)} training rows, got "
                         f"{num_clusters}")
    source = {"embeddings_sha256": hashlib.sha256(embeddings.tobytes()).hexdigest(), "rows": len(embeddings),
              "num_clusters": num_clusters, "seed": training_args.seed}
    path, source_path = folder / "cluster_centers.npy", folder / "cluster_centers.json"
    if training_args.process_index == 0:
        current = json.loads(source_path.read_text()) if source_path.is_file() and path.is_file() else None
        if current != source:
            folder.mkdir(parents=True, exist_ok=True)
            centers = spherical_kmeans(embeddings, num_clusters, seed=training_args.seed)
            np.save(folder / "cluster_centers.partial.npy", centers)
            os.replace(folder / "cluster_centers.partial.npy", path)
            source_path.write_text(json.dumps(source))
    wait_for_everyone()
    centers = np.load(path)
    labels = assign_clusters(embeddings, centers)
    if cluster_on == REGION_CLUSTER_SOURCE:
        used, labels = np.unique(labels, return_inverse=True)
        classified = column(TEACHER_IMAGE_EMBEDS)
        sums = np.zeros((len(used), classified.shape[1]), dtype=np.float64)
        np.add.at(sums, labels, classified)
        centers = normalize_embeddings(sums)
    return torch.from_numpy(centers), labels
