"""Embedding loops shared by every evaluation: `load_clip_towers` opens any checkpoint as a pair of towers, and
`embed_images` / `embed_texts` run them over a data set or a list of strings in batches, returning L2-normalised float32
numpy arrays (`get_image_features` / `get_text_features`, whether they return a tensor or a transformers output)."""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from ..teachers import model_type, pooled_features


def load_clip_towers(name_or_path: str):
    """A [`DCLIPModel`] or [`DCLIPTeacherModel`] folder as itself, any CLIP checkpoint (local or Hub) as a
    [`DCLIPModel`]: each has `get_image_features` / `get_text_features` returning tensors. On the GPU if there is
    one."""
    from modeling_dclip import DCLIPModel, DCLIPTeacherModel

    found = model_type(name_or_path)  # no remote code loaded
    if found == "dclip":
        model = DCLIPModel.from_pretrained(name_or_path)
    elif found == "dclip_teacher":
        model = DCLIPTeacherModel.from_pretrained(name_or_path)
    else:
        model = DCLIPModel.from_clip(name_or_path)
    return model.to("cuda" if torch.cuda.is_available() else "cpu").eval()


@torch.no_grad()
def _embed(model, encode, batches, device: str | torch.device | None, **progress) -> np.ndarray:
    """L2-normalised float32 features `(rows, dim)` of `encode(model, batch, device)` over `batches`."""
    device = torch.device(device or next(model.parameters()).device)
    model.eval()
    chunks = [torch.nn.functional.normalize(pooled_features(encode(batch, device)).float(), dim=-1).cpu()
              for batch in tqdm(batches, **progress)]
    return torch.cat(chunks).numpy() if chunks else np.empty((0, 0), dtype=np.float32)


def embed_images(model, processor, dataset, batch_size: int = 256, image_column: str = "image",
                 device: str | torch.device | None = None) -> np.ndarray:
    """L2-normalised image embeddings `(rows, dim)` float32 of `dataset[image_column]` with `get_image_features`."""
    def encode(start, device):
        images = dataset[start : start + batch_size][image_column]
        return model.get_image_features(processor(images=images)["pixel_values"].to(device))

    return _embed(model, encode, range(0, len(dataset), batch_size), device, desc="image embeddings", unit="batch")


def embed_texts(model, processor, texts: list[str], batch_size: int = 256,
                device: str | torch.device | None = None) -> np.ndarray:
    """L2-normalised text embeddings `(len(texts), dim)` float32 with `get_text_features`."""
    def encode(start, device):
        inputs = processor(text=list(texts[start : start + batch_size]))
        return model.get_text_features(**{k: v.to(device) for k, v in inputs.items()})

    return _embed(model, encode, range(0, len(texts), batch_size), device, disable=True)
