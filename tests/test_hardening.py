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
AutoModel.from_pretrained(student, trust_remote_code=True)
for folder in (student, teacher):
    for processor in (DCLIPProcessor.from_pretrained(folder), AutoProcessor.from_pretrained(folder,
                                                                                           trust_remote_code=True)):
        out = processor(images=[Image.new("RGB", (40, 40), "red")], text=["a red circle"], return_regions=True)
        assert processor.region_extractor._detector is not None and out["region_boxes"].shape[0] == 1
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
