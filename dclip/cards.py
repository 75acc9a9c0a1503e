"""Model cards built from what dclip measured: a training run's summary (`write_student_card`, with a Hub widget of
example scenes for the embedded default) and a benchmark suite (`write_suite_card`: every task in `model-index` with
its task type, the table against the baseline with paired intervals). The rendering and upload live in `dclip.hub`."""

from __future__ import annotations

from pathlib import Path

from .hub import CardInfo, write_model_card


# the widget's examples on the embedded scenes: (true colour + shape, background, the other candidate labels)
SCENE_WIDGET = (("red circle", "gray", ("blue square", "green triangle", "yellow star")),
                ("blue star", "sand", ("blue square", "red star", "green circle")))


def scene_widget_examples(image_size: int = 64) -> list[dict]:
    """Zero-shot widget examples for a student of the embedded scenes: one large shape each, rendered by the scene
    renderer, with candidate labels that make sense for the scenes (colour + shape, the right one among them)."""
    import io

    import numpy as np
    from PIL import Image

    from .data.scenes import SceneConfig, SceneObject, render_scene

    config = SceneConfig(image_size=image_size)
    examples = []
    for index, (label, background, others) in enumerate(SCENE_WIDGET):
        color, shape = label.split()
        obj = SceneObject(shape, color, "large", (0.25, 0.25, 0.75, 0.75))
        png = render_scene([obj], background, image_size, config.noise_std, np.random.default_rng([index]),
                           config.supersample)
        labels = sorted([label, *others])
        examples.append({"image": Image.open(io.BytesIO(png)).convert("RGB"), "labels": labels,
                         "title": f"a {label}"})
    return examples


def write_student_card(summary: dict, model_args, data_args, args, training_args, processor, command: str) -> Path:
    """The student folder's model card from a training run's summary and arguments (`dclip.arguments`): its metrics
    against the base CLIP it started from, and the run's recipe."""
    metrics, per_class = summary["metrics"], summary.get("per_class_recall", {})
    student_dir = summary["artefacts"]["student"]
    embedded = data_args.dataset_name is None
    recipe = _recipe(summary, model_args, data_args, args, training_args)
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
    widget = scene_widget_examples(int(crop)) if embedded else []
    labels = widget[0]["labels"] if widget else ["cat", "dog", "car"]
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
        image_size=int(crop), example_labels=labels, baseline_label=baseline_label, widget_examples=widget,
    )
    return write_model_card(student_dir, info, metrics["student"], metrics.get(baseline), per_class.get("student"),
                            per_class.get(baseline), summary.get("comparisons", {}).get(f"student vs {baseline}"))


def _recipe(summary: dict, model_args, data_args, args, training_args) -> list[str]:
    """The card's lines on how the student was trained."""
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
    return recipe


def suite_key(dataset: str, task: str, metric: str) -> str:
    """A suite metric as a flat card key that `dclip.hub.metric_title` reads: `zeroshot_<data set>_acc1`,
    `linear_probe_<data set>_acc1`, `image_retrieval_recall@1 (<data set>)`."""
    if task == "zeroshot_classification":
        return f"zeroshot_{dataset}_{metric}"
    if task == "linear_probe":
        return f"linear_probe_{dataset}_{metric.removeprefix('lp_')}"
    return f"{metric} ({dataset})"


def suite_eval_results(records: list[dict], model: str, specs: list[dict]):
    """`huggingface_hub.EvalResult`s of one model's suite records (`dclip.hub.eval_result` of each reported metric:
    zero-shot image classification, image classification for the linear probe, image-text retrieval), each with
    its data set (the Hub id where the suite read one, else the suite's name for it) and split."""
    from .evaluation.suite import reported_metrics
    from .hub import eval_result, is_hub_repo_id

    by_name = {spec["name"]: spec for spec in specs}
    results = []
    for record in (r for r in records if r["pretrained"] == model):
        spec = by_name[record["dataset"]]
        source = spec["dataset_name"] if is_hub_repo_id(spec["dataset_name"]) else record["dataset"]
        numbers = {key: value for key, value in record["metrics"].items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)}
        for metric in reported_metrics(record["task"], numbers):
            results.append(eval_result(suite_key(record["dataset"], record["task"], metric), numbers[metric], source,
                                       record["dataset"], spec["split"]))
    return results


def write_suite_card(folder: str | Path, info: CardInfo, suite_dir: str | Path, model: str,
                     baseline: str | None = None) -> Path:
    """The card of `model` (a local folder) from a suite run's output (`dclip.evaluation.suite.run_suite`): its
    `model-index` from the records, its table against `baseline` (one of the suite's models) with the paired
    intervals of `table.csv`."""
    import csv
    import json

    suite_dir = Path(suite_dir)
    records = [json.loads(line) for line in (suite_dir / "results.jsonl").read_text().splitlines() if line]
    specs = json.loads((suite_dir / "suite.json").read_text())["datasets"]
    with open(suite_dir / "table.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    metrics, baseline_metrics, differences = {}, {}, {}
    for row in rows:
        key = suite_key(row["dataset"], row["task"], row["metric"])
        if row["model"] == model and row["value"]:
            metrics[key] = float(row["value"])
            if row["difference"] and row["reference"] == baseline:
                differences[key] = {"difference": float(row["difference"]), "low": float(row["low"]),
                                    "high": float(row["high"]), "excludes_zero": row["excludes_zero"] == "True"}
        elif baseline and row["model"] == baseline and row["value"]:
            baseline_metrics[key] = float(row["value"])
    if not metrics:
        raise ValueError(f"{suite_dir}: no results of {model} in this suite")
    return write_model_card(folder, info, metrics, baseline_metrics or None, differences=differences or None,
                            results=suite_eval_results(records, model, specs))
