"""DCLIP model configurations.

Hub remote code: this file travels next to the weights, so it imports only `transformers` and the standard library,
and its own siblings. It also checks the transformers version the remote code needs; the
other two files import it first, so all three say so clearly instead of failing somewhere inside transformers.
"""

import re

import transformers


MIN_TRANSFORMERS_VERSION = "5.0.0"


def _release(text: str) -> tuple[int, ...]:
    """The numeric release of a version string, at least major.minor.patch: pre-releases of a version (5.0.0.dev0,
    5.0.0rc1) count as it, and 5.0 is 5.0.0."""
    parts = tuple(int(part) for part in re.match(r"\d+(?:\.\d+)*", text).group().split("."))
    return parts + (0,) * (3 - len(parts))


if _release(transformers.__version__) < _release(MIN_TRANSFORMERS_VERSION):
    raise ImportError(
        f"dclip's remote code needs transformers>={MIN_TRANSFORMERS_VERSION}, found {transformers.__version__}: "
        "pip install -U transformers"
    )

from transformers import CLIPConfig  # noqa: E402 (after the version check, which must come first)
from transformers.utils import logging  # noqa: E402


logger = logging.get_logger(__name__)


class DCLIPConfig(CLIPConfig):
    r"""
    Configuration of a DCLIP *student*: a CLIP dual encoder (same fields as [`CLIPConfig`]) plus provenance that model
    cards and evaluation read.

    Args:
        text_config (`dict` or `CLIPTextConfig`, *optional*): the text tower.
        vision_config (`dict` or `CLIPVisionConfig`, *optional*): the vision tower.
        projection_dim (`int`, *optional*, defaults to 512): dimension of the joint embedding space.
        logit_scale_init_value (`float`, *optional*, defaults to 2.6592): initial log temperature.
        base_model_name_or_path (`str`, *optional*): the CLIP checkpoint the student was initialised from.
        teacher_name_or_path (`str`, *optional*): the teacher the student was distilled from.
        distillation_method (`str`, *optional*): `"dclip"`, `"clip_cid"`, `"dclip+clip_cid"` or `None` (plain CLIP).
        teacher_embed_dim (`int`, *optional*): while distilling from a teacher of another embedding width, the width
            of a linear head that maps the student's image and text embeddings into the teacher's space (one map for
            both, so that their alignment carries over; CLIP-KD maps features likewise). Training only: a saved
            student has no head and this is `None`.

    Example:

    ```python
    >>> from configuration_dclip import DCLIPConfig
    >>> config = DCLIPConfig(distillation_method="dclip")
    ```"""

    model_type = "dclip"

    base_model_name_or_path: str | None = None
    teacher_name_or_path: str | None = None
    distillation_method: str | None = None
    teacher_embed_dim: int | None = None

    def __post_init__(self, **kwargs):
        if self.teacher_embed_dim is not None and self.teacher_embed_dim < 1:
            raise ValueError(f"`teacher_embed_dim` must be a positive width or None, got {self.teacher_embed_dim}.")
        allowed = (None, "dclip", "clip_cid", "dclip+clip_cid")
        if self.distillation_method not in allowed:
            raise ValueError(f"`distillation_method` must be one of {allowed}, got {self.distillation_method!r}.")
        super().__post_init__(**kwargs)


class DCLIPTeacherConfig(CLIPConfig):
    r"""
    Configuration of the DCLIP cross-modal *teacher*: CLIP towers (same fields as [`CLIPConfig`]) plus a fusion block
    of bidirectional cross-attention between image regions and caption text spans.

    Args:
        text_config, vision_config, projection_dim, logit_scale_init_value: the CLIP towers, as in [`CLIPConfig`].
        embed_dim (`int`, *optional*): dimension of the enriched embeddings, i.e. the *student's* `projection_dim`.
            Defaults to `projection_dim`.
        fusion_hidden_size (`int`, *optional*, defaults to 512): width of the fusion block.
        fusion_num_layers (`int`, *optional*, defaults to 2): number of bidirectional cross-attention blocks.
        fusion_num_heads (`int`, *optional*, defaults to 8): attention heads in the fusion block.
        fusion_intermediate_size (`int`, *optional*): MLP width; defaults to `4 * fusion_hidden_size`.
        fusion_dropout (`float`, *optional*, defaults to 0.0): dropout in the fusion block.
        max_regions (`int`, *optional*, defaults to 8): most image regions per sample.
        max_spans (`int`, *optional*, defaults to 8): most text spans per sample.
        freeze_vision_tower (`bool`, *optional*, defaults to `True`): keep the CLIP vision tower fixed.
        freeze_text_tower (`bool`, *optional*, defaults to `True`): keep the CLIP text tower fixed.
        num_negatives (`int`, *optional*, defaults to 7): hard negatives per sample in the teacher's pairwise
            (ITM-style) contrastive objective; `-1` scores every pair of the batch.
        base_model_name_or_path (`str`, *optional*): the CLIP checkpoint the towers came from.
    """

    model_type = "dclip_teacher"

    embed_dim: int | None = None
    fusion_hidden_size: int = 512
    fusion_num_layers: int = 2
    fusion_num_heads: int = 8
    fusion_intermediate_size: int | None = None
    fusion_dropout: float = 0.0
    max_regions: int = 8
    max_spans: int = 8
    freeze_vision_tower: bool = True
    freeze_text_tower: bool = True
    num_negatives: int = 7
    base_model_name_or_path: str | None = None

    def __post_init__(self, **kwargs):
        if self.embed_dim is None:
            self.embed_dim = self.projection_dim
        if self.fusion_intermediate_size is None:
            self.fusion_intermediate_size = 4 * self.fusion_hidden_size
        if self.fusion_hidden_size % self.fusion_num_heads != 0:
            raise ValueError(
                f"`fusion_hidden_size` ({self.fusion_hidden_size}) must be a multiple of `fusion_num_heads` "
                f"({self.fusion_num_heads})."
            )
        for name in ("max_regions", "max_spans", "fusion_num_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be at least 1, got {getattr(self, name)}.")
        super().__post_init__(**kwargs)


__all__ = ["MIN_TRANSFORMERS_VERSION", "DCLIPConfig", "DCLIPTeacherConfig"]
