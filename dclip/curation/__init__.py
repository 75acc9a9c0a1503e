"""CLIP-CID's image semantic balance (`examples/curate.py`): drop perceptual duplicates and semantically redundant
pairs before training, so that over-represented concepts are thinned and rare ones kept.

- `balance`: the settings and the algorithm on one machine (`semantic_balance`);
- `calibration`: thresholds fitted to the embeddings they are given;
- `duplicates` and `vectors`: FAISS range searches for duplicate pairs; normalisation, row reads and k-means;
- `pixels`: perceptual duplicates from the images' own pixels;
- `curate`: a whole run over a data set, with its report and the guard against removing too much;
- `ray_engine`: the same result on a Ray cluster (`pip install -e ".[scale]"`).
"""

from .balance import (
    CAPPED,
    DUPLICATE,
    KEPT,
    REASONS,
    SEMANTIC,
    BalanceResult,
    SemanticBalanceConfig,
    balance_cluster,
    greedy_diverse_subset,
    semantic_balance,
)
from .calibration import EXACT_COPY_DISTANCE, calibrate, nearest_neighbour_distances
from .curate import (
    DEFAULT_MAX_REMOVED_FRACTION,
    RemovalRefused,
    check_max_removed_fraction,
    curate_dataset,
    embed_images_with,
    plot_cluster_sizes,
    write_balance_outputs,
)
from .duplicates import drop_later_duplicates, duplicate_pairs, find_duplicate_pairs, find_duplicates, ivf_index
from .pixels import dataset_pixel_pairs, pixel_duplicate_pairs, thumbnail_vectors
from .vectors import (
    assign_clusters,
    cluster_count,
    fit_centers,
    kmeans_sample,
    normalize_embeddings,
    read_rows,
    spherical_kmeans,
)


__all__ = [
    "CAPPED", "DUPLICATE", "EXACT_COPY_DISTANCE", "KEPT", "REASONS", "SEMANTIC", "DEFAULT_MAX_REMOVED_FRACTION",
    "BalanceResult", "RemovalRefused", "SemanticBalanceConfig", "assign_clusters", "balance_cluster", "calibrate",
    "check_max_removed_fraction",
    "cluster_count", "curate_dataset", "dataset_pixel_pairs", "drop_later_duplicates", "duplicate_pairs",
    "embed_images_with", "find_duplicate_pairs", "find_duplicates", "fit_centers", "greedy_diverse_subset",
    "ivf_index", "kmeans_sample", "nearest_neighbour_distances", "normalize_embeddings", "pixel_duplicate_pairs",
    "plot_cluster_sizes", "read_rows", "semantic_balance", "spherical_kmeans", "thumbnail_vectors",
    "write_balance_outputs",
]
