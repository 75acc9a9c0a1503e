"""Benchmark: image semantic balance (k-means + deduplication) of N x D float32 embeddings.

The embeddings are synthetic but shaped like web data: samples around `--concepts` concept directions with a
long-tailed (Zipf) popularity, plus `--duplicate_fraction` near-copies of earlier samples. Prints the timings and
counts as JSON and, with `--markdown`, appends a row to BENCHMARKS.md.

    python benchmarks/semantic_balance.py                      # 1,000,000 x 512, the issue's size
    python benchmarks/semantic_balance.py --samples 100000     # a quick one
    python benchmarks/semantic_balance.py --engine both        # and on a local Ray cluster, the kept rows checked
                                                               # equal (pip install -e ".[scale]")

With `--engine ray` the embeddings are written to a temporary `.npy` first (the Ray engine's input; not timed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict

import numpy as np


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dclip.curation import SemanticBalanceConfig, semantic_balance  # noqa: E402


def synthetic_embeddings(samples: int, dim: int, concepts: int, duplicate_fraction: float,
                         seed: int) -> tuple[np.ndarray, int]:
    """Long-tailed concept mixture with near-copies of earlier originals, L2-normalised float32, generated in
    chunks; and the number of copies."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((concepts, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    popularity = 1.0 / np.arange(1, concepts + 1) ** 0.8
    popularity /= popularity.sum()
    out = np.empty((samples, dim), dtype=np.float32)
    chunk = 100_000
    for start in range(0, samples, chunk):
        stop = min(samples, start + chunk)
        concept = rng.choice(concepts, size=stop - start, p=popularity)
        block = centres[concept] + 0.9 / np.sqrt(dim) * rng.standard_normal((stop - start, dim), dtype=np.float32)
        out[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    copies = rng.random(samples) < duplicate_fraction
    copies[0] = False
    targets, originals = np.flatnonzero(copies), np.flatnonzero(~copies)
    earlier = np.searchsorted(originals, targets)  # how many originals come before each copy (at least row 0)
    sources = originals[(rng.random(len(targets)) * earlier).astype(np.int64)]  # an earlier original
    for start in range(0, len(targets), chunk):
        rows, origin = targets[start : start + chunk], sources[start : start + chunk]
        block = out[origin] + 0.02 / np.sqrt(dim) * rng.standard_normal((len(rows), dim), dtype=np.float32)
        out[rows] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out, len(targets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--concepts", type=int, default=20_000)
    parser.add_argument("--duplicate_fraction", type=float, default=0.1)
    parser.add_argument("--duplicate_threshold", type=float, default=None, help="default: calibrated")
    parser.add_argument("--semantic_threshold", type=float, default=None, help="default: calibrated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", default=None, help="append a result row to this file (e.g. BENCHMARKS.md)")
    parser.add_argument("--engine", choices=("local", "ray", "both"), default="local")
    parser.add_argument("--ray_num_cpus", type=int, default=None, help="CPUs of the local Ray cluster")
    args = parser.parse_args()

    started = time.perf_counter()
    embeddings, injected = synthetic_embeddings(args.samples, args.dim, args.concepts, args.duplicate_fraction,
                                                args.seed)
    generate_seconds = time.perf_counter() - started
    config = SemanticBalanceConfig(duplicate_threshold=args.duplicate_threshold,
                                   semantic_threshold=args.semantic_threshold, kmeans_seed=args.seed)
    engines = {}
    if args.engine in ("ray", "both"):
        import tempfile

        from dclip.curation.ray_engine import semantic_balance_ray

        with tempfile.TemporaryDirectory() as scratch:
            np.save(f"{scratch}/embeddings.npy", embeddings)
            engines["ray"] = semantic_balance_ray(f"{scratch}/embeddings.npy", config, num_cpus=args.ray_num_cpus)
    if args.engine in ("local", "both"):
        engines["local"] = semantic_balance(embeddings, config, verbose=True)
    if len(engines) == 2:
        assert np.array_equal(engines["local"].reason, engines["ray"].reason), "the engines kept different rows"
    result = engines.get("local", engines.get("ray"))
    report = result.report()
    report["seconds_by_engine"] = {name: engine.seconds for name, engine in engines.items()}
    import faiss

    report.update(samples=args.samples, injected_duplicates=injected, dim=args.dim,
                  generate_seconds=round(generate_seconds, 1), faiss_threads=faiss.omp_get_max_threads(),
                  cpu_count=os.cpu_count(), machine=platform.processor() or platform.machine(), config=asdict(config))
    print(json.dumps(report, indent=2))
    if args.markdown:
        seconds = report["seconds"]
        row = (f"| {args.samples:,} x {args.dim} | {report['num_clusters']:,} | {seconds['kmeans']} | "
               f"{seconds['duplicates']} | {seconds['semantic']} | **{seconds['total']}** | "
               f"{report['removed']['perceptual_duplicate']:,} / {report['removed']['semantic_redundant']:,} | "
               f"{report['faiss_threads']} threads, {report['machine']} |\n")
        with open(args.markdown, "a") as handle:
            handle.write(row)


if __name__ == "__main__":
    main()
