"""The training recipe as stages: `pretrain` (a base CLIP), `teacher` (the cross-modal teacher), `distill` (the
student with the hybrid loss). Each stage writes a Hub-ready folder: weights, config, processor, remote code."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import CLIPImageProcessor, CLIPModel, Trainer, TrainingArguments

from .data.collator import DCLIPCollator, TeacherFeatureCollator
from .data.scenes import SceneConfig, load_scenes, zero_shot_tasks
from .data.tokenizer import train_clip_tokenizer
from .evaluation import embed_pairs, retrieval_recall, zero_shot_accuracy
from .presets import small_clip_config
from .targets import (
    TEACHER_FEATURE_COLUMNS, compute_teacher_features, compute_teacher_targets, fuse_teacher_targets,
)
from .trainer import DCLIPTrainer


logger = logging.getLogger(__name__)
STAGES = ("pretrain", "teacher", "distill", "all")


@dataclass
class ModelArguments:
    student_model: str | None = field(default=None, metadata={"help": "CLIP checkpoint to start the student from; "
                                                              "default: the base CLIP of the `pretrain` stage"})
    teacher_model: str | None = field(default=None, metadata={"help": "CLIP checkpoint for the teacher's towers; "
                                                              "default: the student's base CLIP"})
    preset: str = field(default="clip-small", metadata={"help": "size of the base CLIP trained from scratch"})
    # CPU-sized defaults: the teacher's pairwise objective fuses batch x (1 + num_negatives) x 2 pairs per step
    fusion_hidden_size: int = 128
    fusion_num_layers: int = 2
    fusion_num_heads: int = 4
    num_negatives: int = 3
    detector_path: str | None = field(default=None, metadata={"help": "YOLO weights for region extraction "
                                                              "(data without boxes)"})


@dataclass
class DataArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "default: the embedded procedural scenes"})
    cache_dir: str = "outputs/cache"
    num_train_scenes: int = 20_000
    image_size: int = 64
    vocab_size: int = 1024
    max_eval_samples: int = 1000


@dataclass
class DistillationArguments:
    stage: str = field(default="all", metadata={"help": f"one of {STAGES}"})
    method: str = field(default="dclip", metadata={"help": "dclip (clip_cid and dclip+clip_cid: issue 5)"})
    contrastive_weight: float = 1.0
    cosine_image_weight: float = 1.0
    cosine_text_weight: float = 1.0
    pretrain_steps: int = 300
    teacher_steps: int = 150
    distill_steps: int = 150
    pretrain_learning_rate: float = 1e-3
    teacher_learning_rate: float = 5e-4
    distill_learning_rate: float = 5e-5
    online_teacher: bool = field(default=False, metadata={"help": "run the teacher per batch instead of caching"})

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"--stage must be one of {STAGES}, got {self.stage!r}")


def _stage_arguments(training_args: TrainingArguments, name: str, steps: int, learning_rate: float) -> TrainingArguments:
    return dataclasses.replace(
        training_args, output_dir=os.path.join(training_args.output_dir, name), max_steps=steps,
        learning_rate=learning_rate, remove_unused_columns=False,
    )


def build_default_processor(data_args: DataArguments, scenes, detector_path: str | None = None):
    from processing_dclip import DCLIPProcessor

    tokenizer = train_clip_tokenizer(scenes["train"]["caption"][:5000], vocab_size=data_args.vocab_size,
                                     model_max_length=40)
    size = data_args.image_size
    image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return DCLIPProcessor(image_processor, tokenizer, detector_path=detector_path, max_regions=4, max_spans=6)


def _save(model, processor, folder: str) -> str:
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def pretrain(model_args, data_args, args, training_args, scenes, processor) -> str:
    """Train a base CLIP from scratch (contrastive only) on the scenes; return its folder."""
    from modeling_dclip import DCLIPModel

    torch.manual_seed(training_args.seed)
    model = DCLIPModel(small_clip_config(processor.tokenizer, data_args.image_size, model_args.preset))
    stage_args = _stage_arguments(training_args, "base_clip", args.pretrain_steps, args.pretrain_learning_rate)
    trainer = DCLIPTrainer(model=model, args=stage_args, train_dataset=scenes["train"],
                           data_collator=DCLIPCollator(processor), loss_weights={"contrastive": 1.0})
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint and _last_checkpoint(stage_args))
    return _save(model.to_clip(), processor, os.path.join(training_args.output_dir, "base_clip", "final"))


def train_teacher(model_args, data_args, args, training_args, scenes, processor, base_clip: str) -> str:
    """Fine-tune the cross-modal teacher (fusion block; towers frozen) on the scenes' regions and spans."""
    from modeling_dclip import DCLIPTeacherModel

    torch.manual_seed(training_args.seed)
    teacher = DCLIPTeacherModel.from_clip(
        model_args.teacher_model or base_clip, fusion_hidden_size=model_args.fusion_hidden_size,
        fusion_num_layers=model_args.fusion_num_layers, fusion_num_heads=model_args.fusion_num_heads,
        num_negatives=model_args.num_negatives, max_regions=processor.max_regions, max_spans=processor.max_spans,
    )
    stage_args = _stage_arguments(training_args, "teacher", args.teacher_steps, args.teacher_learning_rate)
    if teacher.config.freeze_vision_tower and teacher.config.freeze_text_tower:
        # frozen towers: encode regions and spans once, then train the fusion block on the cached features
        features = compute_teacher_features(scenes["train"], teacher, processor, batch_size=256)
        train, collator = features.select_columns(list(TEACHER_FEATURE_COLUMNS)), TeacherFeatureCollator()
    else:
        train, collator = scenes["train"], _TeacherCollator(processor)
    trainer = Trainer(model=teacher, args=stage_args, train_dataset=train, data_collator=collator)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint and _last_checkpoint(stage_args))
    return _save(teacher, processor, os.path.join(training_args.output_dir, "teacher", "final"))


class _TeacherCollator(DCLIPCollator):
    def __init__(self, processor):
        super().__init__(processor, with_teacher_inputs=True)

    def __call__(self, rows):
        return {**super().__call__(rows), "return_loss": True}


def distill(model_args, data_args, args, training_args, scenes, processor, base_clip: str, teacher_dir: str) -> str:
    """The DCLIP student: initialised from the base CLIP, trained with contrastive + cosine-to-teacher terms."""
    from modeling_dclip import DCLIPModel, DCLIPTeacherModel

    torch.manual_seed(training_args.seed)
    student = DCLIPModel.from_clip(model_args.student_model or base_clip, distillation_method=args.method,
                                   teacher_name_or_path=teacher_dir)
    teacher = DCLIPTeacherModel.from_pretrained(teacher_dir)
    train = scenes["train"]
    if not args.online_teacher:
        if teacher.config.freeze_vision_tower and teacher.config.freeze_text_tower:  # the teacher stage's cache
            train = fuse_teacher_targets(compute_teacher_features(train, teacher, processor, batch_size=256), teacher)
        else:
            train = compute_teacher_targets(train, teacher, processor, batch_size=256)
    weights = {"contrastive": args.contrastive_weight, "cosine_image": args.cosine_image_weight,
               "cosine_text": args.cosine_text_weight}
    stage_args = _stage_arguments(training_args, "student", args.distill_steps, args.distill_learning_rate)
    trainer = DCLIPTrainer(
        model=student, args=stage_args, train_dataset=train, loss_weights=weights,
        teacher=teacher if args.online_teacher else None,
        data_collator=DCLIPCollator(processor, with_teacher_inputs=args.online_teacher),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint and _last_checkpoint(stage_args))
    return _save(student, processor, os.path.join(training_args.output_dir, "student", "final"))


def _last_checkpoint(stage_args: TrainingArguments) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(stage_args.output_dir) if os.path.isdir(stage_args.output_dir) else None


def evaluate_folder(folder: str, scenes, processor, max_samples: int) -> dict[str, float]:
    """Retrieval Recall@K and zero-shot accuracy of a student or base-CLIP folder on the test split."""
    from modeling_dclip import DCLIPModel

    model_type = json.loads((Path(folder) / "config.json").read_text()).get("model_type")
    model = DCLIPModel.from_pretrained(folder) if model_type == "dclip" else DCLIPModel.from_clip(folder)
    test = scenes["test"].select(range(min(max_samples, len(scenes["test"]))))
    image_embeds, text_embeds = embed_pairs(model, processor, test)
    results = retrieval_recall(image_embeds, text_embeds, torch.arange(len(test)).numpy())
    for column, names in zero_shot_tasks().items():
        results[f"zeroshot_{column}"] = zero_shot_accuracy(model, processor, test, column, names)
    return results


def run(model_args: ModelArguments, data_args: DataArguments, args: DistillationArguments,
        training_args: TrainingArguments) -> dict:
    """Run the chosen stages on the embedded default data; return where each artefact went, and the metrics."""
    if data_args.dataset_name is not None:
        raise NotImplementedError("real data sets in train.py come with the rest of issue 4; use dclip.data.loaders")
    scenes = load_scenes(SceneConfig(num_train=data_args.num_train_scenes, image_size=data_args.image_size,
                                     seed=training_args.seed), cache_dir=data_args.cache_dir)
    output = Path(training_args.output_dir)
    processor = build_default_processor(data_args, scenes, model_args.detector_path)
    artefacts: dict[str, str] = {}
    base_clip = model_args.student_model or str(output / "base_clip" / "final")
    if args.stage in ("pretrain", "all") and model_args.student_model is None:
        artefacts["base_clip"] = base_clip = pretrain(model_args, data_args, args, training_args, scenes, processor)
    teacher_dir = str(output / "teacher" / "final")
    if args.stage in ("teacher", "all"):
        artefacts["teacher"] = teacher_dir = train_teacher(model_args, data_args, args, training_args, scenes,
                                                           processor, base_clip)
    if args.stage in ("distill", "all"):
        artefacts["student"] = distill(model_args, data_args, args, training_args, scenes, processor, base_clip,
                                       teacher_dir)
    metrics = {name: evaluate_folder(folder, scenes, processor, data_args.max_eval_samples)
               for name, folder in artefacts.items() if name in ("base_clip", "student")}
    summary = {"artefacts": artefacts, "metrics": metrics}
    output.mkdir(parents=True, exist_ok=True)
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
