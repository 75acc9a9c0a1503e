"""What CLIP-CID's clusters mean on the embedded scenes: k-means of the teacher's whole-image embeddings (the
paper's `--cluster_on image`) against k-means of the DCLIP teacher's embedding of each image's largest region
(`--cluster_on region`), scored by normalised mutual information and purity with the scenes' class labels (the
main object's colour, shape and both: the zero-shot tasks). The README's "what this shows" figures:

    python benchmarks/cluster_labels.py --default outputs/default
"""

from __future__ import annotations

import argparse

import numpy as np
from sklearn.metrics import normalized_mutual_info_score

from dclip.arguments import DataArguments
from dclip.curation import assign_clusters, normalize_embeddings, spherical_kmeans
from dclip.data.loading import load_data
from dclip.targets import compute_teacher_features, largest_region_features
from dclip.teachers import FUSION, load_teacher


LABELS = ("label_color", "label_shape", "label_color_shape")


def purity(labels: np.ndarray, clusters: np.ndarray) -> float:
    """The fraction of rows whose cluster's most common label is their own."""
    return sum(np.bincount(labels[clusters == c]).max() for c in np.unique(clusters)) / len(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--default", default="outputs/default", help="the default run's output folder")
    parser.add_argument("--num_clusters", default="64,256", help="comma-separated K")
    parser.add_argument("--seed", type=int, default=42, help="the run's --seed (the embedded scenes, k-means)")
    args = parser.parse_args()
    data_args = DataArguments()
    data, _ = load_data(data_args, args.seed)
    teacher = load_teacher(f"{args.default}/teacher/final", FUSION)
    # the same cached pass as the run's teacher targets: the towers' (the base CLIP's) outputs on the training split
    features = compute_teacher_features(data["train"], teacher.model, teacher.processor, batch_size=256,
                                        **data_args.region_settings())
    sources = {
        "whole image (--cluster_on image)": normalize_embeddings(np.asarray(features["image_global_features"])),
        "largest region (--cluster_on region)": normalize_embeddings(largest_region_features(features)),
    }
    labels = {name: np.asarray(data["train"][name]) for name in LABELS}
    print("| clustered | K | " + " | ".join(f"NMI / purity, {name[6:].replace('_', '+')}" for name in LABELS) + " |")
    print("|---" * (len(LABELS) + 2) + "|")
    for source, embeddings in sources.items():
        for k in (int(k) for k in args.num_clusters.split(",")):
            clusters = assign_clusters(embeddings, spherical_kmeans(embeddings, k, seed=args.seed))
            cells = [f"{normalized_mutual_info_score(y, clusters):.2f} / {purity(y, clusters):.2f}"
                     for y in labels.values()]
            print(f"| {source} | {k} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
