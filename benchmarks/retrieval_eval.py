"""Benchmark: retrieval evaluation (Recall@1/5/10 and mAP, both directions) of N images x 5N captions.

Embeddings are random 512-d unit vectors; each image has 5 captions at `--noise` from it (cosine ~0.24 at the
default 4.0, so Recall@1 is high but not trivial). Prints one JSON object: seconds per backend and, for the FAISS
backend, how often its text-to-image hits agree with exact ranks on `--check_queries` sampled captions.

    python benchmarks/retrieval_eval.py                                     # 100,000 x 500,000, the issue's size
    python benchmarks/retrieval_eval.py --images 20000 --backends exact,faiss
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--captions_per_image", type=int, default=5)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--noise", type=float, default=4.0)
    parser.add_argument("--backends", default="faiss", help="comma-separated: exact, faiss")
    parser.add_argument("--faiss_nprobe", type=int, default=8)
    parser.add_argument("--check_queries", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    image_embeds, text_embeds, text_to_image = synthetic(args.images, args.captions_per_image, args.dim, args.noise,
                                                         args.seed)
    report = {"images": args.images, "captions": len(text_embeds), "dim": args.dim, "noise": args.noise,
              "generate_seconds": round(time.perf_counter() - started, 1), "cpu_count": os.cpu_count(),
              "torch_threads": torch.get_num_threads(), "results": {}}
    # exact text-to-image ranks of a sample of captions: the reference the FAISS backend is checked against
    rng = np.random.default_rng(args.seed + 1)
    sample = rng.choice(len(text_embeds), min(args.check_queries, len(text_embeds)), replace=False)
    sample_scores = text_embeds[sample] @ image_embeds.T
    sample_true = sample_scores[np.arange(len(sample)), text_to_image[sample]]
    sample_ranks = (sample_scores > sample_true[:, None] + 1e-6).sum(1)
    report["sampled_exact_image_retrieval_recall@1"] = float(np.mean(sample_ranks < 1))
    for backend in args.backends.split(","):
        started = time.perf_counter()
        metrics = retrieval_metrics(image_embeds, text_embeds, text_to_image, backend=backend,
                                    faiss_nprobe=args.faiss_nprobe)
        entry = {"seconds": round(time.perf_counter() - started, 1), "metrics": metrics}
        if backend == "faiss":  # agreement of the approximate search with exact ranks on the sampled captions
            from dclip.evaluation import nearest_neighbours

            found = nearest_neighbours(image_embeds, text_embeds[sample], 10, args.faiss_nprobe)
            hits = found == text_to_image[sample][:, None]
            for k in (1, 10):
                entry[f"sampled_agreement_recall@{k}"] = float(np.mean(hits[:, :k].any(1) == (sample_ranks < k)))
            entry["nprobe"] = args.faiss_nprobe
        report["results"][backend] = entry
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
