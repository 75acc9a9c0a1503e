"""DCLIP models: the CLIP-compatible student and the region/span cross-modal teacher.

Hub remote code: this file travels next to the weights, so it imports only torch, transformers and its siblings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


# First, before anything of transformers: importing the configuration checks the transformers version.
try:
    from .configuration_dclip import DCLIPConfig, DCLIPTeacherConfig
except ImportError:
    if __package__:  # Hub remote code: the sibling is there, so this is its own error (e.g. the version check)
        raise
    from configuration_dclip import DCLIPConfig, DCLIPTeacherConfig  # a checkout or an install: top-level modules

from transformers import CLIPConfig, CLIPModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.clip.modeling_clip import (
    CLIPPreTrainedModel,
    CLIPTextModel,
    CLIPVisionModel,
    image_text_contrastive_loss,
)
from transformers.utils import ModelOutput, logging


logger = logging.get_logger(__name__)

# Keys of a CLIP config that describe a checkpoint's files rather than its architecture.
_NON_ARCHITECTURE_KEYS = ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path", "dtype")


def _l2_normalize(tensor: torch.Tensor) -> torch.Tensor:
    """Divide by the L2 norm over the last dimension, with the same operations as `CLIPModel` (bit-identical)."""
    return tensor / torch.pow(torch.sum(torch.pow(tensor, 2), dim=-1, keepdim=True), 0.5)


def _clip_architecture_kwargs(config: CLIPConfig) -> dict:
    """The fields of a CLIP-style config that a `CLIPConfig` (or a subclass) needs to rebuild the same towers."""
    config_dict = config.to_dict()
    return {
        "text_config": config_dict["text_config"],
        "vision_config": config_dict["vision_config"],
        "projection_dim": config_dict["projection_dim"],
        "logit_scale_init_value": config_dict["logit_scale_init_value"],
        "initializer_factor": config_dict.get("initializer_factor", 1.0),
    }


def _attn_implementations(config: CLIPConfig) -> dict:
    """The attention implementation of a CLIP-style model and of each tower, in `set_attn_implementation`'s form."""
    return {
        "": config._attn_implementation,
        "text_config": config.text_config._attn_implementation,
        "vision_config": config.vision_config._attn_implementation,
    }


def _load_clip(clip: str | os.PathLike | CLIPModel, **from_pretrained_kwargs) -> tuple[CLIPModel, str | None]:
    """A `CLIPModel` from a checkpoint name, a local folder (a CLIP or a DCLIP student) or an instance, and the name to
    record as provenance."""
    if isinstance(clip, CLIPModel):
        return clip, clip.config.name_or_path or None
    if isinstance(clip, (str, os.PathLike)):
        config = CLIPConfig.get_config_dict(clip, **from_pretrained_kwargs)[0]
        if config.get("model_type") == DCLIPConfig.model_type:  # a DCLIP student: its exact plain-CLIP export
            return DCLIPModel.from_pretrained(clip, **from_pretrained_kwargs).to_clip(), str(clip)
        return CLIPModel.from_pretrained(clip, **from_pretrained_kwargs), str(clip)
    raise TypeError(f"`clip` must be a checkpoint name, a path or a `CLIPModel`, got {type(clip).__name__}.")


@dataclass
class DCLIPOutput(ModelOutput):
    """
    Output of [`DCLIPModel`], field for field the same as `transformers.CLIPOutput`.

    Args:
        loss (`torch.FloatTensor` of shape `(1,)`, *optional*): contrastive loss, when `return_loss=True`.
        logits_per_image (`torch.FloatTensor` of shape `(image_batch_size, text_batch_size)`): scaled cosine
            similarities between each image and each text.
        logits_per_text (`torch.FloatTensor` of shape `(text_batch_size, image_batch_size)`): the transpose.
        text_embeds (`torch.FloatTensor` of shape `(text_batch_size, projection_dim)`): L2-normalised text embeddings.
        image_embeds (`torch.FloatTensor` of shape `(image_batch_size, projection_dim)`): L2-normalised image
            embeddings.
        text_model_output, vision_model_output (`BaseModelOutputWithPooling`): the towers' outputs.
        distill_text_embeds, distill_image_embeds (`torch.FloatTensor` of shape `(batch_size, teacher_embed_dim)`,
            *optional*): only while distilling from a teacher of another width (`config.teacher_embed_dim`): the
            embeddings mapped into the teacher's space by the distillation head (one for both), L2-normalised. Not in
            `CLIPOutput`.
    """

    loss: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_model_output: BaseModelOutputWithPooling | None = None
    vision_model_output: BaseModelOutputWithPooling | None = None
    distill_text_embeds: torch.FloatTensor | None = None
    distill_image_embeds: torch.FloatTensor | None = None

    def to_tuple(self) -> tuple:
        return tuple(
            self[k] if k not in ["text_model_output", "vision_model_output"] else getattr(self, k).to_tuple()
            for k in self.keys()
        )


@dataclass
class DCLIPTeacherImageFeatures(ModelOutput):
    """
    The image side of the teacher before fusion.

    Args:
        global_embeds (`(batch, projection_dim)`): CLIP embedding of the whole image.
        region_embeds (`(batch, regions, projection_dim)`): CLIP embedding of each region crop (zeros where padded).
        region_boxes (`(batch, regions, 4)`): normalised `(x1, y1, x2, y2)` boxes.
        region_mask (`(batch, regions)`, bool): which regions are real.
    """

    global_embeds: torch.FloatTensor | None = None
    region_embeds: torch.FloatTensor | None = None
    region_boxes: torch.FloatTensor | None = None
    region_mask: torch.BoolTensor | None = None


@dataclass
class DCLIPTeacherTextFeatures(ModelOutput):
    """
    The text side of the teacher before fusion.

    Args:
        global_embeds (`(batch, projection_dim)`): CLIP embedding of the whole caption.
        span_embeds (`(batch, spans, projection_dim)`): CLIP embedding of each text span (zeros where padded).
        span_mask (`(batch, spans)`, bool): which spans are real.
    """

    global_embeds: torch.FloatTensor | None = None
    span_embeds: torch.FloatTensor | None = None
    span_mask: torch.BoolTensor | None = None


@dataclass
class DCLIPTeacherOutput(ModelOutput):
    """
    Output of [`DCLIPTeacherModel`].

    Args:
        loss (`torch.FloatTensor`, *optional*): the teacher's training loss, when `return_loss=True`.
        pair_logits (`torch.FloatTensor` of shape `(batch, 1 + negatives)`, *optional*): scaled fused similarity of
            each image with its own caption (column 0) and its hard-negative captions, when `return_loss=True`.
        image_embeds (`(batch, embed_dim)`): enriched, L2-normalised image embeddings, each fused with its own
            caption; these are the distillation targets.
        text_embeds (`(batch, embed_dim)`): enriched, L2-normalised text embeddings.
        global_image_embeds, global_text_embeds (`(batch, projection_dim)`): the towers' L2-normalised embeddings.
        image_features, text_features: the unfused inputs of the fusion block.
    """

    loss: torch.FloatTensor | None = None
    pair_logits: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    global_image_embeds: torch.FloatTensor | None = None
    global_text_embeds: torch.FloatTensor | None = None
    image_features: DCLIPTeacherImageFeatures | None = None
    text_features: DCLIPTeacherTextFeatures | None = None

    def to_tuple(self) -> tuple:
        return tuple(
            self[k] if k not in ["image_features", "text_features"] else getattr(self, k).to_tuple()
            for k in self.keys()
        )


class DCLIPPreTrainedModel(CLIPPreTrainedModel):
    """Weight initialisation and loading shared by the DCLIP student and teacher."""

    config: DCLIPConfig
    base_model_prefix = "dclip"
    _no_split_modules = ["CLIPTextEmbeddings", "CLIPEncoderLayer", "CLIPVisionEmbeddings", "DCLIPFusionLayer"]

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        # transformers guesses from this file's source, and the teacher's fusion attention class (no attention
        # interface) makes it say no. The setting is for the CLIP towers, which are CLIP's own and take it; the fusion
        # block always runs torch's scaled_dot_product_attention, whatever the setting.
        return True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        factor = self.config.initializer_factor
        if isinstance(module, (DCLIPModel, DCLIPTeacherModel)):
            init.normal_(module.text_projection.weight, std=module.text_embed_dim**-0.5 * factor)
            init.normal_(module.visual_projection.weight, std=module.vision_embed_dim**-0.5 * factor)
            init.constant_(module.logit_scale, self.config.logit_scale_init_value)
        if isinstance(module, DCLIPTeacherModel):
            std = 0.02 * factor
            init.constant_(module.fusion_logit_scale, self.config.logit_scale_init_value)
            init.normal_(module.token_type_embeddings, std=std)
            for linear in (module.image_input_projection, module.text_input_projection, module.box_embedding):
                init.normal_(linear.weight, std=std)
                init.zeros_(linear.bias)
            # The fused residual starts small, so an untrained teacher gives (almost) the towers' own embeddings.
            for linear in (module.image_output_projection, module.text_output_projection):
                init.normal_(linear.weight, std=std * 0.1)
                init.zeros_(linear.bias)
            for linear in (module.image_embed_projection, module.text_embed_projection):
                if isinstance(linear, nn.Linear):
                    init.normal_(linear.weight, std=module.projection_dim**-0.5 * factor)
        elif isinstance(module, (DCLIPFusionAttention, DCLIPFusionMLP)):
            std = 0.02 * factor
            for child in module.children():
                if isinstance(child, nn.Linear):
                    init.normal_(child.weight, std=std)
                    init.zeros_(child.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)


class _CLIPTowersMixin:
    """The CLIP towers and projections, under the same module names as `CLIPModel` so state dicts match."""

    def _build_towers(self, config: CLIPConfig) -> None:
        self.projection_dim = config.projection_dim
        self.text_embed_dim = config.text_config.hidden_size
        self.vision_embed_dim = config.vision_config.hidden_size
        self.text_model = CLIPTextModel._from_config(config.text_config)
        self.vision_model = CLIPVisionModel._from_config(config.vision_config)
        self.visual_projection = nn.Linear(self.vision_embed_dim, self.projection_dim, bias=False)
        self.text_projection = nn.Linear(self.text_embed_dim, self.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))

    def get_input_embeddings(self) -> nn.Module:
        """The text tower's token embedding. accelerate's FSDP2 preparation asks for it (to shard it as its own unit),
        and transformers' default raises for a two-tower model."""
        return self.text_model.embeddings.token_embedding

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.text_model.embeddings.token_embedding = value

    def get_text_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.FloatTensor:
        """Projected (not normalised) text embeddings, `(batch, projection_dim)`."""
        text_outputs = self.text_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        return self.text_projection(text_outputs.pooler_output)

    def get_image_features(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False
    ) -> torch.FloatTensor:
        """Projected (not normalised) image embeddings, `(batch, projection_dim)`."""
        vision_outputs = self.vision_model(pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        return self.visual_projection(vision_outputs.pooler_output)

    @classmethod
    def _config_from_clip(cls, clip: CLIPModel, name: str | None, **config_kwargs):
        kwargs = _clip_architecture_kwargs(clip.config)
        kwargs["base_model_name_or_path"] = name
        kwargs.update(config_kwargs)
        return cls.config_class(**kwargs)


class DCLIPModel(_CLIPTowersMixin, DCLIPPreTrainedModel):
    """
    The DCLIP student: a CLIP dual encoder with `transformers.CLIPModel`'s forward signature and outputs.

    Start from any CLIP checkpoint with [`DCLIPModel.from_clip`]; export a distilled student to a plain `CLIPModel`
    (no remote code needed) with [`DCLIPModel.to_clip`].
    """

    config_class = DCLIPConfig
    config: DCLIPConfig
    main_input_name = "input_ids"

    def __init__(self, config: DCLIPConfig):
        super().__init__(config)
        self._build_towers(config)
        self.post_init()
        if getattr(config, "teacher_embed_dim", None) is not None:  # training only: see `drop_teacher_head`
            # drawn from a forked random state, so that the towers start the same with the head or without
            # one map for both modalities, so that aligning each with the teacher aligns them with each other
            with torch.random.fork_rng(devices=[]):
                self.teacher_head = nn.Linear(self.projection_dim, config.teacher_embed_dim, bias=False)
                nn.init.normal_(self.teacher_head.weight, std=self.projection_dim**-0.5 * config.initializer_factor)

    @classmethod
    def from_clip(
        cls, clip: str | os.PathLike | CLIPModel, from_pretrained_kwargs: dict | None = None, **config_kwargs
    ) -> DCLIPModel:
        """
        A student with the exact weights of a CLIP checkpoint (a Hub name, a local folder or a `CLIPModel`).
        `config_kwargs` set [`DCLIPConfig`] fields such as `distillation_method`.
        """
        clip, name = _load_clip(clip, **(from_pretrained_kwargs or {}))
        config = cls._config_from_clip(clip, name, **config_kwargs)
        model = cls(config)
        missing, unexpected = model.load_state_dict(clip.state_dict(), strict=False)
        if unexpected or any(not key.startswith("teacher_head.") for key in missing):
            raise RuntimeError(f"CLIP weights do not fit the student: missing={missing}, unexpected={unexpected}")
        model.set_attn_implementation(_attn_implementations(clip.config))  # e.g. "eager" for attention weights
        return model.to(dtype=clip.dtype)

    def drop_teacher_head(self) -> DCLIPModel:
        """This student without the distillation head of a wider or narrower teacher (`config.teacher_embed_dim`),
        as it is saved and used: a plain CLIP dual encoder. Returns `self`."""
        if hasattr(self, "teacher_head"):
            del self.teacher_head
        self.config.teacher_embed_dim = None
        return self

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, also mapping `AutoModelForZeroShotImageClassification` to this class."""
        if self._auto_class is not None:
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            module = self.__class__.__module__.split(".")[-1]
            auto_map.setdefault("AutoModelForZeroShotImageClassification", f"{module}.{self.__class__.__name__}")
            self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)

    def to_clip(self) -> CLIPModel:
        """A plain `transformers.CLIPModel` with this student's weights: identical embeddings, no remote code."""
        config = CLIPConfig(**_clip_architecture_kwargs(self.config))
        config._attn_implementation = self.config._attn_implementation
        clip = CLIPModel(config).to(dtype=self.dtype)
        clip.set_attn_implementation(_attn_implementations(self.config))  # the towers' own, if set apart
        state = {k: v for k, v in self.state_dict().items() if not k.startswith("teacher_head.")}  # training only
        clip.load_state_dict(state, strict=True)
        return clip.to(self.device)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        return_loss: bool | None = None,
        interpolate_pos_encoding: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> DCLIPOutput | tuple:
        """
        Same inputs and outputs as `transformers.CLIPModel.forward`. `output_attentions` and `output_hidden_states`
        go to both towers, as `CLIPModel` passes them: `vision_model_output.attentions` / `.hidden_states` (and the
        text tower's) are filled by the towers' output capturing. Attention weights need an attention implementation
        that computes them: load with `attn_implementation="eager"` (or call `set_attn_implementation("eager")`);
        under `sdpa` the towers warn and return no attentions, as `CLIPModel` does.
        """
        if input_ids is None or pixel_values is None:
            raise ValueError("DCLIPModel.forward needs both `input_ids` and `pixel_values`.")
        # Only what is given: left out, each tower falls back on its own config, as in `CLIPModel`.
        flags = {"output_attentions": output_attentions, "output_hidden_states": output_hidden_states}
        capture = {name: value for name, value in flags.items() if value is not None}
        vision_outputs = self.vision_model(
            pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, return_dict=True, **capture
        )
        text_outputs = self.text_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, return_dict=True, **capture
        )
        image_embeds = _l2_normalize(self.visual_projection(vision_outputs.pooler_output))
        text_embeds = _l2_normalize(self.text_projection(text_outputs.pooler_output))
        distill = {}
        if hasattr(self, "teacher_head"):  # in forward, so that DDP / FSDP see the head
            distill = {"distill_image_embeds": _l2_normalize(self.teacher_head(image_embeds)),
                       "distill_text_embeds": _l2_normalize(self.teacher_head(text_embeds))}

        logits_per_text = torch.matmul(text_embeds, image_embeds.t().to(text_embeds.device))
        logits_per_text = logits_per_text * self.logit_scale.exp().to(text_embeds.device)
        logits_per_image = logits_per_text.t()
        loss = image_text_contrastive_loss(logits_per_text) if return_loss else None

        output = DCLIPOutput(
            loss=loss,
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_text,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            text_model_output=text_outputs,
            vision_model_output=vision_outputs,
            **distill,
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        return output if return_dict else output.to_tuple()


class DCLIPFusionAttention(nn.Module):
    """Multi-head attention from `queries` to `keys_values` with a key padding mask (pre-norm is done outside)."""

    def __init__(self, config: DCLIPTeacherConfig):
        super().__init__()
        self.num_heads = config.fusion_num_heads
        self.head_dim = config.fusion_hidden_size // config.fusion_num_heads
        self.dropout = config.fusion_dropout
        self.q_proj = nn.Linear(config.fusion_hidden_size, config.fusion_hidden_size)
        self.k_proj = nn.Linear(config.fusion_hidden_size, config.fusion_hidden_size)
        self.v_proj = nn.Linear(config.fusion_hidden_size, config.fusion_hidden_size)
        self.out_proj = nn.Linear(config.fusion_hidden_size, config.fusion_hidden_size)

    def _split_heads(self, states: torch.Tensor) -> torch.Tensor:
        batch, length, _ = states.shape
        return states.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, queries: torch.Tensor, keys_values: torch.Tensor, key_mask: torch.BoolTensor) -> torch.Tensor:
        # queries: (batch, q_len, hidden); keys_values: (batch, k_len, hidden); key_mask: (batch, k_len), True = real
        query = self._split_heads(self.q_proj(queries))
        key = self._split_heads(self.k_proj(keys_values))
        value = self._split_heads(self.v_proj(keys_values))
        attn_mask = key_mask[:, None, None, :]  # (batch, 1, 1, k_len)
        attended = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        batch, _, q_len, _ = attended.shape
        return self.out_proj(attended.transpose(1, 2).reshape(batch, q_len, -1))


class DCLIPFusionMLP(nn.Module):
    def __init__(self, config: DCLIPTeacherConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.fusion_hidden_size, config.fusion_intermediate_size)
        self.fc2 = nn.Linear(config.fusion_intermediate_size, config.fusion_hidden_size)
        self.dropout = nn.Dropout(config.fusion_dropout)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(F.gelu(self.fc1(hidden_states))))


class DCLIPFusionStream(nn.Module):
    """One modality's half of a fusion layer: pre-norm self-attention, cross-attention to the other side, MLP."""

    def __init__(self, config: DCLIPTeacherConfig):
        super().__init__()
        self.self_attn_norm = nn.LayerNorm(config.fusion_hidden_size)
        self.self_attn = DCLIPFusionAttention(config)
        self.cross_attn_norm = nn.LayerNorm(config.fusion_hidden_size)
        self.context_norm = nn.LayerNorm(config.fusion_hidden_size)
        self.cross_attn = DCLIPFusionAttention(config)
        self.mlp_norm = nn.LayerNorm(config.fusion_hidden_size)
        self.mlp = DCLIPFusionMLP(config)
        self.dropout = nn.Dropout(config.fusion_dropout)

    def forward(
        self, states: torch.Tensor, mask: torch.BoolTensor, context: torch.Tensor, context_mask: torch.BoolTensor
    ) -> torch.Tensor:
        normed = self.self_attn_norm(states)
        states = states + self.dropout(self.self_attn(normed, normed, mask))
        states = states + self.dropout(
            self.cross_attn(self.cross_attn_norm(states), self.context_norm(context), context_mask)
        )
        return states + self.mlp(self.mlp_norm(states))


class DCLIPFusionLayer(nn.Module):
    """Bidirectional cross-attention block: regions attend to spans and spans to regions, simultaneously."""

    def __init__(self, config: DCLIPTeacherConfig):
        super().__init__()
        self.image_stream = DCLIPFusionStream(config)
        self.text_stream = DCLIPFusionStream(config)

    def forward(
        self,
        image_states: torch.Tensor,
        image_mask: torch.BoolTensor,
        text_states: torch.Tensor,
        text_mask: torch.BoolTensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        new_image_states = self.image_stream(image_states, image_mask, text_states, text_mask)
        new_text_states = self.text_stream(text_states, text_mask, image_states, image_mask)
        return new_image_states, new_text_states


def _masked_mean(states: torch.Tensor, mask: torch.BoolTensor) -> torch.Tensor:
    """Mean over the real tokens of `(batch, length, dim)`; zeros for a row with none."""
    weights = mask.to(states.dtype).unsqueeze(-1)
    return (states * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class DCLIPTeacherModel(_CLIPTowersMixin, DCLIPPreTrainedModel):
    """
    The DCLIP cross-modal teacher.

    The CLIP vision tower encodes the whole image and each region crop (its box added as a positional signal); the
    CLIP text tower encodes the caption and each text span. A stack of [`DCLIPFusionLayer`]s fuses regions and spans,
    with the whole-image and whole-caption embeddings as an always-present first token on each side. The mean of the
    fused region (span) tokens, projected, is added to the normalised global embedding and mapped into the student's
    embedding space (`config.embed_dim`). With no region (span), the enriched embedding is the global one.

    Training objective (the paper leaves it open; our choice): pairwise, ITM-style contrastive loss. Each image is
    fused with its own caption and with `config.num_negatives` hard-negative captions (mined by global similarity),
    and vice versa; the fused cosine similarity, scaled, is trained with cross-entropy towards the true pair.
    """

    config_class = DCLIPTeacherConfig
    config: DCLIPTeacherConfig
    main_input_name = "input_ids"

    def __init__(self, config: DCLIPTeacherConfig):
        super().__init__(config)
        self._build_towers(config)
        hidden = config.fusion_hidden_size
        self.image_input_projection = nn.Linear(config.projection_dim, hidden)
        self.text_input_projection = nn.Linear(config.projection_dim, hidden)
        self.box_embedding = nn.Linear(5, hidden)  # (x1, y1, x2, y2, area)
        # 0: whole image, 1: region, 2: whole caption, 3: span
        self.token_type_embeddings = nn.Parameter(torch.zeros(4, hidden))
        self.fusion_layers = nn.ModuleList([DCLIPFusionLayer(config) for _ in range(config.fusion_num_layers)])
        self.image_output_norm = nn.LayerNorm(hidden)
        self.text_output_norm = nn.LayerNorm(hidden)
        self.image_output_projection = nn.Linear(hidden, config.projection_dim)
        self.text_output_projection = nn.Linear(hidden, config.projection_dim)
        if config.embed_dim != config.projection_dim:
            self.image_embed_projection = nn.Linear(config.projection_dim, config.embed_dim, bias=False)
            self.text_embed_projection = nn.Linear(config.projection_dim, config.embed_dim, bias=False)
        else:
            self.image_embed_projection = nn.Identity()
            self.text_embed_projection = nn.Identity()
        self.fusion_logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))
        self.post_init()
        self._apply_freezing()

    def _apply_freezing(self) -> None:
        for frozen, modules in (
            (self.config.freeze_vision_tower, (self.vision_model, self.visual_projection)),
            (self.config.freeze_text_tower, (self.text_model, self.text_projection)),
        ):
            for module in modules:
                module.requires_grad_(not frozen)
        self.logit_scale.requires_grad_(not (self.config.freeze_vision_tower and self.config.freeze_text_tower))

    @classmethod
    def from_clip(
        cls, clip: str | os.PathLike | CLIPModel, from_pretrained_kwargs: dict | None = None, **config_kwargs
    ) -> DCLIPTeacherModel:
        """
        A teacher whose towers are a CLIP checkpoint's (unchanged) and whose fusion block is freshly initialised.
        `config_kwargs` set [`DCLIPTeacherConfig`] fields (fusion size, `embed_dim`, freezing, ...).
        """
        clip, name = _load_clip(clip, **(from_pretrained_kwargs or {}))
        config = cls._config_from_clip(clip, name, **config_kwargs)
        model = cls(config)
        missing, unexpected = model.load_state_dict(clip.state_dict(), strict=False)
        clip_keys = set(clip.state_dict())
        if unexpected or any(key in clip_keys for key in missing):
            raise RuntimeError(f"CLIP weights do not fit the teacher's towers: missing={missing}, "
                               f"unexpected={unexpected}")
        model.set_attn_implementation(_attn_implementations(clip.config))
        return model.to(dtype=clip.dtype)

    # ----- the two sides before fusion -----------------------------------------------------------------------

    def _encode_masked(self, encode, inputs: tuple[torch.Tensor, ...], mask: torch.BoolTensor) -> torch.Tensor:
        """Run `encode` on the real items of `(batch, items, ...)` inputs only; zeros where `mask` is False."""
        batch, items = mask.shape
        output = torch.zeros(batch, items, self.projection_dim, device=mask.device, dtype=self.dtype)
        if mask.any():
            flat = [tensor[mask] for tensor in inputs]
            output[mask] = encode(*flat).to(output.dtype)
        return output

    def encode_image_side(
        self,
        pixel_values: torch.FloatTensor,
        region_pixel_values: torch.FloatTensor | None = None,
        region_boxes: torch.FloatTensor | None = None,
        region_mask: torch.BoolTensor | None = None,
    ) -> DCLIPTeacherImageFeatures:
        """Global and per-region CLIP embeddings. `region_pixel_values`: `(batch, regions, channels, height, width)`."""
        global_embeds = self.get_image_features(pixel_values)
        batch = pixel_values.shape[0]
        if region_pixel_values is None:
            region_pixel_values = pixel_values.new_zeros(batch, 0, *pixel_values.shape[1:])
            region_boxes = pixel_values.new_zeros(batch, 0, 4)
        if region_mask is None:
            region_mask = torch.ones(region_pixel_values.shape[:2], dtype=torch.bool, device=pixel_values.device)
        if region_boxes is None:
            raise ValueError("`region_boxes` must be given with `region_pixel_values`.")
        region_mask = region_mask.bool()
        region_embeds = self._encode_masked(self.get_image_features, (region_pixel_values,), region_mask)
        return DCLIPTeacherImageFeatures(
            global_embeds=global_embeds, region_embeds=region_embeds, region_boxes=region_boxes, region_mask=region_mask
        )

    def encode_text_side(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        span_input_ids: torch.LongTensor | None = None,
        span_attention_mask: torch.Tensor | None = None,
        span_mask: torch.BoolTensor | None = None,
    ) -> DCLIPTeacherTextFeatures:
        """Global and per-span CLIP embeddings. `span_input_ids`: `(batch, spans, span_length)`."""
        global_embeds = self.get_text_features(input_ids, attention_mask)
        batch = input_ids.shape[0]
        if span_input_ids is None:
            span_input_ids = input_ids.new_zeros(batch, 0, 1)
        if span_attention_mask is None:
            span_attention_mask = torch.ones_like(span_input_ids)
        if span_mask is None:
            span_mask = torch.ones(span_input_ids.shape[:2], dtype=torch.bool, device=input_ids.device)
        span_mask = span_mask.bool()
        span_embeds = self._encode_masked(self.get_text_features, (span_input_ids, span_attention_mask), span_mask)
        return DCLIPTeacherTextFeatures(global_embeds=global_embeds, span_embeds=span_embeds, span_mask=span_mask)

    # ----- fusion ----------------------------------------------------------------------------------------------

    def fuse(
        self,
        image_features: DCLIPTeacherImageFeatures,
        text_features: DCLIPTeacherTextFeatures,
        image_index: torch.LongTensor | None = None,
        text_index: torch.LongTensor | None = None,
    ) -> tuple[torch.FloatTensor, torch.FloatTensor]:
        """
        Enriched, L2-normalised `(image_embeds, text_embeds)`, each `(pairs, embed_dim)`, for the pairs
        `(image_index[p], text_index[p])` (by default, row `p` of each side with row `p` of the other).
        """
        if image_index is not None:
            image_features = DCLIPTeacherImageFeatures(**{k: v[image_index] for k, v in image_features.items()})
        if text_index is not None:
            text_features = DCLIPTeacherTextFeatures(**{k: v[text_index] for k, v in text_features.items()})
        max_regions, max_spans = self.config.max_regions, self.config.max_spans
        region_embeds = image_features.region_embeds[:, :max_regions]
        region_boxes = image_features.region_boxes[:, :max_regions].to(region_embeds.dtype)
        region_mask = image_features.region_mask[:, :max_regions]
        span_embeds = text_features.span_embeds[:, :max_spans]
        span_mask = text_features.span_mask[:, :max_spans]

        image_global = _l2_normalize(image_features.global_embeds)
        text_global = _l2_normalize(text_features.global_embeds)
        area = (region_boxes[..., 2] - region_boxes[..., 0]) * (region_boxes[..., 3] - region_boxes[..., 1])
        box_features = torch.cat([region_boxes, area.unsqueeze(-1)], dim=-1)  # (pairs, regions, 5)
        types = self.token_type_embeddings
        image_states = torch.cat(
            [
                (self.image_input_projection(image_global) + types[0]).unsqueeze(1),
                self.image_input_projection(_l2_normalize_or_zero(region_embeds))
                + self.box_embedding(box_features)
                + types[1],
            ],
            dim=1,
        )
        text_states = torch.cat(
            [
                (self.text_input_projection(text_global) + types[2]).unsqueeze(1),
                self.text_input_projection(_l2_normalize_or_zero(span_embeds)) + types[3],
            ],
            dim=1,
        )
        always = region_mask.new_ones(region_mask.shape[0], 1)
        image_mask = torch.cat([always, region_mask], dim=1)
        text_mask = torch.cat([always, span_mask], dim=1)
        for layer in self.fusion_layers:
            image_states, text_states = layer(image_states, image_mask, text_states, text_mask)

        image_delta = self.image_output_projection(
            self.image_output_norm(_masked_mean(image_states[:, 1:], region_mask))
        )
        text_delta = self.text_output_projection(self.text_output_norm(_masked_mean(text_states[:, 1:], span_mask)))
        image_delta = image_delta * region_mask.any(1, keepdim=True).to(image_delta.dtype)
        text_delta = text_delta * span_mask.any(1, keepdim=True).to(text_delta.dtype)
        image_embeds = _l2_normalize(self.image_embed_projection(image_global + image_delta))
        text_embeds = _l2_normalize(self.text_embed_projection(text_global + text_delta))
        return image_embeds, text_embeds

    def pair_logits(
        self,
        image_features: DCLIPTeacherImageFeatures,
        text_features: DCLIPTeacherTextFeatures,
        image_index: torch.LongTensor,
        text_index: torch.LongTensor,
    ) -> torch.FloatTensor:
        """Scaled fused cosine similarity of each pair `(image_index[p], text_index[p])`; any index shape."""
        shape = image_index.shape
        image_embeds, text_embeds = self.fuse(
            image_features, text_features, image_index.reshape(-1), text_index.reshape(-1)
        )
        return (self.fusion_logit_scale.exp() * (image_embeds * text_embeds).sum(-1)).reshape(shape)

    def _check_cached_features_allowed(self, frozen: bool, tower: str) -> None:
        if self.training and not frozen:
            raise ValueError(
                f"precomputed {tower} features skip the {tower} tower, which this teacher trains "
                f"(`freeze_{tower}_tower=False`): pass pixels/ids instead."
            )

    def _refuse_output_flags(self, **flags: bool | None) -> None:
        for name, value in flags.items():
            if value if value is not None else getattr(self.config, name, False):
                raise ValueError(
                    f"DCLIPTeacherModel does not return `{name.removeprefix('output_')}` (`{name}=True`"
                    f"{'' if value is not None else ' in its config'}): its outputs are fused embeddings. Ask a tower "
                    f"instead, e.g. `teacher.vision_model(pixel_values, {name}=True)` or "
                    f"`teacher.text_model(input_ids, {name}=True)`."
                )

    def _image_features(
        self, pixel_values, region_pixel_values, region_boxes, region_mask, image_global_features, region_features
    ) -> DCLIPTeacherImageFeatures:
        """The image side from pixels and region crops, or from the towers' cached outputs."""
        if image_global_features is not None:
            self._check_cached_features_allowed(self.config.freeze_vision_tower, "vision")
            return DCLIPTeacherImageFeatures(
                global_embeds=image_global_features, region_embeds=region_features, region_boxes=region_boxes,
                region_mask=region_mask.bool(),
            )
        if pixel_values is not None:
            return self.encode_image_side(pixel_values, region_pixel_values, region_boxes, region_mask)
        raise ValueError("DCLIPTeacherModel.forward needs `pixel_values` or `image_global_features`.")

    def _text_features(
        self, input_ids, attention_mask, span_input_ids, span_attention_mask, span_mask, text_global_features,
        span_features,
    ) -> DCLIPTeacherTextFeatures:
        """The text side from ids and span ids, or from the towers' cached outputs."""
        if text_global_features is not None:
            self._check_cached_features_allowed(self.config.freeze_text_tower, "text")
            return DCLIPTeacherTextFeatures(
                global_embeds=text_global_features, span_embeds=span_features, span_mask=span_mask.bool()
            )
        if input_ids is not None:
            return self.encode_text_side(input_ids, attention_mask, span_input_ids, span_attention_mask, span_mask)
        raise ValueError("DCLIPTeacherModel.forward needs `input_ids` or `text_global_features`.")

    @staticmethod
    def _caption_negatives(global_embeds, span_embeds, span_mask, mask):
        """Each caption's own hard negatives `(batch, negatives, ...)` as one flat text side, and which are real
        (None without them)."""
        if global_embeds is None:
            return None
        batch, count = global_embeds.shape[:2]
        if mask is None:
            mask = torch.ones(batch, count, dtype=torch.bool, device=global_embeds.device)
        flat = DCLIPTeacherTextFeatures(
            global_embeds=global_embeds.flatten(0, 1), span_embeds=span_embeds.flatten(0, 1),
            span_mask=span_mask.flatten(0, 1).bool())
        return flat, mask.bool()

    def _training_loss(self, image_features, text_features, global_image_embeds, global_text_embeds, negatives=None):
        """The pairwise (ITM-style) loss over each pair and its hard negatives both ways (plus the global contrastive
        loss when a tower trains), and the per-image pair logits. `negatives` (`_caption_negatives`): each image's
        caption's own hard negatives (e.g. swapped attributes), scored against the image beside the batch's."""
        with torch.no_grad():
            similarity = global_image_embeds @ global_text_embeds.t()
        text_candidates = self._candidates(similarity, self.config.num_negatives)  # per image
        image_candidates = self._candidates(similarity.t(), self.config.num_negatives)  # per caption
        rows = torch.arange(similarity.shape[0], device=similarity.device)[:, None]
        pair_logits = self.pair_logits(image_features, text_features, rows.expand_as(text_candidates), text_candidates)
        caption_pair_logits = self.pair_logits(
            image_features, text_features, image_candidates, rows.expand_as(image_candidates)
        )
        if negatives is not None:
            negative_features, negative_mask = negatives
            batch, count = negative_mask.shape
            own = self.pair_logits(image_features, negative_features, rows[:batch].expand(batch, count),
                                   torch.arange(batch * count, device=similarity.device).view(batch, count))
            pair_logits = torch.cat([pair_logits, own.masked_fill(~negative_mask, float("-inf"))], dim=1)
        targets = torch.zeros(similarity.shape[0], dtype=torch.long, device=similarity.device)
        loss = (F.cross_entropy(pair_logits, targets) + F.cross_entropy(caption_pair_logits, targets)) / 2
        if not (self.config.freeze_vision_tower and self.config.freeze_text_tower):
            global_logits = self.logit_scale.exp() * global_text_embeds @ global_image_embeds.t()
            loss = loss + image_text_contrastive_loss(global_logits)
        return loss, pair_logits

    def _candidates(self, similarity: torch.Tensor, num_negatives: int) -> torch.LongTensor:
        """For each row: its own index first, then its `num_negatives` most similar other columns."""
        batch = similarity.shape[0]
        positives = torch.arange(batch, device=similarity.device)
        num_negatives = batch - 1 if num_negatives < 0 else min(num_negatives, batch - 1)
        masked = similarity.masked_fill(torch.eye(batch, dtype=torch.bool, device=similarity.device), float("-inf"))
        negatives = masked.topk(num_negatives, dim=1).indices
        return torch.cat([positives[:, None], negatives], dim=1)  # (batch, 1 + num_negatives)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        region_pixel_values: torch.FloatTensor | None = None,
        region_boxes: torch.FloatTensor | None = None,
        region_mask: torch.BoolTensor | None = None,
        span_input_ids: torch.LongTensor | None = None,
        span_attention_mask: torch.Tensor | None = None,
        span_mask: torch.BoolTensor | None = None,
        image_global_features: torch.FloatTensor | None = None,
        region_features: torch.FloatTensor | None = None,
        text_global_features: torch.FloatTensor | None = None,
        span_features: torch.FloatTensor | None = None,
        negative_text_global_features: torch.FloatTensor | None = None,
        negative_span_features: torch.FloatTensor | None = None,
        negative_span_mask: torch.BoolTensor | None = None,
        negative_mask: torch.BoolTensor | None = None,
        return_loss: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> DCLIPTeacherOutput | tuple:
        """
        Enriched embeddings of each (image, own caption) pair; with `return_loss`, the teacher's training loss.

        The towers' outputs may be given instead of pixels and ids (precomputed once while the towers are frozen):
        `image_global_features (batch, projection_dim)` with `region_features (batch, regions, projection_dim)`,
        `region_boxes` and `region_mask`; `text_global_features` with `span_features` and `span_mask`. `negative_*`
        (`(batch, negatives, ...)`, with `negative_mask`): each caption's own hard negatives for the training loss.

        `output_attentions` and `output_hidden_states` are refused (`ValueError`): the outputs are fused embeddings,
        the towers run on images, crops, captions and spans at once (or not at all, from cached features), and the
        fusion keeps no attention weights. Ask the towers: `teacher.vision_model(pixel_values, output_attentions=True)`.
        """
        self._refuse_output_flags(output_attentions=output_attentions, output_hidden_states=output_hidden_states)
        image_features = self._image_features(
            pixel_values, region_pixel_values, region_boxes, region_mask, image_global_features, region_features
        )
        text_features = self._text_features(
            input_ids, attention_mask, span_input_ids, span_attention_mask, span_mask, text_global_features,
            span_features,
        )
        image_embeds, text_embeds = self.fuse(image_features, text_features)
        global_image_embeds = _l2_normalize(image_features.global_embeds)
        global_text_embeds = _l2_normalize(text_features.global_embeds)
        loss = pair_logits = None
        if return_loss:
            negatives = self._caption_negatives(negative_text_global_features, negative_span_features,
                                                negative_span_mask, negative_mask)
            loss, pair_logits = self._training_loss(image_features, text_features, global_image_embeds,
                                                    global_text_embeds, negatives)
        output = DCLIPTeacherOutput(
            loss=loss, pair_logits=pair_logits, image_embeds=image_embeds, text_embeds=text_embeds,
            global_image_embeds=global_image_embeds, global_text_embeds=global_text_embeds,
            image_features=image_features, text_features=text_features)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        return output if return_dict else output.to_tuple()


def _l2_normalize_or_zero(tensor: torch.Tensor) -> torch.Tensor:
    """L2-normalise the last dimension, leaving all-zero (padding) vectors at zero."""
    return tensor / tensor.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-12)


DCLIPConfig.register_for_auto_class("AutoConfig")
DCLIPTeacherConfig.register_for_auto_class("AutoConfig")
DCLIPModel.register_for_auto_class("AutoModel")
DCLIPTeacherModel.register_for_auto_class("AutoModel")

__all__ = [
    "DCLIPModel",
    "DCLIPOutput",
    "DCLIPPreTrainedModel",
    "DCLIPTeacherImageFeatures",
    "DCLIPTeacherModel",
    "DCLIPTeacherOutput",
    "DCLIPTeacherTextFeatures",
]
