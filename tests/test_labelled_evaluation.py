"""CLIP_benchmark-style evaluation on labelled image data (issue 17): every input layout, written here with real
image files, gives the same zero-shot and linear-probe figures as a naive loop over the same embeddings and as
scikit-learn; the JSON has CLIP_benchmark's layout; a suite of two data sets over two models runs in one command."""

import csv
import json
import runpy
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch


REPO_ROOT = Path(__file__).resolve().parents[1]
CLASSES = sorted(["red square", "green circle", "blue star", "yellow triangle", "purple cross", "orange ring"])
COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 220), (230, 220, 30), (140, 40, 160), (250, 140, 20)]
PER_CLASS = {"train": 6, "test": 3}  # the test split: 3 + label images per class, unbalanced


def _image(label: int, index: int, rng):
    from PIL import Image

    pixels = np.clip(np.array(COLOURS[label]) + rng.normal(0, 40, (40, 40, 3)), 0, 255).astype(np.uint8)
    pixels[index % 30 : index % 30 + 10, 5:15] = 255 - pixels[index % 30 : index % 30 + 10, 5:15]
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """The same labelled images (6 classes; train and test) in every layout the evaluation reads."""
    from datasets import ClassLabel, Dataset, Features, Image

    root = tmp_path_factory.mktemp("labelled")
    rng = np.random.default_rng(0)
    rows = {split: [] for split in PER_CLASS}
    for split, count in PER_CLASS.items():
        for label, name in enumerate(CLASSES):
            count = PER_CLASS[split] + (label if split == "test" else 0)
            folder = root / "folders" / split / name.replace(" ", "_")
            folder.mkdir(parents=True)
            for i in range(count):
                path = folder / f"{i}.png"
                _image(label, i + (100 if split == "test" else 0), rng).save(path)
                rows[split].append((path, label))
    # imagefolder + metadata.jsonl (text labels), and a CSV (integer labels, a names file), a JSONL (text labels)
    meta = root / "metadata_folder"
    meta.mkdir()
    lines = []
    for i, (path, label) in enumerate(rows["test"]):
        (meta / f"{i:03d}.png").write_bytes(path.read_bytes())
        lines.append(json.dumps({"file_name": f"{i:03d}.png", "label": CLASSES[label]}))
    (meta / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    with open(root / "test.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["filepath", "y"])
        writer.writerows((str(path.relative_to(root)), label) for path, label in rows["test"])
    (root / "names.txt").write_text("\n".join(CLASSES) + "\n")
    (root / "test.jsonl").write_text("".join(json.dumps({"image": str(path), "label": CLASSES[label]}) + "\n"
                                             for path, label in rows["test"]))
    # a Hub-layout data set: parquet shards whose label is a ClassLabel (what `load_dataset(name)` reads)
    features = Features({"img": Image(), "label": ClassLabel(names=[c.replace(" ", "_") for c in CLASSES])})
    for split in PER_CLASS:
        columns = {"img": [str(path) for path, _ in rows[split]], "label": [label for _, label in rows[split]]}
        dataset = Dataset.from_dict(columns, features=features)
        (root / "hub" / "data").mkdir(parents=True, exist_ok=True)
        dataset.to_parquet(str(root / "hub" / "data" / f"{split}-00000-of-00001.parquet"))
    return {"root": root, "rows": rows,
            "sources": {"class folders": dict(name_or_path=str(root / "folders")),
                        "imagefolder + metadata.jsonl": dict(name_or_path=str(meta), split="train"),
                        "csv + names file": dict(name_or_path=str(root / "test.csv"), label_column="y",
                                                 class_names_file=str(root / "names.txt")),
                        "jsonl": dict(name_or_path=str(root / "test.jsonl")),
                        "hub ClassLabel": dict(name_or_path=str(root / "hub"))}}


@pytest.fixture(scope="module")
def model_and_processor(tiny_clip_dir):
    from dclip.evaluation import load_dual_encoder

    return load_dual_encoder(str(tiny_clip_dir))


def _naive_image_embeds(model, processor, paths):
    from PIL import Image

    rows = []
    with torch.no_grad():
        for path in paths:  # one image at a time, straight through the model
            with Image.open(path) as image:
                pixels = processor(images=[image.convert("RGB")])["pixel_values"]
            feature = model.get_image_features(pixels)
            feature = getattr(feature, "pooler_output", feature)
            rows.append((feature / feature.norm(dim=-1, keepdim=True))[0].numpy())
    return np.stack(rows)


def _naive_classifier(model, processor, templates):
    """Each class's prompts embedded on their own, averaged and normalised, one class at a time."""
    classifier = []
    with torch.no_grad():
        for name in CLASSES:
            prompts = [template.format(name) for template in templates]
            text = processor(text=prompts)
            embeds = model.get_text_features(**text)
            embeds = getattr(embeds, "pooler_output", embeds)
            mean = (embeds / embeds.norm(dim=-1, keepdim=True)).mean(0)
            classifier.append((mean / mean.norm()).numpy())
    return np.stack(classifier)


def _naive_zero_shot(image_embeds, classifier, labels):
    scores = image_embeds @ classifier.T
    hits1 = hits5 = 0
    per_class = {c: [0, 0] for c in range(len(CLASSES))}
    for row, label in enumerate(labels):  # a loop, not a vectorised rank
        ranked = sorted(range(len(CLASSES)), key=lambda c: -scores[row, c])
        hits1 += ranked[0] == label
        hits5 += label in ranked[:5]
        per_class[label][0] += ranked[0] == label
        per_class[label][1] += 1
    recall = np.mean([hit / total for hit, total in per_class.values() if total])
    return scores, {"acc1": hits1 / len(labels), "acc5": hits5 / len(labels), "mean_per_class_recall": recall}


@pytest.mark.parametrize("layout", ["class folders", "imagefolder + metadata.jsonl", "csv + names file", "jsonl",
                                    "hub ClassLabel"])
def test_each_layout_gives_the_naive_loops_and_scikit_learns_zero_shot_figures(layouts, model_and_processor,
                                                                                layout):
    from sklearn.metrics import balanced_accuracy_score, top_k_accuracy_score

    from dclip.data.labelled import load_labelled_dataset
    from dclip.evaluation.benchmark import load_templates, zeroshot_classification

    model, processor = model_and_processor
    data = load_labelled_dataset(**{"split": "test", **layouts["sources"][layout]})
    assert data.class_names == CLASSES  # folder names / ClassLabel: underscores read as spaces; text labels sorted
    expected_labels = [label for _, label in layouts["rows"]["test"]]
    assert [data.class_names[label] for label in data.labels] == [CLASSES[label] for label in expected_labels]
    templates = load_templates("openai_cifar")
    result = zeroshot_classification(model, processor, data, templates, batch_size=7)
    # the same embeddings, computed apart (one image, one class at a time; equal up to float rounding), then the
    # metrics by a naive loop over the embeddings the evaluation used (rounding could otherwise flip a near-tie)
    from dclip.evaluation import embed_images, zero_shot_classifier

    image_embeds = embed_images(model, processor, data.dataset, batch_size=7)
    classifier = zero_shot_classifier(model, processor, data.class_names, templates)
    np.testing.assert_allclose(image_embeds, _naive_image_embeds(
        model, processor, [path for path, _ in layouts["rows"]["test"]]), atol=1e-5)
    np.testing.assert_allclose(classifier, _naive_classifier(model, processor, templates), atol=1e-5)
    scores, naive = _naive_zero_shot(image_embeds, classifier, expected_labels)
    for key in ("acc1", "acc5", "mean_per_class_recall"):
        assert result.metrics[key] == pytest.approx(naive[key], abs=1e-9), key
    assert result.metrics["acc1"] == pytest.approx(top_k_accuracy_score(expected_labels, scores, k=1))
    assert result.metrics["acc5"] == pytest.approx(top_k_accuracy_score(expected_labels, scores, k=5))
    assert result.metrics["mean_per_class_recall"] == pytest.approx(
        balanced_accuracy_score(expected_labels, scores.argmax(1)))
    assert 0 < naive["acc5"] < 1  # not a degenerate case where any computation agrees
    assert abs(naive["mean_per_class_recall"] - naive["acc1"]) > 1e-3  # unbalanced: the two differ
    assert result.outcomes["acc1"].mean() == pytest.approx(result.metrics["acc1"])


def test_the_linear_probe_matches_scikit_learn_with_the_regularisation_chosen_on_validation(layouts,
                                                                                          model_and_processor):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import train_test_split

    from dclip.data.labelled import load_labelled_dataset
    from dclip.evaluation import embed_images
    from dclip.evaluation.benchmark import PROBE_REGULARIZATION, linear_probe_task

    model, processor = model_and_processor
    source = layouts["sources"]["hub ClassLabel"]["name_or_path"]
    train, test = (load_labelled_dataset(source, split) for split in ("train", "test"))
    result = linear_probe_task(model, processor, train, test, validation_fraction=0.25, seed=3)
    train_x, test_x = (embed_images(model, processor, d.dataset) for d in (train, test))
    fit_x, val_x, fit_y, val_y = train_test_split(train_x, train.labels, test_size=0.25, random_state=3,
                                                  stratify=train.labels)
    accuracies = [LogisticRegression(C=c, max_iter=1000).fit(fit_x, fit_y).score(val_x, val_y)
                  for c in PROBE_REGULARIZATION]
    best = PROBE_REGULARIZATION[int(np.argmax(accuracies))]
    assert result.metrics["C"] == best
    final = LogisticRegression(C=best, max_iter=1000).fit(np.concatenate([fit_x, val_x]),
                                                           np.concatenate([fit_y, val_y]))
    predictions = final.predict(test_x)
    assert result.metrics["lp_acc1"] == pytest.approx(float(np.mean(predictions == test.labels)))
    assert result.metrics["lp_mean_per_class_recall"] == pytest.approx(
        balanced_accuracy_score(test.labels, predictions))
    assert 0.3 < result.metrics["lp_acc1"]  # colours are linearly separable even in a random tiny CLIP's features


def test_the_linear_probe_holds_out_a_test_part_when_there_is_no_training_split(layouts, model_and_processor):
    from dclip.data.labelled import load_labelled_dataset
    from dclip.evaluation.benchmark import split_for_probe

    data = load_labelled_dataset(str(layouts["root"] / "test.jsonl"))
    train, test = split_for_probe(data, 0.4, seed=0)
    assert len(train) + len(test) == len(data) == 33 and len(test) == 14
    assert np.abs(np.bincount(test.labels) - 0.4 * np.bincount(data.labels)).max() <= 1  # stratified


def test_a_names_file_must_cover_the_labels_and_integer_labels_need_names(tmp_path, layouts):
    from dclip.data.labelled import load_labelled_dataset

    (tmp_path / "short.txt").write_text("red square\ngreen circle\n")
    with pytest.raises(ValueError, match="labels run from 0 to 5, but there are 2 class names"):
        load_labelled_dataset(str(layouts["root"] / "test.csv"), label_column="y",
                              class_names_file=str(tmp_path / "short.txt"))
    with pytest.raises(ValueError, match="--class_names_file"):
        load_labelled_dataset(str(layouts["root"] / "test.csv"), label_column="y")
    with pytest.raises(ValueError, match="no split 'validation'"):
        load_labelled_dataset(str(layouts["root"] / "folders"), "validation")


def test_an_unreadable_image_is_skipped_counted_and_named(tmp_path, layouts):
    from dclip.data.labelled import load_labelled_dataset

    lines = (layouts["root"] / "test.jsonl").read_text().splitlines()
    (tmp_path / "broken.png").write_bytes(b"not an image")
    lines[3] = json.dumps({"image": str(tmp_path / "broken.png"), "label": CLASSES[0]})
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    data = load_labelled_dataset(str(tmp_path / "data.jsonl"))
    assert len(data) == len(lines) - 1 and data.skipped == {"corrupt_image": 1}


def test_the_record_has_clip_benchmarks_layout_and_the_schema_rejects_others():
    import jsonschema

    from dclip.evaluation.benchmark import TaskResult, clip_benchmark_record, validate_record

    record = clip_benchmark_record("pets", "student", TaskResult(
        "zeroshot_classification", {"acc1": 0.5, "acc5": float("nan"), "mean_per_class_recall": 0.4}))
    assert list(record) == ["dataset", "model", "pretrained", "task", "metrics", "language"]
    assert "acc5" not in record["metrics"]  # JSON has no NaN: an undefined metric is left out
    validate_record(record)
    json.loads(json.dumps(record, allow_nan=False))
    for broken in ({**record, "task": "zero_shot"}, {k: v for k, v in record.items() if k != "pretrained"},
                   {**record, "metrics": {"accuracy": 0.5, "mean_per_class_recall": 0.4}},
                   {**record, "metrics": {"acc1": 1.5, "mean_per_class_recall": 0.4}}):
        with pytest.raises(jsonschema.ValidationError):
            validate_record(broken)
    validate_record(clip_benchmark_record("coco", "s", TaskResult(
        "zeroshot_retrieval", {"image_retrieval_recall@1": 0.2, "text_retrieval_recall@1": 0.3})))
    with pytest.raises(jsonschema.ValidationError):
        validate_record(clip_benchmark_record("coco", "s", TaskResult("linear_probe", {"acc1": 0.2})))


def _evaluate_cli(monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", ["evaluate.py", *map(str, args)])
    runpy.run_path(str(REPO_ROOT / "examples" / "evaluate.py"), run_name="__main__")


def test_the_cli_writes_a_clip_benchmark_json_per_task(monkeypatch, tmp_path, layouts, tiny_clip_dir, capsys):
    from dclip.evaluation.benchmark import validate_record

    folders = layouts["root"] / "folders"
    for task in ("zeroshot_classification", "linear_probe"):
        output = tmp_path / f"{task}.json"
        _evaluate_cli(monkeypatch, "--model_name_or_path", tiny_clip_dir, "--dataset_name", folders, "--task", task,
                      "--templates", "openai_imagenet", "--output_file", output)
        record = json.loads(output.read_text())
        validate_record(record)
        assert record["task"] == task and record["dataset"] == "folders"
    printed = capsys.readouterr().out
    assert "lp_acc1" in printed and "mean_per_class_recall" in printed


def test_a_suite_of_two_data_sets_over_two_models_runs_in_one_command(monkeypatch, tmp_path, layouts, tiny_clip_dir,
                                                                      tokenizer, image_processor):
    from conftest import tiny_clip_config_kwargs
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    from dclip.evaluation import paired_bootstrap
    from dclip.evaluation.benchmark import validate_record

    torch.manual_seed(1)
    other = tmp_path / "other-clip"
    CLIPModel(CLIPConfig(**tiny_clip_config_kwargs(tokenizer))).save_pretrained(other)
    CLIPProcessor(image_processor, tokenizer).save_pretrained(other)
    root = layouts["root"]
    (tmp_path / "suite.yaml").write_text(f"""
datasets:
  - name: shapes
    dataset_name: {root / 'folders'}
    tasks: [zeroshot_classification, linear_probe]
  - name: shapes-hub
    dataset_name: {root / 'hub'}
    tasks: [zeroshot_classification]
    templates: openai_cifar
""")
    student = tmp_path / "student"
    shutil.copytree(tiny_clip_dir, student)
    _evaluate_cli(monkeypatch, "--model_name_or_path", student, "--baseline_model", other, "--suite",
                  tmp_path / "suite.yaml", "--output_dir", tmp_path / "out", "--write_card")
    records = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [(r["model"], r["dataset"], r["task"]) for r in records] == [
        (name, dataset, task) for name in ("other-clip", "student")  # the baseline first: the others' reference
        for dataset, task in (("shapes", "zeroshot_classification"), ("shapes", "linear_probe"),
                              ("shapes-hub", "zeroshot_classification"))]
    for record in records:
        validate_record(record)
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| shapes-hub | zeroshot_classification | acc1 |" in table and "[" in table
    outcomes = np.load(tmp_path / "out" / "outcomes.npz")
    rows = list(csv.DictReader(open(tmp_path / "out" / "table.csv")))
    row = next(r for r in rows if r["model"] == str(student) and r["dataset"] == "shapes" and r["metric"] == "lp_acc1")
    expected = paired_bootstrap(outcomes[f"{student}|shapes|linear_probe|lp_acc1"],
                                outcomes[f"{other}|shapes|linear_probe|lp_acc1"])
    assert float(row["low"]) == pytest.approx(expected["low"]) and float(row["high"]) == pytest.approx(
        expected["high"])
    assert float(row["value"]) == pytest.approx(records[4]["metrics"]["lp_acc1"])
    # the card: every task in model-index with its task type, the table against the baseline with intervals
    from huggingface_hub import ModelCard

    from dclip.hub import validate_model_card

    text = (student / "README.md").read_text()
    card = validate_model_card(text)
    index = card.data.to_dict()["model-index"][0]["results"]
    kinds = {(entry["task"]["type"], entry["dataset"]["name"]) for entry in index}
    assert kinds == {("zero-shot-image-classification", "shapes"), ("image-classification", "shapes"),
                     ("zero-shot-image-classification", "shapes-hub")}
    metrics = {(entry["task"]["type"], entry["dataset"]["name"], m["type"]): m["value"]
               for entry in index for m in entry["metrics"]}
    assert metrics[("image-classification", "shapes", "accuracy")] == round(records[4]["metrics"]["lp_acc1"], 4)
    assert f"{float(row['difference']):+.3f} [{float(row['low']):+.3f}, {float(row['high']):+.3f}]" in text
    assert isinstance(ModelCard.load(student / "README.md").data.to_dict()["model-index"], list)


def test_edge_cases_of_the_classification_metrics_agree_with_their_outcomes():
    from dclip.evaluation.classification import classification_metrics

    tied = np.array([[0.5, 0.5, 0.1], [0.2, 0.7, 0.7], [0.3, 0.3, 0.3]])
    outcomes = {}
    metrics = classification_metrics(tied, [0, 2, 1], ["a", "b", "c"], outcomes=outcomes)
    assert metrics["acc1"] == outcomes["acc1"].mean()  # ties ranked as scikit-learn ranks them, in both
    five = classification_metrics(np.eye(5)[[1, 2, 3, 4, 0]], [0, 1, 2, 3, 4], list("abcde"))
    assert five["acc5"] == 1.0 and five["acc1"] == 0.0  # CLIP_benchmark reports top-5 from 5 classes on
    assert "acc5" not in classification_metrics(np.array([[0.2, 0.8], [0.9, 0.1]]), [1, 1], ["a", "b"])


def test_the_linear_probe_scores_a_class_it_never_saw_and_a_few_shot_split_does_not_crash(caplog):
    from dclip.evaluation.benchmark import linear_probe, stratified_split

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 8)) * 3
    train_y, test_y = np.repeat([0, 1, 2], 10), np.repeat([0, 1, 2, 3], 5)  # class 3 only in the test split
    train_x, test_x = centres[train_y] + rng.normal(size=(30, 8)), centres[test_y] + rng.normal(size=(20, 8))
    result = linear_probe(train_x, train_y, test_x, test_y, list("abcd"))
    assert np.isfinite(result.metrics["lp_acc1"]) and result.metrics["lp_acc1"] <= 0.75  # d is never predicted
    assert result.outcomes["lp_acc1"][test_y == 3].sum() == 0
    kept, held = stratified_split(np.repeat(np.arange(6), 2), 0.2, 0, "--probe_test_fraction")  # 3 rows, 6 classes
    assert len(held) == 3 and len(kept) == 9 and "at random" in caplog.text


def test_a_single_file_source_never_trains_its_probe_on_its_test_rows(layouts):
    from dclip.evaluation.suite import DatasetSpec, _Data

    data = _Data(DatasetSpec(name="x", dataset_name=str(layouts["root"] / "test.jsonl"), tasks=["linear_probe"]))
    train, validation, test = data.probe_splits()
    train_paths = {row["image"]["path"] for row in train.dataset.cast_column("image", _undecoded())}
    test_paths = {row["image"]["path"] for row in test.dataset.cast_column("image", _undecoded())}
    assert validation is None and not train_paths & test_paths and len(train_paths) + len(test_paths) == 33


def _undecoded():
    from datasets import Image

    return Image(decode=False)


def test_names_files_keyed_by_classlabel_name_and_large_string_labels(tmp_path, layouts):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dclip.data.labelled import load_labelled_dataset

    wnids = {name.replace(" ", "_"): f"the {name}" for name in CLASSES}
    (tmp_path / "names.json").write_text(json.dumps(wnids))
    data = load_labelled_dataset(str(layouts["root"] / "hub"), "test", class_names_file=str(tmp_path / "names.json"))
    assert data.class_names == [f"the {name}" for name in CLASSES]
    rows = layouts["rows"]["test"]
    table = pa.table({"image": pa.array([str(path) for path, _ in rows], pa.large_string()),
                      "label": pa.array([CLASSES[label] for _, label in rows], pa.large_string())})
    (tmp_path / "large" / "data").mkdir(parents=True)
    pq.write_table(table, tmp_path / "large" / "data" / "test-00000-of-00001.parquet")
    data = load_labelled_dataset(str(tmp_path / "large"), "test")
    assert data.class_names == CLASSES and [CLASSES[label] for _, label in rows] == [
        data.class_names[label] for label in data.labels]


def test_workers_embed_the_same_rows_in_the_same_order(layouts, model_and_processor):
    from dclip.data.labelled import load_labelled_dataset
    from dclip.evaluation import embed_images

    model, processor = model_and_processor
    data = load_labelled_dataset(str(layouts["root"] / "folders"), "test")
    serial = embed_images(model, processor, data.dataset, batch_size=4)
    parallel = embed_images(model, processor, data.dataset, batch_size=4, num_workers=2)
    np.testing.assert_array_equal(serial, parallel)


def test_a_sampled_retrieval_record_validates():
    from dclip.evaluation.benchmark import TaskResult, clip_benchmark_record, validate_record

    validate_record(clip_benchmark_record("coco", "s", TaskResult("zeroshot_retrieval", {
        "image_retrieval_recall@1": 0.2, "image_retrieval_recall@1_stderr": 0.01, "image_retrieval_queries": 5000,
        "text_retrieval_recall@5": 0.5, "image_retrieval_mAP": 0.3})))


def test_the_cli_runs_zeroshot_retrieval_on_captioned_data(monkeypatch, tmp_path, layouts, tiny_clip_dir):
    from dclip.evaluation.benchmark import validate_record

    folder = tmp_path / "captioned" / "test"
    folder.mkdir(parents=True)
    lines = []
    for index, (path, label) in enumerate(layouts["rows"]["test"][:12]):
        (folder / f"{index}.png").write_bytes(path.read_bytes())
        lines.append(json.dumps({"file_name": f"{index}.png", "caption": f"a {CLASSES[label]}"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    output = tmp_path / "retrieval.json"
    _evaluate_cli(monkeypatch, "--model_name_or_path", tiny_clip_dir, "--dataset_name", tmp_path / "captioned",
                  "--dataset_format", "imagefolder", "--task", "zeroshot_retrieval", "--ks", "1,5",
                  "--output_file", output)
    record = json.loads(output.read_text())
    validate_record(record)
    assert record["task"] == "zeroshot_retrieval"
    assert {"image_retrieval_recall@1", "image_retrieval_recall@5", "text_retrieval_recall@1"} <= set(
        record["metrics"])


def test_a_retrieval_subset_takes_whole_images_at_random():
    """--max_samples on captioned data: N images chosen at random (seeded), each with every one of its captions,
    in the data's order; not the first N rows, which would cut an image's captions and favour the start."""
    from datasets import Dataset

    from dclip.evaluation.suite import caption_subset

    image_ids = [f"img{i % 10}" for i in range(30)]  # 10 images, 3 captions each, interleaved
    dataset = Dataset.from_dict({"image_id": image_ids, "caption": [f"caption {i}" for i in range(30)]})
    subset = caption_subset(dataset, 4, seed=1)
    chosen = set(subset["image_id"])
    assert len(chosen) == 4 and len(subset) == 12
    assert subset["caption"] == [c for c, i in zip(dataset["caption"], image_ids) if i in chosen]  # all, in order
    assert caption_subset(dataset, 4, seed=1)["caption"] == subset["caption"]
    assert {frozenset(caption_subset(dataset, 4, seed=s)["image_id"]) for s in range(5)} != {frozenset(chosen)}
    assert len(caption_subset(dataset, 10, seed=0)) == 30
    one_a_row = Dataset.from_dict({"caption": [f"c{i}" for i in range(9)]})  # no image_id: a row is an image
    assert len(caption_subset(one_a_row, 3, seed=0)) == 3


def test_an_image_folder_is_read_once_for_all_its_splits(layouts, monkeypatch):
    """A suite data set reads a source's splits from one read of it (an image folder's files are resolved once, not
    once per split): the same rows as reading each split on its own."""
    import datasets

    from dclip.data.labelled import load_labelled_dataset

    source = layouts["sources"]["class folders"]["name_or_path"]
    alone = {split: load_labelled_dataset(source, split) for split in ("train", "test")}
    calls = []
    real = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append(a) or real(*a, **k))
    sources: dict = {}
    shared = {split: load_labelled_dataset(source, split, sources=sources) for split in ("train", "test")}
    assert len(calls) == 1 and list(sources) == [source]
    for split in ("train", "test"):
        assert shared[split].labels.tolist() == alone[split].labels.tolist() and len(shared[split].labels) > 0
        assert shared[split].class_names == alone[split].class_names
