"""Save with `save_pretrained`, then load with the Auto classes in a fresh process where this repo is not importable."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import BLOCK_REPO_IMPORTS, REPO_ROOT, random_images
from transformers import pipeline

from modeling_dclip import DCLIPModel, DCLIPTeacherModel


REMOTE_FILES = {"configuration_dclip.py", "modeling_dclip.py", "processing_dclip.py"}

# Runs in the fresh process: repo modules are blocked, so only the copies next to the weights can be used.
LOADER = BLOCK_REPO_IMPORTS + textwrap.dedent(
    """
    import torch
    from PIL import Image
    from transformers import AutoConfig, AutoModel, AutoProcessor, pipeline

    student_dir, teacher_dir, work = sys.argv[1:4]
    raw = torch.load(f"{work}/raw.pt")
    images = [Image.open(f"{work}/image{i}.png") for i in range(raw["num_images"])]
    results = {}
    for name, folder in (("student", student_dir), ("teacher", teacher_dir)):
        config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
        model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        assert type(processor).__module__.startswith("transformers_modules."), type(processor).__module__
        inputs = processor(
            text=raw["texts"], images=images, return_regions=True, return_spans=True, region_boxes=raw["boxes"]
        )
        results[name + "_config"] = type(config).__name__
        results[name + "_class"] = type(model).__name__
        results[name + "_inputs"] = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        with torch.no_grad():
            if name == "student":
                out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                            pixel_values=inputs["pixel_values"])
                results["student_logits"] = out.logits_per_image
                classifier = pipeline("zero-shot-image-classification", model=folder, trust_remote_code=True)
                results["pipeline"] = classifier(images[0], candidate_labels=raw["labels"])
            else:
                inputs.pop("region_source")
                out = model(**inputs)
                results["teacher_image_embeds"] = out.image_embeds
                results["teacher_text_embeds"] = out.text_embeds
    torch.save(results, f"{work}/results.pt")
    """
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_clip, processor):
    root = tmp_path_factory.mktemp("remote")
    student = DCLIPModel.from_clip(tiny_clip, distillation_method="dclip").eval()
    torch.manual_seed(0)
    teacher = DCLIPTeacherModel.from_clip(
        tiny_clip, fusion_hidden_size=32, fusion_num_heads=4, max_regions=4, max_spans=4
    ).eval()
    with torch.no_grad():  # make the fusion residual visible in the outputs
        teacher.image_output_projection.weight.normal_(std=0.2)
        teacher.text_output_projection.weight.normal_(std=0.2)
    for name, model in (("student", student), ("teacher", teacher)):
        model.save_pretrained(root / name)
        processor.save_pretrained(root / name)
    images = random_images(2, seed=3)
    for index, image in enumerate(images):
        image.save(root / f"image{index}.png")
    raw = {
        "texts": ["a small red circle to the left of two blue squares", "a purple square"],
        "boxes": [[[0.1, 0.1, 0.6, 0.5], [0.5, 0.2, 0.9, 0.9]], [[0.0, 0.0, 1.0, 1.0]]],
        "labels": ["circle", "square", "star"],
        "num_images": len(images),
    }
    torch.save(raw, root / "raw.pt")
    return root, student, teacher, raw, images


def test_saved_folders_carry_the_remote_code(saved):
    root = saved[0]
    for name, class_name in (("student", "DCLIPModel"), ("teacher", "DCLIPTeacherModel")):
        files = set(os.listdir(root / name))
        assert REMOTE_FILES <= files, files
        assert "model.safetensors" in files
        config = json.loads((root / name / "config.json").read_text())
        assert config["auto_map"]["AutoModel"] == f"modeling_dclip.{class_name}"
        assert config["auto_map"]["AutoConfig"].startswith("configuration_dclip.")
    student_config = json.loads((root / "student" / "config.json").read_text())
    assert student_config["auto_map"]["AutoModelForZeroShotImageClassification"] == "modeling_dclip.DCLIPModel"
    assert student_config["distillation_method"] == "dclip"


def test_fresh_process_loads_identical_models_and_processor(saved, processor):
    root, student, teacher, raw, images = saved
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(root / "modules")
    env["HF_HUB_OFFLINE"] = "1"
    completed = subprocess.run(
        [sys.executable, "-c", LOADER, str(root / "student"), str(root / "teacher"), str(root)],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = torch.load(root / "results.pt", weights_only=False)
    assert results["student_class"] == "DCLIPModel" and results["student_config"] == "DCLIPConfig"
    assert results["teacher_class"] == "DCLIPTeacherModel" and results["teacher_config"] == "DCLIPTeacherConfig"

    inputs = processor(
        text=raw["texts"], images=images, return_regions=True, return_spans=True, region_boxes=raw["boxes"]
    )
    for name in ("student", "teacher"):
        for key, value in results[f"{name}_inputs"].items():
            torch.testing.assert_close(value, inputs[key], atol=0, rtol=0, msg=f"{name} processor: {key}")
    with torch.no_grad():
        student_logits = student(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], pixel_values=inputs["pixel_values"]
        ).logits_per_image
        inputs.pop("region_source")
        teacher_out = teacher(**inputs)
    torch.testing.assert_close(results["student_logits"], student_logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(results["teacher_image_embeds"], teacher_out.image_embeds, atol=1e-6, rtol=0)
    torch.testing.assert_close(results["teacher_text_embeds"], teacher_out.text_embeds, atol=1e-6, rtol=0)
    assert (teacher_out.image_embeds - teacher_out.global_image_embeds).abs().max() > 1e-3  # fusion weights count

    local = pipeline(
        "zero-shot-image-classification", model=student, tokenizer=processor.tokenizer,
        image_processor=processor.image_processor,
    )(images[0], candidate_labels=raw["labels"])
    assert {r["label"]: round(r["score"], 6) for r in results["pipeline"]} == {
        r["label"]: round(r["score"], 6) for r in local
    }


# ----- the transformers version the remote code needs --------------------------------------------------------------

REMOTE_MODULES = ("configuration_dclip", "modeling_dclip", "processing_dclip")


def old_transformers_message(found: str) -> str:
    return f"dclip's remote code needs transformers>=5.0.0, found {found}: pip install -U transformers"


def test_remote_code_checks_the_transformers_version_at_import():
    """Each file, imported as a top-level module (a checkout or an install), under a patched transformers version."""
    code = textwrap.dedent(
        """
        import importlib, json, sys
        import transformers

        real = transformers.__version__
        results = {}
        for found in ("4.57.1", "4.99.0", "5.0.0.dev0", "5.0.0rc1", "5.0.0", real):
            for name in MODULES:
                for loaded in MODULES:
                    sys.modules.pop(loaded, None)
                # the module the next `import transformers` gets: some imports put a new one in sys.modules
                sys.modules["transformers"].__version__ = found
                try:
                    importlib.import_module(name)
                    results[f"{found} {name}"] = "imported"
                except ImportError as error:
                    results[f"{found} {name}"] = str(error)
        print(json.dumps({"real": real, "results": results}))
        """
    ).replace("MODULES", repr(REMOTE_MODULES))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO_ROOT,
                               timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    for found in ("4.57.1", "4.99.0"):
        for name in REMOTE_MODULES:
            assert report["results"][f"{found} {name}"] == old_transformers_message(found), name
    for found in ("5.0.0.dev0", "5.0.0rc1", "5.0.0", report["real"]):  # pre-releases of 5.0.0 count as 5.0.0
        for name in REMOTE_MODULES:
            assert report["results"][f"{found} {name}"] == "imported", (found, name)


def test_minimum_transformers_version_matches_the_install_requirement():
    import configparser

    from packaging.requirements import Requirement
    from packaging.version import Version

    from configuration_dclip import MIN_TRANSFORMERS_VERSION

    setup = configparser.ConfigParser()
    setup.read(REPO_ROOT / "setup.cfg")
    requirements = [Requirement(line) for line in setup["options"]["install_requires"].splitlines()
                    if line.strip() and not line.strip().startswith("#")]
    (transformers,) = [r for r in requirements if r.name == "transformers"]
    (minimum,) = [Version(spec.version) for spec in transformers.specifier if spec.operator == ">="]
    assert minimum == Version(MIN_TRANSFORMERS_VERSION)


def test_hub_loading_under_old_transformers_says_which_version_it_needs(saved):
    """The saved folder loaded as Hub remote code (the repo blocked) under a patched transformers version: every
    entry point ends in the version error, not in a missing module or a failure inside transformers."""
    root = saved[0]
    code = BLOCK_REPO_IMPORTS + textwrap.dedent(
        """
        import json
        import transformers
        from transformers import AutoConfig, AutoModel, AutoProcessor
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        folder = sys.argv[1]
        entry_points = {
            "AutoConfig": lambda: AutoConfig.from_pretrained(folder, trust_remote_code=True),
            "AutoModel": lambda: AutoModel.from_pretrained(folder, trust_remote_code=True),
            "AutoProcessor": lambda: AutoProcessor.from_pretrained(folder, trust_remote_code=True),
            "modeling_dclip": lambda: get_class_from_dynamic_module("modeling_dclip.DCLIPModel", folder),
            "processing_dclip": lambda: get_class_from_dynamic_module("processing_dclip.DCLIPProcessor", folder),
        }
        results = {}
        for name, load in entry_points.items():
            for module in [m for m in sys.modules if m.endswith("_dclip")]:  # a failed import leaves a husk
                del sys.modules[module]
            # the module the remote code's `import transformers` gets: some imports put a new one in sys.modules
            sys.modules["transformers"].__version__ = "4.57.1"
            try:
                load()
                results[name] = "loaded"
            except ImportError as error:
                results[name] = str(error)
        print(json.dumps(results))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(root / "modules-old-transformers")
    env["HF_HUB_OFFLINE"] = "1"
    completed = subprocess.run([sys.executable, "-c", code, str(root / "student")], cwd=root, env=env,
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads(completed.stdout.strip().splitlines()[-1])
    assert results == {name: old_transformers_message("4.57.1") for name in results}, results
    assert len(results) == 5
