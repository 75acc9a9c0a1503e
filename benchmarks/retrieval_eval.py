"""Benchmark: retrieval evaluation (Recall@1/5/10 and mAP, both directions) of N images x 5N captions.

Embeddings are random 512-d unit vectors; each image has 5 captions at `--noise` from it (cosine ~0.24 at the
default 4.0, so Recall@1 is high but not trivial). For each size and backend it times `retrieval_metrics`
(generation not counted) and prints one JSON object. Backends: `auto` (exact up to 1e10 pairs, else exact ranks of
sampled queries with standard errors), `exact`, `sampled`, `faiss`, and `naive`: the dense implementation most
evaluation code uses (CLIP_benchmark's: the whole caption x image score matrix, a boolean matrix of positive pairs
and `topk`; Recall@K only), skipped where its two matrices would not fit in `--naive_max_gib`.

    python benchmarks/retrieval_eval.py                                     # 100,000 x 500,000, auto
    python benchmarks/retrieval_eval.py --images 10000,100000,1000000 --backends auto,naive
    python benchmarks/retrieval_eval.py --backends sampled,faiss,exact      # each against the exact figures
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dclip.evaluation import retrieval_metrics  # noqa: E402


def synthetic(images: int, captions_per_image: int, dim: int, noise: float, seed: int):
    rng = np.random.default_rng(seed)
    image_embeds = rng.standard_normal((images, dim), dtype=np.float32)
    image_embeds /= np.linalg.norm(image_embeds, axis=1, keepdims=True)
    text_to_image = np.repeat(np.arange(images), captions_per_image)
    text_embeds = np.empty((len(text_to_image), dim), dtype=np.float32)
    for start in range(0, len(text_embeds), 100_000):
        owner = text_to_image[start : start + 100_000]
        chunk = image_embeds[owner] + noise / np.sqrt(dim) * rng.standard_normal((len(owner), dim), dtype=np.float32)
        text_embeds[start : start + len(owner)] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    return image_embeds, text_embeds, text_to_image


@torch.no_grad()
def naive_recall(image_embeds: np.ndarray, text_embeds: np.ndarray, text_to_image: np.ndarray,
                 ks=(1, 5, 10)) -> dict[str, float]:
    """CLIP_benchmark's retrieval metric: dense scores, dense positive pairs, top-K of each row."""
    images, texts = torch.from_numpy(image_embeds), torch.from_numpy(text_embeds)
    scores = texts @ images.t()  # (texts, images)
    positive_pairs = torch.zeros_like(scores, dtype=torch.bool)
    positive_pairs[torch.arange(len(texts)), torch.from_numpy(text_to_image)] = True
    metrics = {}
    top_images = scores.topk(max(ks), dim=1).indices  # (texts, K)
    top_texts = scores.t().topk(max(ks), dim=1).indices  # (images, K)
    for k in ks:
        metrics[f"image_retrieval_recall@{k}"] = float(
            positive_pairs.gather(1, top_images[:, :k]).any(1).float().mean()
        )
        metrics[f"text_retrieval_recall@{k}"] = float(
            positive_pairs.t().gather(1, top_texts[:, :k]).any(1).float().mean()
        )
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default="100000", help="comma-separated gallery sizes (images)")
    parser.add_argument("--captions_per_image", type=int, default=5)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--noise", type=float, default=4.0)
    parser.add_argument("--backends", default="auto", help="comma-separated: auto, exact, sampled, faiss, naive")
    parser.add_argument("--faiss_nprobe", type=int, default=8)
    parser.add_argument("--naive_max_gib", type=float, default=8.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    for images in (int(n) for n in args.images.split(",")):
        started = time.perf_counter()
        image_embeds, text_embeds, text_to_image = synthetic(images, args.captions_per_image, args.dim, args.noise,
                                                             args.seed)
        report = {"images": images, "captions": len(text_embeds), "dim": args.dim, "noise": args.noise,
                  "generate_seconds": round(time.perf_counter() - started, 1), "cpu_count": os.cpu_count(),
                  "torch_threads": torch.get_num_threads(), "results": {}}
        for backend in args.backends.split(","):
            if backend == "naive":
                need_gib = len(text_embeds) * images * 5 / 2**30  # float32 scores + bool positive pairs
                if need_gib > args.naive_max_gib:
                    report["results"][backend] = {"skipped": f"needs {need_gib:,.0f} GiB for its dense matrices"}
                    continue
            started = time.perf_counter()
            if backend == "naive":
                metrics = naive_recall(image_embeds, text_embeds, text_to_image)
            else:
                metrics = retrieval_metrics(image_embeds, text_embeds, text_to_image, backend=backend,
                                            faiss_nprobe=args.faiss_nprobe, seed=args.seed)
            report["results"][backend] = {"seconds": round(time.perf_counter() - started, 1), "metrics": metrics}
        exact = report["results"].get("exact", {}).get("metrics")
        for backend, result in report["results"].items():  # how far each backend is from the exact figures
            if exact and backend != "exact" and "metrics" in result:
                result["minus_exact"] = {key: round(value - exact[key], 5) for key, value in result["metrics"].items()
                                         if key in exact}
        print(json.dumps(report), flush=True)
        del image_embeds, text_embeds


if __name__ == "__main__":
    main()
