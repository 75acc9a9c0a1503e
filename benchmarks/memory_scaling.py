"""Benchmark: peak resident memory of a run, and of `examples/evaluate.py`, over 10,000 images against 1,000
(issue 18: within 1.3x).

Each measurement runs in a fresh process, over `--sizes` pairs of 64 px images with captions and a colour label,
written once under `--data_dir`: a real-data run of the recipe's CLI path (`dclip.pipeline.run`: the imagefolder
read and every image checked, the processor and tokenizer built, a student initialised from a small CLIP and
trained 20 steps of 64 pairs, then evaluated on 200 test pairs); then `examples/evaluate.py --task
zeroshot_classification` and `--task zeroshot_retrieval` over every image of the training split. Peak memory is
each process's `ru_maxrss`. Prints one JSON object.

    python benchmarks/memory_scaling.py
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


DATA_VERSION = "2"  # 2: a label column beside the caption
ROOT = Path(__file__).resolve().parents[1]

def write_data(folder: Path, count: int, size: int = 64) -> None:
    import numpy as np
    from PIL import Image

    if (folder / "done").is_file() and (folder / "done").read_text() == DATA_VERSION:
        return
    rng = np.random.default_rng(0)
    colours = ["red", "blue", "green", "yellow", "purple", "orange"]
    for split, rows in (("train", count), ("test", 200)):
        target = folder / split
        target.mkdir(parents=True, exist_ok=True)
        lines = []
        for index in range(rows):
            colour = colours[index % len(colours)]
            pixels = np.clip(rng.normal(128, 40, (size, size, 3)), 0, 255).astype(np.uint8)
            image = Image.fromarray(pixels)
            image.paste(colour, (8, 8, size - 8, size - 8))
            image.save(target / f"{index:06d}.png")
            lines.append(json.dumps({"file_name": f"{index:06d}.png", "caption": f"a {colour} square, {index % 11}",
                                     "label": colour}))
        (target / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "done").write_text(DATA_VERSION)


def run_one(data_dir: str, student: str, output: str) -> dict:
    from transformers import TrainingArguments

    from dclip.arguments import DataArguments, DistillationArguments, ModelArguments
    from dclip.pipeline import run

    started = time.perf_counter()
    args = TrainingArguments(output_dir=output, per_device_train_batch_size=64, report_to=[], use_cpu=True,
                             save_strategy="no", dataloader_num_workers=0, seed=0)
    summary = run(ModelArguments(student_model=student),
                  DataArguments(dataset_name=data_dir, cache_dir=f"{output}/cache", max_eval_samples=200),
                  DistillationArguments(method="none", compare_methods="", distill_steps=20), args)
    return {"rows": summary["data"]["train"]["rows"], "seconds": round(time.perf_counter() - started, 1),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def evaluate_one(task: str, data_dir: str, student: str, output: str) -> dict:
    """`examples/evaluate.py --task <task>` over every image of the training split, in this process."""
    import runpy

    started = time.perf_counter()
    sys.argv = ["evaluate.py", "--task", task, "--dataset_name", data_dir, "--eval_split", "train",
                "--label_column", "label", "--model_name_or_path", student, "--output_file", output]
    runpy.run_path(str(ROOT / "examples" / "evaluate.py"), run_name="__main__")
    return {"seconds": round(time.perf_counter() - started, 1),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def measure(*args: str) -> dict:
    """One measurement in a fresh process: this script with `args`, its last line of output as JSON."""
    output = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--data_dir", default="outputs/bench_memory")
    parser.add_argument("--student", default="outputs/default/base_clip/final", help="a small CLIP folder")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--evaluate", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], args.student, args.one[1])))
        return
    if args.evaluate:
        print(json.dumps(evaluate_one(*args.evaluate[:2], args.student, args.evaluate[2])))
        return
    results = {"machine": "this machine's CPU", "runs": [], "evaluate": {}}
    for size in (int(s) for s in args.sizes.split(",")):
        folder = Path(args.data_dir) / f"data_{size}"
        write_data(folder, size)
        results["runs"].append({"size": size, **measure("--student", args.student, "--one", str(folder),
                                                         str(Path(args.data_dir) / f"run_{size}"))})
        print(json.dumps(results["runs"][-1]), file=sys.stderr)
        for task in ("zeroshot_classification", "zeroshot_retrieval"):
            result = measure("--student", args.student, "--evaluate", task, str(folder),
                             str(Path(args.data_dir) / f"eval_{size}_{task}.json"))
            results["evaluate"].setdefault(task, []).append({"size": size, **result})
            print(json.dumps({"task": task, **results["evaluate"][task][-1]}), file=sys.stderr)
    first, last = results["runs"][0], results["runs"][-1]
    results["ratio"] = round(last["peak_rss_mib"] / first["peak_rss_mib"], 3)
    for task, runs in results["evaluate"].items():
        results[f"ratio_{task}"] = round(runs[-1]["peak_rss_mib"] / runs[0]["peak_rss_mib"], 3)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
