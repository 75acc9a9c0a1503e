"""Model cards (templates in `model_cards/`, rendered with `huggingface_hub.ModelCard`), their plots, and upload of a
saved model folder to the Hub."""

from __future__ import annotations

import json
import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .evaluation.report import reported_keys
from .export import PICKLE_SUFFIXES, export_clip_folder
from .plots import plot_differences, plot_retrieval, plot_zero_shot_per_class


logger = logging.getLogger(__name__)

REMOTE_CODE_FILES = ("configuration_dclip.py", "modeling_dclip.py", "processing_dclip.py")
# what a push never uploads: training state, half-written folders, hidden files
UPLOAD_IGNORE = ("training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json")
EVAL_RESULTS_FILE = "eval_results.json"
RETRIEVAL_PLOT = "retrieval.png"
ZERO_SHOT_PLOT = "zero_shot_per_class.png"
DIFFERENCES_PLOT = "differences.png"
WIDGET_FOLDER = "widget"  # the widget's example images, uploaded with the model


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
        task, measure = _zero_shot_parts("zeroshot_" + key[len("linear_probe_"):])
        name = f"top-{measure[3:]}" if measure.startswith("acc") else "mean per-class recall"
        return f"linear probe {task.removeprefix('label_')} {name}"
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
    """`huggingface_hub.EvalResult`s (the card's `model-index`) for the flat `metrics` (`eval_result` each)."""
    results = [eval_result(key, metrics[key], dataset_type, dataset_name, split) for key in reported_keys(metrics)]
    return [result for result in results if result is not None]


def eval_result(key: str, value: float, dataset_type: str, dataset_name: str, split: str = "test"):
    """The `EvalResult` of one flat metric: retrieval as `image-text-retrieval` (a suite's keys end in ` (<data
    set>)`), zero-shot as `zero-shot-image-classification` and the linear probe as `image-classification` (the label
    column or data set as the dataset config), hard negatives as `image-text-matching`; None for another key."""
    from huggingface_hub import EvalResult

    common = dict(dataset_type=dataset_type, dataset_name=dataset_name, dataset_split=split,
                  metric_value=round(float(value), 4), metric_name=metric_title(key))
    base = key.split(" (")[0]
    if base.startswith(("image_retrieval_", "text_retrieval_")):
        return EvalResult(task_type="image-text-retrieval", task_name="Image-text retrieval",
                          metric_type=base.split("_retrieval_")[1].lower(), metric_config=base.split("_")[0]
                          + "_retrieval", **common)
    if key.startswith(("zeroshot_", "linear_probe_")):
        probe = key.startswith("linear_probe_")
        task, measure = _zero_shot_parts("zeroshot_" + key.split("_", 2 if probe else 1)[-1])
        kind = "accuracy" if probe and measure == "acc1" else (
            f"top_{measure[3:]}_accuracy" if measure.startswith("acc") else measure)
        if probe:
            return EvalResult(task_type="image-classification", task_name="Linear probe", dataset_config=task,
                              metric_type=kind, **common)
        return EvalResult(task_type="zero-shot-image-classification", task_name="Zero-shot image classification",
                          dataset_config=task, metric_type=kind, **common)
    if key.startswith("hard_negative_accuracy"):
        return EvalResult(task_type="image-text-matching", task_name="Hard-negative captions", metric_type="accuracy",
                          metric_config=key, **common)
    return None


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
    # where the card links for the code and the recipe: a URL the user gives, else none (the card names dclip only)
    project_url: str | None = None
    # the Hub widget's zero-shot examples: {"image": PIL image, "labels": [...], "title": str}; written as PNGs
    widget_examples: list[dict] = field(default_factory=list)


METHOD_TITLES = {"dclip": "DCLIP", "clip_cid": "CLIP-CID", "dclip+clip_cid": "DCLIP + CLIP-CID",
                 "dclip+instance": "DCLIP + instance distillation", "instance": "instance distillation"}


def render_model_card(info: CardInfo, metrics: dict[str, float], baseline: dict[str, float] | None = None,
                      plots: list[tuple[str, str]] | None = None, template: str = "student.md",
                      differences: dict[str, dict] | None = None, widget: list[dict] | None = None,
                      results=None):
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
        eval_results=(results if results is not None else eval_results(
            metrics, info.dataset_type, info.dataset_name, info.dataset_split)) or None,
        widget=widget or None,
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
        project_url=info.project_url, hub_repo=is_hub_repo_id(info.repo_id),
    )
    return validate_model_card(str(card))


def is_hub_repo_id(repo_id: str) -> bool:
    """Whether `repo_id` names a Hub repository (`owner/name`), not a local folder."""
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", repo_id)) and not Path(repo_id).exists()


def write_widget(folder: Path, info: CardInfo) -> list[dict]:
    """Save `info.widget_examples`' images under `<folder>/widget/` and return the card's `widget` entries for
    zero-shot image classification: `src` (the file's Hub URL when the repo id is a Hub one, else its path in the
    folder), `candidate_labels` (comma-separated), `example_title`."""
    entries = []
    for index, example in enumerate(info.widget_examples):
        relative = f"{WIDGET_FOLDER}/example_{index}.png"
        (folder / WIDGET_FOLDER).mkdir(exist_ok=True)
        example["image"].save(folder / relative)
        src = f"https://huggingface.co/{info.repo_id}/resolve/main/{relative}" if is_hub_repo_id(info.repo_id) \
            else relative
        entries.append({"src": src, "candidate_labels": ", ".join(example["labels"]),
                        "example_title": example.get("title", f"example {index}")})
    return entries


def check_widget(widget, folder: Path | None = None, repo_id: str | None = None) -> None:
    """A zero-shot image classification widget as the Hub reads it: a list of entries, each with an image `src` (an
    https URL, or a file of the model folder) and at least two comma-separated `candidate_labels`; a URL into this
    repo must name a file the folder has."""
    if not isinstance(widget, list) or not widget:
        raise ValueError(f"model card widget must be a non-empty list, got {widget!r}")
    for index, entry in enumerate(widget):
        if not isinstance(entry, dict) or not isinstance(entry.get("src"), str):
            raise ValueError(f"model card widget[{index}] needs an image `src`, got {entry!r}")
        labels = [label.strip() for label in str(entry.get("candidate_labels", "")).split(",") if label.strip()]
        if len(labels) < 2:
            raise ValueError(f"model card widget[{index}] needs at least two candidate_labels, got {labels}")
        src = entry["src"]
        prefix = f"https://huggingface.co/{repo_id}/resolve/main/" if repo_id else None
        if src.startswith("https://"):
            local = src[len(prefix):] if prefix and src.startswith(prefix) else None
        elif "://" in src:
            raise ValueError(f"model card widget[{index}]: src must be https or a file of the repo, got {src!r}")
        else:
            local = src
        if local is not None and folder is not None and not (folder / local).is_file():
            raise ValueError(f"model card widget[{index}]: {src} is not a file of {folder}")


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
                     differences: dict[str, dict] | None = None, results=None) -> Path:
    """Write `README.md` (the card), its plots, widget images and `eval_results.json` into a saved model folder;
    return the card. `results`: the `model-index` entries (`EvalResult`s), default from `metrics`."""
    folder = Path(folder)
    plots = []
    if any(key.startswith(("image_retrieval_", "text_retrieval_")) for key in metrics):
        plot_retrieval(metrics, baseline, folder / RETRIEVAL_PLOT, info.model_label, info.baseline_label,
                       title=metric_title)
        plots.append(("Retrieval against the baseline", RETRIEVAL_PLOT))
    if differences:
        plot_differences(differences, folder / DIFFERENCES_PLOT, info.model_label, info.baseline_label,
                         title=metric_title)
        plots.append(("Difference to the baseline, with 95% intervals", DIFFERENCES_PLOT))
    if per_class_recall:
        plot_zero_shot_per_class(per_class_recall, baseline_per_class_recall, folder / ZERO_SHOT_PLOT,
                                 info.model_label, info.baseline_label)
        plots.append(("Zero-shot recall per class", ZERO_SHOT_PLOT))
    widget = write_widget(folder, info)
    card = render_model_card(info, metrics, baseline, plots, differences=differences, widget=widget,
                             results=results)
    if widget:
        check_widget(card.data.to_dict()["widget"], folder, info.repo_id)
    (folder / EVAL_RESULTS_FILE).write_text(json.dumps(
        {"dataset": info.dataset_type, "split": info.dataset_split, "metrics": metrics, "baseline": baseline or {},
         "baseline_label": info.baseline_label, "differences": differences or {},
         "per_class_recall": per_class_recall or {}}, indent=2))
    card.save(folder / "README.md")
    return folder / "README.md"


# ----- upload ---------------------------------------------------------------------------------------------------


def upload_files(folder: str | Path) -> list[str]:
    """The files a push of `folder` uploads (relative paths): everything at its top level that a Hub model needs
    (weights, config, processor, remote code, card, plots, evaluation, detector) and the card widget's images in
    `widget/`, not training state,
    checkpoints or hidden files. Raises naming what is missing when the folder is not a complete DCLIP model."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such model folder")
    files = sorted(path.name for path in folder.iterdir()
                   if path.is_file() and not path.name.startswith(".") and path.name not in UPLOAD_IGNORE)
    if (folder / WIDGET_FOLDER).is_dir():  # the card widget's example images
        files += sorted(f"{WIDGET_FOLDER}/{path.name}" for path in (folder / WIDGET_FOLDER).iterdir()
                        if path.is_file() and not path.name.startswith("."))
    pickles = [name for name in files if name.lower().endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise ValueError(f"{folder} holds pickle files {pickles}: nothing dclip publishes is a pickle. A detector "
                         "saved as `detector.pt` by an older dclip is converted by re-saving the processor: "
                         "DCLIPProcessor.from_pretrained(folder).save_pretrained(folder), then remove the .pt")
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
                commit_message: str = "Upload DCLIP model", as_clip: bool = False) -> str:
    """Create `repo_id` (if needed) and upload `upload_files(folder)` in one commit; return the commit URL. With
    `as_clip`, a student is uploaded as its plain `CLIPModel` export (`dclip.export.export_clip_folder`), which the
    Hub's widget and inference API run without remote code. Raises `PushError`, with one clear message, when the
    Hub cannot be reached or refuses the upload."""
    folder = Path(folder)
    if not as_clip:
        return _commit(folder, repo_id, token, private, commit_message, source=folder, as_clip=False)
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        exported = export_clip_folder(folder, Path(scratch) / "clip", repo_id=repo_id)
        return _commit(exported, repo_id, token, private, commit_message + " (plain CLIPModel export)", source=folder,
                       as_clip=True)


def _commit(folder: Path, repo_id: str, token: str | None, private: bool | None, commit_message: str, source: Path,
            as_clip: bool) -> str:
    """Upload `upload_files(folder)` in one commit (`push_to_hub`); errors name the user's `source` folder, which
    for a plain-CLIP push is not the temporary export that was uploaded."""
    from huggingface_hub import CommitOperationAdd, HfApi

    files = upload_files(folder)
    api = HfApi(token=token)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in files]
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.create_commit(repo_id=repo_id, repo_type="model", operations=operations,
                                 commit_message=commit_message)
    except Exception as error:  # noqa: BLE001 - sorted below: network, token and access errors only
        if not _is_hub_failure(error):
            raise
        reason = str(error).strip().splitlines()[0] if str(error).strip() else "no details"
        retry = f"--push_to_hub --hub_model_id {repo_id}" + (" --push_as_clip" if as_clip else "")
        raise PushError(f"pushing {source} to the Hub as {repo_id} failed ({type(error).__name__}: {reason}). "
                        f"Nothing was uploaded (the upload is one commit, and it was not made). The local folder "
                        f"{source} is complete; push it again with `python examples/evaluate.py --model_name_or_path "
                        f"{source} {retry}` once the network, token (`hf auth login`) and write access are "
                        "there.") from error
    logger.info("pushed %d files of %s to %s", len(files), source, repo_id)
    return str(getattr(info, "commit_url", info))


def _is_hub_failure(error: BaseException) -> bool:
    """Whether `error` says the Hub could not be reached or refused the upload (no network, no token, no write
    access): an HTTP error of `huggingface_hub`, or one of the HTTP library under it (httpx, or httpx2 for
    huggingface_hub 2), or an OS-level connection error."""
    from huggingface_hub.errors import HfHubHTTPError

    libraries = {type_.__module__.split(".")[0] for type_ in type(error).__mro__}
    return isinstance(error, (HfHubHTTPError, OSError)) or bool(libraries & {"httpx", "httpx2", "requests",
                                                                              "urllib3"})


class PushError(RuntimeError):
    """Publishing to the Hub failed; nothing was uploaded, and the local folder is complete. The message says why."""
