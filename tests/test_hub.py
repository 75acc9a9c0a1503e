"""Model cards (metadata, usage snippet, plots) and the Hub upload path, offline."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import BLOCK_REPO_IMPORTS

from dclip.hub import CardInfo, eval_results, push_to_hub, upload_files, validate_model_card, write_model_card


METRICS = {"image_retrieval_recall@1": 0.141, "image_retrieval_recall@5": 0.434, "text_retrieval_recall@1": 0.155,
           "image_retrieval_mAP": 0.29, "text_retrieval_mAP": 0.25, "zeroshot_label_color_acc1": 0.608,
           "zeroshot_label_color_acc5": 0.95, "zeroshot_label_color_mean_per_class_recall": 0.6,
           "linear_probe_label_color_acc1": 0.655, "hard_negative_accuracy": 0.7,
           "hard_negative_accuracy_swap_relation": 0.52}
BASELINE = {key: value * 0.8 for key, value in METRICS.items()}
PER_CLASS = {"label_color": {"red": 0.9, "blue": 0.5, "green": 0.1}}


def env_without_repo(root):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(root / "modules"), HF_HUB_OFFLINE="1")
    return env


@pytest.fixture
def student_folder(tmp_path, tiny_clip, processor):
    from modeling_dclip import DCLIPModel

    folder = tmp_path / "student"
    DCLIPModel.from_clip(tiny_clip, distillation_method="dclip").save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def card_info(repo_id):
    return CardInfo(repo_id=repo_id, base_model="openai/clip-vit-base-patch32", datasets=["dclip/scenes"],
                    recipe=["300 steps, batch 128"], image_size=32, example_labels=["red circle", "blue square"])


def test_model_index_carries_every_metric():
    results = eval_results(METRICS, "dclip-scenes", "scenes")
    assert {round(result.metric_value, 4) for result in results} == {round(v, 4) for v in METRICS.values()}
    by_name = {result.metric_name: result for result in results}
    assert by_name["zero-shot color top-1"].task_type == "zero-shot-image-classification"
    assert by_name["zero-shot color top-1"].dataset_config == "label_color"
    assert by_name["text-to-image Recall@1"].metric_type == "recall@1"
    assert by_name["zero-shot color mean per-class recall"].metric_type == "mean_per_class_recall"
    assert by_name["zero-shot color top-5"].metric_type == "top_5_accuracy"
    assert by_name["linear probe color top-1"].task_type == "image-classification"
    assert by_name["hard-negative accuracy (swap relation)"].metric_value == 0.52


def test_sampled_retrieval_reports_estimates_with_their_errors_not_as_metrics():
    from dclip.hub import render_model_card

    sampled = {**METRICS, "image_retrieval_recall@1_stderr": 0.0031, "image_retrieval_queries": 25_000}
    results = eval_results(sampled, "dclip-scenes", "scenes")
    assert len(results) == len(METRICS)  # the error and the query count are no model-index entries
    assert not any("stderr" in result.metric_type or "queries" in result.metric_type for result in results)
    card = str(render_model_card(card_info("me/student"), sampled, BASELINE))
    assert "| 0.1410 ± 0.0031 |" in card.replace("`", "")
    assert "25000" not in card and "25,000" not in card


def test_card_metadata_validates_and_shows_the_numbers(student_folder):
    from huggingface_hub import ModelCard

    write_model_card(student_folder, card_info("someone/dclip-student"), METRICS, BASELINE, PER_CLASS, PER_CLASS)
    text = (student_folder / "README.md").read_text()
    card = ModelCard(text, ignore_metadata_errors=False)
    assert card.data.pipeline_tag == "zero-shot-image-classification"
    assert card.data.library_name == "transformers" and card.data.base_model == "openai/clip-vit-base-patch32"
    assert card.data.datasets == ["dclip/scenes"] and "distillation" in card.data.tags
    values = {result.metric_name: result.metric_value for result in card.data.eval_results}
    assert values["text-to-image Recall@1"] == 0.141 and values["zero-shot color top-1"] == 0.608
    assert "| text-to-image Recall@1 (`image_retrieval_recall@1`) | 0.1410 | 0.1128 |" in text
    for plot in ("retrieval.png", "zero_shot_per_class.png"):
        assert f"]({plot})" in text and (student_folder / plot).read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((student_folder / "eval_results.json").read_text())
    assert saved["metrics"] == METRICS and saved["per_class_recall"] == PER_CLASS
    # validation refuses what the Hub would refuse
    broken = text.replace("pipeline_tag: zero-shot-image-classification\n", "")
    with pytest.raises(ValueError, match="pipeline_tag"):
        validate_model_card(broken)
    bad_index = re.sub(r"value: 0\.141\b", "value: lots", text, count=1)
    with pytest.raises(ValueError, match="not a number"):
        validate_model_card(bad_index)


def test_model_index_that_does_not_round_trip_is_refused(student_folder, monkeypatch):
    """validate_model_card converts the card's model-index to huggingface_hub EvalResults and back, and refuses a
    card whose model-index changes on the way. With huggingface_hub as installed no card text can trip it (parsing
    the card already drops what an EvalResult cannot hold, and the conversion is idempotent after that), so a
    lossy conversion is injected: one that loses the last metric each time it runs."""
    from huggingface_hub import repocard_data

    write_model_card(student_folder, card_info("someone/dclip-student"), METRICS, BASELINE)
    text = (student_folder / "README.md").read_text()
    card = validate_model_card(text)  # today's conversion round-trips
    assert len(card.data.eval_results) == len(METRICS)
    original = repocard_data.eval_results_to_model_index
    monkeypatch.setattr(repocard_data, "eval_results_to_model_index",
                        lambda model_name, results: original(model_name, results[:-1]))
    with pytest.raises(ValueError, match="round-trip"):
        validate_model_card(text)


def test_card_usage_snippet_runs_as_written(student_folder, tmp_path, processor):
    """The card's snippet, run in a clean process, prints the model's probabilities for its labels and the
    pipeline's ranking: both are checked against the same model run here. The labels are written in the order
    opposite to the pipeline's ranking, so a printout that merely echoes the labels cannot pass."""
    import ast
    import dataclasses

    import torch
    from PIL import Image

    from modeling_dclip import DCLIPModel

    model = DCLIPModel.from_pretrained(student_folder).eval()
    image = Image.new("RGB", (32, 32), "red")  # the snippet's image

    def probabilities(template, labels):
        inputs = processor(text=[template.format(label) for label in labels], images=[image])
        with torch.no_grad():
            return dict(zip(labels, model(**inputs).logits_per_image.softmax(dim=-1)[0].tolist()))

    candidates = ["red circle", "blue square", "green star"]
    ranked = sorted(candidates, key=probabilities("This is a photo of {}.", candidates).get, reverse=True)
    labels = ranked[::-1]  # ascending: the pipeline must reorder them
    snippet_reference = probabilities("a photo of a {}.", labels)
    pipeline_reference = probabilities("This is a photo of {}.", labels)
    scores = sorted(pipeline_reference.values())
    assert min(b - a for a, b in zip(scores, scores[1:])) > 1e-4  # a ranking that rounding cannot flip

    info = dataclasses.replace(card_info(str(student_folder)), example_labels=labels)
    write_model_card(student_folder, info, METRICS, BASELINE)
    blocks = re.findall(r"```python\n(.*?)```", (student_folder / "README.md").read_text(), flags=re.S)
    assert len(blocks) == 1 and "trust_remote_code=True" in blocks[0]
    work = tmp_path / "clean"
    work.mkdir()
    completed = subprocess.run([sys.executable, "-c", BLOCK_REPO_IMPORTS + blocks[0]], cwd=work,
                               env=env_without_repo(work), capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    lines = completed.stdout.splitlines()
    printed = ast.literal_eval(lines[0])  # the model's own probabilities, rounded to 3 digits
    assert list(printed) == labels
    for label in labels:
        assert printed[label] == pytest.approx(snippet_reference[label], abs=1e-3), label
    answer = ast.literal_eval(lines[1])  # the pipeline's answer: best first
    assert [entry["label"] for entry in answer] == ranked
    for entry in answer:
        assert entry["score"] == pytest.approx(pipeline_reference[entry["label"]], abs=1e-5), entry


def test_push_uploads_exactly_the_model_files_and_they_load(student_folder, tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    write_model_card(student_folder, card_info("someone/dclip-student"), METRICS, BASELINE, PER_CLASS)
    (student_folder / "training_args.bin").write_bytes(b"not for the Hub")
    (student_folder / "checkpoint-100").mkdir()
    (student_folder / ".cache").mkdir()
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["repo"] = (repo_id, kwargs)

    def create_commit(self, repo_id, operations, **kwargs):
        calls["operations"] = operations
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/0"})()

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    url = push_to_hub(student_folder, "someone/dclip-student", private=True)
    assert url.endswith("/commit/0") and calls["repo"] == ("someone/dclip-student", {
        "repo_type": "model", "private": True, "exist_ok": True})
    uploaded = {operation.path_in_repo: operation.path_or_fileobj for operation in calls["operations"]}
    assert set(uploaded) == {
        "README.md", "config.json", "model.safetensors", "configuration_dclip.py", "modeling_dclip.py",
        "processing_dclip.py", "processor_config.json", "tokenizer.json", "tokenizer_config.json",
        "eval_results.json", "retrieval.png", "zero_shot_per_class.png",
    } | ({"vocab.json", "merges.txt"} & set(uploaded)) | ({"special_tokens_map.json"} & set(uploaded))
    # exactly those files, in a clean folder, load with trust_remote_code in a process without this repo
    clean = tmp_path / "hub-copy"
    clean.mkdir()
    for name, source in uploaded.items():
        shutil.copy(source, clean / name)
    script = BLOCK_REPO_IMPORTS + (
        "from transformers import AutoModel, AutoProcessor\n"
        f"model = AutoModel.from_pretrained({str(clean)!r}, trust_remote_code=True)\n"
        f"processor = AutoProcessor.from_pretrained({str(clean)!r}, trust_remote_code=True)\n"
        "inputs = processor(text=['a red circle'], images=[__import__('PIL.Image').Image.new('RGB', (40, 40))])\n"
        "print(type(model).__module__.split('.')[0], tuple(model(**inputs).logits_per_image.shape))\n"
    )
    completed = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env_without_repo(tmp_path),
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.split() == ["transformers_modules", "(1,", "1)"]


def test_upload_refuses_an_incomplete_folder(student_folder):
    with pytest.raises(ValueError, match="missing README.md"):
        upload_files(student_folder)
    write_model_card(student_folder, card_info("someone/x"), METRICS)
    (student_folder / "modeling_dclip.py").unlink()
    with pytest.raises(ValueError, match="modeling_dclip.py"):
        upload_files(student_folder)
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        upload_files(student_folder / "nope")


def test_plots_leave_the_matplotlib_backend_alone(tmp_path):
    """Library plots draw on `matplotlib.figure.Figure`: the process's backend (a notebook's, a GUI's) stays as it
    was, and pyplot's figure manager holds nothing afterwards."""
    import subprocess
    import sys

    from conftest import REPO_ROOT

    code = (
        "import matplotlib, sys\nmatplotlib.use('svg')\n"
        "from dclip.hub import plot_retrieval, plot_zero_shot_per_class\n"
        "metrics = {'image_retrieval_recall@1': 0.5, 'text_retrieval_recall@1': 0.25}\n"
        f"plot_retrieval(metrics, metrics, __import__('pathlib').Path({str(tmp_path / 'r.png')!r}), 'a', 'b')\n"
        f"plot_zero_shot_per_class({{'label_color': {{'red': 0.5}}}}, None, "
        f"__import__('pathlib').Path({str(tmp_path / 'z.png')!r}), 'a', 'b')\n"
        "assert matplotlib.get_backend() == 'svg', matplotlib.get_backend()\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert (tmp_path / "r.png").stat().st_size > 1000 and (tmp_path / "z.png").stat().st_size > 1000


def test_card_shows_each_difference_with_its_interval_and_calls_only_excluding_ones_gains():
    from dclip.evaluation import paired_bootstrap
    from dclip.hub import render_model_card

    gain = paired_bootstrap([1.0] * 60 + [0.0] * 40, [1.0] * 40 + [0.0] * 60, num_resamples=200)
    noise = paired_bootstrap([1.0, 0.0] * 50, [0.0, 1.0] * 50, num_resamples=200)
    info = card_info("me/student")
    info.baseline_label = "same student, no teacher"
    card = str(render_model_card(info, METRICS, BASELINE, differences={
        "image_retrieval_recall@1": gain, "text_retrieval_recall@1": noise}))
    rows = {line.split("|")[1].strip(): line for line in card.splitlines() if line.startswith("| ")}
    t2i = rows["text-to-image Recall@1 (`image_retrieval_recall@1`)"]
    assert f"{gain['difference']:+.3f} [{gain['low']:+.3f}, {gain['high']:+.3f}] *" in t2i
    i2t = rows["image-to-text Recall@1 (`text_retrieval_recall@1`)"]
    assert f"[{noise['low']:+.3f}, {noise['high']:+.3f}] |" in i2t and "*" not in i2t  # contains 0: no claim
    assert "| same student, no teacher | difference, 95% interval |" in card
    assert "paired bootstrap" in card


def test_card_tables_and_plots_read_in_order_and_the_card_links_only_to_real_places(student_folder):
    from dclip.hub import render_model_card

    metrics = {**METRICS, "image_retrieval_recall@10": 0.6, "text_retrieval_recall@5": 0.4,
               "text_retrieval_recall@10": 0.5}
    card = str(render_model_card(card_info("someone/dclip-student"), metrics))
    titles = re.findall(r"^\| (text-to-image|image-to-text) (Recall@\d+|mAP)", card, flags=re.M)
    assert titles == [("text-to-image", "Recall@1"), ("text-to-image", "Recall@5"), ("text-to-image", "Recall@10"),
                      ("text-to-image", "mAP"), ("image-to-text", "Recall@1"), ("image-to-text", "Recall@5"),
                      ("image-to-text", "Recall@10"), ("image-to-text", "mAP")]
    links = re.findall(r"\]\((https?://[^)]+)\)", card)
    assert links == ["https://huggingface.co/someone/dclip-student"]  # no invented project URL
    local = str(render_model_card(card_info(str(student_folder)), metrics))
    assert not re.findall(r"\]\((https?://[^)]+)\)", local)
    info = card_info("someone/dclip-student")
    info.project_url = "https://example.org/my-fork"
    assert "[dclip](https://example.org/my-fork)" in str(render_model_card(info, metrics))


def test_the_widget_ships_its_images_and_its_metadata_validates(student_folder):
    from huggingface_hub import ModelCard

    from dclip.cards import scene_widget_examples
    from dclip.hub import check_widget

    info = card_info("someone/dclip-student")
    info.widget_examples = scene_widget_examples(32)
    differences = {"image_retrieval_recall@1": {"difference": 0.03, "low": 0.01, "high": 0.05, "excludes_zero": True}}
    write_model_card(student_folder, info, METRICS, BASELINE, differences=differences)
    card = ModelCard.load(student_folder / "README.md")
    widget = card.data.to_dict()["widget"]
    assert [entry["src"] for entry in widget] == [
        f"https://huggingface.co/someone/dclip-student/resolve/main/widget/example_{i}.png" for i in range(2)]
    assert widget[0]["candidate_labels"] == "blue square, green triangle, red circle, yellow star"
    assert card.data.pipeline_tag == "zero-shot-image-classification"
    assert {"widget/example_0.png", "widget/example_1.png"} <= set(upload_files(student_folder))
    assert (student_folder / "differences.png").is_file() and "differences.png" in card.text
    check_widget(widget, student_folder, "someone/dclip-student")
    (student_folder / "widget" / "example_1.png").unlink()
    with pytest.raises(ValueError, match="not a file of"):
        check_widget(widget, student_folder, "someone/dclip-student")
    with pytest.raises(ValueError, match="two candidate_labels"):
        check_widget([{"src": "widget/example_0.png", "candidate_labels": "circle"}], student_folder)
    with pytest.raises(ValueError, match="https"):
        check_widget([{"src": "file:///etc/passwd", "candidate_labels": "a, b"}], student_folder)


def test_push_as_clip_uploads_a_plain_clip_with_the_students_embeddings(student_folder, tmp_path, monkeypatch):
    import torch
    from conftest import random_images
    from huggingface_hub import HfApi
    from transformers import CLIPModel, CLIPProcessor

    from dclip.cards import scene_widget_examples
    from dclip.hub import check_widget
    from modeling_dclip import DCLIPModel
    from processing_dclip import DCLIPProcessor

    info = card_info("someone/dclip-student-clip")
    info.widget_examples = scene_widget_examples(32)
    write_model_card(student_folder, info, METRICS, BASELINE)
    clean = tmp_path / "hub-copy"
    clean.mkdir()

    def create_commit(self, repo_id, operations, **kwargs):  # what the Hub would hold: copied while the files exist
        for operation in operations:
            (clean / operation.path_in_repo).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(operation.path_or_fileobj, clean / operation.path_in_repo)
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/0"})()

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kwargs: None)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    push_to_hub(student_folder, "someone/dclip-student-clip", as_clip=True)
    files = {path.relative_to(clean).as_posix() for path in clean.rglob("*") if path.is_file()}
    assert not [name for name in files if name.endswith((".py", ".pt", ".pth", ".bin", ".pkl"))]
    assert "auto_map" not in (clean / "config.json").read_text()
    clip = CLIPModel.from_pretrained(clean).eval()  # no trust_remote_code anywhere
    plain = CLIPProcessor.from_pretrained(clean)
    student = DCLIPModel.from_pretrained(student_folder).eval()
    own = DCLIPProcessor.from_pretrained(student_folder, trust_remote_code=False)
    images, texts = random_images(3), ["a red circle", "two blue squares left of a star"]
    with torch.no_grad():
        for name, inputs, ours in (("get_image_features", plain(images=images), own(images=images)),
                                   ("get_text_features", plain(text=texts), own(text=texts))):
            exported = getattr(clip, name)(**inputs)
            exported = getattr(exported, "pooler_output", exported)
            torch.testing.assert_close(exported, getattr(student, name)(**ours), atol=1e-5, rtol=1e-5)
    card = (clean / "README.md").read_text()
    assert "trust_remote_code" not in card and 'CLIPModel.from_pretrained("someone/dclip-student-clip")' in card
    from huggingface_hub import ModelCard

    check_widget(ModelCard(card).data.to_dict()["widget"], clean, "someone/dclip-student-clip")
