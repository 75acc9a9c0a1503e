"""Image semantic balance (CLIP-CID): drop perceptual duplicates and semantically redundant pairs before training.

    # the embedded scenes with injected redundancy, embedded by the default run's base CLIP (= the teacher's towers);
    # the thresholds are calibrated to those embeddings, and pixel duplicates are found among the images
    python examples/curate.py --model_name_or_path outputs/default/base_clip/final \
        --exact_duplicate_fraction 0.1 --near_duplicate_fraction 0.15 --concept_fraction 0.15
    # then train on the kept rows
    accelerate launch examples/train.py --train_indices outputs/curated/kept_indices.npy ...
    # web scale: embeddings computed elsewhere, one (rows, dim) .npy (read memory-mapped)
    python examples/curate.py --embeddings laion_image_embeds.npy --samples_per_cluster 400
    # the same on a Ray cluster (pip install -e ".[scale]"; the .npy on storage every node sees)
    python examples/curate.py --embeddings laion_image_embeds.npy --engine ray --ray_address auto

Writes `kept_indices.npy`, `cluster_centers.npy`, `report.json` (counts removed per reason, the thresholds applied,
cluster sizes before and after) and `cluster_sizes.png` to `--output_dir`; `--save_dataset` also writes the kept rows
as a data set. A curation that would remove more than `--max_removed_fraction` (0.5) of the rows writes its report
but no `kept_indices.npy`, says why and exits with status 4, unless `--allow_large_removal true`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from dclip.arguments import DataArguments
from dclip.cli import REFUSED, require_one_process, setup_logging
from dclip.curation import (
    DEFAULT_MAX_REMOVED_FRACTION,
    RemovalRefused,
    SemanticBalanceConfig,
    check_max_removed_fraction,
    curate_dataset,
)
from dclip.data.loading import load_data


@dataclass
class CurationArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "CLIP, DCLIP student or teacher that "
                                                                   "embeds the images"})
    embeddings: str | None = field(default=None, metadata={"help": "precomputed (rows, dim) image embeddings .npy; "
                                                           "rows in the training split's order"})
    output_dir: str = "outputs/curated"
    batch_size: int = 256
    save_dataset: bool = field(default=False, metadata={"help": "also save the kept rows with save_to_disk"})
    data_seed: int = field(default=42, metadata={"help": "seed of the embedded scenes: train.py's --seed"})
    engine: str = field(default="local", metadata={"help": "local (one machine's FAISS) or ray (the same result on "
                                                   "a Ray cluster; pip install -e '.[scale]')"})
    ray_address: str | None = field(default=None, metadata={"help": "the Ray cluster to join (ray.init's address, "
                                                            "e.g. auto); default: a local one"})
    ray_num_cpus: int | None = field(default=None, metadata={"help": "CPUs of the local Ray cluster"})
    ray_embed_workers: int | None = field(default=None, metadata={"help": "model copies embedding the images on "
                                                                  "Ray; default: one per GPU, else 2"})
    max_removed_fraction: float = field(default=DEFAULT_MAX_REMOVED_FRACTION, metadata={
        "help": "a curation that would remove more of the rows stops and says why (see --allow_large_removal)"})
    allow_large_removal: bool = field(default=False, metadata={"help": "keep a result that removes more than "
                                                               "--max_removed_fraction"})

    def __post_init__(self):
        if self.engine not in ("local", "ray"):
            raise ValueError(f"--engine must be local or ray, got {self.engine!r}")
        check_max_removed_fraction(self.max_removed_fraction)


INJECTED = {"exact": "exact copies", "near": "jittered re-renders", "concept": "popular-concept repeats",
            "none": "originals"}


def injected_table(kinds: dict) -> str:
    """A Markdown table: per injected kind of the embedded data, its rows and what was kept or dropped why."""
    reasons = [name for name in next(iter(kinds.values())) if name != "kept"]
    lines = ["| injected kind | rows | kept | " + " | ".join(name.replace("_", " ") for name in reasons) + " |",
             "|---" * (3 + len(reasons)) + "|"]
    for kind in sorted(kinds, key=list(INJECTED).index):
        counts, total = kinds[kind], sum(kinds[kind].values())
        lines.append(f"| {INJECTED[kind]} | {total:,} | {counts['kept']:,} ({counts['kept'] / total:.1%}) | "
                     + " | ".join(f"{counts[name]:,}" for name in reasons) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = HfArgumentParser((CurationArguments, DataArguments, SemanticBalanceConfig))
    args, data_args, config = parser.parse_args_into_dataclasses()
    require_one_process(parser, "examples/curate.py")
    setup_logging()
    dataset = None
    if args.embeddings is None or data_args.dataset_name is not None or args.save_dataset:
        data, _ = load_data(data_args, args.data_seed)
        dataset = data["train"]
    engine = None
    if args.engine == "ray":
        from dclip.curation.ray_engine import RayEngine

        engine = RayEngine(args.ray_address, args.ray_num_cpus, args.ray_embed_workers)
    try:
        report = curate_dataset(dataset, args.output_dir, config, model_name_or_path=args.model_name_or_path,
                                embeddings_file=args.embeddings, batch_size=args.batch_size,
                                save_dataset=args.save_dataset, engine=engine,
                                max_removed_fraction=args.max_removed_fraction,
                                allow_large_removal=args.allow_large_removal)
    except RemovalRefused as refused:
        print(f"curate.py stopped: {refused}", file=sys.stderr)
        sys.exit(REFUSED)
    print(f"kept {report['kept']:,} of {report['samples']:,} pairs ({report['removed_fraction']:.1%} removed): "
          + ", ".join(f"{name} {count:,}" for name, count in report["removed"].items()))
    thresholds = report["thresholds"]
    print(f"thresholds: duplicate {thresholds['duplicate_threshold']:.6f}, semantic "
          f"{thresholds['semantic_threshold']:.6f}" + (f", pixel {config.pixel_threshold}" if
                                                       report["pixel_duplicate_pairs"] is not None else ""))
    if "removed_by_injected_kind" in report:  # the embedded data: what happened to each injected kind
        print(injected_table(report["removed_by_injected_kind"]))
    print(f"report: {args.output_dir}/report.json, plot: {report['plot']}")


if __name__ == "__main__":
    main()
