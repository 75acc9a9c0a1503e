"""Write the paper tables on the default data from the runs of `benchmarks/paper_tables.sh`: `results.json` (every
metric of every model), markdown tables in BENCHMARKS.md (between the `paper-tables` markers) and the plots in
`benchmarks/figures/`.

    python benchmarks/paper_tables.py --default outputs/default --runs outputs/paper_tables --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np


HERE = Path(__file__).resolve().parent
BEGIN, END = "<!-- paper-tables:begin -->", "<!-- paper-tables:end -->"
TASKS = (("label_color", "colour"), ("label_shape", "shape"), ("label_color_shape", "colour+shape"))
# (row label, run folder under --runs or "default:<model>", command that trains it after the default run)
MODELS = (
    ("base CLIP", "default:base_clip", "`accelerate launch examples/train.py` (stage pretrain)"),
    ("DCLIP teacher (base top-16 re-ranked)", "default:teacher", "the same run (stage teacher)"),
    ("DCLIP student", "default:student", "the same run (stage distill, `--method dclip`)"),
    ("CLIP-CID student", "clip_cid", "`--method clip_cid`"),
    ("DCLIP + CLIP-CID student", "dclip_clip_cid", "`--method dclip+clip_cid`"),
    ("same-size student, no teacher", "no_teacher", "`--cosine_image_weight 0 --cosine_text_weight 0`"),
)
CLUSTER_ROWS = (
    ("instance only", "instance_only", "`--method clip_cid --cluster_image_weight 0 --cluster_text_weight 0`"),
    ("cluster + instance, K = 16", "clip_cid_k16", "`--method clip_cid --num_clusters 16`"),
    ("cluster + instance, K = 64 (default)", "clip_cid", "`--method clip_cid`"),
    ("cluster + instance, K = 256", "clip_cid_k256", "`--method clip_cid --num_clusters 256`"),
)
BALANCE_ROWS = (("all pairs", "redundant_full", None),
                ("balanced, semantic threshold 0.9999", "redundant_balanced_0.9999", "curated_0.9999"),
                ("balanced, semantic threshold 0.9998", "redundant_balanced_0.9998", "curated_0.9998"))


def zero_shot_mean(metrics: dict) -> float:
    return float(np.mean([metrics[f"zeroshot_{task}_acc1"] for task, _ in TASKS]))


def probe_mean(metrics: dict) -> float:
    return float(np.mean([metrics[f"linear_probe_{task}_acc1"] for task, _ in TASKS]))


def load_results(default: Path, runs: Path) -> dict:
    default_metrics = json.loads((default / "summary.json").read_text())["metrics"]
    results = {"models": {}, "curation": {}}
    for _, source, _ in MODELS + CLUSTER_ROWS + BALANCE_ROWS:
        if source.startswith("default:"):
            results["models"][source] = default_metrics[source.split(":")[1]]
        else:
            summary = json.loads((runs / source / "summary.json").read_text())
            results["models"][source] = summary["metrics"]["student"]
    for _, _, curated in BALANCE_ROWS:
        if curated:
            results["curation"][curated] = json.loads((runs / curated / "report.json").read_text())
    return results


def cell(metrics: dict, key: str) -> str:
    return f"{metrics[key]:.3f}" if key in metrics else "-"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def markdown(results: dict, command: str, seconds: float | None = None) -> str:
    models = results["models"]
    base = models["default:base_clip"]
    took = f"{int(seconds // 60)} min {int(seconds % 60)} s for the run these figures come from; " if seconds else ""
    lines = [BEGIN, "", f"Regenerate: `{command}` ({took}`REUSE_DEFAULT=1` reuses an "
             "existing default run). Every student starts from the default run's base CLIP and trains 300 steps of "
             "128 pairs at learning rate 2e-4 against its teacher; evaluation on the 1,000 test scenes (one caption "
             "per image). T2I: text-to-image retrieval, I2T: image-to-text, ZS: zero-shot top-1, LP: linear probe "
             "(logistic regression on frozen image features, fitted on the validation split), HN: hard-negative "
             "accuracy (own caption above a swapped-attribute, swapped-relation or wrong-count caption).", "",
             "**Retrieval**", ""]
    rows = []
    for label, source, _ in MODELS:
        m = models[source]
        rows.append([label] + [cell(m, f"image_retrieval_recall@{k}") for k in (1, 5, 10)]
                    + [cell(m, f"text_retrieval_recall@{k}") for k in (1, 5, 10)]
                    + [cell(m, "image_retrieval_mAP"), cell(m, "text_retrieval_mAP")])
    lines += table(["model", "T2I R@1", "T2I R@5", "T2I R@10", "I2T R@1", "I2T R@5", "I2T R@10", "T2I mAP",
                    "I2T mAP"], rows)
    lines += ["", "**Classification** (the teacher has no classifier of its own: it re-ranks pairs)", ""]
    rows = []
    for label, source, _ in MODELS:
        m = models[source]
        if "zeroshot_label_color_acc1" not in m:
            continue
        rows.append([label] + [cell(m, f"zeroshot_{task}_acc1") for task, _ in TASKS]
                    + [f"{zero_shot_mean(m):.3f}", f"{zero_shot_mean(m) / zero_shot_mean(base):.1%}"]
                    + [cell(m, f"linear_probe_{task}_acc1") for task, _ in TASKS] + [f"{probe_mean(m):.3f}"]
                    + [cell(m, "hard_negative_accuracy")])
    lines += table(["model"] + [f"ZS {name}" for _, name in TASKS] + ["ZS mean", "ZS retention"]
                   + [f"LP {name}" for _, name in TASKS] + ["LP mean", "HN"], rows)
    lines += ["", "Students: " + "; ".join(f"{label}: {how}" for label, _, how in MODELS[3:]) + ".", "",
              "![Recall@1 per model](benchmarks/figures/paper_retrieval.png)", "",
              "**CLIP-CID: cluster discrimination** (default data, teacher image embeddings clustered into K groups)",
              ""]
    rows = []
    for label, source, _ in CLUSTER_ROWS:
        m = models[source]
        rows.append([label, cell(m, "image_retrieval_recall@1"), cell(m, "text_retrieval_recall@1")]
                    + [cell(m, f"zeroshot_{task}_acc1") for task, _ in TASKS]
                    + [f"{zero_shot_mean(m):.3f}", f"{probe_mean(m):.3f}"])
    lines += table(["student", "T2I R@1", "I2T R@1"] + [f"ZS {name}" for _, name in TASKS] + ["ZS mean", "LP mean"],
                   rows)
    lines += ["", "**Image semantic balance** (training scenes with 40% injected redundancy: 10% exact copies, 15% "
              "jittered re-renders, 15% repeats of three popular concepts; embedded by the base CLIP, 50 clusters, "
              "duplicate threshold 0.99999; DCLIP students, same 300 steps)", ""]
    rows = []
    full = results["models"]["redundant_full"]
    for label, source, curated in BALANCE_ROWS:
        m = models[source]
        report = results["curation"].get(curated)
        pairs = f"{report['kept']:,} ({-report['removed_fraction']:.1%})" if report else "20,000"
        rows.append([label, pairs, cell(m, "image_retrieval_recall@1"), cell(m, "text_retrieval_recall@1")]
                    + [cell(m, f"zeroshot_{task}_acc1") for task, _ in TASKS]
                    + [f"{zero_shot_mean(m):.3f}", f"{probe_mean(m):.3f}",
                       f"{100 * (m['image_retrieval_recall@1'] - full['image_retrieval_recall@1']):+.1f} / "
                       f"{100 * (m['text_retrieval_recall@1'] - full['text_retrieval_recall@1']):+.1f} / "
                       f"{100 * (zero_shot_mean(m) - zero_shot_mean(full)):+.1f}"])
    lines += table(["trained on", "pairs", "T2I R@1", "I2T R@1"] + [f"ZS {name}" for _, name in TASKS]
                   + ["ZS mean", "LP mean", "points vs all pairs (T2I R@1 / I2T R@1 / ZS mean)"], rows)
    lines += ["", "What each balancing removed, by injected kind (kept / perceptual duplicate / semantic redundant):",
              ""]
    for curated, report in results["curation"].items():
        kinds = report.get("removed_by_injected_kind", {})
        lines.append(f"- `{curated}`: " + "; ".join(
            f"{kind} {counts.get('kept', 0):,} / {counts.get('perceptual_duplicate', 0):,} / "
            f"{counts.get('semantic_redundant', 0):,}" for kind, counts in kinds.items()))
    lines += ["", END]
    return "\n".join(lines)


def plot(results: dict, figures: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures.mkdir(parents=True, exist_ok=True)
    labels = [label for label, _, _ in MODELS]
    metrics = [results["models"][source] for _, source, _ in MODELS]
    series = {"T2I R@1": [m["image_retrieval_recall@1"] for m in metrics],
              "I2T R@1": [m["text_retrieval_recall@1"] for m in metrics],
              "ZS mean": [zero_shot_mean(m) if "zeroshot_label_color_acc1" in m else np.nan for m in metrics]}
    fig, ax = plt.subplots(figsize=(10, 4.2))
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        ax.bar(np.arange(len(labels)) + (i - (len(series) - 1) / 2) * width, values, width, label=name)
    ax.set_xticks(np.arange(len(labels)), [re.sub(r" \(.*\)", "", label) for label in labels], rotation=15,
                  ha="right", fontsize=8)
    ax.set_ylabel("accuracy")
    ax.set_title("Default data, 1,000 test scenes")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = figures / "paper_retrieval.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--default", default="outputs/default")
    parser.add_argument("--runs", default="outputs/paper_tables")
    parser.add_argument("--write", default=None, help="markdown file whose paper-tables section is replaced")
    parser.add_argument("--seconds", type=float, default=None,
                        help="how long the runs took (paper_tables.sh passes it)")
    args = parser.parse_args()
    results = load_results(Path(args.default), Path(args.runs))
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "paper_tables.json").write_text(json.dumps(results, indent=2))
    plot(results, HERE / "figures")
    text = markdown(results, "bash benchmarks/paper_tables.sh", args.seconds)
    if args.write:
        target = Path(args.write)
        current = target.read_text() if target.exists() else ""
        if BEGIN in current and END in current:
            current = current[: current.index(BEGIN)] + text + current[current.index(END) + len(END):]
        else:
            current = current.rstrip() + "\n\n## Paper tables on the default data\n\n" + text + "\n"
        target.write_text(current)
    print(text)


if __name__ == "__main__":
    main()
