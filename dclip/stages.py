"""The recipe's stages, each a function of a `RunContext` that returns a typed result: `detector` (YOLO regions on
the embedded data), `pretrain` (a base CLIP from scratch), `teacher` (the cross-modal fusion block on frozen towers),
`distill` (the student with the method's loss terms) and `evaluate`."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from datasets import DatasetDict
from transformers import PretrainedConfig, Trainer, TrainingArguments

from .arguments import DataArguments, DistillationArguments, ModelArguments
from .columns import CLUSTER_LABELS, TEACHER_FEATURE_COLUMNS, TEACHER_IMAGE_EMBEDS
from .data.collator import DCLIPCollator, TeacherFeatureCollator
from .data.processor import check_teacher_fits
from .data.scenes import zero_shot_tasks
from .evaluation import EvaluationResult, evaluate_checkpoint
from .presets import small_clip_config
from .targets import compute_teacher_features, compute_teacher_targets, fuse_teacher_targets
from .trainer import CLUSTER_TERMS, DCLIPTrainer
from .training import TrainingLog, save_final, stage_arguments, train_stage, wait_for_everyone


logger = logging.getLogger(__name__)
STAGE_FOLDERS = {"detector": "detector", "pretrain": "base_clip", "teacher": "teacher", "distill": "student"}


@dataclass
class RunContext:
    """What every stage of one run reads: its arguments, its data splits and its processor."""

    model_args: ModelArguments
    data_args: DataArguments
    args: DistillationArguments
    training_args: TrainingArguments
    data: DatasetDict
    processor: object
    named_checkpoint: Path | None = None  # `--resume_from_checkpoint <folder>` (`training.explicit_checkpoint`)

    def __post_init__(self):
        if self.named_checkpoint is not None and self.args.stage not in STAGE_FOLDERS and self.owner() is None:
            raise ValueError(f"--resume_from_checkpoint {self.named_checkpoint}: not a checkpoint in one of this run's "
                             f"stage folders ({', '.join(str(self.output / f) for f in STAGE_FOLDERS.values())}); "
                             "to resume from a checkpoint elsewhere, run its stage alone with --stage")

    def owner(self) -> str | None:
        """The stage whose folder holds the named checkpoint, if any."""
        if self.named_checkpoint is None:
            return None
        parent = self.named_checkpoint.resolve().parent
        return next((stage for stage, folder in STAGE_FOLDERS.items() if parent == (self.output / folder).resolve()),
                    None)

    @property
    def output(self) -> Path:
        return Path(self.training_args.output_dir)

    @property
    def is_main(self) -> bool:
        return self.training_args.process_index == 0

    def final_folder(self, stage: str) -> Path:
        return self.output / STAGE_FOLDERS[stage] / "final"

    def resume_from(self, stage: str) -> Path | None:
        """The checkpoint that `--resume_from_checkpoint <folder>` names for `stage`: a checkpoint inside the stage's
        folder, or any checkpoint when this run trains that stage alone."""
        if self.named_checkpoint is not None and (self.owner() == stage or self.args.stage == stage):
            return self.named_checkpoint
        return None

    def train(self, trainer: Trainer, stage: str) -> TrainingLog:
        return train_stage(trainer, self.training_args.resume_from_checkpoint, self.resume_from(stage))

    def stage_arguments(self, stage: str, steps: int, learning_rate: float) -> TrainingArguments:
        return stage_arguments(self.training_args, STAGE_FOLDERS[stage], steps, learning_rate)


@dataclass
class StageResult:
    """A trained stage: its Hub-ready folder, and how it trained."""

    folder: str
    training: TrainingLog


def train_default_detector(context: RunContext) -> str:
    """The region detector on the embedded scenes (see `examples/train_detector.py`); return its weights."""
    from .detector import train_scene_detector

    args, training_args = context.args, context.training_args
    metrics = train_scene_detector(
        context.data, context.output / "detector", train_samples=args.detector_train_samples,
        epochs=args.detector_epochs, seed=training_args.seed, resume=bool(training_args.resume_from_checkpoint),
        device="cpu" if training_args.use_cpu else None,
    )
    logger.info("detector: mAP50 %.3f, right object count %.3f", metrics["map50"], metrics["count_accuracy"])
    return metrics["weights"]


def pretrain(context: RunContext) -> StageResult:
    """Train a base CLIP from scratch (contrastive only) on the training split; saved as a plain `CLIPModel`."""
    from modeling_dclip import DCLIPModel

    torch.manual_seed(context.training_args.seed)
    config = small_clip_config(context.processor.tokenizer, context.data_args.image_size, context.model_args.preset)
    model = DCLIPModel(config)
    stage_args = context.stage_arguments("pretrain", context.args.pretrain_steps, context.args.pretrain_learning_rate)
    trainer = DCLIPTrainer(model=model, args=stage_args, train_dataset=context.data["train"],
                           data_collator=DCLIPCollator(context.processor), loss_weights={"contrastive": 1.0})
    log = context.train(trainer, "pretrain")
    folder = save_final(trainer, context.processor, context.final_folder("pretrain"), export=DCLIPModel.to_clip)
    return StageResult(folder, log)


class _TeacherCollator(DCLIPCollator):
    def __init__(self, processor, **region_settings):
        super().__init__(processor, with_teacher_inputs=True, **region_settings)

    def __call__(self, rows):
        return {**super().__call__(rows), "return_loss": True}


def student_embed_dim(name_or_path: str) -> int:
    """The projection width of a CLIP or DCLIP student, local or on the Hub, without loading remote code."""
    return PretrainedConfig.get_config_dict(name_or_path)[0]["projection_dim"]


def train_teacher(context: RunContext, base_clip: str) -> StageResult:
    """Fine-tune the cross-modal teacher (fusion block; towers frozen) on the training split's regions and spans."""
    from modeling_dclip import DCLIPTeacherModel

    model_args, processor, regions = context.model_args, context.processor, context.data_args.region_settings()
    torch.manual_seed(context.training_args.seed)
    teacher = DCLIPTeacherModel.from_clip(
        model_args.teacher_model or base_clip, fusion_hidden_size=model_args.fusion_hidden_size,
        fusion_num_layers=model_args.fusion_num_layers, fusion_num_heads=model_args.fusion_num_heads,
        num_negatives=model_args.num_negatives, max_regions=processor.max_regions, max_spans=processor.max_spans,
        embed_dim=student_embed_dim(model_args.student_model or base_clip),
    )
    check_teacher_fits(teacher, processor)
    stage_args = context.stage_arguments("teacher", context.args.teacher_steps, context.args.teacher_learning_rate)
    if teacher.config.freeze_vision_tower and teacher.config.freeze_text_tower:
        # frozen towers: encode regions and spans once, then train the fusion block on the cached features
        with context.training_args.main_process_first(local=False, desc="teacher tower features"):
            features = compute_teacher_features(context.data["train"], teacher, processor, batch_size=256, **regions)
        train, collator = features.select_columns(list(TEACHER_FEATURE_COLUMNS)), TeacherFeatureCollator()
    else:
        train, collator = context.data["train"], _TeacherCollator(processor, **regions)
    trainer = Trainer(model=teacher, args=stage_args, train_dataset=train, data_collator=collator)
    log = context.train(trainer, "teacher")
    return StageResult(save_final(trainer, processor, context.final_folder("teacher")), log)


def with_lora(student, model_args: ModelArguments):
    """`student` with LoRA adapters (peft) on `--lora_target_modules`."""
    from peft import LoraConfig, get_peft_model

    targets = [name.strip() for name in model_args.lora_target_modules.split(",") if name.strip()]
    config = LoraConfig(r=model_args.lora_rank, lora_alpha=model_args.lora_alpha, target_modules=targets,
                        lora_dropout=0.0, bias="none")
    return get_peft_model(student, config)


def teacher_targets(context: RunContext, teacher):
    """The training split with the teacher's enriched embeddings as columns, computed once (cached by fingerprint):
    from the teacher stage's cached tower features when its towers are frozen, else by a full teacher pass."""
    train, regions = context.data["train"], context.data_args.region_settings()
    with context.training_args.main_process_first(local=False, desc="teacher targets"):
        if teacher.config.freeze_vision_tower and teacher.config.freeze_text_tower:
            features = compute_teacher_features(train, teacher, context.processor, batch_size=256, **regions)
            return fuse_teacher_targets(features, teacher)
        return compute_teacher_targets(train, teacher, context.processor, batch_size=256, **regions)


def distill(context: RunContext, base_clip: str, teacher_dir: str) -> StageResult:
    """The student: initialised from the base CLIP, trained with the method's terms (DCLIP: contrastive + cosine to
    the teacher; CLIP-CID: cluster + instance discrimination against the teacher's embeddings)."""
    from modeling_dclip import DCLIPModel, DCLIPTeacherModel

    model_args, args = context.model_args, context.args
    torch.manual_seed(context.training_args.seed)
    student = DCLIPModel.from_clip(model_args.student_model or base_clip, distillation_method=args.method,
                                   teacher_name_or_path=teacher_dir)
    teacher = DCLIPTeacherModel.from_pretrained(teacher_dir)
    train = context.data["train"] if args.online_teacher else teacher_targets(context, teacher)
    weights, centers = args.loss_weights(), None
    if any(weights[term] for term in CLUSTER_TERMS):
        centers, labels = cluster_teacher_embeddings(train, args.num_clusters, context.training_args,
                                                     context.output / "student")
        train = train.add_column(CLUSTER_LABELS, labels.tolist())
    if model_args.lora_rank:
        student = with_lora(student, model_args)
    stage_args = context.stage_arguments("distill", args.distill_steps, args.distill_learning_rate)
    collator = DCLIPCollator(context.processor, with_teacher_inputs=args.online_teacher,
                             **context.data_args.region_settings())
    trainer = DCLIPTrainer(
        model=student, args=stage_args, train_dataset=train, loss_weights=weights, data_collator=collator,
        teacher=teacher if args.online_teacher else None, cluster_centers=centers, cluster_scale=args.cluster_scale,
        cluster_margin=args.cluster_margin,
    )
    log = context.train(trainer, "distill")
    merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload() if model_args.lora_rank else None
    return StageResult(save_final(trainer, context.processor, context.final_folder("distill"), model=merged), log)


def cluster_teacher_embeddings(train, num_clusters: int, training_args: TrainingArguments,
                               folder: Path) -> tuple[torch.Tensor, np.ndarray]:
    """
    CLIP-CID's clusters: spherical k-means (FAISS) of the teacher's image embeddings (`teacher_image_embeds`),
    and each row's nearest centre. The main process computes them once and saves `cluster_centers.npy` in `folder`
    with `cluster_centers.json`, a fingerprint of the embeddings, K and the seed: a resumed run and the other
    processes read them back (so every process and restart agrees); centres made from other embeddings are redone.
    """
    from .curation import assign_clusters, normalize_embeddings, spherical_kmeans

    embeddings = normalize_embeddings(np.asarray(train[TEACHER_IMAGE_EMBEDS], dtype=np.float32))
    if not 1 <= num_clusters <= len(embeddings):  # on every process, before any of them waits for the main one
        raise ValueError(f"--num_clusters must be between 1 and the {len(embeddings)} training rows, got "
                         f"{num_clusters}")
    source = {"embeddings_sha256": hashlib.sha256(embeddings.tobytes()).hexdigest(), "rows": len(embeddings),
              "num_clusters": num_clusters, "seed": training_args.seed}
    path, source_path = folder / "cluster_centers.npy", folder / "cluster_centers.json"
    if training_args.process_index == 0:
        current = json.loads(source_path.read_text()) if source_path.is_file() and path.is_file() else None
        if current != source:
            folder.mkdir(parents=True, exist_ok=True)
            centers = spherical_kmeans(embeddings, num_clusters, seed=training_args.seed)
            np.save(folder / "cluster_centers.partial.npy", centers)
            os.replace(folder / "cluster_centers.partial.npy", path)
            source_path.write_text(json.dumps(source))
    wait_for_everyone()
    centers = np.load(path)
    return torch.from_numpy(centers), assign_clusters(embeddings, centers)


def evaluate_models(context: RunContext, artefacts: dict[str, str]) -> dict[str, EvaluationResult]:
    """The chosen `--eval_models` among the run's artefacts on the eval split, with the run's processor (main process
    only; the others get nothing)."""
    chosen = {name.strip() for name in context.args.eval_models.split(",")}
    results = {}
    if not context.is_main:
        return results
    for name in ("base_clip", "teacher", "student"):
        if name in artefacts and name in chosen:
            results[name] = evaluate_checkpoint(
                artefacts[name], context.data["eval"], context.data.get("validation"), zero_shot_tasks(),
                context.processor, teacher_top_k=context.args.eval_top_k)
    return results
