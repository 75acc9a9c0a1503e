"""Evaluate a DCLIP student or teacher folder, or any CLIP checkpoint (local or Hub).

Without --task: everything the embedded scenes (or a captioned data set) allow: retrieval Recall@K and mAP, zero-shot
(prompt templates, top-1/top-5, per class), linear probe and hard negatives; JSON plus a printed table.

With --task (CLIP_benchmark's tasks, names and JSON layout) on any labelled image data (an imagefolder with a folder
per class or a label column, a CSV/JSONL with image paths and labels, a Hub data set with a ClassLabel) or, for
retrieval, any captioned data; with --suite, data sets x tasks for any number of models (comma-separated
--model_name_or_path), compared with paired 95% intervals:

    python examples/evaluate.py --model_name_or_path M --dataset_name pets/ --task zeroshot_classification \
        --templates openai_imagenet --output_file pets.json
    python examples/evaluate.py --model_name_or_path M --dataset_name pets/ --task linear_probe
    python examples/evaluate.py --model_name_or_path M --dataset_name dataset_coco.json --image_root coco/ \
        --task zeroshot_retrieval
    python examples/evaluate.py --model_name_or_path student,student_none --suite suite.yaml --output_dir results/

    python examples/evaluate.py --model_name_or_path outputs/default/student/final        # embedded test split
    python examples/evaluate.py --model_name_or_path outputs/default/student/final \
        --baseline_model outputs/default/base_clip/final --write_card                      # card + plots in the folder
    python examples/evaluate.py --model_name_or_path openai/clip-vit-base-patch32 \
        --dataset_name dataset_coco.json --image_root coco/ --eval_split test --max_eval_samples 25000
    python examples/evaluate.py --model_name_or_path my-student --push_to_hub --hub_model_id you/dclip-student
"""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from dclip.arguments import DataArguments
from dclip.cli import PUSH_FAILED, require_one_process, setup_logging
from dclip.data.loading import load_data
from dclip.data.scenes import zero_shot_tasks
from dclip.evaluation import compare_outcomes, evaluate_checkpoint, format_metrics_table
from dclip.evaluation.benchmark import load_templates
from dclip.evaluation.embedding import default_num_workers
from dclip.evaluation.suite import DatasetSpec, evaluate_suite, read_suite, run_suite


@dataclass
class EvaluateArguments:
    model_name_or_path: str = field(metadata={"help": "DCLIP student/teacher folder, or a CLIP checkpoint"})
    baseline_model: str | None = field(default=None, metadata={"help": "evaluated too; the card's baseline column"})
    seed: int = field(default=42, metadata={"help": "embedded data: the scenes' seed (train.py's --seed)"})
    templates: str = field(default="a photo of a {}.", metadata={
        "help": "zero-shot prompts: a named set (openai_imagenet, openai_cifar, simple), a .txt/.json file, or "
                "'|'-separated templates"})
    task: str | None = field(default=None, metadata={"help": "zeroshot_classification | linear_probe | "
                                                         "zeroshot_retrieval: one CLIP_benchmark task"})
    suite: str | None = field(default=None, metadata={"help": "a suite YAML (data sets x tasks; see "
                                                          "dclip.evaluation.suite)"})
    output_dir: str = field(default="outputs/eval/suite", metadata={"help": "--suite: where results go"})
    label_column: str | None = field(default=None, metadata={"help": "--task: the label column (default: label, "
                                                                     "or the ClassLabel)"})
    image_column: str | None = field(default=None, metadata={"help": "--task: the image column"})
    class_names_file: str | None = field(default=None, metadata={"help": "--task: class names (.txt, .json)"})
    max_samples: int | None = field(default=None, metadata={"help": "--task: a seeded random subset of each split "
                                                            "(rows; for retrieval, images with all their captions)"})
    probe_test_fraction: float | None = field(default=None, metadata={
        "help": "linear probe without a training split: hold this fraction of --eval_split out as its test part"})
    probe_validation_split: str | None = field(default=None, metadata={
        "help": "linear probe: the split its regularisation is chosen on (default: a held-out part of training)"})
    batch_size: int = 256
    num_workers: int | None = field(default=None, metadata={"help": "DataLoader processes decoding images (--task, "
                                                                    "--suite); default: none on 2 cores or fewer, else "
                                                                    "one core in two, up to 4"})
    ks: str = field(default="1,5,10", metadata={"help": "the K of Recall@K, comma-separated"})
    retrieval_backend: str = field(default="auto", metadata={"help": "auto (exact up to 1e10 pairs, else sampled) | "
                                                                   "exact | sampled | faiss"})
    teacher_top_k: int = field(default=16, metadata={"help": "teacher: candidates its fused score re-ranks"})
    output_file: str | None = field(default=None, metadata={"help": "JSON results; default: "
                                                            "outputs/eval/<model name>.json"})
    write_card: bool = field(default=False, metadata={"help": "write README.md, plots and eval_results.json into "
                                                      "the (local) model folder"})
    push_to_hub: bool = field(default=False, metadata={"help": "write the card, then upload the folder"})
    push_as_clip: bool = field(default=False, metadata={"help": "with --push_to_hub: upload the student as its plain "
                                                                "CLIPModel export (no remote code)"})
    hub_model_id: str | None = None
    project_url: str | None = field(default=None, metadata={"help": "the card links here for the code (a URL you "
                                                                    "give; default: no link)"})
    hub_token: str | None = None
    hub_private_repo: bool | None = None


def main() -> None:
    parser = HfArgumentParser((EvaluateArguments, DataArguments))
    args, data_args = parser.parse_args_into_dataclasses()
    require_one_process(parser, "examples/evaluate.py")
    setup_logging()
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id")
    if (args.write_card or args.push_to_hub) and not Path(args.model_name_or_path.split(",")[0]).is_dir():
        parser.error(f"--write_card / --push_to_hub need a local model folder, got {args.model_name_or_path!r}")
    if args.task or args.suite:
        return benchmark(args, data_args)
    data, reports = load_data(data_args, args.seed)
    options = dict(probe_train=data.get("validation"), tasks=zero_shot_tasks(),
                   templates=load_templates(args.templates), ks=tuple(int(k) for k in args.ks.split(",")),
                   retrieval_backend=args.retrieval_backend, teacher_top_k=args.teacher_top_k)
    models = {"model": args.model_name_or_path}
    if args.baseline_model:
        models["baseline"] = args.baseline_model
    results = {name: evaluate_checkpoint(path, data["eval"], **options) for name, path in models.items()}
    report = {
        "model": args.model_name_or_path, "dataset": data_args.dataset_name or "dclip-scenes",
        "split": data_args.eval_split, "num_images": results["model"].num_images,
        "num_texts": results["model"].num_texts, "metrics": results["model"].metrics,
        "per_class_recall": results["model"].per_class_recall, "data": reports,
        "config": {"templates": list(options["templates"]), "ks": list(options["ks"]),
                   "retrieval_backend": args.retrieval_backend, "teacher_top_k": args.teacher_top_k},
    }
    if "baseline" in results:
        report["baseline"] = {"model": args.baseline_model, "metrics": results["baseline"].metrics,
                              "per_class_recall": results["baseline"].per_class_recall}
    output = Path(args.output_file or f"outputs/eval/{Path(args.model_name_or_path).name or 'model'}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2))
    print(format_metrics_table({name: result.metrics for name, result in results.items()}))
    print(f"results: {output}")

    if args.write_card or args.push_to_hub:
        from dclip.hub import write_model_card

        info = card_info(args, dataset=report["dataset"], split=data_args.eval_split,
                         note=f"Measured by dclip's `examples/evaluate.py` on {report['num_images']} images and "
                              f"{report['num_texts']} captions.")
        model, baseline = results["model"], results.get("baseline")
        differences = {key: compare_outcomes(model.outcomes, baseline.outcomes, key)
                       for key in model.outcomes if key in baseline.outcomes and key in model.metrics} \
            if baseline else None
        card = write_model_card(args.model_name_or_path, info, model.metrics, baseline.metrics if baseline else None,
                                model.per_class_recall, baseline.per_class_recall if baseline else None,
                                differences=differences)
        print(f"model card: {card}")
        publish(args)


def card_info(args, dataset: str, split: str, note: str):
    """What the card says besides the numbers: the Hub repo id (or the local folder), the evaluation, the command."""
    from dclip.hub import CardInfo

    folder = args.model_name_or_path.split(",")[0]
    return CardInfo(repo_id=args.hub_model_id or str(Path(folder).resolve()),
                    model_name=(args.hub_model_id or Path(folder).name).split("/")[-1], dataset_type=dataset,
                    dataset_name=dataset, dataset_split=split,
                    command=" ".join(["python examples/evaluate.py"] + [shlex.quote(a) for a in sys.argv[1:]]),
                    evaluation_note=note, project_url=args.project_url,
                    baseline_label=Path(args.baseline_model).name if args.baseline_model else "baseline")


def publish(args) -> None:
    if args.push_to_hub:
        from dclip.hub import PushError, push_to_hub

        try:
            url = push_to_hub(args.model_name_or_path.split(",")[0], args.hub_model_id, token=args.hub_token,
                              private=args.hub_private_repo, as_clip=args.push_as_clip)
            print("pushed:", url)
        except PushError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(PUSH_FAILED)


def benchmark(args, data_args) -> None:
    """--task (one model, one data set, one CLIP_benchmark record) or --suite (models x data sets x tasks)."""
    models = [m for m in args.model_name_or_path.split(",") if m]
    if args.num_workers is None:
        args.num_workers = default_num_workers()
    if args.suite:
        suite_models, specs = read_suite(args.suite)
        baseline = [args.baseline_model] if args.baseline_model else []  # the first model: the others' reference
        paths = run_suite(baseline + suite_models + models, specs, args.output_dir, batch_size=args.batch_size,
                          num_workers=args.num_workers)
        print(paths["table"].read_text())
        print("\n".join(f"{name}: {path}" for name, path in paths.items()))
        if args.write_card or args.push_to_hub:
            from dclip.cards import write_suite_card

            info = card_info(args, dataset="suite", split="see model-index",
                             note=f"Measured by dclip's benchmark suite `{args.suite}`; each difference with its "
                                  "paired-bootstrap 95% interval over the test samples.")
            print("model card:", write_suite_card(models[0], info, args.output_dir, models[0], args.baseline_model))
            publish(args)
        return
    if not data_args.dataset_name:
        raise SystemExit("--task needs --dataset_name (a labelled image folder or file, a Hub data set, or captioned "
                         "data for zeroshot_retrieval)")
    spec = DatasetSpec(
        name=Path(data_args.dataset_name).name or data_args.dataset_name, dataset_name=data_args.dataset_name,
        tasks=[args.task], split=data_args.eval_split,
        train_split=None if args.probe_test_fraction is not None else data_args.train_split,
        validation_split=args.probe_validation_split, label_column=args.label_column, image_column=args.image_column,
        class_names_file=args.class_names_file, image_root=data_args.image_root,
        dataset_format=data_args.dataset_format, templates=args.templates, max_samples=args.max_samples,
        probe_test_fraction=args.probe_test_fraction or 0.5, ks=[int(k) for k in args.ks.split(",")], seed=args.seed)
    records, _ = evaluate_suite(models[:1], [spec], batch_size=args.batch_size, num_workers=args.num_workers)
    record = records[0]
    output = Path(args.output_file or f"outputs/eval/{Path(models[0]).name or 'model'}_{spec.name}_{args.task}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=2))
    numbers = {key: value for key, value in record["metrics"].items() if isinstance(value, (int, float))
               and not isinstance(value, bool) and key not in ("seed",)}
    print(format_metrics_table({record["model"]: numbers}))
    print(f"results: {output}")


if __name__ == "__main__":
    main()
