"""Train a base CLIP, the DCLIP teacher, and distil the student, on the embedded default data (work in progress).

    accelerate launch examples/train.py --output_dir outputs/default
    python examples/train.py --stage distill --output_dir outputs/default   # one stage, reusing earlier ones
"""

from __future__ import annotations

import json
import sys

from transformers import HfArgumentParser, TrainingArguments

from dclip.pipeline import DataArguments, DistillationArguments, ModelArguments, run


def main() -> None:
    parser = HfArgumentParser((ModelArguments, DataArguments, DistillationArguments, TrainingArguments))
    argv = sys.argv[1:]
    if not any(a.startswith("--output_dir") for a in argv):
        argv += ["--output_dir", "outputs/default"]
    defaults = {"--per_device_train_batch_size": "128", "--logging_steps": "25", "--save_steps": "100",
                "--save_total_limit": "1", "--report_to": "none", "--dataloader_num_workers": "0"}
    for flag, value in defaults.items():
        if not any(a.startswith(flag) for a in argv):
            argv += [flag, value]
    model_args, data_args, distill_args, training_args = parser.parse_args_into_dataclasses(argv)
    summary = run(model_args, data_args, distill_args, training_args)
    for name, folder in summary["artefacts"].items():
        print(f"{name}: {folder}")
    print(json.dumps(summary["metrics"], indent=2))


if __name__ == "__main__":
    main()
