"""Train the region detector, a base CLIP, the DCLIP teacher, and distil the student; print an evaluation summary.

    accelerate launch examples/train.py                                   # the embedded default, end to end
    python examples/train.py --stage distill --output_dir outputs/default  # one stage, reusing earlier ones
    accelerate launch examples/train.py --resume_from_checkpoint true      # after an interruption
    accelerate launch examples/train.py --resume_from_checkpoint outputs/default/student/checkpoint-200
    accelerate launch examples/train.py --push_to_hub --hub_model_id you/dclip-student  # card + upload at the end
    accelerate launch --multi_gpu --num_processes 8 examples/train.py --dataset_name dataset_coco.json \
        --image_root coco/ --student_model openai/clip-vit-base-patch32 \
        --teacher_model openai/clip-vit-large-patch14 --bf16 --per_device_train_batch_size 256
"""

from __future__ import annotations

import shlex
import sys

from transformers import HfArgumentParser

from dclip.arguments import DataArguments, DCLIPTrainingArguments, DistillationArguments, ModelArguments
from dclip.cli import PUSH_FAILED, leave_together, setup_logging
from dclip.pipeline import run
from dclip.reporting import format_summary


def main() -> None:
    parser = HfArgumentParser((ModelArguments, DataArguments, DistillationArguments, DCLIPTrainingArguments))
    model_args, data_args, distill_args, training_args = parser.parse_args_into_dataclasses()
    setup_logging(training_args.process_index)
    command = " ".join(["accelerate launch examples/train.py"] + [shlex.quote(a) for a in sys.argv[1:]])
    summary = run(model_args, data_args, distill_args, training_args, command=command)
    if training_args.process_index == 0:
        print(format_summary(summary))
        print(f"summary: {training_args.output_dir}/summary.json")
    leave_together()
    if summary.get("push_error"):  # the run itself is complete; only publishing failed
        print(f"error: {summary['push_error']}", file=sys.stderr)
        sys.exit(PUSH_FAILED)


if __name__ == "__main__":
    main()
