"""DCLIP processor: CLIP image processor + tokenizer, plus YOLO region extraction and caption span extraction.

Hub remote code: this file travels next to the weights, so it imports only numpy, PIL, torch, transformers and its
sibling `configuration_dclip` (which checks the transformers version); `ultralytics` (and `safetensors`, a
transformers dependency) is imported only when a detector is first used, without ultralytics' process-wide side
effects (`import_yolo`); the detector's yaml is read and written with ultralytics' own `YAML`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image


# First, before anything of transformers: importing the configuration checks the transformers version.
try:
    from .configuration_dclip import MIN_TRANSFORMERS_VERSION  # noqa: F401
except ImportError:
    if __package__:  # Hub remote code: the sibling is there, so this is its own error (e.g. the version check)
        raise
    from configuration_dclip import MIN_TRANSFORMERS_VERSION  # noqa: F401 (a checkout or an install)

from transformers import BatchFeature
from transformers.processing_utils import ProcessorMixin
from transformers.utils import logging


logger = logging.get_logger(__name__)

# A saved processor's detector: its weights as safetensors and the architecture that rebuilds it offline (no pickle)
DETECTOR_WEIGHTS_NAME = "detector.safetensors"
DETECTOR_CONFIG_NAME = "detector.yaml"
ULTRALYTICS_IMPORT_ENVIRONMENT = {
    "WORLD_SIZE": "1",  # ultralytics reads the launch at import and would pair its own barriers with ours
    "YOLO_AUTOINSTALL": "false",  # never `pip install` anything (e.g. pi-heif on an undecodable image)
    "YOLO_OFFLINE": "true",  # no DNS probe at import
}

# Word sequences that separate noun phrases in a caption (longest first when matched).
DEFAULT_SPAN_BOUNDARIES = (
    "to the left of", "to the right of", "on the left of", "on the right of", "in front of", "on top of",
    "at the top of", "at the bottom of", "next to", "left of", "right of", "above", "below", "under", "over",
    "beneath", "beside", "near", "behind", "between", "among", "on", "in", "at", "of", "with", "by", "and", "or",
    "but", "while", "which", "that", "there", "is", "are", "was", "were", "has", "have", "sits", "sit", "stands",
    "stand", "lies", "lie", "appears", "appear", "shows", "show", "showing", "containing", "contains",
)
DEFAULT_SPAN_STOPWORDS = ("a", "an", "the", "this", "these", "those", "some", "it", "its", "image", "picture", "photo")


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """Scale an integer or float image array of any range to uint8."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.floating):
        finite = np.nan_to_num(array.astype(np.float64))
        high = 1.0 if finite.size == 0 or finite.max() <= 1.0 else 255.0
        return (np.clip(finite / high, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    high = np.iinfo(array.dtype).max
    if array.size and array.max() <= 255:  # stored wide but holding 8-bit values
        high = 255
    return (array.astype(np.float64) / high * 255.0 + 0.5).astype(np.uint8)


def to_rgb_image(image, name: str = "image") -> Image.Image:
    """
    An RGB `PIL.Image` from a path, a PIL image (any mode: grayscale, RGBA, palette, 16-bit, float), a numpy array or a
    tensor (`HWC` or `CHW`). Transparent pixels are composited on white. Raises `ValueError` naming `name` when the
    file cannot be read or decoded, or when the image is empty.
    """
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        try:
            with Image.open(path) as opened:
                opened.load()
                image = opened.copy()
        except FileNotFoundError:
            raise ValueError(f"{name}: file '{path}' does not exist.") from None
        except (OSError, SyntaxError, Image.DecompressionBombError) as error:
            raise ValueError(f"{name}: cannot decode image file '{path}' ({error}).") from None
    elif isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        array = image
        if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
            array = np.moveaxis(array, 0, -1)  # CHW -> HWC
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
            raise ValueError(f"{name}: expected an array of shape (H, W), (H, W, 3|4) or (3|4, H, W), "
                             f"got {array.shape}.")
        image = Image.fromarray(_to_uint8(array))
    if not isinstance(image, Image.Image):
        raise TypeError(f"{name}: expected a path, PIL image, numpy array or tensor, got {type(image).__name__}.")
    if image.width < 1 or image.height < 1:
        raise ValueError(f"{name}: image has no pixels (size {image.width}x{image.height}).")
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return to_rgb_image(np.asarray(image), name)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


class SpanExtractor:
    """
    Splits a caption into text spans: noun phrases with their attributes ("a small red circle"). Rule-based and
    deterministic, no downloads: the caption is cut at relation words, prepositions, conjunctions and punctuation
    (`boundaries`), and each remaining piece with at least one non-stop-word is a span.
    """

    def __init__(
        self,
        max_spans: int = 8,
        boundaries: tuple[str, ...] | list[str] = DEFAULT_SPAN_BOUNDARIES,
        stopwords: tuple[str, ...] | list[str] = DEFAULT_SPAN_STOPWORDS,
        max_span_words: int = 8,
    ):
        if max_spans < 0:
            raise ValueError(f"`max_spans` must be >= 0, got {max_spans}.")
        self.max_spans = max_spans
        self.max_span_words = max_span_words
        self.stopwords = frozenset(stopwords)
        phrases = sorted({tuple(b.lower().split()) for b in boundaries}, key=len, reverse=True)
        self._boundaries = phrases

    def __call__(self, caption: str) -> list[str]:
        if not isinstance(caption, str):
            raise TypeError(f"caption must be a string, got {type(caption).__name__}.")
        words = re.findall(r"[a-z0-9]+(?:['-][a-z0-9]+)*|[^\sa-z0-9]", caption.lower())
        spans, current, position = [], [], 0
        while position < len(words) and len(spans) < self.max_spans:
            matched = next(
                (len(p) for p in self._boundaries if tuple(words[position : position + len(p)]) == p), 0
            )
            word = words[position]
            is_punctuation = not re.match(r"[a-z0-9]", word)
            if matched or is_punctuation:
                self._close(current, spans)
                current = []
                position += max(matched, 1)
                continue
            current.append(word)
            position += 1
        self._close(current, spans)
        return spans[: self.max_spans]

    def _close(self, words: list[str], spans: list[str]) -> None:
        if any(w not in self.stopwords for w in words) and len(spans) < self.max_spans:
            spans.append(" ".join(words[: self.max_span_words]))


@dataclass
class Regions:
    """Regions of one image: normalised `(x1, y1, x2, y2)` boxes, scores, and where they came from."""

    boxes: np.ndarray  # (regions, 4), in [0, 1]
    scores: np.ndarray  # (regions,)
    source: str  # "detector", "whole_image:no_detector", "whole_image:no_detection", "given"
    class_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


class keep_torch_threads:  # noqa: N801 (used as a context manager, like torch.no_grad)
    """Restore torch's thread count afterwards: ultralytics sets it to `cpu_count - 1` whenever it picks a device,
    which would leave the rest of a CPU run on one core fewer (half the cores on a 2-core machine)."""

    def __enter__(self) -> None:
        self.threads = torch.get_num_threads()

    def __exit__(self, *exc_info) -> None:
        torch.set_num_threads(self.threads)


def import_yolo():
    """
    ultralytics' `YOLO` class, imported without its process-wide side effects: ultralytics patches `PIL.Image.open`
    at import (an undecodable image then makes it try to `pip install pi-heif`), turns on run-time installs, probes
    the network and reads the distributed launch. Here the import runs with `ULTRALYTICS_IMPORT_ENVIRONMENT` (the
    process's environment is restored afterwards), `PIL.Image.open` is put back as it was, and run-time installs stay
    off for the life of the process.
    """
    return _import_ultralytics()[0]


def ultralytics_yaml():
    """ultralytics' own YAML reader and writer (`ultralytics.utils.YAML`), imported as [`import_yolo`] imports it."""
    return _import_ultralytics()[1].YAML


def _import_ultralytics():
    """`(YOLO, ultralytics.utils)`, imported as [`import_yolo`] says."""
    opener = Image.open
    saved = {name: os.environ.get(name) for name in ULTRALYTICS_IMPORT_ENVIRONMENT}
    os.environ.update(ULTRALYTICS_IMPORT_ENVIRONMENT)
    # Every ultralytics import of this file sits in this `try`: transformers' remote-code check (`check_imports`)
    # imports each package a remote file imports outside a `try`, which would import ultralytics plainly, with its
    # side effects, at every `AutoProcessor.from_pretrained(..., trust_remote_code=True)`, and require it installed.
    try:
        import ultralytics.utils as utils
        import ultralytics.utils.checks as checks
        import ultralytics.utils.patches as patches
        from ultralytics import YOLO
    except ImportError as error:
        raise ImportError("Region detection needs `ultralytics`: pip install ultralytics") from error
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    utils.AUTOINSTALL = checks.AUTOINSTALL = False
    if Image.open is patches.image_open:  # patched at its import, now or before us (then `opener` was the patch)
        Image.open = patches._image_open if opener is patches.image_open else opener
    return YOLO, utils


def detector_config_path(weights: str | os.PathLike) -> Path:
    """The architecture file that travels with detector weights: `detector.yaml` beside `detector.safetensors`."""
    return Path(weights).with_suffix(".yaml")


def load_detector(path: str):
    """A YOLO detector from `path`: `detector.safetensors` with its `detector.yaml` beside it (read with no pickle),
    or an ultralytics `.pt` checkpoint (a pickle: only paths you trust)."""
    YOLO = import_yolo()  # noqa: N806 - a class
    if not str(path).endswith(".safetensors"):
        return YOLO(str(path), task="detect")
    from safetensors.torch import load_file

    config = detector_config_path(path)
    if not config.is_file():
        raise FileNotFoundError(f"Detector weights '{path}' need their architecture '{config}' beside them.")
    settings = ultralytics_yaml().load(config)
    detector = YOLO(str(config), task="detect")
    missing, unexpected = detector.model.load_state_dict(load_file(str(path)), strict=False)
    if missing or unexpected:
        raise ValueError(f"Detector weights '{path}' do not fit '{config}': missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}")
    detector.model.names = {int(key): value for key, value in (settings.get("names") or {}).items()}
    detector.model.eval()
    # what a checkpoint would have told ultralytics' predictor: the image size it was trained at (else 640 px)
    detector.overrides.update(settings.get("predict_overrides") or {})
    return detector


def save_detector(detector_path: str, folder: str) -> str:
    """Write the detector at `detector_path` (safetensors + yaml, or an ultralytics `.pt`, converted) into `folder`
    as `detector.safetensors` and `detector.yaml`: the weights as float tensors, the architecture resolved to one
    scale, the class names and the image size it was trained at. Returns the weights' file name."""
    if str(detector_path).endswith(".safetensors"):  # already in this form: the two files as they are
        for source, name in ((detector_path, DETECTOR_WEIGHTS_NAME),
                             (detector_config_path(detector_path), DETECTOR_CONFIG_NAME)):
            Path(folder, name).write_bytes(Path(source).read_bytes())  # a few MB each
        return DETECTOR_WEIGHTS_NAME
    from safetensors.torch import save_file

    detector = load_detector(detector_path)

    model = detector.model
    architecture = dict(model.yaml)
    scales = architecture.pop("scales", None)
    if scales:  # one scale, spelled out: ultralytics guesses a scale from a yaml's file name otherwise
        scale = architecture.get("scale") or next(iter(scales))
        architecture["depth_multiple"], architecture["width_multiple"], architecture["max_channels"] = scales[scale]
    architecture.pop("scale", None)
    architecture.pop("yaml_file", None)
    architecture["names"] = {int(key): str(value) for key, value in dict(model.names).items()}
    architecture["predict_overrides"] = {key: detector.overrides[key] for key in ("imgsz", "single_cls")
                                         if detector.overrides.get(key) is not None}
    state = {name: tensor.detach().float().contiguous() if tensor.is_floating_point() else tensor.contiguous()
             for name, tensor in model.state_dict().items()}
    save_file(state, os.path.join(folder, DETECTOR_WEIGHTS_NAME), metadata={"format": "pt", "library": "ultralytics"})
    ultralytics_yaml().save(os.path.join(folder, DETECTOR_CONFIG_NAME), architecture)
    return DETECTOR_WEIGHTS_NAME


class RegionExtractor:
    """
    Image regions from an ultralytics YOLO detector given by path: top `max_regions` boxes by confidence after NMS,
    at least `min_region_size` (fraction of the shorter image side) wide and high. With no detector, or no detection,
    the whole image is the one region, and `Regions.source` says so. The detector is loaded on first use.

    A saved processor's detector is `detector.safetensors` + `detector.yaml`, loaded with no pickle; an ultralytics
    `.pt` checkpoint is accepted too (a pickle: only give paths you trust) and converted when the processor is saved.
    """

    def __init__(
        self,
        detector_path: str | None = None,
        max_regions: int = 8,
        confidence_threshold: float = 0.25,
        iou_threshold: float = 0.7,
        min_region_size: float = 0.05,
        detector_image_size: int | None = None,
        device: str | None = None,
    ):
        if max_regions < 1:
            raise ValueError(f"`max_regions` must be >= 1, got {max_regions}.")
        self.detector_path = detector_path
        self.max_regions = max_regions
        self.confidence_threshold = confidence_threshold
        self.iou_threshold = iou_threshold
        self.min_region_size = min_region_size
        self.detector_image_size = detector_image_size
        self.device = device
        self._detector = None

    def __deepcopy__(self, memo):
        # The loaded detector is a cache, not state: a copy reloads it lazily.
        copy = RegionExtractor.__new__(RegionExtractor)
        copy.__dict__.update({**self.__dict__, "_detector": None})
        return copy

    @property
    def detector(self):
        if self._detector is None and self.detector_path is not None:
            if not os.path.isfile(self.detector_path):
                raise FileNotFoundError(f"Detector weights '{self.detector_path}' not found.")
            self._detector = load_detector(self.detector_path)
        return self._detector

    def __call__(self, images: list[Image.Image]) -> list[Regions]:
        whole = np.array([[0.0, 0.0, 1.0, 1.0]], dtype=np.float32)
        if self.detector is None:
            return [Regions(whole, np.ones(1, np.float32), "whole_image:no_detector") for _ in images]
        # class-agnostic NMS: a region is a region, whichever class the detector gives it
        kwargs = {"conf": self.confidence_threshold, "iou": self.iou_threshold, "max_det": self.max_regions,
                  "agnostic_nms": True}
        if self.detector_image_size:
            kwargs["imgsz"] = self.detector_image_size
        if self.device:
            kwargs["device"] = self.device
        # ultralytics reads numpy arrays as BGR
        with keep_torch_threads():
            predictions = self.detector.predict([np.asarray(im)[..., ::-1] for im in images], verbose=False, **kwargs)
        results = []
        for image, prediction in zip(images, predictions):
            boxes = prediction.boxes.xyxy.cpu().numpy().astype(np.float32)
            scores = prediction.boxes.conf.cpu().numpy().astype(np.float32)
            class_ids = prediction.boxes.cls.cpu().numpy().astype(np.int64)
            side = self.min_region_size * min(image.width, image.height)
            keep = ((boxes[:, 2] - boxes[:, 0]) >= side) & ((boxes[:, 3] - boxes[:, 1]) >= side)
            order = np.argsort(-scores[keep], kind="stable")[: self.max_regions]
            boxes, scores, class_ids = boxes[keep][order], scores[keep][order], class_ids[keep][order]
            if len(boxes) == 0:
                results.append(Regions(whole, np.ones(1, np.float32), "whole_image:no_detection"))
                continue
            scale = np.array([image.width, image.height, image.width, image.height], dtype=np.float32)
            results.append(Regions(np.clip(boxes / scale, 0.0, 1.0), scores, "detector", class_ids))
        return results


def crop_region(image: Image.Image, box: np.ndarray) -> Image.Image:
    """Crop a normalised `(x1, y1, x2, y2)` box from an image, at least one pixel wide and high."""
    x1, y1, x2, y2 = (float(v) for v in box)
    left = min(int(np.floor(x1 * image.width)), image.width - 1)
    top = min(int(np.floor(y1 * image.height)), image.height - 1)
    right = max(int(np.ceil(x2 * image.width)), left + 1)
    bottom = max(int(np.ceil(y2 * image.height)), top + 1)
    return image.crop((left, top, right, bottom))


_ARGUMENT_ORDER = (
    "DCLIPProcessor takes `images` first, then `text`, as transformers 5 processors do: pass captions as `text=` "
    "(e.g. `processor(images=images, text=captions)`)."
)


def _is_text(value) -> bool:
    """A string, or a non-empty list or tuple of strings only."""
    if isinstance(value, str):
        return True
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(isinstance(item, str) for item in value)


def _check_not_captions(images, text) -> None:
    """Refuse captions given as `images` (the argument order before transformers 5): strings in `images` must be
    image files, and `text` must not hold the images."""
    if not _is_text(images):
        return
    if text is not None and not _is_text(text):
        raise ValueError(f"`images` holds strings and `text` does not: the arguments look swapped. {_ARGUMENT_ORDER}")
    for index, path in enumerate([images] if isinstance(images, str) else images):
        if not os.path.exists(path):
            raise ValueError(
                f"images[{index}]: file '{path}' does not exist. Strings in `images` are image file paths; "
                f"{_ARGUMENT_ORDER}"
            )


class DCLIPProcessor(ProcessorMixin):
    r"""
    Prepares inputs for [`DCLIPModel`] (like `CLIPProcessor`) and [`DCLIPTeacherModel`] (regions and spans too).

    Args:
        image_processor (`CLIPImageProcessor`): resizes and normalises images and region crops.
        tokenizer (`CLIPTokenizer` or any tokenizer): tokenises captions and spans.
        detector_path (`str`, *optional*): YOLO weights for region extraction (`detector.safetensors` with its
            `detector.yaml`, or an ultralytics `.pt`); saved next to the processor as `detector.safetensors` +
            `detector.yaml`. Without it, the whole image is the one region.
        max_regions (`int`, defaults to 8), detector_confidence (`float`, defaults to 0.25), detector_iou (`float`,
            defaults to 0.7), min_region_size (`float`, defaults to 0.05), detector_image_size (`int`, *optional*):
            see [`RegionExtractor`].
        max_spans (`int`, defaults to 8), max_span_length (`int`, defaults to 16): spans per caption and tokens per
            span.
        span_boundaries (`list[str]`, *optional*): words that separate spans, see [`SpanExtractor`].
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        detector_path: str | None = None,
        max_regions: int = 8,
        detector_confidence: float = 0.25,
        detector_iou: float = 0.7,
        min_region_size: float = 0.05,
        detector_image_size: int | None = None,
        max_spans: int = 8,
        max_span_length: int = 16,
        span_boundaries: list[str] | None = None,
        **kwargs,
    ):
        super().__init__(image_processor, tokenizer, **kwargs)
        self.detector_path = detector_path
        self.max_regions = max_regions
        self.detector_confidence = detector_confidence
        self.detector_iou = detector_iou
        self.min_region_size = min_region_size
        self.detector_image_size = detector_image_size
        self.max_spans = max_spans
        self.max_span_length = max_span_length
        self.span_boundaries = list(span_boundaries) if span_boundaries is not None else None
        self.set_detector(detector_path)
        self.span_extractor = SpanExtractor(
            max_spans, tuple(span_boundaries) if span_boundaries is not None else DEFAULT_SPAN_BOUNDARIES
        )

    # ----- saving and loading ------------------------------------------------------------------------------------

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """Save as `ProcessorMixin` does, with the detector (if any) beside it as `detector.safetensors` and
        `detector.yaml` (an ultralytics `.pt` is converted: nothing saved is a pickle). The
        tokenizer is saved without the truncation and padding its last call left set on the fast backend (which
        `tokenizer.json` would otherwise keep, and every later load apply, e.g. a span's short `max_length`)."""
        os.makedirs(save_directory, exist_ok=True)
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:  # each call sets both again: clearing them changes no later call
            backend.no_truncation()
            backend.no_padding()
        original_path = self.detector_path
        if original_path is not None:
            if not os.path.isfile(original_path):
                raise FileNotFoundError(f"Detector weights '{original_path}' not found; cannot save the processor.")
            target = os.path.join(save_directory, DETECTOR_WEIGHTS_NAME)
            if os.path.abspath(original_path) != os.path.abspath(target):
                save_detector(original_path, save_directory)
            self.detector_path = DETECTOR_WEIGHTS_NAME  # stored relative to the folder
        try:
            return super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        finally:
            self.detector_path = original_path

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        processor = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        path = processor.detector_path
        if path is not None and not os.path.isabs(path):
            local = Path(pretrained_model_name_or_path) / path
            if local.is_file():
                resolved = str(local)
            else:
                from transformers.utils import cached_file

                hub_kwargs = {
                    k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only") if k in kwargs
                }
                resolved = cached_file(pretrained_model_name_or_path, path, **hub_kwargs)
                if path.endswith(".safetensors"):  # its architecture, into the same cached snapshot
                    cached_file(pretrained_model_name_or_path, detector_config_path(path).as_posix(), **hub_kwargs)
            processor.set_detector(resolved)
        return processor

    def set_detector(self, detector_path: str | None) -> None:
        """Use other detector weights (or none)."""
        self.detector_path = detector_path
        self.region_extractor = RegionExtractor(
            detector_path, self.max_regions, self.detector_confidence, self.detector_iou, self.min_region_size,
            self.detector_image_size,
        )

    # ----- processing --------------------------------------------------------------------------------------------

    def __call__(
        self,
        images=None,
        text: str | list[str] | None = None,
        *,
        return_regions: bool = False,
        return_spans: bool = False,
        spans: list[list[str]] | None = None,
        region_boxes: list | None = None,
        return_tensors: str | None = "pt",
        padding: bool | str = True,
        truncation: bool = True,
        max_length: int | None = None,
        **kwargs,
    ) -> BatchFeature:
        """
        Process `images` and/or tokenise `text` as `CLIPProcessor` does. With `return_regions`, also crop regions
        (from `region_boxes` if given, else the detector) into `region_pixel_values (batch, regions, 3, H, W)`,
        `region_boxes (batch, regions, 4)`, `region_mask` and `region_source`; with `return_spans`, also tokenise
        spans (from `spans` if given, else extracted from `text`) into `span_input_ids (batch, spans, length)`,
        `span_attention_mask` and `span_mask`.

        `images` comes first, then `text`, as in every transformers 5 processor: `processor(images, text)` is
        `processor(images=images, text=text)`; the other arguments are keyword-only. Strings in `images` are image
        file paths, so the old order, `processor(text, images)`, is refused with a `ValueError`: captions arriving
        as `images` name no file (or `text` then holds the images).
        """
        if text is None and images is None:
            raise ValueError("Give `images`, `text` or both.")
        if images is not None:
            _check_not_captions(images, text)
        data: dict = {}
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            for index, caption in enumerate(texts):
                if not isinstance(caption, str):
                    raise TypeError(f"text[{index}] must be a string, got {type(caption).__name__}.")
            data.update(self._tokenize(texts, padding, truncation, max_length, return_tensors, **kwargs))
            if return_spans or spans is not None:
                if spans is None:
                    spans = [self.span_extractor(caption) for caption in texts]
                elif len(spans) != len(texts):
                    raise ValueError(f"`spans` has {len(spans)} entries for {len(texts)} captions.")
                data.update(self._tokenize_spans(spans, return_tensors))
        elif return_spans or spans is not None:
            raise ValueError("`return_spans` needs `text`.")

        if images is not None:
            single = isinstance(images, (str, os.PathLike, Image.Image)) or (
                isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim <= 3
            )
            image_list = [images] if single else list(images)
            rgb_images = [to_rgb_image(image, f"images[{i}]") for i, image in enumerate(image_list)]
            data["pixel_values"] = self._pixels(rgb_images)
            if return_regions or region_boxes is not None:
                data.update(self._regions(rgb_images, region_boxes))
        elif return_regions or region_boxes is not None:
            raise ValueError("`return_regions` needs `images`.")
        return BatchFeature(data=data, tensor_type=return_tensors if return_tensors != "pt" else None)

    def _tokenize(self, texts, padding, truncation, max_length, return_tensors, **kwargs) -> dict:
        limit = max_length or getattr(self.tokenizer, "model_max_length", None)
        if limit is not None and limit > 100_000:  # tokenizers without a known limit report a huge number
            limit = None
        encoded = self.tokenizer(
            texts, padding=padding, truncation=truncation and limit is not None, max_length=limit,
            return_tensors=return_tensors, **kwargs,
        )
        if truncation and limit is not None:
            for index, caption in enumerate(texts):
                if len(caption) > 4 * limit and len(self.tokenizer(caption, truncation=False)["input_ids"]) > limit:
                    logger.warning(f"text[{index}] is longer than {limit} tokens and was truncated.")
        return dict(encoded)

    def _tokenize_spans(self, spans: list[list[str]], return_tensors) -> dict:
        batch = len(spans)
        spans = [list(sample_spans)[: self.max_spans] for sample_spans in spans]
        count = max([len(s) for s in spans] + [0])
        flat = [span for sample_spans in spans for span in sample_spans]
        length = 1
        if flat:
            encoded = self.tokenizer(
                flat, padding=True, truncation=True, max_length=self.max_span_length, return_tensors="pt"
            )
            length = encoded["input_ids"].shape[1]
        span_input_ids = torch.full((batch, count, length), self.tokenizer.pad_token_id or 0, dtype=torch.long)
        span_attention_mask = torch.zeros((batch, count, length), dtype=torch.long)
        span_mask = torch.zeros((batch, count), dtype=torch.bool)
        position = 0
        for row, sample_spans in enumerate(spans):
            n = len(sample_spans)
            if n:
                span_input_ids[row, :n] = encoded["input_ids"][position : position + n]
                span_attention_mask[row, :n] = encoded["attention_mask"][position : position + n]
                span_mask[row, :n] = True
            position += n
        out = {"span_input_ids": span_input_ids, "span_attention_mask": span_attention_mask, "span_mask": span_mask}
        return out if return_tensors == "pt" else {k: v.tolist() for k, v in out.items()}

    def _pixels(self, rgb_images: list[Image.Image]) -> torch.Tensor:
        return self.image_processor(images=rgb_images, return_tensors="pt")["pixel_values"]

    def _regions(self, rgb_images: list[Image.Image], region_boxes) -> dict:
        if region_boxes is not None:
            if len(region_boxes) != len(rgb_images):
                raise ValueError(f"`region_boxes` has {len(region_boxes)} entries for {len(rgb_images)} images.")
            found = []
            for index, boxes in enumerate(region_boxes):
                boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)[: self.max_regions]
                if boxes.size and (boxes.min() < 0 or boxes.max() > 1 or (boxes[:, 2:] <= boxes[:, :2]).any()):
                    raise ValueError(
                        f"region_boxes[{index}] must be normalised (x1, y1, x2, y2) with 0 <= x1 < x2 <= 1, "
                        f"got {boxes.tolist()}."
                    )
                found.append(Regions(boxes, np.ones(len(boxes), np.float32), "given"))
        else:
            found = self.region_extractor(rgb_images)
        count = max([len(r.boxes) for r in found] + [0])
        crop_size = self.image_processor.crop_size
        height, width = ((crop_size["height"], crop_size["width"]) if crop_size
                         else self._pixels(rgb_images[:1]).shape[-2:])
        region_pixel_values = torch.zeros(len(found), count, 3, height, width)
        boxes_out = torch.zeros(len(found), count, 4)
        region_mask = torch.zeros(len(found), count, dtype=torch.bool)
        crops = [crop_region(image, box) for image, regions in zip(rgb_images, found) for box in regions.boxes]
        if crops:
            crop_pixels = self._pixels(crops)
            position = 0
            for row, regions in enumerate(found):
                n = len(regions.boxes)
                if n:
                    region_pixel_values[row, :n] = crop_pixels[position : position + n]
                    boxes_out[row, :n] = torch.from_numpy(regions.boxes)
                    region_mask[row, :n] = True
                position += n
        return {
            "region_pixel_values": region_pixel_values,
            "region_boxes": boxes_out,
            "region_mask": region_mask,
            "region_source": [r.source for r in found],
        }

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]


DCLIPProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "DCLIPProcessor", "RegionExtractor", "Regions", "SpanExtractor", "crop_region", "keep_torch_threads",
    "to_rgb_image",
]
