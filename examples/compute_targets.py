"""Teacher targets as a sharded, resumable job: each process of the launch encodes its share of the shards (each image
once, each caption once; a DCLIP teacher fuses the pairs from those features) and writes them as Parquet with a
manifest; a rerun recomputes only the shards that are missing or corrupt.

    # the default run's fused teacher on the embedded scenes, in 2 processes
    accelerate launch --num_processes 2 examples/compute_targets.py \
        --teacher_model outputs/default/teacher/final --targets_dir outputs/targets
    # a student reads them by sample id instead of computing its own
    accelerate launch examples/train.py --stage distill --teacher_model outputs/default/teacher/final \
        --teacher_targets outputs/targets

Rows of one image are found by the data's `image_id` column (COCO), else by their stored bytes; keep them adjacent (as
COCO's loaders do) so that they fall in one shard.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import HfArgumentParser

from dclip.arguments import DataArguments
from dclip.cli import leave_together, setup_logging
from dclip.data.loading import load_data


@dataclass
class TargetArguments:
    teacher_model: str = field(metadata={"help": "the teacher: a DCLIP teacher folder (fused embeddings) or any "
                                                 "CLIP-family checkpoint (its own embeddings), with its processor"})
    teacher_kind: str = field(default="auto", metadata={"help": "dclip, clip or auto (from the folder)"})
    detector_path: str | None = field(default=None, metadata={"help": "YOLO weights for a DCLIP teacher's regions "
                                                                      "(default: its folder's)"})
    targets_dir: str = field(default="outputs/targets", metadata={"help": "where the shards and manifest go"})
    shard_size: int = field(default=4096, metadata={"help": "rows per shard"})
    batch_size: int = field(default=256, metadata={"help": "rows per teacher forward"})
    targets_dtype: str = field(default="float32", metadata={"help": "stored dtype: float32 or float16 (read back "
                                                                    "as float32)"})
    data_seed: int = field(default=42, metadata={"help": "seed of the embedded scenes: train.py's --seed"})


def main() -> None:
    from dclip.detector import import_ultralytics_as_one_process
    from dclip.shards import compute_target_shards, launch_state, together, write_manifest
    from dclip.teachers import load_teacher

    args, data_args = HfArgumentParser((TargetArguments, DataArguments)).parse_args_into_dataclasses()
    setup_logging()
    import_ultralytics_as_one_process()
    state = launch_state()
    with state.main_process_first():  # the others read the main process's data caches
        data, _ = load_data(data_args, args.data_seed)
    train = data["train"]
    teacher = load_teacher(args.teacher_model, None if args.teacher_kind == "auto" else args.teacher_kind,
                           detector_path=args.detector_path).to(state.device)
    options = dict(shard_size=args.shard_size, dtype=args.targets_dtype, **data_args.region_settings())
    # `together`: a failure in one process stops every process, none waits at a barrier for it
    stats = together(compute_target_shards, train, teacher, args.targets_dir, batch_size=args.batch_size,
                     process_index=state.process_index, num_processes=state.num_processes, **options)
    print(f"process {state.process_index}: {stats['computed']} shard(s) computed ({stats['rows']:,} rows, "
          f"{stats['images_encoded']:,} images encoded), {stats['skipped']} already complete")
    manifest = together(lambda: write_manifest(train, teacher, args.targets_dir, **options)
                        if state.is_main_process else None)
    if manifest is not None:
        print(f"manifest: {manifest}")
    leave_together()


if __name__ == "__main__":
    main()
