"""The recipe's stages, each a function of a `RunContext` that returns a typed result: `detector` (YOLO regions on
the embedded data), `pretrain` (a base CLIP from scratch), `teacher` (the cross-modal fusion block on frozen towers),
`distill` (the student with the method's loss terms) and `evaluate`."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import DatasetDict
from transformers import PretrainedConfig, Trainer, TrainingArguments

from .arguments import REGION_CLUSTER_SOURCE, DataArguments, DistillationArguments, ModelArguments
from .clusters import cluster_teacher_embeddings
from .columns import (
    CLUSTER_LABELS,
    HARD_NEGATIVES,
    NEGATIVE_FEATURE_COLUMNS,
    REGION_FEATURE_COLUMNS,
    TEACHER_FEATURE_COLUMNS,
)
from .data.collator import DCLIPCollator, TeacherFeatureCollator
from .data.regions import with_region_pairs
from .data.scenes import COLORS, SIZES, zero_shot_tasks
from .evaluation import EvaluationResult, evaluate_checkpoint
from .presets import SMALL_CLIP_PRESETS, small_clip_config
from .targets import (
    compute_negative_features,
    compute_teacher_features,
    compute_teacher_targets,
    fuse_teacher_targets,
)
from .trainer import CLUSTER_TERMS, DCLIPTrainer
from .training import TrainingLog, guard_finite_loss, save_final, stage_arguments, train_stage


logger = logging.getLogger(__name__)
STAGE_FOLDERS = {"detector": "detector", "pretrain": "base_clip", "teacher": "teacher", "distill": "student"}
# what a student's `DCLIPConfig.distillation_method` says for each method
STUDENT_CONFIG_METHODS = {"dclip": "dclip", "clip_cid": "clip_cid", "dclip+clip_cid": "dclip+clip_cid",
                          "dclip+instance": "dclip+clip_cid", "instance": "clip_cid", "none": None}


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
                             f"stage folders ({', '.join(str(self.output / f) for f in self.folder_stages())}); "
                             "to resume from a checkpoint elsewhere, run its stage alone with --stage")

    @property
    def methods(self) -> list[str]:
        """The methods of the run's students, the published one (`--method`) first."""
        return self.args.student_methods(embedded_data=self.data_args.dataset_name is None)

    def student_folder(self, method: str) -> str:
        """`student` for `--method`'s student, `student_<method>` for a compared one."""
        return STAGE_FOLDERS["distill"] if method == self.args.method else "student_" + method.replace("+", "_")

    def folder_stages(self) -> dict[str, str]:
        """Each folder of the run's stages (one per student) and its stage."""
        folders = {folder: stage for stage, folder in STAGE_FOLDERS.items() if stage != "distill"}
        return {**folders, **{self.student_folder(method): "distill" for method in self.methods}}

    def owner(self) -> str | None:
        """The folder (see `folder_stages`) that holds the named checkpoint, if any."""
        if self.named_checkpoint is None:
            return None
        parent = self.named_checkpoint.resolve().parent
        return next((folder for folder in self.folder_stages() if parent == (self.output / folder).resolve()), None)

    @property
    def output(self) -> Path:
        return Path(self.training_args.output_dir)

    @property
    def is_main(self) -> bool:
        return self.training_args.process_index == 0

    def final_folder(self, stage: str, folder: str | None = None) -> Path:
        return self.output / (folder or STAGE_FOLDERS[stage]) / "final"

    def resume_from(self, folder: str) -> Path | None:
        """The checkpoint that `--resume_from_checkpoint <folder>` names for the stage `folder`: a checkpoint inside
        that folder, or any checkpoint outside the run's folders when this run trains the folder's stage alone (the
        published student's, for the students)."""
        owner = self.owner()
        if self.named_checkpoint is None or (owner is not None and owner != folder):
            return None
        stage = self.folder_stages()[folder]
        return self.named_checkpoint if owner == folder or (
            self.args.stage == stage and folder == STAGE_FOLDERS[stage]) else None

    def train(self, trainer: Trainer, folder: str) -> TrainingLog:
        guard_finite_loss(trainer, folder, skip=getattr(self.training_args, "skip_nonfinite_loss", False))
        return train_stage(trainer, self.training_args.resume_from_checkpoint, self.resume_from(folder))

    def stage_arguments(self, stage: str, steps: int, learning_rate: float, folder: str | None = None,
                        warmup: float | None = None) -> TrainingArguments:
        return stage_arguments(self.training_args, folder or STAGE_FOLDERS[stage], steps, learning_rate, warmup)

    def fusion_teacher_given(self) -> bool:
        """Whether `--teacher_model` is a trained DCLIP teacher folder (then no `teacher` stage is needed)."""
        from .teachers import model_type

        return self.model_args.teacher_model is not None and model_type(self.model_args.teacher_model) == \
            "dclip_teacher"

    def teacher_kinds(self) -> set[str]:
        """The kinds of teacher the run's students learn from."""
        kinds = {self.teacher_kind_for(method) for method in self.methods}
        return kinds - {None}

    def needs_base_clip(self) -> bool:
        """Whether a base CLIP is needed: a student starts from it, or a teacher is (or fuses) it."""
        model_args = self.model_args
        student_from_base = model_args.student_model is None and model_args.student_preset is None
        return student_from_base or (model_args.teacher_model is None and bool(self.teacher_kinds()))

    def teacher_kind_for(self, method: str) -> str | None:
        """The kind of teacher `method`'s student learns from (None: no teacher); a trained DCLIP teacher given as
        `--teacher_model` teaches every method under `--teacher_kind auto`."""
        requested = self.model_args.teacher_kind
        if requested == "auto" and self.fusion_teacher_given():
            requested = "dclip"
        return self.args.teacher_kind(method, requested)

    def load_teacher(self, kind: str, base_clip: str, teacher_dir: str):
        """The `dclip.teachers.Teacher` of this kind: the DCLIP teacher folder (`--teacher_model` if it is one, else
        the `teacher` stage's), or the `--teacher_model` checkpoint (default: the base CLIP) with its own processor.
        """
        from .teachers import FUSION, load_teacher

        if kind == FUSION:
            return load_teacher(self.model_args.teacher_model if self.fusion_teacher_given() else teacher_dir, FUSION)
        own = self.model_args.teacher_model is None  # the base CLIP reads the run's processor
        return load_teacher(self.model_args.teacher_model or base_clip, kind, processor=self.processor if own else None)


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
    """Train a base CLIP from scratch (contrastive only) on the training split, with `--pretrain_region_fraction` of
    its pairs (region crop, phrase) pairs (`dclip.data.regions`); saved as a plain `CLIPModel`."""
    from modeling_dclip import DCLIPModel

    train, seed = context.data["train"], context.training_args.seed
    if context.args.pretrain_region_fraction:
        with context.training_args.main_process_first(local=False, desc="region pairs"):
            bare = (*COLORS, *SIZES) if context.data_args.dataset_name is None else ()  # the scenes' adjectives
            train = with_region_pairs(train, context.args.pretrain_region_fraction, seed, bare,
                                      context.args.pretrain_bare_fraction)
    torch.manual_seed(seed)
    config = small_clip_config(context.processor.tokenizer, context.data_args.image_size, context.model_args.preset)
    model = DCLIPModel(config)
    stage_args = context.stage_arguments("pretrain", context.args.pretrain_steps, context.args.pretrain_learning_rate,
                                         warmup=context.args.pretrain_warmup)
    trainer = DCLIPTrainer(model=model, args=stage_args, train_dataset=train,
                           data_collator=DCLIPCollator(context.processor), loss_weights={"contrastive": 1.0})
    log = context.train(trainer, STAGE_FOLDERS["pretrain"])
    folder = save_final(trainer, context.processor, context.final_folder("pretrain"), export=DCLIPModel.to_clip)
    return StageResult(folder, log)


class _TeacherCollator(DCLIPCollator):
    def __init__(self, processor, **region_settings):
        super().__init__(processor, with_teacher_inputs=True, **region_settings)

    def __call__(self, rows):
        return {**super().__call__(rows), "return_loss": True}


def student_embed_dim(model_args: ModelArguments, base_clip: str) -> int:
    """The projection width of the run's students (a preset's, or the checkpoint's they start from), without loading
    them or any remote code."""
    if model_args.student_preset is not None:
        return SMALL_CLIP_PRESETS[model_args.student_preset][0]
    return PretrainedConfig.get_config_dict(model_args.student_model or base_clip)[0]["projection_dim"]


def teacher_processor(context: RunContext):
    """The processor of the DCLIP teacher's towers: the run's processor for the base CLIP, else a `DCLIPProcessor`
    around the `--teacher_model` checkpoint's own image processor and tokenizer, with the run's detector."""
    from transformers import AutoProcessor

    from processing_dclip import DCLIPProcessor

    if context.model_args.teacher_model is None:
        return context.processor
    own = AutoProcessor.from_pretrained(context.model_args.teacher_model)
    processor = context.processor
    return DCLIPProcessor(own.image_processor, own.tokenizer, detector_path=processor.detector_path,
                          max_regions=processor.max_regions, max_spans=processor.max_spans)


def train_teacher(context: RunContext, base_clip: str) -> StageResult:
    """Fine-tune the cross-modal teacher (fusion block; towers frozen) on the training split's regions and spans,
    with its towers' own processor; its fused embeddings are projected into the students' width."""
    from modeling_dclip import DCLIPTeacherModel

    model_args, processor, regions = context.model_args, teacher_processor(context), context.data_args.region_settings()
    torch.manual_seed(context.training_args.seed)
    teacher = DCLIPTeacherModel.from_clip(
        model_args.teacher_model or base_clip, fusion_hidden_size=model_args.fusion_hidden_size,
        fusion_num_layers=model_args.fusion_num_layers, fusion_num_heads=model_args.fusion_num_heads,
        num_negatives=model_args.num_negatives, max_regions=processor.max_regions, max_spans=processor.max_spans,
        embed_dim=student_embed_dim(model_args, base_clip),
    )
    stage_args = context.stage_arguments("teacher", context.args.teacher_steps, context.args.teacher_learning_rate)
    if teacher.config.freeze_vision_tower and teacher.config.freeze_text_tower:
        # frozen towers: encode regions and spans once, then train the fusion block on the cached features
        columns, negatives = list(TEACHER_FEATURE_COLUMNS), model_args.teacher_caption_negatives
        if negatives is None:
            negatives = 2 if HARD_NEGATIVES in context.data["train"].column_names else 0
        with context.training_args.main_process_first(local=False, desc="teacher tower features"):
            features = compute_teacher_features(context.data["train"], teacher, processor, batch_size=256, **regions)
            if negatives:  # each caption's own hard negatives, scored against its image beside the batch's
                features = compute_negative_features(features, teacher, processor, negatives)
                columns += NEGATIVE_FEATURE_COLUMNS
        train, collator = features.select_columns(columns), TeacherFeatureCollator()
    elif model_args.teacher_caption_negatives:
        raise ValueError("--teacher_caption_negatives needs the teacher's towers frozen (their outputs are cached)")
    else:
        train, collator = context.data["train"], _TeacherCollator(processor, **regions)
    trainer = Trainer(model=teacher, args=stage_args, train_dataset=train, data_collator=collator)
    log = context.train(trainer, STAGE_FOLDERS["teacher"])
    return StageResult(save_final(trainer, processor, context.final_folder("teacher")), log)


def with_lora(student, model_args: ModelArguments):
    """`student` with LoRA adapters (peft) on `--lora_target_modules` (its distillation heads, if any, train
    whole)."""
    from peft import LoraConfig, get_peft_model

    targets = [name.strip() for name in model_args.lora_target_modules.split(",") if name.strip()]
    heads = ["teacher_head"] if hasattr(student, "teacher_head") else []
    config = LoraConfig(r=model_args.lora_rank, lora_alpha=model_args.lora_alpha, target_modules=targets,
                        lora_dropout=0.0, bias="none", modules_to_save=heads or None)
    return get_peft_model(student, config)


def teacher_targets(context: RunContext, teacher, published: bool = True):
    """The training split with the teacher's embeddings as columns: read from `--teacher_targets`' shards (by
    sample id) for the published student, and for a compared one whose teacher made them; else, in a run of several
    processes, computed by all of them as a sharded job (`dclip.shards`); else computed once (cached by fingerprint)
    on the teacher's own processor's inputs: for a DCLIP teacher with frozen towers, from its cached tower
    features."""
    train, regions = context.data["train"], context.data_args.region_settings()
    if context.args.teacher_targets:
        from .shards import load_target_shards, made_by

        if published or made_by(context.args.teacher_targets, teacher):
            return load_target_shards(context.args.teacher_targets, train, teacher=teacher, **regions)
        logger.info("%s: targets of another teacher; the %s student's are computed", context.args.teacher_targets,
                    teacher.name)
    if context.training_args.world_size > 1:  # every process its share, none waiting at a barrier for the main one
        from .shards import targets_in_processes

        teacher.to(context.training_args.device)
        return targets_in_processes(train, teacher, context.output / "teacher_targets",
                                    context.training_args.process_index, context.training_args.world_size,
                                    **regions)
    with context.training_args.main_process_first(local=False, desc="teacher targets"):
        config = teacher.model.config
        if teacher.kind == "dclip" and config.freeze_vision_tower and config.freeze_text_tower:
            features = compute_teacher_features(train, teacher.model, teacher.processor, batch_size=256, **regions)
            return fuse_teacher_targets(features, teacher.model)
        return compute_teacher_targets(train, teacher, batch_size=256, **regions)


def teacher_region_features(context: RunContext, teacher, base_clip: str, teacher_dir: str, train):
    """`--cluster_on region`: the training split with a DCLIP teacher's tower outputs (`compute_teacher_features`,
    the same cached pass as its targets'): `train` itself where it carries them (the student's own DCLIP teacher's
    targets), else from the student's teacher when it is a DCLIP one, else from the run's DCLIP teacher (the
    `teacher` stage's, or a DCLIP `--teacher_model`), whose towers, by default, are the CLIP-CID teacher's own (the
    base CLIP)."""
    from .teachers import FUSION

    if set(REGION_FEATURE_COLUMNS) <= set(train.column_names):
        return train
    if teacher is None or teacher.kind != FUSION:
        try:
            teacher = context.load_teacher(FUSION, base_clip, teacher_dir)
        except (OSError, ValueError) as error:
            raise ValueError(f"--cluster_on region embeds each image's largest region with a DCLIP teacher's towers, "
                             f"and none could be loaded from {teacher_dir!r} (run the `teacher` stage first, or give "
                             f"a DCLIP teacher folder as --teacher_model): {error}") from error
    with context.training_args.main_process_first(local=False, desc="teacher region features"):
        return compute_teacher_features(context.data["train"], teacher.model, teacher.processor, batch_size=256,
                                        **context.data_args.region_settings())


def distill(context: RunContext, base_clip: str, teacher_dir: str, method: str | None = None) -> StageResult:
    """One student (`method`, default `--method`): built as `--student_preset` / `--student_model` /
    `--student_inherit_layers` say (default: the base CLIP), trained with the method's terms (DCLIP: contrastive +
    cosine to the teacher; CLIP-CID: cluster + instance discrimination against the teacher's embeddings; none:
    contrastive alone), saved without its distillation heads in its own folder."""
    from modeling_dclip import DCLIPModel

    from .students import build_student
    from .teachers import FUSION

    model_args, args, method = context.model_args, context.args, method or context.args.method
    kind, folder = context.teacher_kind_for(method), context.student_folder(method)
    teacher = context.load_teacher(kind, base_clip, teacher_dir) if kind is not None else None
    student = build_student(
        model_args.student_model, base_clip, context.processor, context.data_args.image_size,
        model_args.student_preset, model_args.student_inherit_layers,
        teacher.embed_dim if teacher is not None else None, context.training_args.seed,
        distillation_method=STUDENT_CONFIG_METHODS[method], teacher_name_or_path=teacher.name if teacher else None)
    online = args.online_teacher and teacher is not None
    if context.data_args.streaming:
        from .streaming import streamed_train

        train = streamed_train(context, None if online else teacher, method)
    else:
        train = (teacher_targets(context, teacher, published=method == args.method)
                 if teacher is not None and not online else context.data["train"])
    weights, centers = args.loss_weights(method), None
    if any(weights[term] for term in CLUSTER_TERMS):
        # the region default needs a DCLIP teacher: the student's own, a given one, or the run's `teacher` stage's
        fusion = (teacher is not None and teacher.kind == FUSION) or context.fusion_teacher_given() or \
            (Path(teacher_dir) / "config.json").is_file()
        cluster_on, num_clusters = args.clusters(regions=context.data_args.dataset_name is None and fusion)
        if args.num_clusters is None:  # the default K, on fewer training rows than that (a tiny run): one per row
            num_clusters = min(num_clusters, len(train))
        regions = (teacher_region_features(context, teacher, base_clip, teacher_dir, train)
                   if cluster_on == REGION_CLUSTER_SOURCE else None)
        centers, labels = cluster_teacher_embeddings(train, num_clusters, context.training_args,
                                                     context.output / folder, cluster_on, regions)
        train = train.add_column(CLUSTER_LABELS, labels.tolist())
    if model_args.lora_rank:
        student = with_lora(student, model_args)
    stage_args = context.stage_arguments("distill", args.distill_steps, args.distill_learning_rate, folder)
    if context.data_args.streaming:  # each process reads its own part of the stream (accelerate shards it), rather
        # than the main process reading every batch and sending the others their slices
        stage_args = dataclasses.replace(stage_args, accelerator_config={"dispatch_batches": False,
                                                                         "split_batches": False})
    collator = DCLIPCollator(context.processor, teacher=teacher if online else None,
                             **context.data_args.region_settings())
    trainer = DCLIPTrainer(
        model=student, args=stage_args, train_dataset=train, loss_weights=weights, data_collator=collator,
        teacher=teacher if online else None, cluster_centers=centers, cluster_scale=args.cluster_scale,
        cluster_margin=args.cluster_margin, cluster_sample_size=args.cluster_sample_size,
    )
    log = context.train(trainer, folder)
    merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload() if model_args.lora_rank else None
    final = save_final(trainer, context.processor, context.final_folder("distill", folder), model=merged,
                       export=DCLIPModel.drop_teacher_head)
    return StageResult(final, log)


def evaluate_models(context: RunContext, artefacts: dict[str, str]) -> dict[str, EvaluationResult]:
    """The chosen `--eval_models` (`all`: every model) among the run's artefacts on the eval split, each with its own
    processor (main process only; the others get nothing)."""
    chosen = {name.strip() for name in context.args.eval_models.split(",")}
    results = {}
    if not context.is_main:
        return results
    for name, folder in artefacts.items():
        if name != "detector" and (name in chosen or "all" in chosen):
            results[name] = evaluate_checkpoint(
                folder, context.data["eval"], context.data.get("validation"), zero_shot_tasks(),
                teacher_top_k=context.args.eval_top_k)
    return results
