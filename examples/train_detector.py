"""Train the YOLO region detector on the procedural scenes, offline, and measure it.

    python examples/train_detector.py                      # defaults: 5,000 scenes, 6 epochs at 64 px (CPU: ~5 min)
    python examples/train_detector.py --epochs 20 --train_samples 20000 --output_dir outputs/detector

Prints box mAP50 on the validation split and how often the processor finds the right number of objects on the test
split; writes `<output_dir>/run/weights/best.pt`, which `DCLIPProcessor(detector_path=...)` loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import HfArgumentParser

from dclip.cli import require_one_process, setup_logging
from dclip.data.scenes import SceneConfig, load_scenes
from dclip.detector import train_scene_detector


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
    parser = HfArgumentParser(DetectorArguments)
    (args,) = parser.parse_args_into_dataclasses()
    require_one_process(parser, "examples/train_detector.py")
    setup_logging()
    scenes = load_scenes(SceneConfig(seed=args.seed), cache_dir=args.cache_dir)
    metrics = train_scene_detector(
        scenes, args.output_dir, train_samples=args.train_samples, val_samples=args.val_samples,
        test_samples=args.test_samples, epochs=args.epochs, image_size=args.image_size, batch_size=args.batch_size,
        model_config=args.model_config, device=args.device, seed=args.seed, resume=args.resume,
    )
    print(f"detector: {metrics['weights']}\n  mAP50 (validation) = {metrics['map50']:.3f}, "
          f"mAP50-95 = {metrics['map50_95']:.3f}\n  right object count (test) = {metrics['count_accuracy']:.3f}")


if __name__ == "__main__":
    main()
