"""Benchmark: the sharded teacher-targets pass (`examples/compute_targets.py`, each image encoded once) against the
per-pair pass the training run uses on its own (`dclip.targets`: every row's image through the vision side), on a
COCO-style set: `--images` embedded scenes with `--captions_per_image` captions each, in adjacent rows.

Teachers (`--teachers`, each timed in the same process, targets checked equal to 1e-4):
- `dclip`: the default run's fused DCLIP teacher (`--run`; its towers frozen, so the per-pair pass is the cached
  tower features, then the fusion block), its regions from the data's boxes;
- `clip`: the default run's base CLIP as a plain dual-encoder teacher;
- `vit-b32`: a randomly initialised CLIP of ViT-B/32's shape (224 px, 12 x 768 vision, 12 x 512 text), the
  kind of teacher whose vision tower dominates.

    python benchmarks/targets_throughput.py                       # after the default run
    python benchmarks/targets_throughput.py --teachers vit-b32 --images 100

Prints one JSON object: rows, images, seconds of each pass and the speed-up.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def coco_style(images: int, captions: int, folder: Path):
    from datasets import Dataset, load_from_disk

    from dclip.data.scenes import SceneConfig, generate_scenes

    scenes = generate_scenes(SceneConfig(num_train=images + captions, num_validation=1, num_test=1, seed=11),
                             num_proc=1)["train"]
    columns = ["image", "caption", "boxes", "spans"]
    rows = {name: [] for name in columns}
    for image in range(images):
        for caption in range(captions):
            source = scenes[image + caption]
            rows["image"].append(scenes[image]["image"])
            rows["boxes"].append(scenes[image]["boxes"])
            rows["caption"].append(source["caption"])
            rows["spans"].append(source["spans"])
    Dataset.from_dict(rows, features=scenes.select_columns(columns).features).save_to_disk(folder)
    return load_from_disk(str(folder))


def vit_b32_teacher(tokenizer_source: str):
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from dclip.teachers import as_teacher
    from processing_dclip import DCLIPProcessor

    tokenizer = DCLIPProcessor.from_pretrained(tokenizer_source, trust_remote_code=False).tokenizer
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=8, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=224, patch_size=32),
        projection_dim=512)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    return as_teacher(CLIPModel(config).eval(), CLIPProcessor(image_processor, tokenizer))


def per_pair(dataset, teacher, batch_size: int):
    """The training run's own pass (`dclip.stages.teacher_targets`)."""
    from dclip.targets import compute_teacher_features, compute_teacher_targets, fuse_teacher_targets

    if teacher.kind == "dclip":
        features = compute_teacher_features(dataset, teacher.model, teacher.processor, batch_size=batch_size)
        return fuse_teacher_targets(features, teacher.model)
    return compute_teacher_targets(dataset, teacher, batch_size=batch_size)


def main() -> None:
    import numpy as np
    from datasets import disable_caching

    from dclip.shards import compute_target_shards, load_target_shards, write_manifest
    from dclip.teachers import load_teacher

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="outputs/default", help="the default run's output folder")
    parser.add_argument("--teachers", default="dclip,clip,vit-b32")
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--captions_per_image", type=int, default=5)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--shard_size", type=int, default=1000)
    args = parser.parse_args()
    disable_caching()  # every pass computes: no earlier run's Arrow cache is read back
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        dataset = coco_style(args.images, args.captions_per_image, scratch / "data")
        for name in args.teachers.split(","):
            if name == "vit-b32":
                teacher = vit_b32_teacher(f"{args.run}/base_clip/final")
            else:
                folder = f"{args.run}/teacher/final" if name == "dclip" else f"{args.run}/base_clip/final"
                teacher = load_teacher(folder, name)
            start = time.perf_counter()
            expected = per_pair(dataset, teacher, args.batch_size)
            per_pair_s = time.perf_counter() - start
            start = time.perf_counter()
            stats = compute_target_shards(dataset, teacher, scratch / name, shard_size=args.shard_size,
                                          batch_size=args.batch_size, process_index=0, num_processes=1)
            write_manifest(dataset, teacher, scratch / name, shard_size=args.shard_size)
            sharded_s = time.perf_counter() - start
            sharded = load_target_shards(scratch / name, dataset)
            for column in ("teacher_image_embeds", "teacher_text_embeds"):
                np.testing.assert_allclose(np.array(sharded[column]), np.array(expected[column]), atol=1e-4)
            results[name] = {"rows": len(dataset), "images": args.images, "images_encoded": stats["images_encoded"],
                             "per_pair_s": round(per_pair_s, 1), "sharded_s": round(sharded_s, 1),
                             "speedup": round(per_pair_s / sharded_s, 2)}
            print(name, results[name], flush=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
