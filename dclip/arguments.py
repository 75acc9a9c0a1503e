"""The command-line arguments of a run, as dataclasses for `HfArgumentParser`: the models, the data, the distillation
recipe, and `DCLIPTrainingArguments` (`transformers.TrainingArguments` with this recipe's defaults and a CPU setup
chosen where there is no accelerator). `python examples/train.py --help` prints these defaults."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments

from .columns import TEACHER_IMAGE_EMBEDS, TEACHER_TEXT_EMBEDS
from .presets import SMALL_CLIP_PRESETS
from .teachers import DUAL_ENCODER, FUSION, TEACHER_KINDS
from .trainer import CLUSTER_TERMS, LOSS_TERMS, METHOD_LOSS_WEIGHTS


logger = logging.getLogger(__name__)


STAGES = ("detector", "pretrain", "teacher", "distill", "evaluate", "all")
# which teacher embeddings CLIP-CID's k-means clusters (`--cluster_on`): the columns, summed after normalising;
# `region` clusters the DCLIP teacher's embedding of each image's largest region (`REGION_CLUSTER_SOURCE`)
REGION_CLUSTER_SOURCE = "region"
CLUSTER_SOURCES = {"image": (TEACHER_IMAGE_EMBEDS,), "text": (TEACHER_TEXT_EMBEDS,),
                   "joint": (TEACHER_IMAGE_EMBEDS, TEACHER_TEXT_EMBEDS), REGION_CLUSTER_SOURCE: ()}


def option(default, help: str):
    """A dataclass field with a default and the help text `--help` prints beside it."""
    return field(default=default, metadata={"help": help})


@dataclass
class ModelArguments:
    student_model: str | None = option(None, "CLIP checkpoint to start the student from (e.g. a smaller CLIP "
                                             "than the teacher); default: the base CLIP of the `pretrain` stage")
    student_preset: str | None = option("clip-tiny", "the student's size when it is trained from scratch "
                                                     f"({', '.join(SMALL_CLIP_PRESETS)}): the default when "
                                                     "neither --student_model nor --student_inherit_layers is "
                                                     "given; none: start from the base CLIP (fine-tuning mode)")
    student_inherit_layers: int | None = option(None, "weight inheritance (TinyCLIP): the student is the "
                                                      "--student_model (default: the base CLIP) cut to this "
                                                      "many evenly spaced layers per tower")
    teacher_model: str | None = option(None, "the teacher, with its own processor (image size, tokenizer, "
                                             "width): a DCLIP teacher folder (used as is), or a CLIP-family "
                                             "checkpoint (CLIP, SigLIP, a DCLIP student): the towers the "
                                             "`teacher` stage fuses, or itself with --teacher_kind clip; "
                                             "default: the base CLIP")
    teacher_kind: str = option("auto", "dclip: the cross-modal teacher's fused embeddings (regions and "
                                       "spans); clip: the teacher checkpoint's own embeddings; auto: dclip for "
                                       "the DCLIP methods, clip for CLIP-CID's (the papers' settings)")
    preset: str = option("clip-small", "size of the base CLIP trained from scratch (the default teacher's "
                                       "towers)")
    # CPU-sized defaults: the teacher's pairwise objective fuses batch x (1 + num_negatives) x 2 pairs per step
    fusion_hidden_size: int = option(128, "the teacher's fusion block width")
    fusion_num_layers: int = option(2, "bidirectional cross-attention layers of the fusion block")
    fusion_num_heads: int = option(4, "attention heads of the fusion block")
    num_negatives: int = option(3, "hard negatives per pair in the teacher's pairwise objective")
    # default 2 on data with generated hard negatives, chosen on the validation split by the rule declared before the
    # run it went into: among settings with both Recall@1 gains over the no-teacher student excluding 0 and T2I at
    # least +20%, the largest lower interval bound on any hard-negative kind (wrong count: +6.5 points with N = 2,
    # +0.6 without); the cost there: I2T -3.4, linear probe -2.1 points against the student of a teacher without them
    teacher_caption_negatives: int | None = option(None, "the teacher's pairwise objective also scores each image "
                                                         "against its caption's first N own hard negatives (the "
                                                         "data's `hard_negatives` column: swapped attributes, "
                                                         "relations, counts); 0: only the batch's other captions; "
                                                         "default: 2 where the data has that column, else 0")
    detector_path: str | None = option(None, "YOLO weights for region extraction; default "
                                             "on the embedded data: the `detector` stage's")
    lora_rank: int = option(0, "LoRA rank on the student's attention (peft); 0: full "
                               "fine-tuning. Adapters are merged into the saved student.")
    lora_alpha: float = option(16.0, "LoRA scaling alpha")
    lora_target_modules: str = option("q_proj,k_proj,v_proj,out_proj", "comma-separated module names for LoRA")

    def __post_init__(self):
        if self.teacher_kind not in ("auto", *TEACHER_KINDS):
            raise ValueError(f"--teacher_kind must be auto or one of {TEACHER_KINDS}, got {self.teacher_kind!r}")
        if self.student_preset in ("none", "None", "") or self.student_model is not None or \
                self.student_inherit_layers:  # a checkpoint (or the base CLIP, cut) starts the student
            self.student_preset = None
        if self.student_preset is not None and self.student_preset not in SMALL_CLIP_PRESETS:
            raise ValueError(f"--student_preset must be one of {list(SMALL_CLIP_PRESETS)} or none, got "
                             f"{self.student_preset!r}")


@dataclass
class DataArguments:
    dataset_name: str | None = option(None, "Hub name or local file/folder of captioned "
                                            "images (dclip.data.loaders); default: the embedded "
                                            "procedural scenes")
    dataset_format: str | None = option(None, "loader format; default: inferred")
    image_root: str | None = option(None, "image folder for COCO/Flickr JSON files")
    train_split: str = option("train", "split trained on (real data sets)")
    eval_split: str = option("test", "split evaluated on")
    cache_dir: str = option("outputs/cache", "where the embedded scenes and the teacher passes are cached")
    num_train_scenes: int = option(20_000, "embedded data: training scenes generated")
    image_size: int = option(64, "embedded data: image side in pixels")
    vocab_size: int = option(1024, "embedded data: BPE vocabulary trained on the captions")
    max_train_samples: int | None = option(None, "use at most this many training pairs")
    train_indices: str | None = option(None, "a .npy of training-split rows to train on, "
                                             "e.g. `kept_indices.npy` of examples/curate.py")
    exact_duplicate_fraction: float = option(0.0, "embedded data: fraction of training "
                                                  "scenes that are byte copies of earlier ones")
    near_duplicate_fraction: float = option(0.0, "embedded data: ...re-rendered copies "
                                                 "with a small jitter")
    concept_fraction: float = option(0.0, "embedded data: ...repeats of a few "
                                          "over-represented concepts")
    streaming: bool = option(False, "read the training split as a stream (a datasets.IterableDataset of "
                                    "--dataset_name: webdataset shards, a Hub data set, ...), split by node; for "
                                    "--stage distill with a --student_model, the teacher's targets from "
                                    "--teacher_targets (or --online_teacher); --distill_steps sets the length")
    max_eval_samples: int = option(1000, "evaluate on at most this many pairs of the eval split")
    use_annotated_regions: bool = option(False, "train the teacher on the data's own "
                                                "boxes and spans, not the detector's and the span "
                                                "extractor's (evaluation always uses the latter)")

    def region_settings(self) -> dict[str, bool]:
        """Where the teacher's training regions and spans come from: the data's annotations, or detector + extractor
        (keyword arguments of `teacher_inputs`, `DCLIPCollator` and the teacher-target passes)."""
        return {"use_given_boxes": self.use_annotated_regions, "use_given_spans": self.use_annotated_regions}


_WEIGHT_HELP = ("this loss term's weight; default: the method's (1 for each term; DCLIP's cosine terms: 10 on the "
                "image, 3 on the text; the instance term of dclip+instance: 0.3) if --method uses the term, else 0")
# default weights of the terms a method uses, where not 1: DCLIP's cosine terms, chosen on the validation split of
# the embedded default (a teacher 1.5x stronger than the student) as the best text-to-image Recall@1 over the
# no-teacher student. Points of text-to-image / image-to-text Recall@1 over it (and of wrong-count hard-negative
# accuracy), image / text weights: 10/10 +4.6 / +3.4 (count -1.1); 30/30 +3.1 / +2.0; 20/1 +4.7 / +3.4 (+2.8);
# 10/1 +4.1 / +3.8 (+3.5); 10/2 +5.8 / +5.0 (+2.3); 5/2 +6.0 / +4.2 (+0.1); 10/3 +6.7 / +5.0 (+2.3). Weight 1/1 gave
# +2.0 / +0.1 in an earlier default (a detector trained 6 epochs).
TERM_WEIGHTS = {"cosine_image": 10.0, "cosine_text": 3.0}
# a method's own defaults, before TERM_WEIGHTS: CLIP-CID's instance term beside DCLIP's, at 0.3, chosen on the
# validation split with the 900-step teacher (see `DistillationArguments.method`)
METHOD_TERM_WEIGHTS = {"dclip+instance": {"instance": 0.3}}


@dataclass
class DistillationArguments:
    stage: str = option("all", f"one of {STAGES}")
    # the default, dclip+instance, is the one setting of those tried that met every target of the embedded default
    # on the validation split (against the no-teacher student: both Recall@1 up with intervals excluding 0, T2I up
    # at least 20%, one kind of hard negative up with its interval excluding 0), with the 900-step base CLIP and a
    # teacher trained without caption negatives (`--teacher_caption_negatives 0`). Points
    # over the no-teacher student, T2I / I2T / wrong-count hard negatives: dclip+instance (instance 0.3) +8.9 / +9.0 /
    # +3.9; instance 1: +8.1 / +6.4 / +4.0 (lower T2I); dclip alone, cosine weights 10/3: +9.8 / +7.0 / +1.8, 3/3:
    # +7.8 / +6.0 / +2.2 (no hard-negative kind with an interval excluding 0), 3/1: +4.3 / +1.8 / +3.5 (I2T's
    # interval includes 0), 1/1: +0.3 / -1.2 / -0.6
    method: str = option("dclip+instance", "the published student's loss terms: dclip+instance (DCLIP's hybrid "
                                           "loss, contrastive + cosine to the DCLIP teacher, plus CLIP-CID's "
                                           "instance term against the same teacher, at weight 0.3), dclip (DCLIP "
                                           "alone), clip_cid (cluster + instance discrimination), dclip+clip_cid, "
                                           "instance (CLIP-CID's instance term alone) or none (contrastive only, "
                                           "no teacher)")
    compare_methods: str | None = option(None, "comma-separated methods of further students trained and "
                                               "evaluated beside it, identically (steps, learning rate, data, "
                                               "seed); default: none,clip_cid,instance on the embedded data, none "
                                               "(the same student without a teacher) on a --dataset_name; '' for "
                                               "no other student")
    # loss weights; unset: 1 for the method's terms, 0 for the others
    contrastive_weight: float | None = option(None, _WEIGHT_HELP)
    cosine_image_weight: float | None = option(None, _WEIGHT_HELP)
    cosine_text_weight: float | None = option(None, _WEIGHT_HELP)
    cluster_image_weight: float | None = option(None, _WEIGHT_HELP)
    cluster_text_weight: float | None = option(None, _WEIGHT_HELP)
    instance_weight: float | None = option(None, _WEIGHT_HELP)
    # TinyCLIP's affinity mimicking, in no method by default: beside the published student's terms on the validation
    # split of the embedded default, weight 1 changed T2I / I2T Recall@1 by -0.6 [-2.4, +1.2] / -1.7 [-3.7, +0.1]
    # points and wrong-count hard negatives by +3.2 [+1.5, +4.9]; weight 3: -1.3 [-3.9, +1.1] / -3.1 [-5.6, -0.6] / +5.6
    # [+3.4, +7.9]
    affinity_weight: float | None = option(None, _WEIGHT_HELP)
    # CLIP-CID's clusters on the embedded scenes: the DCLIP teacher's largest regions, K = 256, chosen on the
    # validation split by a rule declared first (the largest lower interval bound of the mean zero-shot or linear-probe
    # gain over the instance-only student): region K=256 ZS +4.7 [+2.8, +6.6], LP +3.9 [+2.4, +5.6]; region K=64 ZS
    # +3.2 [+1.3, +5.1]; region K=24 LP +3.9 [+2.2, +5.6]; the paper's image embeddings, K=64: ZS -3.1 [-4.9, -1.4].
    # Each costs Recall@1 (region K=256: T2I -5.7 [-8.9, -2.5]): the cluster term pulls scenes of one object together
    num_clusters: int | None = option(None, "k-means clusters of the teacher's embeddings (CLIP-CID's cluster "
                                            "discrimination; --cluster_on says which); default: 256 with "
                                            "--cluster_on region, else 64")
    cluster_on: str | None = option(None, "the teacher's embeddings k-means clusters: image (CLIP-CID), text, joint "
                                          "(each pair's normalised image + text embedding), or region (the DCLIP "
                                          "teacher's embedding of each image's largest region; the classifier "
                                          "centres are each cluster's mean teacher image embedding); default: "
                                          "region on the embedded data when the run has a DCLIP teacher, else "
                                          "image")
    cluster_scale: float = option(16.0, "margin softmax scale s")
    cluster_margin: float = option(0.2, "additive angular margin m, radians")
    cluster_sample_size: int | None = option(None, "centres the margin softmax scores per step (PartialFC): the "
                                                   "batch's own plus random others, for very large "
                                                   "--num_clusters; default: every centre")
    detector_epochs: int = option(4, "0: no detector stage (regions: the data's boxes "
                                     "with --use_annotated_regions, else the whole image)")
    detector_train_samples: int = option(5000, "scenes the detector trains on")
    pretrain_steps: int = option(900, "steps of the base CLIP (embedded data)")
    # 250 (was 150): the one setting tried that raised the teacher's retrieval with its caption negatives kept, chosen
    # on the validation split by a rule declared first (the highest teacher T2I Recall@1 whose wrong-count accuracy
    # stays within 2 points): 250 steps T2I 0.379 (count 0.768); 150 steps 0.360 (0.763); 1 caption negative 0.397
    # (count 0.699, out); learning rate 1e-3 0.362 (0.732, out); 7 batch negatives 0.350 (0.772)
    teacher_steps: int = option(250, "steps of the teacher's fusion block")
    distill_steps: int = option(300, "steps of the student")
    pretrain_learning_rate: float = option(2e-3, "learning rate of the base CLIP")
    pretrain_warmup: float = option(0.1, "linear warm-up of the base CLIP: steps, or a fraction of them below 1")
    pretrain_region_fraction: float = option(0.5, "fraction of the base CLIP's training pairs that are (region "
                                                  "crop, phrase) pairs from the data's annotated boxes and spans "
                                                  "(region-aware pretraining of the teacher's towers); 0: none")
    pretrain_bare_fraction: float = option(0.5, "embedded data: fraction of those phrases that name the "
                                                "object's shape alone (colour and size words dropped)")
    teacher_learning_rate: float = option(5e-4, "learning rate of the teacher")
    distill_learning_rate: float = option(1e-3, "learning rate of the student (one trained from scratch; "
                                                "2e-4 suits one fine-tuned from a checkpoint)")
    online_teacher: bool = option(False, "run the teacher per batch instead of caching")
    teacher_targets: str | None = option(None, "a folder of sharded teacher targets "
                                               "(`examples/compute_targets.py`) that the students read by sample "
                                               "id instead of computing them: computed on the same training split "
                                               "by the same teacher (both checked)")
    cpu_threads: int | None = option(None, "torch threads per process on CPU; default: "
                                           "the cores this process may use / processes per machine "
                                           "(`accelerate launch` alone would leave 1)")
    eval_models: str = option("all", "comma-separated models the evaluation covers (base_clip, teacher, student, "
                                     "student_<method>), or all")
    eval_top_k: int = option(16, "candidates per query that the teacher's fused score "
                                 "re-ranks in retrieval evaluation")

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"--stage must be one of {STAGES}, got {self.stage!r}")
        for method in self.student_methods():
            if method not in METHOD_LOSS_WEIGHTS:
                raise ValueError(f"--method must be one of {list(METHOD_LOSS_WEIGHTS)} (so must each of "
                                 f"--compare_methods), got {method!r}")
        if self.cluster_on is not None and self.cluster_on not in CLUSTER_SOURCES:
            raise ValueError(f"--cluster_on must be one of {list(CLUSTER_SOURCES)}, got {self.cluster_on!r}")
        if self.cluster_sample_size is not None and self.cluster_sample_size < 1:
            raise ValueError(f"--cluster_sample_size must be at least 1, got {self.cluster_sample_size}")
        if self.num_clusters is not None and self.num_clusters < 1:
            raise ValueError(f"--num_clusters must be at least 1, got {self.num_clusters}")
        if self.online_teacher and self.teacher_targets:
            raise ValueError("--online_teacher and --teacher_targets both say where the teacher's targets come "
                             "from: give one")
        if self.online_teacher and any(self.loss_weights()[term] for term in CLUSTER_TERMS):
            raise ValueError("the cluster terms (--method clip_cid) need the teacher's embeddings of the whole "
                             "training set for k-means: drop --online_teacher or set the cluster weights to 0")

    def runs(self, stage: str) -> bool:
        """Whether this run includes `stage` (`--stage all` runs every stage)."""
        return self.stage in (stage, "all")

    def loss_weights(self, method: str | None = None) -> dict[str, float]:
        """Each loss term's weight for `method` (default `--method`): for `--method`, the explicit `--<term>_weight`,
        else the method's default (`METHOD_TERM_WEIGHTS`, else `TERM_WEIGHTS`, else 1) for its terms and 0
        otherwise; a compared method gets its own terms at their defaults."""
        defaults = METHOD_LOSS_WEIGHTS[method or self.method]
        own = METHOD_TERM_WEIGHTS.get(method or self.method, {})
        weights = {}
        for term in LOSS_TERMS:
            explicit = getattr(self, f"{term}_weight") if method in (None, self.method) else None
            default = own.get(term, TERM_WEIGHTS.get(term, 1.0)) if term in defaults else 0.0
            weights[term] = float(explicit) if explicit is not None else default
        return weights

    def clusters(self, regions: bool = True) -> tuple[str, int]:
        """CLIP-CID's `(--cluster_on, --num_clusters)`: as given, else the defaults (`regions`: the embedded scenes
        with a DCLIP teacher in the run: its largest regions, 256; otherwise the paper's image embeddings, 64)."""
        default_on, default_k = (REGION_CLUSTER_SOURCE, 256) if regions else ("image", 64)
        return self.cluster_on or default_on, self.num_clusters or default_k

    def student_methods(self, embedded_data: bool = True) -> list[str]:
        """The methods of the students this run trains: `--method` first (the published one), then the compared
        ones (`--compare_methods`, or its default for the data), without repeats."""
        compare = self.compare_methods
        if compare is None:
            compare = "none,clip_cid,instance" if embedded_data else "none"
        methods = [self.method]
        for method in (name.strip() for name in compare.split(",")):
            if method and method not in methods:
                methods.append(method)
        return methods

    def teacher_kind(self, method: str, requested: str = "auto") -> str | None:
        """The kind of teacher a `method` learns from (`requested`: `--teacher_kind`): None for `none`, else
        `requested`, or for auto the papers' settings: the DCLIP teacher for the DCLIP methods, the teacher
        checkpoint's own embeddings for CLIP-CID's."""
        if not any(term != "contrastive" for term in METHOD_LOSS_WEIGHTS[method]):
            return None
        if requested != "auto":
            return requested
        return DUAL_ENCODER if method in ("clip_cid", "instance") else FUSION


# the environment variables `accelerate launch` sets for a sharded config (examples/accelerate_configs/)
SHARDING_LAUNCHES = {"FSDP": "ACCELERATE_USE_FSDP", "DeepSpeed": "ACCELERATE_USE_DEEPSPEED"}


def accelerator_available() -> bool:
    """Whether this process can see a GPU (CUDA/ROCm), an Apple MPS device or an Intel XPU."""
    if torch.cuda.is_available():
        return True
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return True
    xpu = getattr(torch, "xpu", None)
    return bool(xpu is not None and xpu.is_available())


@dataclass
class DCLIPTrainingArguments(TrainingArguments):
    """
    `transformers.TrainingArguments` with the recipe's defaults (batch 128 per device, a log line every 25 steps, a
    checkpoint every 100 kept once, `outputs/default`), and `use_cpu` chosen where no accelerator is visible. Without
    it, `TrainingArguments` on a CPU-only machine sees world size 1 in every process of a multi-process launch (each
    would run the whole job alone on the same files) and refuses `--bf16`.
    """

    output_dir: str = option("outputs/default", "the run's folder: one sub-folder per stage")
    per_device_train_batch_size: int = option(128, "pairs per device and step")
    logging_steps: float = option(25, "log every N steps")
    save_steps: float = option(100, "checkpoint every N steps")
    save_total_limit: int | None = option(1, "checkpoints kept per stage")
    dataloader_num_workers: int = option(0, "data loading worker processes")
    skip_nonfinite_loss: bool = option(False, "skip a training step whose loss is NaN or infinite (its gradients "
                                              "dropped, logged) instead of stopping the stage with an error")
    push_as_clip: bool = option(False, "with --push_to_hub: publish the student as its plain CLIPModel export (no "
                                       "remote code: the Hub's widget and inference API run it)")

    def __post_init__(self):
        if not self.use_cpu and not accelerator_available():
            self.use_cpu = True
            sharded = [name for name, variable in SHARDING_LAUNCHES.items()
                       if os.environ.get(variable, "false").lower() == "true"]
            if sharded:  # accelerate runs MULTI_CPU on CPU: the config's sharding would be dropped without a word
                logger.warning(f"the accelerate config asks for {sharded[0]}, but this process sees no GPU: on CPU "
                               "accelerate runs plain multi-process data parallelism (gloo) instead, unsharded")
        super().__post_init__()
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched > 1 and self.world_size != launched:  # never N independent copies of one job on the same files
            raise RuntimeError(f"launched as {launched} processes (WORLD_SIZE) but the training arguments see world "
                               f"size {self.world_size}: the process group was not set up. Launch with `accelerate "
                               f"launch` or `torchrun`, and pass --use_cpu on a machine without GPUs.")
