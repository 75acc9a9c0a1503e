"""Train the YOLO region detector on the procedural scenes, offline, and measure it.

    python examples/train_detector.py                      # defaults: 5,000 scenes, 6 epochs at 64 px (CPU: ~5 min)
    python examples/train_detector.py --epochs 20 --train_samples 20000 --output_dir outputs/detector

Prints box mAP50 on the validation split and how often the processor finds the right number of objects on the test
split; writes `<output_dir>/run/weights/best.pt`, which `DCLIPProcessor(detector_path=...)` loads.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from dclip.data.scenes import SHAPES, SceneConfig, load_scenes
from dclip.detector import count_accuracy, export_yolo_dataset, train_detector
from processing_dclip import RegionExtractor


@dataclass
class DetectorArguments:
    output_dir: str = field(default="outputs/detector", metadata={"help": "where data, weights and metrics go"})
    cache_dir: str = field(default="outputs/cache", metadata={"help": "scene data set cache"})
    model_config: str = field(default="yolov8n.yaml", metadata={"help": "ultralytics model yaml (no download)"})
    train_samples: int = field(default=5000, metadata={"help": "scenes used for detector training"})
    val_samples: int = field(default=500)
    test_samples: int = field(default=1000, metadata={"help": "scenes for the object-count check"})
    epochs: int = 6
    image_size: int = 64
    batch_size: int = 32
    device: str | None = field(default=None, metadata={"help": "'cpu', '0', ...; default: GPU when there is one"})
    seed: int = 0
    resume: bool = field(default=False, metadata={"help": "continue an interrupted run from its last.pt"})


def main() -> None:
    (args,) = HfArgumentParser(DetectorArguments).parse_args_into_dataclasses()
    scenes = load_scenes(SceneConfig(seed=args.seed), cache_dir=args.cache_dir)
    output = Path(args.output_dir)
    data_yaml = export_yolo_dataset(
        {"train": scenes["train"], "val": scenes["validation"]}, output / "data", list(SHAPES),
        max_samples={"train": args.train_samples, "val": args.val_samples},
    )
    result = train_detector(
        data_yaml, output / "run", model_config=args.model_config, epochs=args.epochs, image_size=args.image_size,
        batch_size=args.batch_size, device=args.device, seed=args.seed, resume=args.resume,
        # scenes are one scale, one image per canvas: mosaic would halve the objects; colour jitter is irrelevant
        mosaic=0.0, close_mosaic=0, val=False, hsv_h=0.0, hsv_s=0.0, hsv_v=0.2, scale=0.2, translate=0.1,
    )
    extractor = RegionExtractor(result.weights, max_regions=8, detector_image_size=args.image_size, device=args.device)
    test = scenes["test"].select(range(min(args.test_samples, len(scenes["test"]))))
    metrics = {**asdict(result), "count_accuracy": count_accuracy(extractor, test), "args": asdict(args)}
    (output / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"detector: {result.weights}\n  mAP50 (validation) = {result.map50:.3f}, mAP50-95 = {result.map50_95:.3f}\n"
          f"  right object count (test) = {metrics['count_accuracy']:.3f}")


if __name__ == "__main__":
    main()
