"""Train an ultralytics YOLO region detector on a data set with boxes, offline, and measure it."""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm


@dataclass
class DetectorResult:
    weights: str  # best weights (ultralytics .pt)
    map50: float  # box mAP@0.5 on the validation split
    map50_95: float
    data_yaml: str


def export_yolo_dataset(
    splits: dict, output_dir: str | os.PathLike, class_names: list[str], class_column: str = "object_shapes",
    max_samples: dict[str, int] | None = None,
) -> str:
    """
    Write `{"train": Dataset, "val": Dataset}` (columns `image`, `boxes` normalised `x1, y1, x2, y2`, and
    `class_column`) in the YOLO layout (`images/<split>/*.png`, `labels/<split>/*.txt`) plus `data.yaml`; return
    the yaml's path. Already exported files are reused.
    """
    output_dir = Path(output_dir).resolve()
    max_samples = max_samples or {}
    for split, dataset in splits.items():
        images_dir, labels_dir = output_dir / "images" / split, output_dir / "labels" / split
        images_dir.mkdir(parents=True, exist_ok=True)
        labels_dir.mkdir(parents=True, exist_ok=True)
        count = min(len(dataset), max_samples.get(split, len(dataset)))
        raw = dataset.select(range(count)).cast_column("image", type(dataset.features["image"])(decode=False))
        for index, row in enumerate(tqdm(raw, total=count, desc=f"yolo export/{split}", unit="img")):
            image_path, label_path = images_dir / f"{index:07d}.png", labels_dir / f"{index:07d}.txt"
            if label_path.exists() and image_path.exists():
                continue
            data = row["image"]["bytes"] or Path(row["image"]["path"]).read_bytes()
            if data[:8] == b"\x89PNG\r\n\x1a\n":
                image_path.write_bytes(data)
            else:
                Image.open(io.BytesIO(data)).convert("RGB").save(image_path)
            lines = []
            for box, cls in zip(row["boxes"], row[class_column]):
                x1, y1, x2, y2 = (min(max(float(v), 0.0), 1.0) for v in box)
                lines.append(f"{int(cls)} {(x1 + x2) / 2:.6f} {(y1 + y2) / 2:.6f} {x2 - x1:.6f} {y2 - y1:.6f}")
            label_path.write_text("\n".join(lines) + "\n")
    yaml_path = output_dir / "data.yaml"
    names = "\n".join(f"  {i}: {name}" for i, name in enumerate(class_names))
    yaml_path.write_text(f"path: {output_dir}\ntrain: images/train\nval: images/val\nnames:\n{names}\n")
    return str(yaml_path)


def train_detector(
    data_yaml: str, output_dir: str | os.PathLike, model_config: str = "yolov8n.yaml", epochs: int = 10,
    image_size: int = 64, batch_size: int = 64, device: str | None = None, workers: int = 2, seed: int = 0,
    resume: bool = False, **train_kwargs,
) -> DetectorResult:
    """
    Train YOLO built from `model_config` (a yaml: no weights are downloaded) on `data_yaml`. Offline settings:
    `amp=False` (the AMP check downloads weights) and `plots=False` (plots download a font).
    """
    from processing_dclip import keep_torch_threads

    with keep_torch_threads():
        return _train_detector(data_yaml, output_dir, model_config, epochs, image_size, batch_size, device, workers,
                               seed, resume, **train_kwargs)


def _train_detector(data_yaml, output_dir, model_config, epochs, image_size, batch_size, device, workers, seed,
                    resume, **train_kwargs) -> DetectorResult:
    from processing_dclip import import_yolo

    YOLO = import_yolo()  # noqa: N806 - a class; imported without ultralytics' process-wide side effects
    output_dir = Path(output_dir).resolve()
    last, best = output_dir / "weights" / "last.pt", output_dir / "weights" / "best.pt"
    if resume and last.is_file() and not _unfinished(last) and best.is_file():
        pass  # training had finished (stopped during validation): validate the weights there are
    elif resume and last.is_file():
        model = YOLO(str(last))
        model.train(resume=True)
    else:
        model = YOLO(model_config, task="detect")
        model.add_callback("on_pretrain_routine_end", _use_all_cores)
        model.train(
            data=data_yaml, epochs=epochs, imgsz=image_size, batch=batch_size, device=device or _auto_device(),
            workers=workers, seed=seed, deterministic=True, amp=False, plots=False, project=str(output_dir.parent),
            name=output_dir.name, exist_ok=True, verbose=False, **train_kwargs,
        )
    metrics = YOLO(str(best)).val(
        data=data_yaml, imgsz=image_size, batch=batch_size, device=device or _auto_device(), plots=False,
        verbose=False, project=str(output_dir.parent), name=output_dir.name + "-val", exist_ok=True,
    )
    return DetectorResult(str(best), float(metrics.box.map50), float(metrics.box.map), data_yaml)


def import_ultralytics_as_one_process() -> None:
    """
    Import ultralytics as a single process even inside a distributed launch. ultralytics reads WORLD_SIZE / RANK at
    import and then calls `torch.distributed` barriers and broadcasts of its own (settings, trainer, sampler), which
    would pair with the pipeline's barriers on other ranks. Detection and detector training here are one process's
    work, so every rank imports it as one process (`processing_dclip.import_yolo`, which also keeps ultralytics'
    other side effects out) before anything else does.
    """
    import sys

    if "ultralytics" in sys.modules or os.environ.get("WORLD_SIZE", "1") == "1":
        return
    from processing_dclip import import_yolo

    try:
        import_yolo()
    except ImportError:
        pass


def train_scene_detector(
    scenes, output_dir: str | os.PathLike, train_samples: int = 5000, val_samples: int = 500,
    test_samples: int = 1000, epochs: int = 6, image_size: int = 64, batch_size: int = 32,
    model_config: str = "yolov8n.yaml", device: str | None = None, seed: int = 0, resume: bool = False,
) -> dict:
    """
    Train the region detector on the procedural scenes (`train` / `validation` splits) and measure it: box mAP on
    validation, and how often the processor then finds the right number of objects on `test`. Writes
    `<output_dir>/run/weights/best.pt` and `<output_dir>/metrics.json`; returns the metrics.
    """
    from processing_dclip import RegionExtractor

    from .data.scenes import SHAPES

    output = Path(output_dir)
    data_yaml = export_yolo_dataset(
        {"train": scenes["train"], "val": scenes["validation"]}, output / "data", list(SHAPES),
        max_samples={"train": train_samples, "val": val_samples},
    )
    result = train_detector(
        data_yaml, output / "run", model_config=model_config, epochs=epochs, image_size=image_size,
        batch_size=batch_size, device=device, seed=seed, resume=resume,
        # scenes are one scale, one image per canvas: mosaic would halve the objects; colour jitter is irrelevant
        mosaic=0.0, close_mosaic=0, val=False, hsv_h=0.0, hsv_s=0.0, hsv_v=0.2, scale=0.2, translate=0.1,
    )
    extractor = RegionExtractor(result.weights, max_regions=8, detector_image_size=image_size, device=device)
    test = scenes["test"].select(range(min(test_samples, len(scenes["test"]))))
    settings = dict(train_samples=train_samples, val_samples=val_samples, test_samples=test_samples, epochs=epochs,
                    image_size=image_size, batch_size=batch_size, model_config=model_config, seed=seed)
    metrics = {**asdict(result), "count_accuracy": count_accuracy(extractor, test), "settings": settings}
    (output / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def _unfinished(checkpoint: Path) -> bool:
    """An ultralytics checkpoint written mid-training (it keeps its epoch and optimizer; a finished one does not).
    Our own run's file, so unpickling it is safe."""
    import torch

    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    return state.get("epoch", -1) >= 0 and state.get("optimizer") is not None


def _use_all_cores(trainer) -> None:
    """ultralytics trains on `cpu_count - 1` threads (1 of 2 cores here); give CPU training every core."""
    import torch

    if trainer.device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)


def _auto_device() -> str:
    import torch

    return "0" if torch.cuda.is_available() else "cpu"


def count_accuracy(region_extractor, dataset, batch_size: int = 64) -> float:
    """Fraction of images on which the detector finds exactly `num_objects` regions."""
    correct = 0
    for start in tqdm(range(0, len(dataset), batch_size), desc="detector counts", unit="batch"):
        rows = dataset[start : start + batch_size]
        images = [image.convert("RGB") for image in rows["image"]]
        found = region_extractor(images)
        correct += sum(
            int(regions.source == "detector" and len(regions.boxes) == expected)
            for regions, expected in zip(found, rows["num_objects"])
        )
    return correct / max(len(dataset), 1)
