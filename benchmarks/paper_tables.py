"""Write the paper tables on the default data from the runs of `benchmarks/paper_tables.sh`: `results.json` (every
metric of every model, every comparison), markdown tables in BENCHMARKS.md (between the `paper-tables` markers) and
the plot in `benchmarks/figures/`. Each comparison is a paired bootstrap (2,000 resamples, 95% interval) of the two
models' per-query outcomes on the same test queries, read from each run's `eval/<model>.npz`.

    python benchmarks/paper_tables.py --default outputs/default --runs outputs/paper_tables --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from dclip.hub import format_difference
from dclip.reporting import compare


HERE = Path(__file__).resolve().parent
BEGIN, END = "<!-- paper-tables:begin -->", "<!-- paper-tables:end -->"
TASKS = (("label_color", "colour"), ("label_shape", "shape"), ("label_color_shape", "colour+shape"))
HARD_NEGATIVES = (("swap_attribute", "attribute"), ("swap_relation", "relation"), ("wrong_count", "count"))
T2I, I2T, ZS, LP = ("image_retrieval_recall@1", "text_retrieval_recall@1", "zeroshot_mean_acc1",
                    "linear_probe_mean_acc1")
# (row label, "<run>:<model>" with run "default" or a folder under --runs, how it was trained)
MODELS = (
    ("base CLIP (the teacher's towers)", "default:base_clip", "the default run, stage pretrain"),
    ("DCLIP teacher (fused)", "default:teacher", "the default run, stage teacher"),
    ("DCLIP + instance student (published)", "default:student", "the default run (`--method dclip+instance`)"),
    ("DCLIP student (DCLIP alone)", "dclip:student", "`--method dclip`"),
    ("same student, no teacher", "default:student_none", "the default run (`--method none`)"),
    ("CLIP-CID student", "default:student_clip_cid", "the default run (`--method clip_cid`)"),
    ("CLIP-CID, instance only", "default:student_instance", "the default run (`--method instance`)"),
    ("DCLIP + CLIP-CID student", "dclip_clip_cid:student", "`--method dclip+clip_cid`"),
)
NO_TEACHER = "default:student_none"
CLUSTER_ROWS = (
    ("instance only", "default:student_instance"),
    ("cluster on the base CLIP's image embeddings, K = 64 (the paper's)", "clip_cid_image:student"),
    ("cluster on the teacher's largest regions, K = 64", "clip_cid_region_k64:student"),
    ("cluster on the teacher's largest regions, K = 256 (default)", "default:student_clip_cid"),
)
FINETUNE_ROWS = (
    ("starting point: the no-teacher clip-tiny", "default:student_none"),
    ("fine-tuned with the base CLIP as teacher", "finetune_teacher:student"),
    ("fine-tuned without a teacher (control)", "finetune_none:student"),
)


def load_model(default: Path, runs: Path, source: str) -> tuple[dict, dict]:
    """A model's metrics (its run's `summary.json`) and per-query outcomes (`eval/<model>.npz`)."""
    run, model = source.split(":")
    folder = default if run == "default" else runs / run
    metrics = json.loads((folder / "summary.json").read_text())["metrics"][model]
    with np.load(folder / "eval" / f"{model}.npz") as outcomes:
        return metrics, dict(outcomes)


def load_results(default: Path, runs: Path, thresholds: list[str]) -> dict:
    balance = [("all pairs", "redundant_full:student", None)] + [
        ("balanced, curate.py's defaults" if t == "default" else f"balanced, semantic threshold {t}",
         f"redundant_balanced_{t}:student", f"curated_{t}") for t in thresholds]
    sources = {source for _, source, *_ in MODELS + CLUSTER_ROWS + FINETUNE_ROWS + tuple(balance)}
    metrics, outcomes = {}, {}
    for source in sorted(sources):
        metrics[source], outcomes[source] = load_model(default, runs, source)
    pairs = ([(source, NO_TEACHER) for _, source, _ in MODELS if source != NO_TEACHER]
             + [(source, CLUSTER_ROWS[0][1]) for _, source in CLUSTER_ROWS[1:]]
             + [(source, FINETUNE_ROWS[0][1]) for _, source in FINETUNE_ROWS[1:]]
             + [(FINETUNE_ROWS[1][1], FINETUNE_ROWS[2][1])]
             + [(source, balance[0][1]) for _, source, _ in balance[1:]])
    curation = {curated: json.loads((runs / curated / "report.json").read_text()) for _, _, curated in balance
                if curated}
    return {"metrics": metrics, "comparisons": compare(outcomes, pairs), "curation": curation,
            "balance": [list(row) for row in balance]}


def cell(metrics: dict, key: str) -> str:
    return f"{metrics[key]:.3f}" if key in metrics else "-"


def interval(results: dict, pair: str, key: str) -> str:
    """`+0.042 [+0.012, +0.071] **` (** where the interval excludes 0), or `-` where not compared."""
    r = results["comparisons"].get(pair, {}).get(key)
    return "-" if r is None else format_difference(r, mark="**")


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _main_tables(results: dict) -> list[str]:
    metrics = results["metrics"]
    lines = ["**Retrieval and classification** (T2I: text-to-image, I2T: image-to-text, ZS: zero-shot top-1, LP: "
             "linear probe, HN: hard-negative accuracy, own caption above one with a swapped attribute, a swapped "
             "relation or a wrong count)", ""]
    rows = []
    for label, source, _ in MODELS:
        m = metrics[source]
        rows.append([label] + [cell(m, f"image_retrieval_recall@{k}") for k in (1, 5, 10)]
                    + [cell(m, f"text_retrieval_recall@{k}") for k in (1, 5, 10)]
                    + [cell(m, "image_retrieval_mAP"), cell(m, "text_retrieval_mAP")])
    lines += table(["model", "T2I R@1", "T2I R@5", "T2I R@10", "I2T R@1", "I2T R@5", "I2T R@10", "T2I mAP",
                    "I2T mAP"], rows) + [""]
    rows = [[label] + [cell(metrics[source], f"zeroshot_{task}_acc1") for task, _ in TASKS]
            + [cell(metrics[source], ZS), cell(metrics[source], LP)]
            + [cell(metrics[source], f"hard_negative_accuracy_{kind}") for kind, _ in HARD_NEGATIVES]
            for label, source, _ in MODELS]
    lines += table(["model"] + [f"ZS {name}" for _, name in TASKS] + ["ZS mean", "LP mean"]
                   + [f"HN {name}" for _, name in HARD_NEGATIVES], rows)
    lines += ["", "Each model against the same student trained without a teacher (difference, 95% interval; ** where "
              "it excludes 0, the only differences called a gain or a loss):", ""]
    keys = [T2I, I2T, ZS, LP] + [f"hard_negative_accuracy_{kind}" for kind, _ in HARD_NEGATIVES]
    rows = [[label] + [interval(results, f"{source} vs {NO_TEACHER}", key) for key in keys]
            for label, source, _ in MODELS if source != NO_TEACHER]
    lines += table(["model vs no teacher", "T2I R@1", "I2T R@1", "ZS mean", "LP mean"]
                   + [f"HN {name}" for _, name in HARD_NEGATIVES], rows)
    lines += ["", "How each was trained: " + "; ".join(f"{label}: {how}" for label, _, how in MODELS) + ".", "",
              "![Each model minus the no-teacher student, with 95% intervals](benchmarks/figures/paper_retrieval.png)"]
    return lines


def _cluster_table(results: dict) -> list[str]:
    metrics, baseline = results["metrics"], CLUSTER_ROWS[0][1]
    lines = ["**CLIP-CID: cluster discrimination** (k-means of the teacher's embeddings into K groups: the paper's "
             "whole-image embeddings, `--method clip_cid --cluster_on image --num_clusters 64`, or the DCLIP "
             "teacher's embedding of each image's largest region, `--cluster_on region --num_clusters K`; each "
             "against instance only)", ""]
    rows = [[label, cell(metrics[source], T2I), cell(metrics[source], I2T), cell(metrics[source], ZS),
             cell(metrics[source], LP), interval(results, f"{source} vs {baseline}", ZS),
             interval(results, f"{source} vs {baseline}", LP)] for label, source in CLUSTER_ROWS]
    return lines + table(["student", "T2I R@1", "I2T R@1", "ZS mean", "LP mean", "ZS mean vs instance only",
                          "LP mean vs instance only"], rows)


def _finetune_table(results: dict) -> list[str]:
    metrics, start = results["metrics"], FINETUNE_ROWS[0][1]
    lines = ["**The fine-tuning mode** (DCLIP's zero-shot-retention claim): the default run's no-teacher student, a "
             "pretrained clip-tiny 6x smaller than the teacher's towers, fine-tuned 300 more steps at learning rate "
             "2e-4 (`--student_model outputs/default/student_none/final --distill_learning_rate 2e-4`) with the "
             "base CLIP (6x larger) as teacher: contrastive loss plus CLIP-CID's instance term (`--method instance "
             "--contrastive_weight 1`, chosen on the validation split over the published method and DCLIP's cosine "
             "terms); "
             "retention: mean zero-shot accuracy over the starting point's", ""]
    rows = []
    for label, source in FINETUNE_ROWS:
        m, pair = metrics[source], f"{source} vs {start}"
        rows.append([label, cell(m, T2I), cell(m, I2T), cell(m, ZS), f"{m[ZS] / metrics[start][ZS]:.1%}",
                     cell(m, LP), interval(results, pair, T2I), interval(results, pair, I2T),
                     interval(results, pair, ZS)])
    lines += table(["model", "T2I R@1", "I2T R@1", "ZS mean", "ZS retention", "LP mean", "T2I R@1 vs start",
                    "I2T R@1 vs start", "ZS mean vs start"], rows)
    pair = f"{FINETUNE_ROWS[1][1]} vs {FINETUNE_ROWS[2][1]}"
    return lines + ["", f"With the teacher against without, both fine-tuned identically: T2I R@1 "
                        f"{interval(results, pair, T2I)}, I2T R@1 {interval(results, pair, I2T)}, ZS mean "
                        f"{interval(results, pair, ZS)}."]


def _balance_table(results: dict) -> list[str]:
    metrics, balance = results["metrics"], results["balance"]
    full = balance[0][1]
    lines = ["**Image semantic balance** (training scenes with 40% injected redundancy: 10% exact copies, 15% "
             "jittered re-renders, 15% repeats of three popular concepts; embedded by the base CLIP, 50 clusters; "
             "curate.py's defaults: thresholds calibrated to the embeddings and pixel duplicates; the fixed "
             "semantic thresholds: duplicate threshold 0.99999, embeddings only; published-method students, the "
             "same 300 steps)", ""]
    rows = []
    for label, source, curated in balance:
        m, report = metrics[source], results["curation"].get(curated)
        pairs = f"{report['kept']:,} ({-report['removed_fraction']:.1%})" if report else "20,000"
        rows.append([label, pairs, cell(m, T2I), cell(m, I2T), cell(m, ZS), cell(m, LP),
                     interval(results, f"{source} vs {full}", T2I), interval(results, f"{source} vs {full}", I2T)])
    lines += table(["trained on", "pairs", "T2I R@1", "I2T R@1", "ZS mean", "LP mean", "T2I R@1 vs all pairs",
                    "I2T R@1 vs all pairs"], rows)
    lines += ["", "What each balancing removed, by injected kind (kept / perceptual duplicate / semantic redundant):",
              ""]
    for curated, report in results["curation"].items():
        kinds = report.get("removed_by_injected_kind", {})
        lines.append(f"- `{curated}`: " + "; ".join(
            f"{kind} {counts.get('kept', 0):,} / {counts.get('perceptual_duplicate', 0):,} / "
            f"{counts.get('semantic_redundant', 0):,}" for kind, counts in kinds.items()))
    return lines


def markdown(results: dict, command: str, seconds: float | None = None, reused_default: bool = False) -> str:
    took = ""
    if seconds:
        took = (f"{int(seconds // 60)} min {int(seconds % 60)} s on 2 CPU cores for the runs these figures come from"
                + (", after the default run, which the README times; " if reused_default else "; "))
    lines = [BEGIN, "", f"Regenerate: `{command}` ({took}`REUSE_DEFAULT=1` reuses an existing default run). Every "
             "student is a clip-tiny (269k parameters) trained 300 steps of 128 pairs with the same seed and data as "
             "the one it is compared with; the teacher is the default run's region-pretrained clip-small towers "
             "(1.7M parameters) with the fused DCLIP block. Evaluation on the 1,000 test scenes; intervals are "
             "paired bootstraps over the test queries.", ""]
    for part in (_main_tables, _cluster_table, _finetune_table, _balance_table):
        lines += part(results) + [""]
    return "\n".join(lines + [END])


def plot(results: dict, figures: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures.mkdir(parents=True, exist_ok=True)
    compared = [(label, source) for label, source, _ in MODELS if source != NO_TEACHER]
    fig, ax = plt.subplots(figsize=(10, 4.2))
    series = (("T2I R@1", T2I), ("I2T R@1", I2T), ("ZS mean", ZS), ("LP mean", LP))
    width = 0.8 / len(series)
    for i, (name, key) in enumerate(series):
        found = [results["comparisons"].get(f"{source} vs {NO_TEACHER}", {}).get(key) for _, source in compared]
        values = [r["difference"] if r else np.nan for r in found]
        errors = np.array([[r["difference"] - r["low"], r["high"] - r["difference"]] if r else [0, 0]
                           for r in found]).T
        ax.bar(np.arange(len(compared)) + (i - (len(series) - 1) / 2) * width, values, width, label=name,
               yerr=errors, capsize=2)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(np.arange(len(compared)), [label for label, _ in compared], rotation=15, ha="right", fontsize=8)
    ax.set_ylabel("difference to the no-teacher student")
    ax.set_title("Default data, 1,000 test scenes: each model minus the same student without a teacher, "
                 "95% paired-bootstrap intervals", fontsize=9)
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
    parser.add_argument("--thresholds", nargs="+", default=["default", "0.9985", "0.9975"],
                        help="the semantic thresholds paper_tables.sh curated at (default: curate.py's defaults)")
    parser.add_argument("--write", default=None, help="markdown file whose paper-tables section is replaced")
    parser.add_argument("--seconds", type=float, default=None,
                        help="how long the runs took (paper_tables.sh passes it)")
    parser.add_argument("--reused_default", action="store_true",
                        help="the runs reused an existing default run (REUSE_DEFAULT=1): --seconds leaves it out")
    args = parser.parse_args()
    results = load_results(Path(args.default), Path(args.runs), args.thresholds)
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "paper_tables.json").write_text(json.dumps(results, indent=2))
    plot(results, HERE / "figures")
    text = markdown(results, "bash benchmarks/paper_tables.sh", args.seconds, args.reused_default)
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
