"""Print the README's tables of a default run from its `summary.json`: every model's metrics, and each comparison with
its paired-bootstrap 95% interval.

    accelerate launch examples/train.py && python benchmarks/default_tables.py outputs/default/summary.json
"""

from __future__ import annotations

import argparse
import json

from dclip.hub import format_difference


MODELS = {
    "base_clip": "base CLIP (the teacher's towers)",
    "teacher": "DCLIP teacher (fused)",
    "student": "DCLIP + instance student (published)",
    "student_none": "same student, no teacher",
    "student_clip_cid": "CLIP-CID student (cluster + instance)",
    "student_instance": "CLIP-CID student, instance only",
}
COLUMNS = (
    ("T2I R@1", "image_retrieval_recall@1"), ("T2I R@5", "image_retrieval_recall@5"),
    ("I2T R@1", "text_retrieval_recall@1"), ("I2T R@5", "text_retrieval_recall@5"),
    ("ZS colour", "zeroshot_label_color_acc1"), ("ZS shape", "zeroshot_label_shape_acc1"),
    ("ZS colour+shape", "zeroshot_label_color_shape_acc1"), ("ZS mean", "zeroshot_mean_acc1"),
    ("LP mean", "linear_probe_mean_acc1"), ("HN attribute", "hard_negative_accuracy_swap_attribute"),
    ("HN relation", "hard_negative_accuracy_swap_relation"), ("HN count", "hard_negative_accuracy_wrong_count"),
)
COMPARED = (("T2I R@1", "image_retrieval_recall@1"), ("I2T R@1", "text_retrieval_recall@1"),
            ("ZS mean", "zeroshot_mean_acc1"), ("LP mean", "linear_probe_mean_acc1"),
            ("HN attribute", "hard_negative_accuracy_swap_attribute"),
            ("HN relation", "hard_negative_accuracy_swap_relation"),
            ("HN count", "hard_negative_accuracy_wrong_count"))


def metrics_table(metrics: dict) -> list[str]:
    lines = ["| model | " + " | ".join(name for name, _ in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, label in MODELS.items():
        if name in metrics:
            cells = [f"{metrics[name][key]:.3f}" if key in metrics[name] else "-" for _, key in COLUMNS]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def comparison_table(comparisons: dict) -> list[str]:
    lines = ["| comparison | " + " | ".join(name for name, _ in COMPARED) + " |", "|---" * (len(COMPARED) + 1) + "|"]
    for pair, results in comparisons.items():
        model, baseline = pair.split(" vs ")
        cells = []
        for _, key in COMPARED:
            r = results.get(key)
            cells.append("-" if r is None else format_difference(r, mark="**"))
        lines.append(f"| {MODELS.get(model, model)} vs {MODELS.get(baseline, baseline)} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("summary", nargs="?", default="outputs/default/summary.json")
    summary = json.loads(open(parser.parse_args().summary).read())
    print("\n".join(metrics_table(summary["metrics"])))
    print()
    print("\n".join(comparison_table(summary.get("comparisons", {}))))
    print()
    for stage, info in summary.get("training", {}).items():
        print(f"- {stage}: {info['global_step']} steps in {info['seconds']} s")
    print(f"- total inside the run: {summary['seconds']} s")


if __name__ == "__main__":
    main()
