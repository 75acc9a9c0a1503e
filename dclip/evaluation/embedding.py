"""Embedding loops shared by every evaluation: `load_clip_towers` opens any checkpoint as a pair of towers, and
`embed_images` / `embed_texts` run them over a data set or a list of strings in batches (`embed_captioned` over
both sides of a captioned data set), returning L2-normalised float32
numpy arrays (`get_image_features` / `get_text_features`, whether they return a tensor or a transformers output)."""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from ..teachers import model_type, pooled_features
from .retrieval import image_groups


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


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The reduced precision embedding runs under on `device`: bfloat16 on a GPU that has it, else float16 on a GPU;
    None (full precision) on CPU, where bfloat16 matmuls are slower than float32 on most processors."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@torch.no_grad()
def _embed(model, encode, batches, device: str | torch.device | None, amp: bool | None = None,
           **progress) -> np.ndarray:
    """L2-normalised float32 features `(rows, dim)` of `encode(batch, device)` over `batches`, under autocast where
    `amp` (default: where the device has a reduced precision, `autocast_dtype`)."""
    device = torch.device(device or next(model.parameters()).device)
    dtype = autocast_dtype(device) if amp is not False else None
    model.eval()
    chunks = []
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        for batch in tqdm(batches, **progress):
            features = pooled_features(encode(batch, device))
            chunks.append(torch.nn.functional.normalize(features.float(), dim=-1).cpu())
    return torch.cat(chunks).numpy() if chunks else np.empty((0, 0), dtype=np.float32)


def default_num_workers() -> int:
    """`DataLoader` processes that decode images while the model runs: none on 2 cores or fewer, where they compete
    with the model for the same cores (measured: one worker embedded 50,000 64-px images at 0.92x the speed of none,
    median of 4 paired runs, BENCHMARKS.md), else one core in two, up to 4 (not measured here: for machines where
    the model runs on a GPU and decoding in the main process would keep it waiting)."""
    import os

    cores = os.cpu_count() or 1
    return 0 if cores <= 2 else min(4, cores // 2)


class _ImageBatches(torch.utils.data.Dataset):
    """Batches of a data set's images as pixel tensors, for a `DataLoader` whose workers decode and pre-process."""

    def __init__(self, dataset, processor, batch_size: int, image_column: str):
        self.dataset, self.processor, self.batch_size, self.image_column = dataset, processor, batch_size, image_column

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def __getitem__(self, index: int) -> torch.Tensor:
        start = index * self.batch_size
        images = self.dataset[start : start + self.batch_size][self.image_column]
        return self.processor(images=images)["pixel_values"]


def embed_images(model, processor, dataset, batch_size: int = 256, image_column: str = "image",
                 device: str | torch.device | None = None, num_workers: int = 0,
                 amp: bool | None = None) -> np.ndarray:
    """L2-normalised image embeddings `(rows, dim)` float32 of `dataset[image_column]` with `get_image_features`;
    `num_workers` `DataLoader` processes decode and pre-process the images (0: this process), in order."""
    import multiprocessing

    # forked workers share the processor (and a model a dual encoder's processor holds) instead of pickling them
    context = "fork" if num_workers and "fork" in multiprocessing.get_all_start_methods() else None
    batches = torch.utils.data.DataLoader(_ImageBatches(dataset, processor, batch_size, image_column), batch_size=None,
                                          num_workers=num_workers, prefetch_factor=2 if num_workers else None,
                                          multiprocessing_context=context if num_workers else None)

    def encode(pixel_values, device):
        return model.get_image_features(pixel_values.to(device))

    return _embed(model, encode, batches, device, amp, desc="image embeddings", unit="batch")


def embed_texts(model, processor, texts: list[str], batch_size: int = 256,
                device: str | torch.device | None = None, amp: bool | None = None) -> np.ndarray:
    """L2-normalised text embeddings `(len(texts), dim)` float32 with `get_text_features`."""
    def encode(start, device):
        inputs = processor(text=list(texts[start : start + batch_size]))
        return model.get_text_features(**{k: v.to(device) for k, v in inputs.items()})

    return _embed(model, encode, range(0, len(texts), batch_size), device, amp, disable=True)


def embed_captioned(model, processor, captioned, batch_size: int = 256, num_workers: int = 0):
    """The distinct images (`image_groups`: one row per image) and every caption of a captioned data set (`image`,
    `caption`, optional `image_id`), embedded: `(images, image_embeds, text_embeds, text_to_image)`, where
    `text_to_image[t]` is the row of caption `t`'s image in `images`."""
    image_rows, text_to_image = image_groups(captioned)
    images = captioned.select(image_rows) if len(image_rows) != len(captioned) else captioned
    image_embeds = embed_images(model, processor, images, batch_size=batch_size, num_workers=num_workers)
    text_embeds = embed_texts(model, processor, captioned["caption"], batch_size=batch_size)
    return images, image_embeds, text_embeds, text_to_image
