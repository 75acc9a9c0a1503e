"""Memory and time of one CLIP-CID cluster-head step (margin softmax forward + backward) at CLIP-CID's scale of about
1M clusters: the full softmax against the sampled one (PartialFC, `--cluster_sample_size`). Each setting runs in its
own process; its peak is measured over the steps alone (Linux `clear_refs`), after the centres are built:

    python benchmarks/cluster_head_memory.py --num_clusters 1000000 --dim 512 --batch 256 --sample_sizes 0,8192,65536
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def one_setting(num_clusters: int, dim: int, batch: int, sample_size: int, steps: int) -> dict:
    import torch

    from dclip.losses import ClusterMarginLoss

    torch.manual_seed(0)
    centers = torch.randn(num_clusters, dim)
    loss_fn = ClusterMarginLoss(centers, sample_size=sample_size or None)
    del centers
    features = torch.randn(batch, dim, requires_grad=True)
    labels = torch.randint(num_clusters, (batch,))
    setup_mib = _status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear:  # Linux: the peak below is the steps' own
        clear.write("5")
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        loss_fn(features, labels).backward()
        seconds.append(time.perf_counter() - start)
    return {"sample_size": sample_size or num_clusters, "setup_mib": round(setup_mib),
            "peak_mib": round(_status_mib("VmHWM")), "centres_mib": round(num_clusters * dim * 4 / 2**20),
            "median_step_s": round(sorted(seconds)[len(seconds) // 2], 3)}


def _status_mib(field: str) -> float:
    """A `/proc/self/status` memory figure (kB) in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_clusters", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--sample_sizes", default="0,8192,65536", help="0: the full softmax")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # a child process's setting
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(one_setting(args.num_clusters, args.dim, args.batch, args.one, args.steps)))
        return
    print(f"K = {args.num_clusters:,}, dim {args.dim}, batch {args.batch}, float32 on CPU; median of {args.steps} "
          "steps\n")
    print("| centres scored per step | resident before the steps | peak during the steps | the centres alone | "
          "forward + backward |")
    print("|---|---|---|---|---|")
    for size in (int(s) for s in args.sample_sizes.split(",")):
        out = subprocess.run([sys.executable, __file__, "--num_clusters", str(args.num_clusters), "--dim",
                              str(args.dim), "--batch", str(args.batch), "--steps", str(args.steps), "--one",
                              str(size)], capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        label = "all (full softmax)" if size == 0 else f"{row['sample_size']:,} (sampled)"
        print(f"| {label} | {row['setup_mib']:,} MiB | {row['peak_mib']:,} MiB | {row['centres_mib']:,} MiB | "
              f"{row['median_step_s']} s |")


if __name__ == "__main__":
    main()
