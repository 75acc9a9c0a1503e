"""Export a saved DCLIP student folder to a plain `transformers.CLIPModel` folder: the same weights as safetensors, a
plain `CLIPProcessor` (the student's own tokenizer and image processor, with `DCLIPProcessor`'s call defaults) and the
card with its plots, images and evaluation. No remote code, no `auto_map`, no detector or pickle files: the folder
loads wherever CLIP loads (`CLIPModel.from_pretrained`, `AutoModel`, the zero-shot pipeline) with nothing trusted.

What the plain processor cannot do that `DCLIPProcessor` does: regions and spans (the teacher's inputs, not the
student's), and `DCLIPProcessor`'s own image decoding (`to_rgb_image`): 16-bit images and float arrays are scaled to
8 bits there, while `CLIPImageProcessor` reads float arrays as already in `[0, 255]` (pass `do_rescale=False` for
arrays in `[0, 1]`) and 2-D numpy arrays not at all. PIL images of any mode, uint8 arrays, tensors and paths give
the same pixels; text gives the same tokens.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from .folders import write_whole


logger = logging.getLogger(__name__)

# Copied as they are from the student folder's top level: the card, its plots and images, its evaluation.
CARD_SUFFIXES = (".md", ".png", ".jpg", ".jpeg", ".gif", ".webp", ".svg")
CARD_FILES = ("eval_results.json", "LICENSE")
# Subfolders copied likewise, card files only: the card widget's images (`dclip.hub.WIDGET_FOLDER`).
CARD_FOLDERS = ("widget", "examples")
# pickles: never in an export or anything dclip publishes (`dclip.hub.upload_files` refuses them too)
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt")
# Never in an export: remote code, pickles (detector, training state).
FORBIDDEN_SUFFIXES = (".py", *PICKLE_SUFFIXES)
# A tokenizer reporting a longer limit has none (transformers' VERY_LARGE_INTEGER): `DCLIPProcessor` then does not
# truncate.
UNKNOWN_LENGTH_LIMIT = 100_000


def export_clip_folder(student_dir: str | Path, output_dir: str | Path, overwrite: bool = False,
                       repo_id: str | None = None) -> Path:
    """
    Write the DCLIP student saved in `student_dir` (a `DCLIPModel` folder with its `DCLIPProcessor`) as a plain
    `transformers.CLIPModel` folder in `output_dir`: `DCLIPModel.to_clip()` saved as safetensors, a `CLIPProcessor`
    made of the student's tokenizer and image processor (see `clip_processor`), and the card files (`README.md`,
    images, `eval_results.json`, `widget/`), its usage section rewritten for a plain CLIP (`plain_clip_card`, naming
    `repo_id`, default the output folder). Written whole or not at all (`dclip.folders.write_whole`).

    Raises `ValueError` when `student_dir` is not a DCLIP student (a teacher, a plain CLIP, no model at all) or lacks
    its processor, or when `output_dir` is the student folder or holds it; `FileExistsError` when `output_dir` exists
    and is not empty, unless `overwrite`. Returns `output_dir`.
    """
    from modeling_dclip import DCLIPModel

    student_dir, output_dir = Path(student_dir), Path(output_dir)
    check_student_folder(student_dir)
    _check_output_folder(student_dir, output_dir, overwrite)
    clip = DCLIPModel.from_pretrained(student_dir, dtype="auto").to_clip()  # in the dtype it was saved in
    copied: list[str] = []

    def write(partial: Path) -> None:
        clip.save_pretrained(partial)
        clip_processor(student_dir, clip.config).save_pretrained(partial)
        copied.extend(_copy_card_files(student_dir, partial))
        if (partial / "README.md").is_file():
            plain_clip_card(partial / "README.md", repo_id or str(output_dir.resolve()))
        _check_plain_clip_folder(partial)

    write_whole(output_dir, write)
    left_out = sorted(path.name for path in student_dir.iterdir() if path.suffix.lower() in FORBIDDEN_SUFFIXES)
    logger.info("exported %s to %s as a plain CLIPModel; card files copied: %s; left out: %s", student_dir, output_dir,
                ", ".join(copied) or "none", ", ".join(left_out) or "nothing")
    return output_dir


def check_student_folder(student_dir: Path) -> dict:
    """The config of the DCLIP student saved in `student_dir`; `ValueError` naming the folder when it is none, or when
    its processor (tokenizer, image processor) is missing."""
    config_file = student_dir / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{student_dir}: no config.json, not a saved model folder (expected a DCLIP student folder "
                         "written by DCLIPModel.save_pretrained).")
    config = json.loads(config_file.read_text())
    model_type = config.get("model_type")
    if model_type != "dclip":
        what = {"dclip_teacher": "a DCLIP teacher", "clip": "already a plain CLIP model"}.get(
            model_type, f"a model of type {model_type!r}")
        raise ValueError(f"{student_dir} holds {what}, not a DCLIP student (model_type 'dclip'): only a DCLIPModel "
                         "student exports to a plain CLIPModel folder.")
    missing = [name for name in ("tokenizer_config.json",) if not (student_dir / name).is_file()]
    if not any((student_dir / name).is_file() for name in ("processor_config.json", "preprocessor_config.json")):
        missing.append("processor_config.json (or preprocessor_config.json)")
    if missing:
        raise ValueError(f"{student_dir}: the student's processor is missing ({', '.join(missing)}); save its "
                         "DCLIPProcessor into the folder with processor.save_pretrained.")
    return config


def _check_output_folder(student_dir: Path, output_dir: Path, overwrite: bool) -> None:
    student, output = student_dir.resolve(), output_dir.resolve()
    if output == student:
        raise ValueError(f"output_dir {output_dir} is the student folder itself: export to another folder.")
    if output in student.parents:
        raise ValueError(f"output_dir {output_dir} holds the student folder {student_dir}: export to another folder.")
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())) and not overwrite:
        raise FileExistsError(f"output_dir {output_dir} exists and is not empty: pass overwrite=True to replace it.")


def clip_processor(student_dir: str | Path, config=None):
    """
    A plain `transformers.CLIPProcessor` made of the tokenizer and image processor saved in `student_dir`, loaded
    without remote code and without their `auto_map`, that gives the same `input_ids`, `attention_mask` and
    `pixel_values` as the student's `DCLIPProcessor` when called the same way. `DCLIPProcessor` pads to the longest
    text, truncates to the tokenizer's `model_max_length` and returns tensors unless told otherwise; a
    `CLIPProcessor` takes its defaults from its tokenizer's init kwargs (`ProcessorMixin._merge_kwargs`), so they are
    set there and saved in `tokenizer_config.json`. The tokenizer's own calls (e.g. in the zero-shot pipeline) keep
    their defaults. `config` (the export's `CLIPConfig`) spares `AutoTokenizer` reading the student's config.
    """
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPConfig, CLIPProcessor

    tokenizer = AutoTokenizer.from_pretrained(student_dir, config=config or CLIPConfig(), trust_remote_code=False)
    image_processor = AutoImageProcessor.from_pretrained(student_dir, trust_remote_code=False)
    for key in ("auto_map", "processor_class", "is_local", "local_files_only"):  # the student's, or loading state
        tokenizer.init_kwargs.pop(key, None)
    tokenizer.init_kwargs.update(dclip_processor_call_defaults(tokenizer))
    vars(image_processor).pop("auto_map", None)
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def dclip_processor_call_defaults(tokenizer) -> dict:
    """`DCLIPProcessor.__call__`'s text and tensor defaults for `tokenizer`, as `CLIPProcessor` call kwargs."""
    defaults = {"padding": True, "return_tensors": "pt"}
    limit = getattr(tokenizer, "model_max_length", None)
    if limit is not None and limit <= UNKNOWN_LENGTH_LIMIT:  # no limit: DCLIPProcessor does not truncate
        defaults["truncation"] = True  # to model_max_length, DCLIPProcessor's `max_length`
    return defaults


def _is_card_file(name: str) -> bool:
    return not name.startswith(".") and (name in CARD_FILES or name.lower().endswith(CARD_SUFFIXES))


def _copy_card_files(student_dir: Path, output_dir: Path) -> list[str]:
    """Copy the card, its images and evaluation (top level) and `examples/` card files; return what was copied."""
    copied = []
    for path in sorted(student_dir.iterdir()):
        if path.is_file() and _is_card_file(path.name):
            shutil.copy2(path, output_dir / path.name)
            copied.append(path.name)
        elif path.is_dir() and path.name in CARD_FOLDERS:
            for file in sorted(path.rglob("*")):
                if file.is_file() and _is_card_file(file.name):
                    target = output_dir / file.relative_to(student_dir)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(file, target)
                    copied.append(file.relative_to(student_dir).as_posix())
    return copied


def _check_plain_clip_folder(folder: Path) -> None:
    """Refuse (RuntimeError) an export that would still need or carry remote code or pickles."""
    config = json.loads((folder / "config.json").read_text())
    problems = [] if config.get("model_type") == "clip" else [f"model_type {config.get('model_type')!r}"]
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if path.suffix.lower() in FORBIDDEN_SUFFIXES:
            problems.append(name)
        elif path.suffix == ".json" and '"auto_map"' in path.read_text():  # at any depth
            problems.append(f"auto_map in {name}")
    if not any(path.suffix == ".safetensors" for path in folder.iterdir()):
        problems.append("no safetensors weights")
    if problems:
        raise RuntimeError(f"{folder}: the export is not a plain CLIP folder: {', '.join(problems)}")


PLAIN_CLIP_USAGE = """## Usage

A plain `transformers.CLIPModel` export of a dclip student: it loads with no remote code, and runs in the Hub's
widget and inference API and in the `zero-shot-image-classification` pipeline.

```python
from transformers import CLIPModel, CLIPProcessor, pipeline

model = CLIPModel.from_pretrained("{repo_id}")
processor = CLIPProcessor.from_pretrained("{repo_id}")
classifier = pipeline("zero-shot-image-classification", model="{repo_id}")
print(classifier("your_image.png", candidate_labels={labels}))
```

"""


def plain_clip_card(path: Path, repo_id: str) -> None:
    """Rewrite a student card's `## Usage` section (remote code, `to_clip()`) for the plain CLIP export; the metadata
    (model-index, widget), the evaluation and the recipe stay as they are."""
    import re

    text = path.read_text()
    start = text.find("## Usage")
    end = text.find("\n## ", start + 1)
    if start < 0 or end < 0:
        logger.warning("%s: no usage section to rewrite for the plain CLIP export", path)
        return
    found = re.search(r"^labels = (\[.*\])$", text[start:end], flags=re.M)
    usage = PLAIN_CLIP_USAGE.format(repo_id=repo_id, labels=found.group(1) if found else '["a cat", "a dog"]')
    path.write_text(text[:start] + usage + text[end + 1:])

