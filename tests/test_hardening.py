"""Hardening (issue 18): no third-party side effects from the detector, no pickles in what dclip saves or publishes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


REPO_ROOT = Path(__file__).resolve().parents[1]

# Run in a fresh process, so that ultralytics is first imported there, with every way of starting a program or pip
# turned into a failure once torch, transformers and the remote code are imported (torch itself runs `ldconfig -p`
# to find CUDA libraries).
NO_SUBPROCESS = """
import os, subprocess, sys
import PIL.Image, torch, transformers
import processing_dclip
def refuse(*args, **kwargs):
    raise AssertionError(f"a subprocess or pip was started: {args[:1]}")
subprocess.Popen = subprocess.run = subprocess.call = subprocess.check_call = subprocess.check_output = refuse
os.system = os.execv = os.execvp = os.spawnv = refuse
class NoPip:
    def find_spec(self, name, path=None, target=None):
        if name == "pip" or name.startswith("pip."):
            raise AssertionError("pip was imported")
sys.meta_path.insert(0, NoPip())
"""

SIDE_EFFECTS = """
from pathlib import Path
from transformers import CLIPImageProcessor
from dclip.data.loaders import load_caption_dataset
from dclip.data.tokenizer import train_clip_tokenizer
""" + NO_SUBPROCESS + """
original_open = PIL.Image.open
from processing_dclip import DCLIPProcessor, import_yolo

root = Path(sys.argv[1])
import_yolo()("yolov8n.yaml", task="detect").save(str(root / "yolo.pt"))
tokenizer = train_clip_tokenizer(["a red circle", "two blue squares"] * 4, vocab_size=600, model_max_length=16)
processor = DCLIPProcessor(CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                           tokenizer, detector_path=str(root / "yolo.pt"), max_regions=2, max_spans=2)
processor(images=[PIL.Image.new("RGB", (40, 40), "red")], return_regions=True)
assert processor.region_extractor._detector is not None, "the detector was not loaded"
assert PIL.Image.open is original_open, f"PIL.Image.open is {PIL.Image.open}"
assert not [name for name in os.environ if name.startswith("YOLO_")], "ultralytics' settings left in the environment"
errors = {}
for name in ("empty.jpg", "text.jpg", "truncated.jpg"):
    try:
        processor(images=[PIL.Image.new("RGB", (40, 40)), str(root / name)], return_regions=True)
    except ValueError as error:
        errors[name] = str(error)
dataset, report = load_caption_dataset(str(root), format="imagefolder")
print(json.dumps({"errors": errors, "skipped": dict(report.skipped), "rows": len(dataset),
                  "messages": report.examples if hasattr(report, "examples") else []}))
"""


def _write_bad_images(root: Path) -> None:
    from PIL import Image

    (root / "empty.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("this is not an image\n")
    Image.new("RGB", (64, 64), "blue").save(root / "good.jpg", quality=95)
    data = (root / "good.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "metadata.jsonl").write_text("".join(json.dumps({"file_name": name, "caption": f"picture {name}"}) + "\n"
                                                 for name in ("good.jpg", "empty.jpg", "text.jpg", "truncated.jpg")))


def _run(script: str, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", "import json\n" + script, *map(str, args)], capture_output=True,
                          text=True, timeout=300, env=env, cwd=str(REPO_ROOT))


def test_the_detector_leaves_pil_and_the_environment_alone_and_bad_images_keep_our_errors(tmp_path):
    pytest.importorskip("ultralytics")
    _write_bad_images(tmp_path)
    completed = _run(SIDE_EFFECTS, tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert set(result["errors"]) == {"empty.jpg", "text.jpg", "truncated.jpg"}
    for name, message in result["errors"].items():
        assert "images[1]" in message and name in message, message
        assert "pi_heif" not in message and "pi-heif" not in message
    assert result["skipped"] == {"corrupt_image": 3} and result["rows"] == 1
    assert "pi_heif" not in completed.stderr and "pi-heif" not in completed.stderr


def test_the_guard_fails_when_ultralytics_is_imported_plainly(tmp_path):
    """The check above can fail: ultralytics imported without `import_yolo` patches PIL.Image.open."""
    pytest.importorskip("ultralytics")
    completed = _run(NO_SUBPROCESS + "import PIL.Image\nbefore = PIL.Image.open\nimport ultralytics.utils.patches\n"
                     "print(PIL.Image.open is before)")
    assert completed.stdout.strip().splitlines()[-1] == "False"


NO_PICKLE = """
import pickle, sys, torch
def refuse(*args, **kwargs):
    raise AssertionError("a pickle was loaded")
pickle.load = pickle.loads = torch.load = refuse
import pickle as again
assert again.load is refuse
from PIL import Image
from transformers import AutoModel, AutoProcessor
from modeling_dclip import DCLIPModel, DCLIPTeacherModel
from processing_dclip import DCLIPProcessor
student, teacher = sys.argv[1], sys.argv[2]
DCLIPModel.from_pretrained(student)
DCLIPTeacherModel.from_pretrained(teacher)
# a published student's runtime (the licence boundary): embeddings without regions never import ultralytics (AGPL)
model = AutoModel.from_pretrained(student, trust_remote_code=True)
runtime = AutoProcessor.from_pretrained(student, trust_remote_code=True)
inputs = runtime(images=[Image.new("RGB", (40, 40), "red")], text=["a red circle"])
with torch.no_grad():
    model.get_image_features(pixel_values=inputs["pixel_values"])
    model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
from transformers import pipeline
classifier = pipeline("zero-shot-image-classification", model=student, trust_remote_code=True)
assert len(classifier(Image.new("RGB", (40, 40), "red"), candidate_labels=["a red circle", "a blue square"])) == 2
assert not [name for name in sys.modules if name.startswith("ultralytics")], "the runtime imported ultralytics"
for folder in (student, teacher):
    for processor in (DCLIPProcessor.from_pretrained(folder), AutoProcessor.from_pretrained(folder,
                                                                                           trust_remote_code=True)):
        out = processor(images=[Image.new("RGB", (40, 40), "red")], text=["a red circle"], return_regions=True)
        assert processor.region_extractor._detector is not None and out["region_boxes"].shape[0] == 1
assert "ultralytics" in sys.modules  # region extraction, and only it, does
print("loaded")
"""
PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")  # pickle 2+, torch zip


def test_saved_folders_hold_no_pickle_and_load_with_pickle_refused(tmp_path, tiny_clip, processor):
    from conftest import fused_teacher

    from dclip.hub import upload_files
    from modeling_dclip import DCLIPModel
    from processing_dclip import DCLIPProcessor, import_yolo

    pytest.importorskip("ultralytics")
    import_yolo()("yolov8n.yaml", task="detect").save(str(tmp_path / "users_own.pt"))  # a user's .pt, as input
    with_detector = DCLIPProcessor(processor.image_processor, processor.tokenizer,
                                   detector_path=str(tmp_path / "users_own.pt"), max_regions=2, max_spans=2)
    student, teacher = tmp_path / "student", tmp_path / "teacher"
    DCLIPModel.from_clip(tiny_clip).save_pretrained(student)
    fused_teacher(tiny_clip).save_pretrained(teacher)
    for folder in (student, teacher):
        with_detector.save_pretrained(folder)
        files = [path for path in folder.rglob("*") if path.is_file()]
        assert "detector.safetensors" in {path.name for path in files}
        assert not [path.name for path in files if path.suffix in (".pt", ".pth", ".pkl", ".pickle", ".bin")]
        assert not [path.name for path in files if path.suffix != ".safetensors"  # (a length there could match)
                    and path.read_bytes()[:4].startswith(PICKLE_MAGIC)]
    (student / "README.md").write_text("---\nlicense: apache-2.0\n---\n# student\n")
    assert not [name for name in upload_files(student) if name.endswith((".pt", ".pth", ".pkl", ".bin"))]
    completed = _run(NO_PICKLE, student, teacher)
    assert completed.returncode == 0 and completed.stdout.strip().endswith("loaded"), completed.stderr[-3000:]


def test_a_folder_with_a_pickle_is_not_published(tmp_path, tiny_clip, processor):
    from dclip.hub import upload_files
    from modeling_dclip import DCLIPModel

    DCLIPModel.from_clip(tiny_clip).save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    (tmp_path / "README.md").write_text("---\nlicense: apache-2.0\n---\n# student\n")
    (tmp_path / "training_args.bin").write_bytes(b"training state: left out, not an error")
    assert "training_args.bin" not in upload_files(tmp_path)
    (tmp_path / "detector.pt").write_bytes(b"\x80\x04 an old dclip's detector")
    with pytest.raises(ValueError, match=r"pickle files \['detector.pt'\].*save_pretrained"):
        upload_files(tmp_path)


def test_a_converted_detector_keeps_the_image_size_it_was_trained_at(tmp_path):
    """A trained checkpoint tells ultralytics' predictor its training image size; without it, prediction runs at
    640 px (on the recipe's 64 px scenes: 100 times the work, and other boxes)."""
    import torch

    from processing_dclip import import_yolo, load_detector, save_detector

    pytest.importorskip("ultralytics")
    import_yolo()("yolov8n.yaml", task="detect").save(str(tmp_path / "yolo.pt"))
    checkpoint = torch.load(tmp_path / "yolo.pt", weights_only=False)  # our own file, made just above
    checkpoint["train_args"] = {"imgsz": 48, "task": "detect"}  # as a training run leaves it
    torch.save(checkpoint, tmp_path / "trained.pt")
    (tmp_path / "saved").mkdir()
    save_detector(str(tmp_path / "trained.pt"), str(tmp_path / "saved"))
    assert load_detector(str(tmp_path / "trained.pt")).overrides["imgsz"] == 48
    assert load_detector(str(tmp_path / "saved" / "detector.safetensors")).overrides["imgsz"] == 48


def _nan_run(tmp_path, tiny_clip, processor, skip: bool):
    """A student trained 3 steps of 2 pairs with a checkpoint after each; the 5th row's teacher target is NaN, so
    the 3rd step's cosine term is."""
    import torch
    from conftest import random_images
    from datasets import Dataset
    from transformers import TrainingArguments

    from dclip.trainer import DCLIPTrainer
    from dclip.training import guard_finite_loss, train_stage
    from modeling_dclip import DCLIPModel

    inputs = processor(text=["a red circle", "two squares", "a star", "a green triangle", "a ring", "a cross"],
                       images=random_images(6, seed=3))
    targets = torch.nn.functional.normalize(torch.randn(6, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    targets[4] = float("nan")
    data = Dataset.from_dict({"pixel_values": inputs["pixel_values"].numpy(), "input_ids": inputs["input_ids"].numpy(),
                              "attention_mask": inputs["attention_mask"].numpy(),
                              "teacher_image_embeds": targets.numpy(), "teacher_text_embeds": targets.numpy()})
    data.set_format("torch")
    args = TrainingArguments(output_dir=str(tmp_path / "student"), report_to=[], use_cpu=True, max_steps=3,
                             per_device_train_batch_size=2, save_steps=1, logging_steps=1, learning_rate=1e-3,
                             remove_unused_columns=False, seed=0, save_total_limit=None)
    trainer = DCLIPTrainer(model=DCLIPModel.from_clip(tiny_clip), args=args, train_dataset=data,
                           loss_weights={"contrastive": 1.0, "cosine_image": 1.0, "cosine_text": 1.0})
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(data)  # rows in order
    guard_finite_loss(trainer, "student", skip=skip)
    return trainer, lambda: train_stage(trainer, None)


def test_a_nan_loss_stops_the_stage_naming_it_and_the_last_checkpoint_stays_intact(tmp_path, tiny_clip, processor):
    import torch
    from safetensors.torch import load_file

    from dclip.training import NonFiniteLossError

    trainer, train = _nan_run(tmp_path, tiny_clip, processor, skip=False)
    with pytest.raises(NonFiniteLossError, match=r"stage student, step 3: .*cosine_image.*cosine_text"):
        train()
    folders = sorted(path.name for path in (tmp_path / "student").iterdir() if path.name.startswith("checkpoint"))
    assert folders == ["checkpoint-1", "checkpoint-2"]
    weights = load_file(tmp_path / "student" / "checkpoint-2" / "model.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())


def test_skip_nonfinite_loss_skips_the_step_without_moving_a_parameter(tmp_path, tiny_clip, processor):
    import torch
    from safetensors.torch import load_file

    trainer, train = _nan_run(tmp_path, tiny_clip, processor, skip=True)
    train()
    assert trainer.skipped_steps == 1 and trainer.state.global_step == 3
    before = load_file(tmp_path / "student" / "checkpoint-2" / "model.safetensors")
    after = load_file(tmp_path / "student" / "checkpoint-3" / "model.safetensors")
    assert all(torch.equal(before[name], after[name]) for name in before)
    first = load_file(tmp_path / "student" / "checkpoint-1" / "model.safetensors")
    assert not all(torch.equal(first[name], before[name]) for name in before)  # the other steps did move them


@pytest.mark.parametrize("broken", ["captions", "images"])
def test_a_data_set_with_nothing_usable_is_refused_before_any_training(tmp_path, broken):
    from PIL import Image

    from dclip.arguments import DataArguments
    from dclip.data.loading import load_data

    for split in ("train", "test"):
        (tmp_path / split).mkdir()
        rows = []
        for i in range(3):
            if broken == "images":
                (tmp_path / split / f"{i}.png").write_bytes(b"not a png")
            else:
                Image.new("RGB", (32, 32), "red").save(tmp_path / split / f"{i}.png")
            rows.append(json.dumps({"file_name": f"{i}.png", "caption": "  " if broken == "captions" else "a cat"}))
        (tmp_path / split / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    reason = "3 empty_caption" if broken == "captions" else "3 corrupt_image"
    with pytest.raises(ValueError, match=rf"no usable \(image, caption\) pair in split 'train' \(skipped: {reason}\)"):
        load_data(DataArguments(dataset_name=str(tmp_path), dataset_format="imagefolder"), seed=0)


def test_an_error_while_writing_a_final_folder_leaves_the_previous_one_whole(tmp_path, tiny_clip, processor,
                                                                              monkeypatch):
    from transformers import Trainer, TrainingArguments

    from dclip.training import save_final
    from modeling_dclip import DCLIPModel

    args = TrainingArguments(output_dir=str(tmp_path / "run"), report_to=[], use_cpu=True)
    trainer = Trainer(model=DCLIPModel.from_clip(tiny_clip), args=args)
    final = tmp_path / "student" / "final"
    save_final(trainer, processor, final)
    before = {path.relative_to(final): path.read_bytes() for path in final.rglob("*") if path.is_file()}

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    import torch

    with torch.no_grad():  # other weights this time: a folder written in place would differ
        next(trainer.model.parameters()).add_(1.0)
    monkeypatch.setattr(type(processor), "save_pretrained", disk_full)  # the weights are written, then this fails
    with pytest.raises(OSError, match="No space left"):
        save_final(trainer, processor, final)
    after = {path.relative_to(final): path.read_bytes() for path in final.rglob("*") if path.is_file()}
    assert after == before and "model.safetensors" in {str(name) for name in after}


def test_a_push_without_network_ends_in_one_clear_message_and_exit_code(tmp_path, tiny_clip, processor, monkeypatch,
                                                                         capsys):
    import runpy
    import socket
    from types import SimpleNamespace

    import huggingface_hub.constants

    from dclip.cli import PUSH_FAILED
    from dclip.hub import PushError, push_to_hub
    from modeling_dclip import DCLIPModel

    folder = tmp_path / "student"
    DCLIPModel.from_clip(tiny_clip).save_pretrained(folder)
    processor.save_pretrained(folder)
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# student\n")
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    with socket.socket() as probe:  # a local port nothing listens on: the connection is refused, as offline
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{closed_port}")
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    with pytest.raises(PushError, match="OfflineModeIsEnabled"):  # HF_HUB_OFFLINE=1, as the tests run
        push_to_hub(folder, "someone/dclip-student")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # now a real, refused connection
    with pytest.raises(PushError, match=r"Nothing was uploaded.*local folder .*student is complete") as raised:
        push_to_hub(folder, "someone/dclip-student")
    assert "ConnectError" in str(raised.value) and "--push_to_hub --hub_model_id someone/dclip-student" in str(
        raised.value)
    cli = runpy.run_path(str(REPO_ROOT / "examples" / "evaluate.py"), run_name="not_main")
    args = SimpleNamespace(push_to_hub=True, model_name_or_path=str(folder), hub_model_id="someone/dclip-student",
                           hub_token=None, hub_private_repo=None, push_as_clip=False)
    capsys.readouterr()  # the progress bars so far
    with pytest.raises(SystemExit) as exited:
        cli["publish"](args)
    assert exited.value.code == PUSH_FAILED
    error = capsys.readouterr().err
    assert error.startswith("error: pushing") and "Traceback" not in error
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before  # every local artefact intact


SLOW_MAP = """
import sys, time
from datasets import load_from_disk
from dclip.targets import cached_map
base, marker = sys.argv[1], sys.argv[2]
def slow(batch):
    time.sleep(0.2)
    with open(marker, "a") as handle:
        handle.write("batch\\n")
    return {"y": [2 * x for x in batch["x"]]}
cached_map(load_from_disk(base), slow, "fingerprint-of-the-pass", batched=True, batch_size=10)
"""


def _double(batch):
    return {"y": [2 * x for x in batch["x"]]}


def test_a_pass_killed_mid_way_leaves_no_cache_and_a_corrupt_cache_is_named_and_recomputed(tmp_path, caplog):
    import logging
    import signal
    import time

    from datasets import Dataset, load_from_disk

    from dclip.targets import cached_map

    Dataset.from_dict({"x": list(range(400))}).save_to_disk(str(tmp_path / "base"))
    cache = Path(load_from_disk(str(tmp_path / "base"))._get_cache_file_path("fingerprint-of-the-pass"))
    marker = tmp_path / "progress"
    process = subprocess.Popen([sys.executable, "-c", SLOW_MAP, str(tmp_path / "base"), str(marker)],
                               env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (not marker.exists() or marker.read_text().count("batch") < 5):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert 5 <= marker.read_text().count("batch") < 40  # killed mid-way
    assert not cache.exists()  # nothing half-written under the cache's name: a rerun computes the pass
    result = cached_map(load_from_disk(str(tmp_path / "base")), _double, "fingerprint-of-the-pass", batched=True,
                        batch_size=10)
    assert result["y"] == [2 * x for x in range(400)] and cache.exists()

    import pyarrow as pa

    for cut in (cache.stat().st_size // 2, None):  # cut mid-batch; or whole batches gone (it reads, but short)
        if cut is None:
            short = pa.table({"x": pa.array(range(100), pa.int64()), "y": pa.array(range(0, 200, 2), pa.int64())})
            with pa.OSFile(str(cache), "wb") as sink, pa.ipc.new_stream(sink, short.schema) as writer:
                writer.write_table(short)
        else:
            cache.write_bytes(cache.read_bytes()[:cut])
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="dclip.targets"):
            again = cached_map(load_from_disk(str(tmp_path / "base")), _double, "fingerprint-of-the-pass",
                               batched=True, batch_size=10)
        assert str(cache) in caplog.text and "computed again" in caplog.text
        assert again["y"] == [2 * x for x in range(400)]


def test_a_10000_pair_run_with_1_percent_corrupt_images_finishes_and_reports_exactly_100_skipped(tmp_path,
                                                                                                  tiny_clip_dir):
    import numpy as np
    from PIL import Image
    from transformers import TrainingArguments

    from dclip.arguments import DataArguments, DistillationArguments, ModelArguments
    from dclip.pipeline import run

    rng = np.random.default_rng(0)
    colours = ["red", "blue", "green", "yellow"]
    for split, count, corrupt in (("train", 10_000, 100), ("test", 40, 0)):
        folder = tmp_path / "data" / split
        folder.mkdir(parents=True)
        broken = set(rng.choice(count, corrupt, replace=False).tolist())
        lines = []
        for index in range(count):
            colour = colours[index % 4]
            path = folder / f"{index:05d}.png"
            if index in broken:  # three kinds of unreadable file
                kind = index % 3
                path.write_bytes(b"" if kind == 0 else b"not an image" if kind == 1 else
                                 b"\x89PNG\r\n\x1a\n" + bytes(20))
            else:
                Image.new("RGB", (16, 16), colour).save(path)
            lines.append(json.dumps({"file_name": path.name, "caption": f"a {colour} square number {index % 7}"}))
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    training_args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=16, report_to=[],
                                      use_cpu=True, save_strategy="no", dataloader_num_workers=0, seed=0)
    summary = run(ModelArguments(student_model=str(tiny_clip_dir)),
                  DataArguments(dataset_name=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache")),
                  DistillationArguments(method="none", compare_methods="", distill_steps=2), training_args)
    assert summary["data"]["train"]["skipped"] == {"corrupt_image": 100}
    assert summary["data"]["train"]["rows"] == 9_900 and summary["training"]["distill"]["global_step"] == 2
    assert Path(summary["artefacts"]["student"], "model.safetensors").is_file()
