"""Teachers independent of the student: any CLIP-family dual encoder (`transformers` `CLIPModel`, `SiglipModel`, a
DCLIP student) or a DCLIP cross-modal teacher folder, each with its *own* processor (image size, normalisation,
tokenizer) and embedding width. `Teacher.inputs` prepares a batch of rows for it and `Teacher.embed` gives its
L2-normalised image and text embeddings, so the teacher never sees the student's pixels or token ids."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .columns import CAPTION, IMAGE


FUSION, DUAL_ENCODER = "dclip", "clip"  # the kinds of teacher: cross-modal fusion, or a plain dual encoder
TEACHER_KINDS = (FUSION, DUAL_ENCODER)


def model_type(name_or_path: str) -> str | None:
    """The `model_type` of a local or Hub checkpoint's config, without loading it (or its remote code)."""
    from transformers import PretrainedConfig

    return PretrainedConfig.get_config_dict(str(name_or_path))[0].get("model_type")


def pooled_features(output) -> torch.Tensor:
    """`get_*_features` of a DCLIP model returns a tensor; transformers 5's CLIP and SigLIP an output object."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@dataclass
class Teacher:
    """A loaded teacher: its model (in eval mode, no gradients), its own processor, its kind (`"dclip"`: fused
    embeddings from regions and spans, a `DCLIPTeacherModel`; `"clip"`: a dual encoder's own embeddings) and name."""

    model: torch.nn.Module
    processor: object
    kind: str
    name: str

    def __post_init__(self):
        if self.kind not in TEACHER_KINDS:
            raise ValueError(f"teacher kind must be one of {TEACHER_KINDS}, got {self.kind!r}")
        self.model.eval()  # `embed` runs without gradients

    @property
    def embed_dim(self) -> int:
        """The width of the teacher's embeddings (a DCLIP teacher's: the student's, its fusion projects there)."""
        config = self.model.config
        if self.kind == FUSION:
            return config.embed_dim or config.projection_dim
        return getattr(config, "projection_dim", None) or config.vision_config.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device) -> Teacher:
        self.model.to(device)
        return self

    def inputs(self, batch: dict, use_given_boxes: bool = True, use_given_spans: bool = True) -> dict:
        """The teacher's inputs for a batch of rows (`image`, `caption`, optional `boxes`, `spans`), made by its own
        processor: pixels at its image size and normalisation, token ids of its tokenizer (and, for a DCLIP
        teacher, its region crops and caption spans: `dclip.data.collator.teacher_inputs`)."""
        if self.kind == FUSION:
            from .data.collator import teacher_inputs

            return teacher_inputs(self.processor, batch, use_given_boxes, use_given_spans)
        return {"pixel_values": self.pixels(batch[IMAGE]), **self.tokenize(batch[CAPTION])}

    def pixels(self, images) -> torch.Tensor:
        """`pixel_values` of `images` by the teacher's own image processor (its size and normalisation)."""
        images = [image.convert("RGB") if hasattr(image, "convert") else image for image in images]
        return self.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]

    def tokenize(self, texts) -> dict[str, torch.Tensor]:
        """`input_ids` (and `attention_mask`) of `texts` by the teacher's own tokenizer, padded as the model was
        trained (SigLIP: to the maximum length, without a mask)."""
        siglip = "siglip" in (getattr(self.model.config, "model_type", "") or "")
        text = self.processor.tokenizer(list(texts), padding="max_length" if siglip else True, truncation=True,
                                        max_length=self._max_text_length(), return_tensors="pt")
        inputs = {"input_ids": text["input_ids"]}
        if "attention_mask" in text and not siglip:
            inputs["attention_mask"] = text["attention_mask"]
        return inputs

    def _max_text_length(self) -> int:
        positions = self.model.config.text_config.max_position_embeddings
        return min(positions, self.processor.tokenizer.model_max_length or positions)

    @torch.no_grad()
    def embed(self, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised `(image_embeds, text_embeds)`, `(batch, embed_dim)` each, of a batch of `inputs`."""
        device = self.device
        inputs = {name: value.to(device) for name, value in inputs.items()}
        if self.kind == FUSION:
            out = self.model(**inputs)
            return out.image_embeds, out.text_embeds
        image = pooled_features(self.model.get_image_features(pixel_values=inputs["pixel_values"]))
        text_inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
        text = pooled_features(self.model.get_text_features(**text_inputs))
        return torch.nn.functional.normalize(image, dim=-1), torch.nn.functional.normalize(text, dim=-1)


class DualEncoderProcessor:
    """A dual-encoder teacher's own processor as the evaluation calls one: `processor(images=...)` gives its
    `pixel_values`, `processor(text=...)` its padded token ids (`Teacher.pixels`, `Teacher.tokenize`)."""

    def __init__(self, teacher: Teacher):
        self.teacher = teacher

    def __call__(self, images=None, text=None) -> dict[str, torch.Tensor]:
        inputs = {"pixel_values": self.teacher.pixels(images)} if images is not None else {}
        return {**inputs, **(self.teacher.tokenize(text) if text is not None else {})}


def _has_dclip_processor(name_or_path: str) -> bool:
    """Whether a local folder's saved processor is a `DCLIPProcessor` (its `auto_map` names ours)."""
    path = Path(name_or_path) / "processor_config.json"
    if not path.is_file():
        return False
    auto_map = json.loads(path.read_text()).get("auto_map", {})
    return str(auto_map.get("AutoProcessor", "")).endswith("processing_dclip.DCLIPProcessor")


def load_teacher(name_or_path: str, kind: str | None = None, detector_path: str | None = None,
                 processor=None) -> Teacher:
    """
    A teacher from a local folder or Hub name, with its own processor (`processor` overrides it): a
    `DCLIPTeacherModel` folder (kind `"dclip"`; its saved processor and detector, or `detector_path`), or any CLIP-
    family dual encoder (kind `"clip"`): a DCLIP student, or whatever `AutoModel` loads with `get_image_features` /
    `get_text_features` (`CLIPModel`, `SiglipModel`, ...) and `AutoProcessor` gives a processor for.
    """
    from transformers import AutoModel, AutoProcessor

    from modeling_dclip import DCLIPModel, DCLIPTeacherModel
    from processing_dclip import DCLIPProcessor

    found = model_type(name_or_path)
    if found == "dclip_teacher":
        if kind not in (None, FUSION):
            raise ValueError(f"{name_or_path} is a DCLIP cross-modal teacher: its kind is {FUSION!r}, not {kind!r}")
        model = DCLIPTeacherModel.from_pretrained(name_or_path)
        processor = processor or DCLIPProcessor.from_pretrained(name_or_path, trust_remote_code=False)
        if detector_path is not None:
            processor.set_detector(detector_path)
        return Teacher(model, processor, FUSION, str(name_or_path))
    if kind == FUSION:
        raise ValueError(f"{name_or_path} ({found}) is a dual encoder, not a DCLIP teacher folder: train a fusion "
                         "block on its towers (the `teacher` stage) or use it with --teacher_kind clip")
    if found == "dclip":
        model = DCLIPModel.from_pretrained(name_or_path)
    else:
        model = AutoModel.from_pretrained(name_or_path)
    if processor is None and (found == "dclip" or _has_dclip_processor(name_or_path)):
        # this package's own processor (a base CLIP saved by the pipeline): no remote code to trust
        processor = DCLIPProcessor.from_pretrained(name_or_path, trust_remote_code=False)
    processor = processor or AutoProcessor.from_pretrained(name_or_path)
    for method in ("get_image_features", "get_text_features"):
        if not hasattr(model, method):
            raise ValueError(f"{name_or_path} ({type(model).__name__}) has no `{method}`: a teacher must be a "
                             "CLIP-family dual encoder or a DCLIP teacher folder")
    if not (hasattr(processor, "image_processor") and hasattr(processor, "tokenizer")):
        raise ValueError(f"{name_or_path}: its processor ({type(processor).__name__}) needs an image processor and a "
                         "tokenizer")
    return Teacher(model, processor, DUAL_ENCODER, str(name_or_path))


def as_teacher(teacher, processor=None) -> Teacher:
    """`teacher` if it is a `Teacher`, else a model with the `processor` it reads, as one (a `DCLIPTeacherModel` is
    of kind `"dclip"`, anything else a dual encoder)."""
    if isinstance(teacher, Teacher):
        if processor is not None and processor is not teacher.processor:
            raise ValueError("a `Teacher` brings its own processor: pass no other")
        return teacher
    if processor is None:
        raise ValueError("a teacher model needs the processor that makes its inputs")
    fusion = type(teacher).__name__ == "DCLIPTeacherModel"
    name = getattr(getattr(teacher, "config", None), "_name_or_path", "") or type(teacher).__name__
    return Teacher(teacher, processor, FUSION if fusion else DUAL_ENCODER, name)
