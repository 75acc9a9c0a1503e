"""The run's processor (`DCLIPProcessor`: image processor, tokenizer, detector, span extractor): built once per run,
saved in `<output_dir>/processor/` and read back by every later stage, process and resumed run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from transformers import CLIPImageProcessor

from ..arguments import DataArguments, ModelArguments
from .tokenizer import train_clip_tokenizer


def build_default_processor(data_args: DataArguments, scenes, detector_path: str | None = None):
    """A processor for the embedded data: a BPE tokenizer trained on its captions and a small-image CLIP processor."""
    from processing_dclip import DCLIPProcessor

    tokenizer = train_clip_tokenizer(scenes["train"]["caption"][:5000], vocab_size=data_args.vocab_size,
                                     model_max_length=40)
    size = data_args.image_size
    image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return DCLIPProcessor(image_processor, tokenizer, detector_path=detector_path, max_regions=4, max_spans=6)


def build_processor(model_args: ModelArguments, data_args: DataArguments, data, detector_path: str | None,
                    folder: Path):
    """
    The run's processor, saved once in `folder` and read back by every later stage, process and resumed run (its
    tokenizer and detector are not trained again): the student's own (tokenizer, image processor) when it starts from
    a checkpoint, else the embedded default's. A saved one made for another student or data set is rebuilt.
    """
    from processing_dclip import DCLIPProcessor

    source = {"student_model": model_args.student_model, "dataset_name": data_args.dataset_name,
              "image_size": data_args.image_size, "vocab_size": data_args.vocab_size}
    source_file = folder / "dclip_source.json"
    if source_file.is_file() and json.loads(source_file.read_text()) == source:
        processor = DCLIPProcessor.from_pretrained(folder)
        processor.set_detector(detector_path)
        return processor
    if model_args.student_model is None:
        processor = build_default_processor(data_args, data, detector_path)
    else:
        clip_processor = DCLIPProcessor.from_pretrained(model_args.student_model, trust_remote_code=False)
        processor = DCLIPProcessor(clip_processor.image_processor, clip_processor.tokenizer,
                                   detector_path=detector_path, max_regions=4, max_spans=6)
    saved = folder.with_name(folder.name + ".partial")
    shutil.rmtree(saved, ignore_errors=True)
    processor.save_pretrained(saved)
    (saved / "dclip_source.json").write_text(json.dumps(source))
    shutil.rmtree(folder, ignore_errors=True)
    saved.rename(folder)
    return processor


def check_teacher_fits(teacher, processor) -> None:
    """Refuse a teacher whose towers cannot read the student processor's images or token ids."""
    crop = processor.image_processor.crop_size or {}
    image_size = teacher.config.vision_config.image_size
    if crop and crop.get("height") != image_size:
        raise ValueError(f"the teacher's vision tower takes {image_size}px images but the student's processor makes "
                         f"{crop.get('height')}px ones: use a teacher and a student of the same input size.")
    if teacher.config.text_config.vocab_size < len(processor.tokenizer):
        raise ValueError(f"the teacher's text tower has {teacher.config.text_config.vocab_size} tokens but the "
                         f"student's tokenizer {len(processor.tokenizer)}: they must share a tokenizer.")
