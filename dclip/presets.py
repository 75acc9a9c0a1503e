"""Small CLIP architectures for the offline default pipeline (no pretrained CLIP can be downloaded here)."""

from __future__ import annotations

from transformers import CLIPConfig


SMALL_CLIP_PRESETS = {
    # name: (width, layers, heads, patch size)
    "clip-tiny": (64, 2, 2, 8),
    "clip-small": (128, 4, 4, 8),
    "clip-base-cpu": (256, 6, 4, 8),
}


def small_clip_config(tokenizer, image_size: int = 64, preset: str = "clip-small",
                      projection_dim: int | None = None) -> CLIPConfig:
    """A `CLIPConfig` of a `SMALL_CLIP_PRESETS` size whose text side fits `tokenizer` (vocabulary, special tokens)."""
    if preset not in SMALL_CLIP_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(SMALL_CLIP_PRESETS)}")
    width, layers, heads, patch = SMALL_CLIP_PRESETS[preset]
    if image_size % patch:
        raise ValueError(f"`image_size` ({image_size}) must be a multiple of the patch size ({patch}).")
    text_config = dict(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    vision_config = dict(
        hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers, num_attention_heads=heads,
        image_size=image_size, patch_size=patch,
    )
    return CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=projection_dim or width)
