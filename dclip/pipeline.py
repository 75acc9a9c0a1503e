"""The recipe: data and processor, then the stages (`dclip.stages`) in order, each writing a Hub-ready folder
(weights, config, processor, remote code), then the evaluation summary, the student's model card and the upload."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import torch
from transformers import TrainingArguments

from .arguments import DataArguments, DistillationArguments, ModelArguments
from .data.loading import load_data
from .data.processor import build_processor
from .detector import import_ultralytics_as_one_process
from .reporting import compare, comparison_pairs, paper_claims
from .stages import (
    STAGE_FOLDERS,
    RunContext,
    distill,
    evaluate_models,
    pretrain,
    train_default_detector,
    train_teacher,
)
from .trainer import CLUSTER_TERMS
from .training import cpu_threads_per_process, explicit_checkpoint, wait_for_everyone


logger = logging.getLogger(__name__)


def check_run_arguments(model_args: ModelArguments, data_args: DataArguments, args: DistillationArguments,
                        training_args: TrainingArguments) -> Path | None:
    """Refuse combinations that no stage could run, before any work; return the checkpoint folder that
    `--resume_from_checkpoint` names, if it names one (checked complete)."""
    if data_args.dataset_name is not None and model_args.student_model is None and (
            model_args.student_preset is None or model_args.teacher_model is None):
        raise ValueError("--dataset_name needs --student_model (a CLIP checkpoint), or --student_preset and "
                         "--teacher_model: a base CLIP is pretrained here only on the embedded default data.")
    if data_args.streaming:
        check_streaming_arguments(model_args, data_args, args)
    if training_args.push_to_hub and not training_args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id (the repository the student goes to, e.g. "
                         "your-name/dclip-student)")
    return explicit_checkpoint(training_args.resume_from_checkpoint)


def check_streaming_arguments(model_args: ModelArguments, data_args: DataArguments,
                              args: DistillationArguments) -> None:
    """`--streaming` trains students only, from a real data set, on targets that need no pass over the whole split."""
    needs = []
    if data_args.dataset_name is None:
        needs.append("--dataset_name (the embedded scenes are map-style)")
    if args.stage != "distill":
        needs.append("--stage distill (the base CLIP and the teacher train on map-style data)")
    if model_args.student_model is None:
        needs.append("--student_model (its processor; no tokenizer is trained on a stream)")
    if data_args.train_indices is not None or data_args.max_train_samples is not None:
        needs.append("no --train_indices or --max_train_samples (rows of a stream are not selected by position, "
                     "and each process reads its own part of it; --distill_steps sets the length)")
    for method in args.student_methods(embedded_data=False):
        if any(args.loss_weights(method)[term] for term in CLUSTER_TERMS):
            needs.append(f"no cluster terms ({method}: k-means needs the whole split)")
        elif method != "none" and not (args.teacher_targets or args.online_teacher):
            needs.append(f"--teacher_targets or --online_teacher for the {method} student")
    if needs:
        raise ValueError("--streaming needs " + "; ".join(needs))


def clear_stale_folders(context: RunContext) -> None:
    """A fresh run (no resume flag): nothing of an earlier run in the folders of the stages it runs may pass for this
    run's (the main process clears them; every process waits)."""
    if not context.training_args.resume_from_checkpoint and context.is_main:
        own_detector = context.data_args.dataset_name is None and context.model_args.detector_path is None
        for folder, stage in {"detector": "detector", **context.folder_stages()}.items():
            if context.args.runs(stage) and (stage != "detector" or own_detector):
                shutil.rmtree(context.output / folder, ignore_errors=True)
    wait_for_everyone()


def prepare_detector_and_processor(context: RunContext) -> str | None:
    """The region detector's weights (given, trained here on the embedded data, or an earlier run's) and the run's
    processor, built once by the main process and read back by the others; returns the detector's path."""
    model_args, args, training_args = context.model_args, context.args, context.training_args
    detector_path, resume = model_args.detector_path, bool(training_args.resume_from_checkpoint)
    default_detector = context.output / "detector" / "run" / "weights" / "best.pt"
    with training_args.main_process_first(local=False, desc="detector and processor"):
        if detector_path is None and context.data_args.dataset_name is None and args.detector_epochs > 0:
            finished = (context.output / "detector" / "metrics.json").is_file()  # written once it is trained
            if context.is_main and args.runs("detector") and not (resume and finished):
                detector_path = train_default_detector(context)
            elif default_detector.is_file():
                detector_path = str(default_detector)
        folder = context.output / "processor"
        if context.is_main and args.runs("pretrain") and not resume and model_args.student_model is None:
            shutil.rmtree(folder, ignore_errors=True)  # a new base CLIP gets a new tokenizer
        context.processor = build_processor(model_args, context.data_args, context.data, detector_path, folder)
    return detector_path


def run(model_args: ModelArguments, data_args: DataArguments, args: DistillationArguments,
        training_args: TrainingArguments, command: str = "accelerate launch examples/train.py") -> dict:
    """Run the chosen stages; return where each artefact went, how each stage trained, and the metrics. After an
    evaluation the student folder gets its model card (`command` is the reproduction line it prints); with
    `--push_to_hub` the folder is then uploaded to `--hub_model_id`."""
    named_checkpoint = check_run_arguments(model_args, data_args, args, training_args)
    started = time.perf_counter()
    if not torch.cuda.is_available():
        torch.set_num_threads(cpu_threads_per_process(args.cpu_threads))
    Path(training_args.output_dir).mkdir(parents=True, exist_ok=True)
    import_ultralytics_as_one_process()
    with training_args.main_process_first(local=False, desc="data"):  # the others read the main process's caches
        data, data_reports = load_data(data_args, training_args.seed)
    context = RunContext(model_args, data_args, args, training_args, data, processor=None,
                         named_checkpoint=named_checkpoint)
    clear_stale_folders(context)
    detector_path = prepare_detector_and_processor(context)
    training, artefacts = train_stages(context)
    if detector_path is not None:
        artefacts = {"detector": str(detector_path), **artefacts}

    results = evaluate_models(context, artefacts) if args.stage in ("evaluate", "all") else {}
    metrics = {name: result.metrics for name, result in results.items()}
    pairs = comparison_pairs(results, {method: context.student_folder(method) for method in context.methods})
    comparisons = compare({name: result.outcomes for name, result in results.items()}, pairs, training_args.seed)
    summary = {"artefacts": artefacts, "data": data_reports,
               "training": {stage: vars(log) for stage, log in training.items()}, "metrics": metrics,
               "per_class_recall": {name: result.per_class_recall for name, result in results.items()
                                    if result.per_class_recall},
               "comparisons": comparisons, "claims": paper_claims(metrics, comparisons),
               "seconds": round(time.perf_counter() - started, 1)}
    if results and context.is_main:
        save_outcomes(results, context.output / "eval")
    if context.is_main:
        publish(summary, context, command)
    return summary


def train_stages(context: RunContext) -> tuple[dict, dict[str, str]]:
    """Train the stages that are due (chosen, and when resuming not finished, or after a retrained base CLIP or
    teacher): the base CLIP, the DCLIP teacher if a student learns from one, and each student. Returns how each
    trained and the folders of the run's models (`base_clip`, `teacher`, `student`, `student_<method>`)."""
    model_args, args = context.model_args, context.args
    resume, training = bool(context.training_args.resume_from_checkpoint), {}

    def due(stage: str, folder: str | None = None) -> bool:
        folder = folder or STAGE_FOLDERS[stage]
        written = (context.final_folder(stage, folder) / "config.json").is_file()
        finished = written and context.resume_from(folder) is None
        upstream_retrained = bool({"pretrain", "teacher"} & set(training))
        return args.runs(stage) and not (resume and finished and not upstream_retrained)
    base_clip = model_args.student_model or str(context.final_folder("pretrain"))
    if model_args.student_model is None and context.needs_base_clip() and due("pretrain"):
        result = pretrain(context)
        base_clip, training["pretrain"] = result.folder, result.training
    teacher_dir = str(context.final_folder("teacher"))
    fusion = "dclip" in context.teacher_kinds() and not context.fusion_teacher_given()
    if fusion and due("teacher"):
        training["teacher"] = train_teacher(context, base_clip).training
    for method in context.methods:
        folder = context.student_folder(method)
        if due("distill", folder):
            name = "distill" if method == args.method else f"distill_{method}"
            training[name] = distill(context, base_clip, teacher_dir, method).training
    candidates = {"base_clip": base_clip, "teacher": teacher_dir if fusion else model_args.teacher_model}
    candidates.update({folder: str(context.final_folder("distill", folder))
                       for folder in map(context.student_folder, context.methods)})
    artefacts = {name: folder for name, folder in candidates.items() if folder is not None and (
        (Path(folder) / "config.json").is_file() or (name == "base_clip" and model_args.student_model))}
    return training, artefacts


def publish(summary: dict, context: RunContext, command: str) -> None:
    """Main process: the student's model card (after an evaluation), `summary.json`, and the upload to the Hub."""
    from .cards import write_student_card
    from .hub import PushError, push_to_hub

    training_args, output = context.training_args, context.output
    if "student" in summary["metrics"]:
        summary["artefacts"]["model_card"] = str(write_student_card(
            summary, context.model_args, context.data_args, context.args, training_args, context.processor, command))
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    if training_args.push_to_hub and "student" in summary["artefacts"]:
        try:
            summary["pushed"] = push_to_hub(summary["artefacts"]["student"], training_args.hub_model_id,
                                            token=training_args.hub_token, private=training_args.hub_private_repo,
                                            as_clip=training_args.push_as_clip)
        except PushError as error:  # every artefact is written: the run ends with the message, not a traceback
            logger.error("%s", error)
            summary["push_error"] = str(error)
        (output / "summary.json").write_text(json.dumps(summary, indent=2))


def save_outcomes(results: dict, folder: Path) -> None:
    """Each evaluated model's per-query outcomes as `<folder>/<model>.npz`, for paired bootstraps across runs
    (`benchmarks/paper_tables.py`)."""
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    for name, result in results.items():
        np.savez_compressed(folder / f"{name}.npz", **result.outcomes)
