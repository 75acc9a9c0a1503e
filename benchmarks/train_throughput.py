"""Benchmark: training throughput of the student distillation step against open_clip's training loop, in one run.

Every configuration trains the same small CLIP (the pipeline's `clip-small` preset: ViT and text transformer of 4
layers x 128, patch 8, 64 px images, 32 tokens, vocabulary 1,024) on the same in-memory batches (pre-processed
tensors, so no image decoding is timed), AdamW at a constant learning rate, each in a fresh subprocess:

- `dclip_cached`: `DCLIPTrainer` (a `transformers.Trainer`), DCLIP's hybrid loss (contrastive + cosine to the
  teacher's image and text embeddings), teacher targets precomputed (the pipeline's default);
- `dclip_online`: the same, the teacher (a frozen CLIP of the same size) run on every batch;
- `open_clip_distill`: `open_clip_train.train.train_one_epoch` with its distillation option (`dist_model`, a frozen
  CLIP of the same size run on every batch, `DistillClipLoss`);
- `open_clip`: the same loop without distillation (its plain CLIP loss);
- `models`: the two implementations alone, forward + backward of one batch (`--steps` times), and their sizes;
- `scenes_cached`, `scenes_online` (teacher-target caching): the default run's (`--run`) student, DCLIP teacher and
  processor on the embedded scenes, images processed per batch as in the pipeline; cached targets (their one-off
  computation timed apart) against the teacher (detector, region crops, towers, fusion) on every batch.

Throughput is samples per second over the steps after `--warmup`; memory is the process's peak resident set minus
the resident set just before training (CPU) or the peak allocated during training (CUDA). Prints one JSON object; the
ratios compare per-sample speed.

    pip install -e ".[bench]"
    python benchmarks/train_throughput.py                   # CPU here; CUDA (and --bf16) when a GPU is present
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch


CONFIGS = ("models", "dclip_cached", "dclip_online", "open_clip_distill", "open_clip", "scenes_cached",
           "scenes_online")
WIDTH, LAYERS, HEADS, PATCH, IMAGE_SIZE, CONTEXT, VOCAB = 128, 4, 4, 8, 64, 32, 1024


def batches(count: int, batch_size: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(count * batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    texts = torch.randint(1, VOCAB - 2, (count * batch_size, CONTEXT), generator=generator)
    # bos ... eos (the eos id is the highest: open_clip pools at argmax)
    texts[:, 0], texts[:, -1] = VOCAB - 2, VOCAB - 1
    return images, texts


def peak_memory_mib(device: torch.device, baseline: int) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline) / 2**20


def resident_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def small_clip(seed: int):
    """The `clip-small` student as a `DCLIPModel` (transformers' CLIP inside)."""
    from transformers import CLIPConfig, CLIPModel

    from modeling_dclip import DCLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, max_position_embeddings=CONTEXT, eos_token_id=VOCAB - 1,
                         bos_token_id=VOCAB - 2, pad_token_id=VOCAB - 1),
        vision_config=dict(hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=LAYERS,
                           num_attention_heads=HEADS, image_size=IMAGE_SIZE, patch_size=PATCH),
        projection_dim=WIDTH)
    return DCLIPModel.from_clip(CLIPModel(config))


def small_open_clip(device: torch.device, precision: str = "fp32"):
    """The same architecture in open_clip: its registered name and a new model."""
    import open_clip

    name = "dclip-bench-small"
    open_clip.factory._MODEL_CONFIGS[name] = {
        "embed_dim": WIDTH,
        "quick_gelu": True,  # transformers' CLIP default activation (`hidden_act="quick_gelu"`): the same model
        "vision_cfg": {"image_size": IMAGE_SIZE, "layers": LAYERS, "width": WIDTH, "head_width": WIDTH // HEADS,
                       "patch_size": PATCH, "mlp_ratio": 4},
        "text_cfg": {"context_length": CONTEXT, "vocab_size": VOCAB, "width": WIDTH, "heads": HEADS,
                     "layers": LAYERS},
    }
    return name, open_clip.create_model(name, precision=precision, device=device, output_dict=True)


def run_models(args, device: torch.device) -> dict:
    """The two implementations alone: parameters, and forward + backward of one batch (no loop, no loss)."""
    images, texts = (tensor.to(device) for tensor in batches(1, args.batch_size))
    hf = small_clip(0).to(device)
    _, oc = small_open_clip(device)

    def hf_step():
        out = hf(pixel_values=images, input_ids=texts, attention_mask=torch.ones_like(texts))
        (out.image_embeds.sum() + out.text_embeds.sum()).backward()

    def oc_step():
        out = oc(images, texts)
        (out["image_features"].sum() + out["text_features"].sum()).backward()

    result = {}
    for name, model, step in (("transformers", hf, hf_step), ("open_clip", oc, oc_step)):
        step()
        started = time.perf_counter()
        for _ in range(args.steps):
            model.zero_grad(set_to_none=True)
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        result[f"{name}_parameters"] = sum(p.numel() for p in model.parameters())
        result[f"{name}_forward_backward_seconds"] = round((time.perf_counter() - started) / args.steps, 4)
    return result


def train_clocked(args, device: torch.device, student, train_dataset, data_collator, teacher=None) -> dict:
    """`DCLIPTrainer` on DCLIP's hybrid loss for `args.steps` steps; a timestamp at the end of each step."""
    from transformers import TrainerCallback, TrainingArguments

    from dclip.trainer import DCLIPTrainer

    class Clock(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_end(self, *_, **__):
            if device.type == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())

    clock = Clock()
    training_args = TrainingArguments(
        output_dir=os.path.join(args.scratch, "dclip"), per_device_train_batch_size=args.batch_size,
        max_steps=args.steps, learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch",
        weight_decay=0.1, logging_steps=10**6, save_strategy="no", report_to=[], dataloader_num_workers=0,
        remove_unused_columns=False, use_cpu=device.type == "cpu", bf16=args.bf16, seed=0, disable_tqdm=True,
        max_grad_norm=args.max_grad_norm)
    trainer = DCLIPTrainer(model=student, args=training_args, train_dataset=train_dataset, teacher=teacher,
                           data_collator=data_collator, callbacks=[clock],
                           loss_weights={"contrastive": 1.0, "cosine_image": 1.0, "cosine_text": 1.0})
    baseline = resident_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer.train()
    return {"step_times": clock.times, "peak_memory_mib": peak_memory_mib(device, baseline)}


def run_dclip(args, device: torch.device, online: bool) -> dict:
    images, texts = batches(args.steps, args.batch_size)
    targets = torch.nn.functional.normalize(torch.randn(2, len(images), WIDTH), dim=-1)

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            row = {"pixel_values": images[i], "input_ids": texts[i],
                   "attention_mask": torch.ones(CONTEXT, dtype=torch.long)}
            if not online:
                row.update(teacher_image_embeds=targets[0, i], teacher_text_embeds=targets[1, i])
            return row

    return train_clocked(args, device, small_clip(0), Rows(),
                         lambda rows: {k: torch.stack([r[k] for r in rows]) for k in rows[0]},
                         teacher=small_clip(1).to(device) if online else None)


def run_scenes(args, device: torch.device, online: bool) -> dict:
    """The default run's student, DCLIP teacher and processor on the embedded scenes, as the pipeline trains them:
    images processed per batch, the teacher's regions from the detector. Cached: the targets are computed first
    (tower features, then the fusion; timed apart, not counted in the steps); online: the teacher (detector, region
    crops, towers, fusion) runs on every batch."""
    import datasets

    from dclip.arguments import DataArguments
    from dclip.data.collator import DCLIPCollator
    from dclip.data.loading import load_data
    from dclip.targets import compute_teacher_features, fuse_teacher_targets
    from modeling_dclip import DCLIPModel, DCLIPTeacherModel
    from processing_dclip import DCLIPProcessor

    run = os.path.abspath(args.run)
    data, _ = load_data(DataArguments(cache_dir=os.path.join(os.path.dirname(run), "cache")), 42)
    train = data["train"].select(range(args.batch_size * args.steps))
    processor = DCLIPProcessor.from_pretrained(os.path.join(run, "processor"), trust_remote_code=False)
    teacher = DCLIPTeacherModel.from_pretrained(os.path.join(run, "teacher", "final")).to(device)
    student = DCLIPModel.from_clip(os.path.join(run, "base_clip", "final"))
    regions = {"use_given_boxes": False, "use_given_spans": False}  # the pipeline's default: detector + extractor
    caching = {}
    if not online:
        datasets.disable_caching()  # time the computation, not a read of an earlier run's cache
        started = time.perf_counter()
        features = compute_teacher_features(train, teacher, processor, batch_size=256, device=device, **regions)
        caching["tower_features_seconds"] = time.perf_counter() - started
        started = time.perf_counter()
        train = fuse_teacher_targets(features, teacher)
        caching["fusion_seconds"] = time.perf_counter() - started
        caching["pairs_per_second"] = len(train) / (caching["tower_features_seconds"] + caching["fusion_seconds"])
    result = train_clocked(args, device, student, train,
                           DCLIPCollator(processor, with_teacher_inputs=online, **regions),
                           teacher=teacher if online else None)
    return {**result, **{f"caching_{key}": round(value, 1) for key, value in caching.items()}}


def run_open_clip(args, device: torch.device, distill: bool) -> dict:
    import open_clip
    from open_clip_train.params import parse_args
    from open_clip_train.scheduler import const_lr
    from open_clip_train.train import train_one_epoch

    precision = "amp_bf16" if args.bf16 else "fp32"
    torch.manual_seed(0)
    name, model = small_open_clip(device, precision)
    dist_model = small_open_clip(device, precision)[1] if distill else None
    images, texts = batches(args.steps, args.batch_size)
    clock = []

    class ClockedLoader:  # the loop asks for batch i + 1 right after step i: a timestamp per step
        num_batches, num_samples = args.steps, args.steps * args.batch_size

        def __iter__(self):
            for start in range(0, len(images), args.batch_size):
                if start:
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    clock.append(time.perf_counter())
                yield images[start : start + args.batch_size], texts[start : start + args.batch_size]
            if device.type == "cuda":
                torch.cuda.synchronize()
            clock.append(time.perf_counter())

    class DataInfo:  # open_clip_train.data.DataInfo's interface (that module needs webdataset, unused here)
        dataloader = ClockedLoader()

        def set_epoch(self, epoch):
            pass

    loop_args = parse_args(["--model", name, "--batch-size", str(args.batch_size), "--precision", precision,
                            "--lr", "1e-4", "--wd", "0.1", "--log-every-n-steps", str(10**6)])
    loop_args.device, loop_args.distill, loop_args.world_size, loop_args.rank, loop_args.local_rank = \
        str(device), distill, 1, 0, 0
    loop_args.horovod, loop_args.wandb = False, False
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    loss = open_clip.create_loss(loop_args)
    baseline = resident_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train_one_epoch(model, {"train": DataInfo()}, loss, 0, optimizer, None,
                    const_lr(optimizer, 1e-4, 0, args.steps), dist_model, loop_args)
    return {"step_times": clock, "peak_memory_mib": peak_memory_mib(device, baseline)}


def measure(config: str, args) -> dict:
    torch.set_num_threads(os.cpu_count() or 1)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    if config == "models":
        return {"config": config, "device": str(device), **run_models(args, device)}
    if config.startswith("scenes"):
        result = run_scenes(args, device, online=config == "scenes_online")
    elif config.startswith("dclip"):
        result = run_dclip(args, device, online=config == "dclip_online")
    else:
        result = run_open_clip(args, device, distill=config == "open_clip_distill")
    times = result.pop("step_times")
    measured = times[args.warmup - 1 :]  # timestamps at the ends of steps warmup..steps
    seconds = measured[-1] - measured[0]
    steps = len(measured) - 1
    return {"config": config, "device": str(device), "samples_per_second": round(steps * args.batch_size / seconds, 1),
            "seconds_per_step": round(seconds / steps, 4), "measured_steps": steps,
            "peak_memory_mib": round(result.pop("peak_memory_mib"), 1), **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--max_grad_norm", type=float, default=1.0, help="dclip's gradient clipping (the Trainer's "
                        "default 1.0; open_clip's loop does not clip); 0 turns it off")
    parser.add_argument("--cpu", action="store_true", help="stay on the CPU even with a GPU present")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--scratch", default="outputs/bench_throughput")
    parser.add_argument("--run", default="outputs/default", help="the default run (scenes_* configs)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: measure one config here
    args = parser.parse_args()
    if not 1 <= args.warmup < args.steps:
        parser.error(f"--warmup must be at least 1 and below --steps ({args.steps}), got {args.warmup}")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if args.one:
        print("RESULT " + json.dumps(measure(args.one, args)), flush=True)
        return
    results = {}
    for config in args.configs.split(","):
        command = [sys.executable, os.path.abspath(__file__), "--one", config] + sys.argv[1:]
        output = subprocess.run(command, capture_output=True, text=True)
        lines = [line for line in output.stdout.splitlines() if line.startswith("RESULT ")]
        if output.returncode or not lines:
            raise RuntimeError(f"{config} failed:\n{output.stderr[-3000:]}")
        results[config] = json.loads(lines[-1][len("RESULT "):])
        print(json.dumps(results[config]), file=sys.stderr, flush=True)
    report = {"batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup, "bf16": args.bf16,
              "cpu_count": os.cpu_count(), "torch": torch.__version__, "results": results}
    speed = {name: result["samples_per_second"] for name, result in results.items() if "samples_per_second" in result}
    if "dclip_cached" in speed and "open_clip_distill" in speed:
        report["dclip_cached_over_open_clip_distill"] = round(speed["dclip_cached"] / speed["open_clip_distill"], 3)
    if "dclip_online" in speed and "open_clip_distill" in speed:
        report["dclip_online_over_open_clip_distill"] = round(speed["dclip_online"] / speed["open_clip_distill"], 3)
    if "scenes_cached" in speed and "scenes_online" in speed:
        report["scenes_cached_over_online"] = round(speed["scenes_cached"] / speed["scenes_online"], 2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
