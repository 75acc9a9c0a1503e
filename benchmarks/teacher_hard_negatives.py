"""The fused teacher's hard-negative accuracy against the students of a default run, with paired-bootstrap 95%
intervals over the same test pairs (the README's "does the teacher know more" figures):

    python benchmarks/teacher_hard_negatives.py --default outputs/default
"""

from __future__ import annotations

import argparse

import numpy as np

from dclip.arguments import DataArguments
from dclip.data.loading import load_data
from dclip.data.scenes import zero_shot_tasks
from dclip.evaluation import evaluate_checkpoint, paired_bootstrap
from dclip.hub import format_difference


KINDS = ("swap_attribute", "swap_relation", "wrong_count")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--default", default="outputs/default", help="the default run's output folder")
    parser.add_argument("--models", default="student_none,student,base_clip", help="its models to compare with")
    parser.add_argument("--seed", type=int, default=42, help="the run's --seed (the embedded scenes)")
    args = parser.parse_args()
    data, _ = load_data(DataArguments(), args.seed)
    teacher = evaluate_checkpoint(f"{args.default}/teacher/final", data["eval"], tasks=zero_shot_tasks())
    print("| teacher vs | " + " | ".join(f"HN {kind.replace('_', ' ')}" for kind in KINDS) + " |")
    print("|---" * (len(KINDS) + 1) + "|")
    for name in args.models.split(","):
        with np.load(f"{args.default}/eval/{name}.npz") as other:
            cells = []
            for kind in KINDS:
                key = f"hard_negative_accuracy_{kind}"
                result = paired_bootstrap(teacher.outcomes[key], other[key])
                cells.append(f"{result['a']:.3f} vs {result['b']:.3f}: {format_difference(result, mark='**')}")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
