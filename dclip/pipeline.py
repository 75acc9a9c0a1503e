"""The training recipe as stages: `detector` (YOLO regions, embedded data), `pretrain` (a base CLIP, embedded data),
`teacher` (the cross-modal teacher), `distill` (the student with the hybrid loss), then an evaluation summary.
Each stage writes a Hub-ready folder: weights, config, processor, remote code."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from datasets import DatasetDict
from transformers import CLIPImageProcessor, Trainer, TrainingArguments

from .data.collator import DCLIPCollator, TeacherFeatureCollator
from .data.scenes import SceneConfig, load_scenes, zero_shot_tasks
from .data.tokenizer import train_clip_tokenizer
from .detector import import_ultralytics_as_one_process
from .evaluation import (
    EvaluationResult, evaluate_checkpoint, format_metrics_table, zero_shot_top1_keys,
)
from .presets import small_clip_config
from .targets import (
    TEACHER_FEATURE_COLUMNS, compute_teacher_features, compute_teacher_targets, fuse_teacher_targets,
)
from .trainer import CLUSTER_TERMS, LOSS_TERMS, METHOD_LOSS_WEIGHTS, DCLIPTrainer


logger = logging.getLogger(__name__)
STAGES = ("detector", "pretrain", "teacher", "distill", "evaluate", "all")


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
    detector_path: str | None = field(default=None, metadata={"help": "YOLO weights for region extraction; default "
                                                              "on the embedded data: the `detector` stage's"})
    lora_rank: int = field(default=0, metadata={"help": "LoRA rank on the student's attention (peft); 0: full "
                                                "fine-tuning. Adapters are merged into the saved student."})
    lora_alpha: float = 16.0
    lora_target_modules: str = field(default="q_proj,k_proj,v_proj,out_proj",
                                     metadata={"help": "comma-separated module names for LoRA"})


@dataclass
class DataArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "Hub name or local file/folder of captioned "
                                                             "images (dclip.data.loaders); default: the embedded "
                                                             "procedural scenes"})
    dataset_format: str | None = field(default=None, metadata={"help": "loader format; default: inferred"})
    image_root: str | None = field(default=None, metadata={"help": "image folder for COCO/Flickr JSON files"})
    train_split: str = "train"
    eval_split: str = "test"
    cache_dir: str = "outputs/cache"
    num_train_scenes: int = 20_000
    image_size: int = 64
    vocab_size: int = 1024
    max_train_samples: int | None = field(default=None, metadata={"help": "use at most this many training pairs"})
    train_indices: str | None = field(default=None, metadata={"help": "a .npy of training-split rows to train on, "
                                                              "e.g. `kept_indices.npy` of examples/curate.py"})
    exact_duplicate_fraction: float = field(default=0.0, metadata={"help": "embedded data: fraction of training "
                                                                   "scenes that are byte copies of earlier ones"})
    near_duplicate_fraction: float = field(default=0.0, metadata={"help": "embedded data: ...re-rendered copies "
                                                                  "with a small jitter"})
    concept_fraction: float = field(default=0.0, metadata={"help": "embedded data: ...repeats of a few "
                                                           "over-represented concepts"})
    max_eval_samples: int = 1000
    use_annotated_regions: bool = field(default=False, metadata={"help": "train the teacher on the data's own "
                                                                  "boxes and spans, not the detector's and the span "
                                                                  "extractor's (evaluation always uses the latter)"})


@dataclass
class DistillationArguments:
    stage: str = field(default="all", metadata={"help": f"one of {STAGES}"})
    method: str = field(default="dclip", metadata={"help": "dclip (contrastive + cosine to the teacher), clip_cid "
                                                   "(cluster + instance discrimination) or dclip+clip_cid"})
    # loss weights; unset: 1 for the method's terms, 0 for the others
    contrastive_weight: float | None = None
    cosine_image_weight: float | None = None
    cosine_text_weight: float | None = None
    cluster_image_weight: float | None = None
    cluster_text_weight: float | None = None
    instance_weight: float | None = None
    num_clusters: int = field(default=64, metadata={"help": "k-means clusters of the teacher's image embeddings "
                                                   "(CLIP-CID's cluster discrimination)"})
    cluster_scale: float = field(default=16.0, metadata={"help": "margin softmax scale s"})
    cluster_margin: float = field(default=0.2, metadata={"help": "additive angular margin m, radians"})
    detector_epochs: int = field(default=6, metadata={"help": "0: no detector stage (regions: the data's boxes "
                                                     "with --use_annotated_regions, else the whole image)"})
    detector_train_samples: int = 5000
    pretrain_steps: int = 300
    teacher_steps: int = 150
    distill_steps: int = 300
    pretrain_learning_rate: float = 1e-3
    teacher_learning_rate: float = 5e-4
    distill_learning_rate: float = 2e-4
    online_teacher: bool = field(default=False, metadata={"help": "run the teacher per batch instead of caching"})
    cpu_threads: int | None = field(default=None, metadata={"help": "torch threads per process on CPU; default: "
                                                      "the cores this process may use / processes per machine "
                                                      "(`accelerate launch` alone would leave 1)"})
    eval_models: str = field(default="base_clip,teacher,student", metadata={"help": "comma-separated models the "
                                                                         "evaluation covers"})
    eval_top_k: int = field(default=16, metadata={"help": "candidates per query that the teacher's fused score "
                                                  "re-ranks in retrieval evaluation"})

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"--stage must be one of {STAGES}, got {self.stage!r}")
        if self.method not in METHOD_LOSS_WEIGHTS:
            raise ValueError(f"--method must be one of {list(METHOD_LOSS_WEIGHTS)}, got {self.method!r}")
        if self.num_clusters < 1:
            raise ValueError(f"--num_clusters must be at least 1, got {self.num_clusters}")
        if self.online_teacher and any(self.loss_weights()[term] for term in CLUSTER_TERMS):
            raise ValueError("the cluster terms (--method clip_cid) need the teacher's embeddings of the whole "
                             "training set for k-means: drop --online_teacher or set the cluster weights to 0")

    def loss_weights(self) -> dict[str, float]:
        """Each loss term's weight: the explicit `--<term>_weight`, else 1 for the method's terms and 0 otherwise."""
        defaults = METHOD_LOSS_WEIGHTS[self.method]
        weights = {}
        for term in LOSS_TERMS:
            explicit = getattr(self, f"{term}_weight")
            weights[term] = float(explicit) if explicit is not None else float(term in defaults)
        return weights


def _stage_arguments(training_args: TrainingArguments, name: str, steps: int, learning_rate: float) -> TrainingArguments:
    return dataclasses.replace(
        training_args, output_dir=os.path.join(training_args.output_dir, name), max_steps=steps,
        learning_rate=learning_rate, remove_unused_columns=False, push_to_hub=False,  # the run pushes the student
    )


def _runs(args: DistillationArguments, stage: str) -> bool:
    return args.stage in (stage, "all")


# ----- data and processor ---------------------------------------------------------------------------------------


def load_data(data_args: DataArguments, seed: int) -> tuple[DatasetDict, dict[str, dict]]:
    """`train` and `eval` splits (the embedded scenes, or a real captioned data set through `dclip.data.loaders`), and
    per split what the loader kept and skipped (missing or corrupt images, empty captions)."""
    reports: dict[str, dict] = {}
    if data_args.dataset_name is None:
        scenes = load_scenes(SceneConfig(
            num_train=data_args.num_train_scenes, image_size=data_args.image_size, seed=seed,
            exact_duplicate_fraction=data_args.exact_duplicate_fraction,
            near_duplicate_fraction=data_args.near_duplicate_fraction, concept_fraction=data_args.concept_fraction,
        ), cache_dir=data_args.cache_dir)
        data = DatasetDict(train=scenes["train"], eval=scenes[data_args.eval_split], validation=scenes["validation"],
                           test=scenes["test"])
    else:
        from .data.loaders import load_caption_dataset

        data = DatasetDict()
        extra = {"image_root": data_args.image_root} if data_args.image_root else {}
        for name, split in (("train", data_args.train_split), ("eval", data_args.eval_split)):
            dataset, report = load_caption_dataset(data_args.dataset_name, format=data_args.dataset_format,
                                                   split=split, **extra)
            logger.warning("%s split %r: %s", data_args.dataset_name, split, report)
            data[name] = dataset
            reports[name] = {"source": report.source, "rows": report.num_rows, "images": report.num_images,
                             "skipped": dict(report.skipped)}
    if data_args.max_train_samples is not None:  # first, as in examples/curate.py, so curated indices line up
        data["train"] = data["train"].select(range(min(data_args.max_train_samples, len(data["train"]))))
    if data_args.train_indices is not None:
        data["train"] = select_rows(data["train"], data_args.train_indices)
    data["eval"] = data["eval"].select(range(min(data_args.max_eval_samples, len(data["eval"]))))
    return data, reports


def select_rows(dataset, indices_file: str):
    """The rows of `dataset` listed in a `.npy` file of integer indices, with a clear error for a bad file."""
    try:
        indices = np.load(indices_file)
    except (OSError, ValueError) as error:
        raise ValueError(f"--train_indices {indices_file}: not a readable .npy file ({error})") from error
    if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer) or not len(indices):
        raise ValueError(f"--train_indices {indices_file}: expected a non-empty 1-d array of integer row indices, got "
                         f"{indices.dtype} of shape {indices.shape}")
    report = Path(indices_file).with_name("report.json")  # examples/curate.py writes one beside the indices
    if report.is_file():
        rows = json.loads(report.read_text()).get("rows")
        if rows is not None and rows != len(dataset):
            raise ValueError(f"--train_indices {indices_file}: curated from {rows} rows ({report}), but this "
                             f"training split has {len(dataset)}: the same data arguments and --seed are needed")
    if (indices.min() < 0 or indices.max() >= len(dataset)):
        raise ValueError(f"--train_indices {indices_file}: indices must lie in [0, {len(dataset)}), the training "
                         f"split's rows; got {indices.min()}..{indices.max()} (made for another data set?)")
    return dataset.select(indices)


def build_default_processor(data_args: DataArguments, scenes, detector_path: str | None = None):
    """A processor for the embedded data: a BPE tokenizer trained on its captions and a small-image CLIP processor."""
    from processing_dclip import DCLIPProcessor

    tokenizer = train_clip_tokenizer(scenes["train"]["caption"][:5000], vocab_size=data_args.vocab_size,
                                     model_max_length=40)
    size = data_args.image_size
    image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return DCLIPProcessor(image_processor, tokenizer, detector_path=detector_path, max_regions=4, max_spans=6)


def build_processor(model_args: ModelArguments, data_args: DataArguments, data, detector_path: str | None,
                    folder: Path):
    """
    The run's processor, saved once in `folder` and read back by every later stage, process and resumed run (a BPE
    tokenizer trained twice on the same captions can differ in tie-breaks): the student's own (tokenizer, image
    processor) when it starts from a checkpoint, else the embedded default's. A saved one made for another student
    or data set is rebuilt.
    """
    from processing_dclip import DCLIPProcessor

    source = {"student_model": model_args.student_model, "dataset_name": data_args.dataset_name,
              "image_size": data_args.image_size, "vocab_size": data_args.vocab_size}
    source_file = folder / "dclip_source.json"
    if source_file.is_file() and json.loads(source_file.read_text()) == source:
        processor = DCLIPProcessor.from_pretrained(folder)
        processor.set_detector(detector_path)
        return processor
    if model_args.student_model is None:
        processor = build_default_processor(data_args, data, detector_path)
    else:
        clip_processor = DCLIPProcessor.from_pretrained(model_args.student_model, trust_remote_code=False)
        processor = DCLIPProcessor(clip_processor.image_processor, clip_processor.tokenizer,
                                   detector_path=detector_path, max_regions=4, max_spans=6)
    saved = folder.with_name(folder.name + ".partial")
    shutil.rmtree(saved, ignore_errors=True)
    processor.save_pretrained(saved)
    (saved / "dclip_source.json").write_text(json.dumps(source))
    shutil.rmtree(folder, ignore_errors=True)
    saved.rename(folder)
    return processor


def _check_teacher_fits(teacher, processor) -> None:
    crop = processor.image_processor.crop_size or {}
    image_size = teacher.config.vision_config.image_size
    if crop and crop.get("height") != image_size:
        raise ValueError(f"the teacher's vision tower takes {image_size}px images but the student's processor makes "
                         f"{crop.get('height')}px ones: use a teacher and a student of the same input size.")
    if teacher.config.text_config.vocab_size < len(processor.tokenizer):
        raise ValueError(f"the teacher's text tower has {teacher.config.text_config.vocab_size} tokens but the "
                         f"student's tokenizer {len(processor.tokenizer)}: they must share a tokenizer.")


# ----- stages ---------------------------------------------------------------------------------------------------


def _wait_for_everyone() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _save(model, processor, folder: str | Path, training_args: TrainingArguments) -> str:
    """Save from the main process, atomically: a folder that exists is complete (an interrupted save leaves only
    `<folder>.partial`). Every process returns once it is written."""
    folder = Path(folder)
    if training_args.process_index == 0:
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        model.save_pretrained(partial)
        processor.save_pretrained(partial)
        shutil.rmtree(folder, ignore_errors=True)
        partial.rename(folder)
    _wait_for_everyone()
    return str(folder)


def last_complete_checkpoint(folder: str | os.PathLike) -> str | None:
    """The newest `checkpoint-<step>` in `folder` that was completely written. The Trainer writes
    `trainer_state.json` last, so a run killed while saving leaves a checkpoint without a readable one: skipped."""
    folder = Path(folder)
    steps = sorted((int(path.name.split("-")[1]), path) for path in folder.glob("checkpoint-*")
                   if path.is_dir() and path.name.split("-")[1].isdigit())
    for _, path in reversed(steps):
        try:
            json.loads((path / "trainer_state.json").read_text())
        except (OSError, ValueError):
            logger.warning("skipping incomplete checkpoint %s", path)
            continue
        return str(path)
    return None


def _train(trainer: Trainer, training_args: TrainingArguments, stage_args: TrainingArguments) -> dict:
    """`trainer.train()`, from the stage's last complete checkpoint when `--resume_from_checkpoint` is set."""
    checkpoint = None
    if training_args.resume_from_checkpoint:
        checkpoint = last_complete_checkpoint(stage_args.output_dir)
        if checkpoint:
            logger.warning("resuming %s from %s", stage_args.output_dir, checkpoint)
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=checkpoint)
    return {"resumed_from": checkpoint, "global_step": trainer.state.global_step,
            "train_rows": len(trainer.train_dataset), "seconds": round(time.perf_counter() - started, 1)}


def train_default_detector(args: DistillationArguments, training_args: TrainingArguments, data, output: Path) -> str:
    """The region detector on the embedded scenes (see `examples/train_detector.py`); return its weights."""
    from .detector import train_scene_detector

    metrics = train_scene_detector(
        data, output / "detector", train_samples=args.detector_train_samples, epochs=args.detector_epochs,
        seed=training_args.seed, resume=bool(training_args.resume_from_checkpoint),
        device="cpu" if training_args.use_cpu else None,
    )
    logger.warning("detector: mAP50 %.3f, right object count %.3f", metrics["map50"], metrics["count_accuracy"])
    return metrics["weights"]


def pretrain(model_args, data_args, training_args, args, data, processor, log: dict) -> str:
    """Train a base CLIP from scratch (contrastive only) on the training split; return its folder."""
    from modeling_dclip import DCLIPModel

    torch.manual_seed(training_args.seed)
    model = DCLIPModel(small_clip_config(processor.tokenizer, data_args.image_size, model_args.preset))
    stage_args = _stage_arguments(training_args, "base_clip", args.pretrain_steps, args.pretrain_learning_rate)
    trainer = DCLIPTrainer(model=model, args=stage_args, train_dataset=data["train"],
                           data_collator=DCLIPCollator(processor), loss_weights={"contrastive": 1.0})
    log["pretrain"] = _train(trainer, training_args, stage_args)
    return _save(model.to_clip(), processor, os.path.join(training_args.output_dir, "base_clip", "final"),
                 training_args)


def _region_settings(data_args: DataArguments) -> dict:
    """Where the teacher's training regions and spans come from: the data's annotations, or detector + extractor."""
    return {"use_given_boxes": data_args.use_annotated_regions, "use_given_spans": data_args.use_annotated_regions}


def train_teacher(model_args, data_args, training_args, args, data, processor, base_clip: str, log: dict) -> str:
    """Fine-tune the cross-modal teacher (fusion block; towers frozen) on the training split's regions and spans."""
    from modeling_dclip import DCLIPTeacherModel

    torch.manual_seed(training_args.seed)
    teacher = DCLIPTeacherModel.from_clip(
        model_args.teacher_model or base_clip, fusion_hidden_size=model_args.fusion_hidden_size,
        fusion_num_layers=model_args.fusion_num_layers, fusion_num_heads=model_args.fusion_num_heads,
        num_negatives=model_args.num_negatives, max_regions=processor.max_regions, max_spans=processor.max_spans,
        embed_dim=_student_embed_dim(model_args, base_clip),
    )
    _check_teacher_fits(teacher, processor)
    stage_args = _stage_arguments(training_args, "teacher", args.teacher_steps, args.teacher_learning_rate)
    if teacher.config.freeze_vision_tower and teacher.config.freeze_text_tower:
        # frozen towers: encode regions and spans once, then train the fusion block on the cached features
        with training_args.main_process_first(local=False, desc="teacher tower features"):
            features = compute_teacher_features(data["train"], teacher, processor, batch_size=256,
                                                **_region_settings(data_args))
        train, collator = features.select_columns(list(TEACHER_FEATURE_COLUMNS)), TeacherFeatureCollator()
    else:
        train, collator = data["train"], _TeacherCollator(processor, **_region_settings(data_args))
    trainer = Trainer(model=teacher, args=stage_args, train_dataset=train, data_collator=collator)
    log["teacher"] = _train(trainer, training_args, stage_args)
    return _save(teacher, processor, os.path.join(training_args.output_dir, "teacher", "final"), training_args)


def _student_embed_dim(model_args: ModelArguments, base_clip: str) -> int:
    from transformers import PretrainedConfig

    # a CLIP or a DCLIP student, local or on the Hub, without loading remote code
    return PretrainedConfig.get_config_dict(model_args.student_model or base_clip)[0]["projection_dim"]


class _TeacherCollator(DCLIPCollator):
    def __init__(self, processor, **region_settings):
        super().__init__(processor, with_teacher_inputs=True, **region_settings)

    def __call__(self, rows):
        return {**super().__call__(rows), "return_loss": True}


def _with_lora(student, model_args: ModelArguments):
    from peft import LoraConfig, get_peft_model

    targets = [name.strip() for name in model_args.lora_target_modules.split(",") if name.strip()]
    config = LoraConfig(r=model_args.lora_rank, lora_alpha=model_args.lora_alpha, target_modules=targets,
                        lora_dropout=0.0, bias="none")
    return get_peft_model(student, config)


def distill(model_args, data_args, training_args, args, data, processor, base_clip: str, teacher_dir: str,
            log: dict) -> str:
    """The student: initialised from the base CLIP, trained with the method's terms (DCLIP: contrastive + cosine to
    the teacher; CLIP-CID: cluster + instance discrimination against the teacher's embeddings)."""
    from modeling_dclip import DCLIPModel, DCLIPTeacherModel

    torch.manual_seed(training_args.seed)
    student = DCLIPModel.from_clip(model_args.student_model or base_clip, distillation_method=args.method,
                                   teacher_name_or_path=teacher_dir)
    teacher = DCLIPTeacherModel.from_pretrained(teacher_dir)
    train = data["train"]
    if not args.online_teacher:
        with training_args.main_process_first(local=False, desc="teacher targets"):
            if teacher.config.freeze_vision_tower and teacher.config.freeze_text_tower:  # the teacher stage's cache
                features = compute_teacher_features(train, teacher, processor, batch_size=256,
                                                    **_region_settings(data_args))
                train = fuse_teacher_targets(features, teacher)
            else:
                train = compute_teacher_targets(train, teacher, processor, batch_size=256,
                                                **_region_settings(data_args))
    weights = args.loss_weights()
    centers = None
    if any(weights[term] for term in CLUSTER_TERMS):
        centers, labels = cluster_teacher_embeddings(train, args.num_clusters, training_args,
                                                     Path(training_args.output_dir) / "student")
        train = train.add_column("cluster_labels", labels.tolist())
    if model_args.lora_rank:
        student = _with_lora(student, model_args)
    stage_args = _stage_arguments(training_args, "student", args.distill_steps, args.distill_learning_rate)
    trainer = DCLIPTrainer(
        model=student, args=stage_args, train_dataset=train, loss_weights=weights,
        teacher=teacher if args.online_teacher else None, cluster_centers=centers, cluster_scale=args.cluster_scale,
        cluster_margin=args.cluster_margin,
        data_collator=DCLIPCollator(processor, with_teacher_inputs=args.online_teacher, **_region_settings(data_args)),
    )
    log["distill"] = _train(trainer, training_args, stage_args)
    if model_args.lora_rank:
        student = student.merge_and_unload()
    return _save(student, processor, os.path.join(training_args.output_dir, "student", "final"), training_args)


def cluster_teacher_embeddings(train, num_clusters: int, training_args: TrainingArguments,
                               folder: Path) -> tuple[torch.Tensor, np.ndarray]:
    """
    CLIP-CID's clusters: spherical k-means (FAISS) of the teacher's image embeddings (`teacher_image_embeds`),
    and each row's nearest centre. The main process computes them once and saves `cluster_centers.npy` in `folder`
    with `cluster_centers.json`, a fingerprint of the embeddings, K and the seed: a resumed run and the other
    processes read them back (so every process and restart agrees); centres made from other embeddings are redone.
    """
    import hashlib

    from .curation import assign_clusters, normalize_embeddings, spherical_kmeans

    embeddings = normalize_embeddings(np.asarray(train["teacher_image_embeds"], dtype=np.float32))
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
    _wait_for_everyone()
    centers = np.load(path)
    return torch.from_numpy(centers), assign_clusters(embeddings, centers)


# ----- evaluation -----------------------------------------------------------------------------------------------


def paper_claims(metrics: dict[str, dict[str, float]]) -> dict[str, float | bool]:
    """DCLIP's claims, checked on this run: the teacher and the student retrieve better than the base CLIP (Recall@1,
    both directions), and the student keeps at least 94% of the base CLIP's mean zero-shot accuracy."""
    base, claims = metrics.get("base_clip"), {}
    if base is None:
        return claims
    directions = ("image_retrieval_recall@1", "text_retrieval_recall@1")
    for name in ("teacher", "student"):
        if name in metrics:
            claims[f"{name}_beats_base_recall@1"] = all(metrics[name][key] > base[key] for key in directions)
    student = metrics.get("student")
    if student is not None:
        base_t2i = base["image_retrieval_recall@1"]
        claims["student_text_to_image_recall@1_relative_gain"] = (
            (student["image_retrieval_recall@1"] - base_t2i) / base_t2i if base_t2i else float("nan"))
        zero_shot = zero_shot_top1_keys(base)
        if zero_shot:
            retention = np.mean([student[k] for k in zero_shot]) / max(np.mean([base[k] for k in zero_shot]), 1e-12)
            claims["student_zero_shot_retention"] = float(retention)
            claims["student_keeps_94%_zero_shot"] = bool(retention >= 0.94)
    return claims


# ----- the whole run --------------------------------------------------------------------------------------------


def cpu_threads_per_process(requested: int | None = None) -> int:
    """`requested`, else this process's usable cores shared among the processes on this machine. `accelerate launch`
    exports OMP_NUM_THREADS=1 unless given `--cpu`, which would leave a CPU run on one core."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--cpu_threads must be at least 1, got {requested}")
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def run(model_args: ModelArguments, data_args: DataArguments, args: DistillationArguments,
        training_args: TrainingArguments, command: str = "accelerate launch examples/train.py") -> dict:
    """Run the chosen stages; return where each artefact went, how each stage trained, and the metrics. After an
    evaluation the student folder gets its model card (`command` is the reproduction line it prints); with
    `--push_to_hub` the folder is then uploaded to `--hub_model_id`."""
    embedded = data_args.dataset_name is None
    if not embedded and model_args.student_model is None:
        raise ValueError("--dataset_name needs --student_model (a CLIP checkpoint): a base CLIP is pretrained here "
                         "only on the embedded default data.")
    if training_args.push_to_hub and not training_args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id (the repository the student goes to, e.g. "
                         "your-name/dclip-student)")
    started = time.perf_counter()
    if not torch.cuda.is_available():
        torch.set_num_threads(cpu_threads_per_process(args.cpu_threads))
    output = Path(training_args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    main = training_args.process_index == 0
    import_ultralytics_as_one_process()
    with training_args.main_process_first(local=False, desc="data"):  # the others read the main process's caches
        data, data_reports = load_data(data_args, training_args.seed)
    resume = bool(training_args.resume_from_checkpoint)
    artefacts: dict[str, str] = {}
    log: dict[str, dict] = {}

    def done(folder: Path) -> bool:  # a finished stage is skipped when resuming
        return resume and (folder / "config.json").is_file()

    if not resume and main:  # a fresh run: nothing of an earlier run in these folders may pass for this one's
        for stage, folder in (("detector", "detector"), ("pretrain", "base_clip"), ("teacher", "teacher"),
                              ("distill", "student")):
            if _runs(args, stage) and (stage != "detector" or (embedded and model_args.detector_path is None)):
                shutil.rmtree(output / folder, ignore_errors=True)
    _wait_for_everyone()
    detector_path = model_args.detector_path
    default_detector = output / "detector" / "run" / "weights" / "best.pt"
    with training_args.main_process_first(local=False, desc="detector and processor"):
        if detector_path is None and embedded and args.detector_epochs > 0:
            finished = (output / "detector" / "metrics.json").is_file()  # written once the detector is trained
            if main and _runs(args, "detector") and not (resume and finished):
                detector_path = train_default_detector(args, training_args, data, output)
            elif default_detector.is_file():
                detector_path = str(default_detector)
        processor_folder = output / "processor"
        if main and _runs(args, "pretrain") and not resume and model_args.student_model is None:
            shutil.rmtree(processor_folder, ignore_errors=True)  # a new base CLIP gets a new tokenizer
        processor = build_processor(model_args, data_args, data, detector_path, processor_folder)
    if detector_path is not None:
        artefacts["detector"] = str(detector_path)

    base_clip = model_args.student_model or str(output / "base_clip" / "final")
    if _runs(args, "pretrain") and model_args.student_model is None and not done(Path(base_clip)):
        base_clip = pretrain(model_args, data_args, training_args, args, data, processor, log)
    teacher_dir = output / "teacher" / "final"
    if _runs(args, "teacher") and not done(teacher_dir):
        train_teacher(model_args, data_args, training_args, args, data, processor, base_clip, log)
    student_dir = output / "student" / "final"
    if _runs(args, "distill") and not done(student_dir):
        distill(model_args, data_args, training_args, args, data, processor, base_clip, str(teacher_dir), log)
    for name, folder in (("base_clip", base_clip), ("teacher", str(teacher_dir)), ("student", str(student_dir))):
        if (Path(folder) / "config.json").is_file() or (name == "base_clip" and model_args.student_model):
            artefacts[name] = folder

    results: dict[str, EvaluationResult] = {}
    if args.stage in ("evaluate", "all") and main:
        chosen = {name.strip() for name in args.eval_models.split(",")}
        for name in ("base_clip", "teacher", "student"):  # on the eval split, with the run's processor
            if name in artefacts and name in chosen:
                results[name] = evaluate_checkpoint(artefacts[name], data["eval"], data.get("validation"),
                                                    zero_shot_tasks(), processor, teacher_top_k=args.eval_top_k)
    metrics = {name: result.metrics for name, result in results.items()}
    summary = {"artefacts": artefacts, "data": data_reports, "training": log, "metrics": metrics,
               "per_class_recall": {name: result.per_class_recall for name, result in results.items()
                                    if result.per_class_recall},
               "claims": paper_claims(metrics),
               "seconds": round(time.perf_counter() - started, 1)}
    if main:
        if "student" in results:
            summary["artefacts"]["model_card"] = str(write_student_card(
                summary, model_args, data_args, args, training_args, processor, command))
        (output / "summary.json").write_text(json.dumps(summary, indent=2))
        if training_args.push_to_hub and "student" in artefacts:
            from .hub import push_to_hub

            summary["pushed"] = push_to_hub(artefacts["student"], training_args.hub_model_id,
                                            token=training_args.hub_token, private=training_args.hub_private_repo)
            (output / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def write_student_card(summary: dict, model_args: ModelArguments, data_args: DataArguments,
                       args: DistillationArguments, training_args: TrainingArguments, processor, command: str) -> Path:
    """The student folder's model card: its metrics against the base CLIP it started from, the run's recipe."""
    from .hub import CardInfo, write_model_card

    metrics, per_class = summary["metrics"], summary.get("per_class_recall", {})
    student_dir = summary["artefacts"]["student"]
    embedded = data_args.dataset_name is None
    weights = {term: weight for term, weight in args.loss_weights().items() if weight}
    recipe = [f"method: {args.method}; loss terms (weights): "
              + ", ".join(f"{term} ({weight:g})" for term, weight in weights.items()),
              f"student initialised from {model_args.student_model or 'the base CLIP pretrained in this run'}; "
              f"teacher towers: {model_args.teacher_model or 'the same base CLIP'}, fusion width "
              f"{model_args.fusion_hidden_size}, {model_args.fusion_num_layers} layers, "
              f"{model_args.num_negatives} hard negatives",
              f"{args.distill_steps} steps at learning rate {args.distill_learning_rate:g}, batch "
              f"{training_args.per_device_train_batch_size} per device x {training_args.world_size} processes"
              + (f", LoRA rank {model_args.lora_rank} (merged)" if model_args.lora_rank else ""),
              f"training data: {data_args.dataset_name or 'the embedded procedural scenes'}"
              + (f", {data_args.num_train_scenes} scenes at {data_args.image_size} px" if embedded else "")]
    recipe += [f"stage {stage}: {info['global_step']} steps in {info['seconds']} s"
               for stage, info in summary.get("training", {}).items()]
    claims = summary.get("claims", {})
    note = (f"Measured by dclip on the first {data_args.max_eval_samples} pairs of the `{data_args.eval_split}` "
            f"split, after training; the baseline is the CLIP the student started from.")
    if "student_zero_shot_retention" in claims:
        note += (f" Text-to-image Recall@1 relative gain over it: "
                 f"{claims['student_text_to_image_recall@1_relative_gain']:+.1%}; zero-shot accuracy kept: "
                 f"{claims['student_zero_shot_retention']:.1%}.")
    crop = (processor.image_processor.crop_size or {}).get("height", data_args.image_size)
    labels = zero_shot_tasks()["label_color_shape"][:3] if embedded else ["cat", "dog", "car"]
    hub_dataset = data_args.dataset_name if data_args.dataset_name and not Path(data_args.dataset_name).exists() \
        else None
    info = CardInfo(
        repo_id=training_args.hub_model_id or str(Path(student_dir).resolve()),
        model_name=(training_args.hub_model_id or "dclip-student").split("/")[-1], method=args.method,
        base_model=model_args.student_model if model_args.student_model and not Path(model_args.student_model).exists()
        else None,
        datasets=[hub_dataset] if hub_dataset else [],
        dataset_type=hub_dataset or ("dclip-scenes" if embedded else Path(data_args.dataset_name).name),
        dataset_name=("dclip procedural scenes (embedded default)" if embedded else data_args.dataset_name),
        dataset_split=data_args.eval_split, recipe=recipe, command=command, evaluation_note=note,
        image_size=int(crop), example_labels=labels,
    )
    return write_model_card(student_dir, info, metrics["student"], metrics.get("base_clip"),
                            per_class.get("student"), per_class.get("base_clip"))


def format_summary(summary: dict) -> str:
    """The run's artefacts, training times, metrics (a column per model) and claims, as plain text tables."""
    lines = ["artefacts:"] + [f"  {name:<10} {path}" for name, path in summary["artefacts"].items()]
    if summary.get("training"):
        lines.append("training:")
        for stage, info in summary["training"].items():
            resumed = f", resumed from {info['resumed_from']}" if info.get("resumed_from") else ""
            lines.append(f"  {stage:<10} {info['global_step']} steps in {info['seconds']} s{resumed}")
    if summary.get("metrics"):
        lines.append("metrics (eval split):")
        lines += ["  " + line for line in format_metrics_table(summary["metrics"]).splitlines()]
    if summary.get("claims"):
        lines.append("claims:")
        lines += [f"  {name}: {value:.4f}" if isinstance(value, float) else f"  {name}: {value}"
                  for name, value in summary["claims"].items()]
    lines.append(f"total: {summary['seconds']} s")
    return "\n".join(lines)
