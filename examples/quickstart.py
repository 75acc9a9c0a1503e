"""Wrap a CLIP checkpoint as a DCLIP student and teacher, save them Hub-ready, reload them with trust_remote_code.

    python examples/quickstart.py                                   # offline: a tiny random CLIP built here
    python examples/quickstart.py --clip openai/clip-vit-base-patch32 --output_dir outputs/quickstart
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor, CLIPConfig, CLIPImageProcessor, CLIPModel, HfArgumentParser, pipeline

from dclip.data.tokenizer import train_clip_tokenizer
from modeling_dclip import DCLIPModel, DCLIPTeacherModel
from processing_dclip import DCLIPProcessor


@dataclass
class QuickstartArguments:
    clip: str | None = field(default=None,
                             metadata={"help": "CLIP checkpoint (Hub name or folder); default: tiny random"})
    output_dir: str = field(default="outputs/quickstart", metadata={"help": "where the two model folders go"})


def tiny_offline_clip() -> tuple[CLIPModel, DCLIPProcessor]:
    captions = ["a red circle", "a blue square", "a green star", "two yellow triangles above a circle"]
    tokenizer = train_clip_tokenizer(captions * 8, vocab_size=600, model_max_length=32)
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=32, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=64,
                  patch_size=16)
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=32))
    image_processor = CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    return clip, DCLIPProcessor(image_processor, tokenizer)


def main() -> None:
    (args,) = HfArgumentParser(QuickstartArguments).parse_args_into_dataclasses()
    if args.clip is None:
        clip, processor = tiny_offline_clip()
    else:
        clip = CLIPModel.from_pretrained(args.clip)
        clip_processor = AutoProcessor.from_pretrained(args.clip)
        processor = DCLIPProcessor(clip_processor.image_processor, clip_processor.tokenizer)

    output = Path(args.output_dir)
    student = DCLIPModel.from_clip(clip)
    teacher = DCLIPTeacherModel.from_clip(clip, fusion_hidden_size=64, fusion_num_heads=4)
    for name, model in (("student", student), ("teacher", teacher)):
        model.save_pretrained(output / name)
        processor.save_pretrained(output / name)
        print(f"{name}: {output / name}  ({sorted(p.name for p in (output / name).iterdir())})")

    reloaded = AutoModel.from_pretrained(output / "student", trust_remote_code=True)
    print(f"AutoModel loaded {type(reloaded).__name__}; exported to {type(reloaded.to_clip()).__name__}")
    image = Image.fromarray(np.full((80, 80, 3), (200, 30, 30), dtype=np.uint8))
    classifier = pipeline("zero-shot-image-classification", model=str(output / "student"), trust_remote_code=True)
    print("zero-shot (untrained weights, so near uniform):",
          classifier(image, candidate_labels=["circle", "square", "star"]))


if __name__ == "__main__":
    main()
