"""Benchmark: zero-shot classification of 50,000 64-px images (issue 17), end to end as `examples/evaluate.py --task
zeroshot_classification` runs it, against the code path it replaced.

The data: an imagefolder of `--num_images` PNGs (64 px, 10 class folders of coloured shapes with pixel noise),
written once under `--data_dir`. The model: the default run's student (`--model`). Each configuration runs in a fresh
subprocess, one at a time:

- `before`: the path before issue 17, i.e. images decoded and pre-processed in the main process between model calls
  (`embed_images(..., num_workers=0)`), top-K and per-class recall by hand (NumPy);
- `workers=N`: `DataLoader` workers decode and pre-process while the main process runs the model; metrics from
  scikit-learn (the path `examples/evaluate.py --num_workers N` takes).

Reading the data set (`load_labelled_dataset`: imagefolder scan, class indices, every image decoded once to skip
unreadable ones) is timed apart: first in a warm-up run (`read`, which also fills the page cache, so that no
configuration reads the files cold), then in each configuration from `datasets`' cache.
Prints one JSON object.

    python benchmarks/zero_shot_speed.py --model outputs/default/student/final
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


CLASSES = ("red circle", "blue square", "green triangle", "yellow star", "purple hexagon", "orange diamond",
           "white circle", "black square", "pink star", "gray triangle")


def write_images(folder: Path, count: int, size: int = 64) -> None:
    """`count` PNGs in one folder per class: a shape of the class's colour on noise (once; kept between runs)."""
    import numpy as np
    from PIL import Image, ImageDraw

    if (folder / "done").is_file():
        return
    rng = np.random.default_rng(0)
    colours = {"red": (220, 40, 40), "blue": (40, 60, 220), "green": (40, 190, 60), "yellow": (230, 220, 40),
               "purple": (140, 50, 170), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (15, 15, 15),
               "pink": (245, 150, 190), "gray": (128, 128, 128)}
    for index in range(count):
        label = index % len(CLASSES)
        colour, shape = CLASSES[label].split()
        background = rng.integers(60, 200, 3)
        pixels = np.clip(background + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels)
        box = [int(v) for v in rng.integers(4, size // 3, 2)] + [int(v) for v in rng.integers(2 * size // 3, size - 4,
                                                                                             2)]
        draw = ImageDraw.Draw(image)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=colours[colour])
        target = folder / CLASSES[label].replace(" ", "_")
        target.mkdir(parents=True, exist_ok=True)
        image.save(target / f"{index:06d}.png")
    (folder / "done").write_text(str(count))


def run_one(config: str, model_path: str, data_dir: str, batch_size: int) -> dict:
    """One configuration in this process: the data read, the images embedded, the classifier and the metrics."""
    import numpy as np
    import sklearn.metrics  # noqa: F401 - its one-off import (about 0.5 s) is not the metrics' cost
    import torch

    from dclip.data.labelled import load_labelled_dataset
    from dclip.evaluation import embed_images, load_dual_encoder, zero_shot_classifier
    from dclip.evaluation.classification import classification_metrics

    torch.set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    data = load_labelled_dataset(data_dir, "train")
    read = time.perf_counter() - started
    if config == "read":  # the warm-up: builds the data set's cache and warms the page cache for every run after
        return {"config": config, "images": len(data), "read_s": round(read, 1)}
    model, processor = load_dual_encoder(model_path)
    started = time.perf_counter()
    workers = 0 if config == "before" else int(config.split("=")[1])
    image_embeds = embed_images(model, processor, data.dataset, batch_size=batch_size, num_workers=workers)
    embedded = time.perf_counter() - started
    started = time.perf_counter()
    scores = image_embeds @ zero_shot_classifier(model, processor, data.class_names).T
    labels = data.labels
    if config == "before":  # the hand-written metrics the evaluation had
        order = np.argsort(-scores, axis=1, kind="stable")
        metrics = {"acc1": float(np.mean(order[:, 0] == labels)),
                   "acc5": float(np.mean((order[:, :5] == labels[:, None]).any(1))),
                   "mean_per_class_recall": float(np.mean([np.mean(order[labels == c, 0] == c)
                                                           for c in np.unique(labels)]))}
    else:
        metrics = classification_metrics(scores, labels, data.class_names)
        metrics = {key: metrics[key] for key in ("acc1", "acc5", "mean_per_class_recall")}
    classified = time.perf_counter() - started
    return {"config": config, "images": len(data), "read_s": round(read, 1), "embed_s": round(embedded, 1),
            "classify_s": round(classified, 2), "total_s": round(embedded + classified, 1),
            "images_per_s": round(len(data) / (embedded + classified), 1), "metrics": metrics}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="outputs/default/student/final")
    parser.add_argument("--data_dir", default="outputs/bench_zero_shot/images")
    parser.add_argument("--num_images", type=int, default=50_000)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--configs", default="before,workers=1,workers=2")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.model, args.data_dir, args.batch_size)))
        return
    started = time.perf_counter()
    write_images(Path(args.data_dir), args.num_images)
    results = {"machine": f"{os.cpu_count()} CPU cores", "written_s": round(time.perf_counter() - started, 1),
               "runs": []}
    for config in ["read"] + args.configs.split(","):
        output = subprocess.run([sys.executable, __file__, "--one", config, "--model", args.model, "--data_dir",
                                 args.data_dir, "--batch_size", str(args.batch_size)], capture_output=True, text=True,
                                check=True).stdout
        results["runs"].append(json.loads(output.strip().splitlines()[-1]))
        print(json.dumps(results["runs"][-1]), file=sys.stderr)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
