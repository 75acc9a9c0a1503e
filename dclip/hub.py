"""Model cards (templates in `model_cards/`, rendered with `huggingface_hub.ModelCard`), their plots, and upload of a
saved model folder to the Hub."""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .evaluation.report import reported_keys


logger = logging.getLogger(__name__)

REMOTE_CODE_FILES = ("configuration_dclip.py", "modeling_dclip.py", "processing_dclip.py")
# what a push never uploads: training state, half-written folders, hidden files
UPLOAD_IGNORE = ("training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json")
EVAL_RESULTS_FILE = "eval_results.json"
RETRIEVAL_PLOT = "retrieval.png"
ZERO_SHOT_PLOT = "zero_shot_per_class.png"


def template_path(name: str = "student.md") -> Path:
    """A card template: `model_cards/` beside the package (a checkout or editable install), else the copy
    `pip install` puts in `<prefix>/share/dclip/model_cards`."""
    for folder in (Path(__file__).resolve().parents[1] / "model_cards", Path(sys.prefix) / "share/dclip/model_cards"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"model card template {name!r} not found in model_cards/ or {sys.prefix}/share/dclip")


# ----- metrics in the card --------------------------------------------------------------------------------------


def metric_title(key: str) -> str:
    """A reader's name for a flat metric key (`dclip.evaluation` names)."""
    for prefix, title in (("image_retrieval_", "text-to-image "), ("text_retrieval_", "image-to-text ")):
        if key.startswith(prefix):
            return title + key[len(prefix):].replace("recall@", "Recall@")
    if key.startswith("zeroshot_"):
        task, measure = _zero_shot_parts(key)
        name = f"top-{measure[3:]}" if measure.startswith("acc") else "mean per-class recall"
        return f"zero-shot {task.removeprefix('label_')} {name}"
    if key.startswith("linear_probe_"):
        return "linear probe " + key[len("linear_probe_"):].removeprefix("label_").removesuffix("_acc1") + " top-1"
    if key.startswith("hard_negative_accuracy"):
        kind = key[len("hard_negative_accuracy"):].lstrip("_").replace("_", " ")
        return "hard-negative accuracy" + (f" ({kind})" if kind else "")
    return key


def _zero_shot_parts(key: str) -> tuple[str, str]:
    """`zeroshot_<task>_<measure>` -> (task, measure), measure one of acc1, acc5, mean_per_class_recall."""
    body = key[len("zeroshot_"):]
    for measure in ("mean_per_class_recall", "acc1", "acc5"):
        if body.endswith("_" + measure):
            return body[: -len(measure) - 1], measure
    return body, "acc1"


def eval_results(metrics: dict[str, float], dataset_type: str, dataset_name: str, split: str = "test"):
    """`huggingface_hub.EvalResult`s (the card's `model-index`) for the flat `metrics`: retrieval as
    `image-text-retrieval`, zero-shot as `zero-shot-image-classification` and the linear probe as
    `image-classification` (one dataset config per label column), hard negatives as `image-text-matching`."""
    from huggingface_hub import EvalResult

    results = []
    for key in reported_keys(metrics):
        value = metrics[key]
        common = dict(dataset_type=dataset_type, dataset_name=dataset_name, dataset_split=split,
                      metric_value=round(float(value), 4), metric_name=metric_title(key))
        if key.startswith(("image_retrieval_", "text_retrieval_")):
            measure = key.split("_retrieval_")[1]
            results.append(EvalResult(task_type="image-text-retrieval", task_name="Image-text retrieval",
                                      metric_type=measure.lower(), metric_config=key.split("_")[0] + "_retrieval",
                                      **common))
        elif key.startswith("zeroshot_"):
            task, measure = _zero_shot_parts(key)
            results.append(EvalResult(task_type="zero-shot-image-classification",
                                      task_name="Zero-shot image classification", dataset_config=task,
                                      metric_type=f"top_{measure[3:]}_accuracy" if measure.startswith("acc")
                                      else measure, **common))
        elif key.startswith("linear_probe_"):
            task = key[len("linear_probe_"):].removesuffix("_acc1")
            results.append(EvalResult(task_type="image-classification", task_name="Linear probe",
                                      dataset_config=task, metric_type="accuracy", **common))
        elif key.startswith("hard_negative_accuracy"):
            results.append(EvalResult(task_type="image-text-matching", task_name="Hard-negative captions",
                                      metric_type="accuracy", metric_config=key, **common))
    return results


# ----- plots ----------------------------------------------------------------------------------------------------


def _grouped_bars(axes, names: list[str], series: list[tuple[str, dict]], title: str, fontsize: int = 8) -> None:
    """One bar group per name, one bar per `(label, values)` series (missing values left empty), scores in [0, 1]."""
    import numpy as np

    positions = np.arange(len(names))
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series):
        axes.bar(positions + i * width, [values.get(name, np.nan) for name in names], width, label=label)
    axes.set_xticks(positions + width * (len(series) - 1) / 2, names, rotation=45, ha="right", fontsize=fontsize)
    axes.set_ylim(0, 1)
    axes.set_title(title, fontsize=9)
    axes.legend(fontsize=7)


def _save_figure(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def plot_retrieval(metrics: dict[str, float], baseline: dict[str, float] | None, path: Path, model_label: str,
                   baseline_label: str) -> Path:
    """Bar chart of Recall@K both ways (and mAP), the model beside the baseline."""
    from matplotlib.figure import Figure  # no pyplot: the process's matplotlib backend stays the user's

    keys = [key for key in reported_keys(metrics) if key.startswith(("image_retrieval_", "text_retrieval_"))]
    series = [(model_label, metrics)] + ([(baseline_label, baseline)] if baseline else [])
    figure = Figure(figsize=(max(6, 0.9 * len(keys)), 3.6))
    axes = figure.subplots()
    _grouped_bars(axes, keys, series, "Retrieval")
    axes.set_xticklabels([metric_title(key) for key in keys])
    return _save_figure(figure, path)


def plot_zero_shot_per_class(per_class: dict[str, dict[str, float]], baseline: dict[str, dict[str, float]] | None,
                             path: Path, model_label: str, baseline_label: str) -> Path:
    """Per-class zero-shot recall, one panel per task, the model beside the baseline."""
    from matplotlib.figure import Figure

    tasks = list(per_class)
    figure = Figure(figsize=(10, 2.6 * len(tasks)))
    axes_list = figure.subplots(len(tasks), 1, squeeze=False)
    for axes, task in zip(axes_list[:, 0], tasks):
        series = [(model_label, per_class[task])]
        if baseline and task in baseline:
            series.append((baseline_label, baseline[task]))
        _grouped_bars(axes, list(per_class[task]), series,
                      f"zero-shot recall per class: {task.removeprefix('label_')}", fontsize=6)
    return _save_figure(figure, path)


# ----- the card -------------------------------------------------------------------------------------------------


@dataclass
class CardInfo:
    """What a model card says besides the numbers."""

    repo_id: str
    model_name: str = "dclip-student"
    method: str = "dclip+instance"
    base_model: str | None = None
    datasets: list[str] = field(default_factory=list)
    dataset_type: str = "dclip-scenes"
    dataset_name: str = "dclip procedural scenes (embedded default)"
    dataset_split: str = "test"
    recipe: list[str] = field(default_factory=list)
    command: str = "accelerate launch examples/train.py"
    evaluation_note: str = ""
    limitations: str = ("Trained and evaluated on the data named above; numbers on other data will differ. "
                        "Zero-shot accuracy depends on the prompt template.")
    image_size: int = 224
    example_labels: list[str] = field(default_factory=lambda: ["circle", "square", "star"])
    model_label: str = "student"
    baseline_label: str = "base CLIP"
    license: str = "apache-2.0"


METHOD_TITLES = {"dclip": "DCLIP", "clip_cid": "CLIP-CID", "dclip+clip_cid": "DCLIP + CLIP-CID",
                 "dclip+instance": "DCLIP + instance distillation", "instance": "instance distillation"}


def render_model_card(info: CardInfo, metrics: dict[str, float], baseline: dict[str, float] | None = None,
                      plots: list[tuple[str, str]] | None = None, template: str = "student.md",
                      differences: dict[str, dict] | None = None):
    """A `huggingface_hub.ModelCard` from `model_cards/<template>`: YAML metadata (library, pipeline tag, tags,
    datasets, base model, `model-index` from `metrics`), usage, a metric table against `baseline` (with each
    `differences[key]`, a `paired_bootstrap` result, as the difference and its 95% interval), `plots`
    (`(title, file)`), the recipe. Checked with `validate_model_card` before it is returned."""
    from huggingface_hub import ModelCard, ModelCardData

    card_data = ModelCardData(
        model_name=info.model_name, library_name="transformers", pipeline_tag="zero-shot-image-classification",
        license=info.license, tags=["clip", "distillation", "dclip", info.method.replace("+", "-"),
                                    "zero-shot-image-classification", "image-text-retrieval"],
        datasets=info.datasets or None, base_model=info.base_model,
        eval_results=eval_results(metrics, info.dataset_type, info.dataset_name, info.dataset_split) or None,
    )
    baseline = baseline or {}
    from .evaluation import format_estimate

    differences = differences or {}
    rows = [{"name": f"{metric_title(key)} (`{key}`)", "value": format_estimate(metrics, key, separator=" ± "),
             "baseline": format_estimate(baseline, key, separator=" ± ") if key in baseline else "-",
             "difference": format_difference(differences[key]) if key in differences else "-"}
            for key in reported_keys(metrics)]
    card = ModelCard.from_template(
        card_data, template_path=str(template_path(template)), repo_id=info.repo_id,
        model_name=info.model_name, method_title=METHOD_TITLES.get(info.method, info.method), metric_rows=rows,
        model_column=info.model_label, baseline_column=info.baseline_label if baseline else None,
        difference_column=bool(differences),
        plots=[{"title": title, "file": file} for title, file in plots or []], recipe=info.recipe,
        command=info.command, evaluation_note=info.evaluation_note, limitations=info.limitations,
        image_size=info.image_size, example_labels=json.dumps(info.example_labels),
    )
    return validate_model_card(str(card))


def format_difference(result: dict, mark: str = "*") -> str:
    """A `paired_bootstrap` result as `+0.037 [+0.012, +0.061]`, followed by ` <mark>` when the interval excludes 0."""
    suffix = f" {mark}" if result.get("excludes_zero") else ""
    return f"{result['difference']:+.3f} [{result['low']:+.3f}, {result['high']:+.3f}]{suffix}"


def validate_model_card(content: str):
    """
    Parse a card as `huggingface_hub` does, refusing metadata errors, and check what a Hub model page needs: a
    library name, the pipeline tag, a well-formed `model-index` that round-trips to the same results. (The Hub's
    own `ModelCard.validate()` posts the YAML to huggingface.co; this is the part that runs offline.)
    """
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard_data import eval_results_to_model_index, model_index_to_eval_results

    card = ModelCard(content, ignore_metadata_errors=False)
    data = card.data.to_dict()
    for key in ("library_name", "pipeline_tag", "license", "tags"):
        if not data.get(key):
            raise ValueError(f"model card metadata lacks {key!r}")
    if "model-index" in data:
        name, results = model_index_to_eval_results(data["model-index"])
        if eval_results_to_model_index(name, results) != data["model-index"]:
            raise ValueError("model card model-index does not round-trip through huggingface_hub's EvalResult")
        for result in results:
            if not isinstance(result.metric_value, (int, float)):
                raise ValueError(f"model-index metric {result.metric_name!r} is not a number: {result.metric_value!r}")
    return card


def write_model_card(folder: str | Path, info: CardInfo, metrics: dict[str, float],
                     baseline: dict[str, float] | None = None,
                     per_class_recall: dict[str, dict[str, float]] | None = None,
                     baseline_per_class_recall: dict[str, dict[str, float]] | None = None,
                     differences: dict[str, dict] | None = None) -> Path:
    """Write `README.md` (the card), its plots and `eval_results.json` into a saved model folder; return the card."""
    folder = Path(folder)
    plots = []
    if any(key.startswith(("image_retrieval_", "text_retrieval_")) for key in metrics):
        plot_retrieval(metrics, baseline, folder / RETRIEVAL_PLOT, info.model_label, info.baseline_label)
        plots.append(("Retrieval against the baseline", RETRIEVAL_PLOT))
    if per_class_recall:
        plot_zero_shot_per_class(per_class_recall, baseline_per_class_recall, folder / ZERO_SHOT_PLOT,
                                 info.model_label, info.baseline_label)
        plots.append(("Zero-shot recall per class", ZERO_SHOT_PLOT))
    card = render_model_card(info, metrics, baseline, plots, differences=differences)
    (folder / EVAL_RESULTS_FILE).write_text(json.dumps(
        {"dataset": info.dataset_type, "split": info.dataset_split, "metrics": metrics, "baseline": baseline or {},
         "baseline_label": info.baseline_label, "differences": differences or {},
         "per_class_recall": per_class_recall or {}}, indent=2))
    card.save(folder / "README.md")
    return folder / "README.md"


# ----- upload ---------------------------------------------------------------------------------------------------


def write_student_card(summary: dict, model_args, data_args, args, training_args, processor, command: str) -> Path:
    """The student folder's model card from a training run's summary and arguments (`dclip.arguments`): its metrics
    against the base CLIP it started from, and the run's recipe."""
    from .data.scenes import zero_shot_tasks

    metrics, per_class = summary["metrics"], summary.get("per_class_recall", {})
    student_dir = summary["artefacts"]["student"]
    embedded = data_args.dataset_name is None
    weights = {term: weight for term, weight in args.loss_weights().items() if weight}
    if model_args.student_preset:
        start = f"student: the {model_args.student_preset} preset trained from scratch"
    else:
        start = f"student initialised from {model_args.student_model or 'the base CLIP pretrained in this run'}" \
            + (f", cut to {model_args.student_inherit_layers} layers per tower" if model_args.student_inherit_layers
               else "")
    teacher = model_args.teacher_model or "the base CLIP pretrained in this run"
    recipe = [f"method: {args.method}; loss terms (weights): "
              + ", ".join(f"{term} ({weight:g})" for term, weight in weights.items()),
              f"{start}; teacher: {teacher} (its own processor), fused with YOLO regions and caption spans for "
              f"DCLIP (fusion width {model_args.fusion_hidden_size}, {model_args.fusion_num_layers} layers, "
              f"{model_args.num_negatives} hard negatives)",
              f"{args.distill_steps} steps at learning rate {args.distill_learning_rate:g}, batch "
              f"{training_args.per_device_train_batch_size} per device x {training_args.world_size} processes"
              + (f", LoRA rank {model_args.lora_rank} (merged)" if model_args.lora_rank else ""),
              f"training data: {data_args.dataset_name or 'the embedded procedural scenes'}"
              + (f", {data_args.num_train_scenes} scenes at {data_args.image_size} px" if embedded else "")]
    recipe += [f"stage {stage}: {info['global_step']} steps in {info['seconds']} s"
               for stage, info in summary.get("training", {}).items()]
    claims = summary.get("claims", {})
    baseline = "student_none" if "student_none" in metrics else "base_clip"
    baseline_label = "same student, no teacher" if baseline == "student_none" else "base CLIP"
    note = (f"Measured by dclip on the first {data_args.max_eval_samples} pairs of the `{data_args.eval_split}` "
            "split, after training. " + (
                "The baseline is the same student trained without a teacher (same steps, learning rate, data and "
                "seed)." if baseline == "student_none" else "The baseline is the CLIP the student started from."))
    if "student_zero_shot_retention" in claims and baseline == "base_clip":
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
        image_size=int(crop), example_labels=labels, baseline_label=baseline_label,
    )
    return write_model_card(student_dir, info, metrics["student"], metrics.get(baseline), per_class.get("student"),
                            per_class.get(baseline), summary.get("comparisons", {}).get(f"student vs {baseline}"))


def upload_files(folder: str | Path) -> list[str]:
    """The files a push of `folder` uploads (relative paths, sorted): everything at its top level that a Hub model
    needs (weights, config, processor, remote code, card, plots, evaluation, detector), not training state,
    checkpoints or hidden files. Raises naming what is missing when the folder is not a complete DCLIP model."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such model folder")
    files = sorted(path.name for path in folder.iterdir()
                   if path.is_file() and not path.name.startswith(".") and path.name not in UPLOAD_IGNORE)
    missing = [name for name in ("config.json", "README.md") if name not in files]
    if not any(name.endswith(".safetensors") for name in files):
        missing.append("*.safetensors weights")
    config = json.loads((folder / "config.json").read_text()) if "config.json" in files else {}
    if config.get("auto_map"):  # remote code: the files the auto_map names must travel with the weights
        missing += [name for name in REMOTE_CODE_FILES[:2] if name not in files]
        if "processor_config.json" in files and REMOTE_CODE_FILES[2] not in files:
            missing.append(REMOTE_CODE_FILES[2])
    if missing:
        raise ValueError(f"{folder} is not ready to push: missing {', '.join(missing)}")
    return files


def push_to_hub(folder: str | Path, repo_id: str, token: str | None = None, private: bool | None = None,
                commit_message: str = "Upload DCLIP model") -> str:
    """Create `repo_id` (if needed) and upload `upload_files(folder)` in one commit; return the commit URL."""
    from huggingface_hub import CommitOperationAdd, HfApi

    folder = Path(folder)
    files = upload_files(folder)
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in files]
    info = api.create_commit(repo_id=repo_id, repo_type="model", operations=operations,
                             commit_message=commit_message)
    logger.info("pushed %d files of %s to %s", len(files), folder, repo_id)
    return str(getattr(info, "commit_url", info))
