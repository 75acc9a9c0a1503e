"""Tiny checkpoints built and saved locally by the tests, in the same formats as real Hub checkpoints."""

from __future__ import annotations

import math
import os
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch


REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))

IMAGE_SIZE = 32
CORPUS = [
    "a small red circle to the left of two blue squares",
    "three green triangles above a large yellow star on a gray background",
    "a purple square below an orange circle",
    "one big white star next to a tiny black triangle",
    "this is a photo of a circle",
]


# Prefix of a script run in a fresh process: this repo's modules are blocked, so only copies next to the weights
# (loaded with trust_remote_code) can be used.
BLOCK_REPO_IMPORTS = textwrap.dedent(
    """
    import importlib.abc, sys
    BLOCKED = {"dclip", "configuration_dclip", "modeling_dclip", "processing_dclip"}

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked in this test")

    sys.meta_path.insert(0, Block())
    try:
        import modeling_dclip
        raise SystemExit("the repo is importable; the test would prove nothing")
    except ImportError:
        pass
    """
)


@pytest.fixture(scope="session")
def tokenizer():
    from dclip.data.tokenizer import train_clip_tokenizer

    return train_clip_tokenizer(CORPUS * 4, vocab_size=600, model_max_length=24)


def tiny_clip_config_kwargs(tokenizer, projection_dim: int = 16) -> dict:
    text_config = dict(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    vision_config = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=IMAGE_SIZE,
        patch_size=8,
    )
    return dict(text_config=text_config, vision_config=vision_config, projection_dim=projection_dim)


@pytest.fixture(scope="session")
def tiny_clip(tokenizer):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    return CLIPModel(CLIPConfig(**tiny_clip_config_kwargs(tokenizer))).eval()


@pytest.fixture(scope="session")
def image_processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


@pytest.fixture(scope="session")
def processor(image_processor, tokenizer):
    from processing_dclip import DCLIPProcessor

    return DCLIPProcessor(image_processor, tokenizer, max_regions=4, max_spans=4)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory, tiny_clip, tokenizer, image_processor):
    """A CLIP checkpoint folder in the layout of `openai/clip-vit-base-patch32`: weights, config, processor."""
    from transformers import CLIPProcessor

    path = tmp_path_factory.mktemp("tiny-clip")
    tiny_clip.save_pretrained(path)
    CLIPProcessor(image_processor, tokenizer).save_pretrained(path)
    return path


def unit_rows(rows: int, dim: int, seed: int):
    """`rows` random unit vectors of `dim` (float32)."""
    from dclip.curation import normalize_embeddings

    return normalize_embeddings(np.random.default_rng(seed).standard_normal((rows, dim)))


def random_images(count: int, seed: int = 0, size: int = 48):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)) for _ in range(count)]


def fused_teacher(tiny_clip, seed: int = 0):
    """A teacher from the tiny CLIP whose fused residual is large enough that regions and spans change its
    embeddings (a fresh teacher's output projections start near zero, which would hide lost region inputs)."""
    from modeling_dclip import DCLIPTeacherModel

    torch.manual_seed(seed)
    model = DCLIPTeacherModel.from_clip(tiny_clip, fusion_hidden_size=32, fusion_num_heads=4, max_regions=4,
                                        max_spans=4)
    with torch.no_grad():
        model.image_output_projection.weight.normal_(std=0.2)
        model.text_output_projection.weight.normal_(std=0.2)
    return model.eval()


def run_without_heavy_imports(imports: str, heavy: tuple[str, ...], then: str = "") -> str:
    """Import `imports` in a fresh interpreter (this checkout first on the path) and fail if any module of `heavy`
    got imported with them; run `then` after, and return the output."""
    import subprocess

    code = (f"import sys, {imports}\nheavy = [m for m in {heavy!r} if m in sys.modules]\nassert not heavy, heavy\n"
            + then)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO_ROOT)
    assert completed.returncode == 0, completed.stderr[-2000:]
    return completed.stdout


def naive_margin_loss(features, centers, labels, scale, margin):
    """ArcFace loss of one batch written out with angles (no fall-back case: all angles + margin stay below pi)."""
    total = 0.0
    for feature, label in zip(features, labels):
        cosines = [float(torch.nn.functional.cosine_similarity(feature, center, dim=0)) for center in centers]
        logits = [scale * (math.cos(math.acos(c) + margin) if j == label else c) for j, c in enumerate(cosines)]
        total += -logits[label] + math.log(sum(math.exp(v) for v in logits))
    return total / len(labels)


def naive_affinity_loss(student_images, student_texts, teacher_images, teacher_texts, scale, teacher_scale):
    """KL(teacher || student) of each row's in-batch distribution, image->text and text->image, written out."""
    def softmax(row):
        top = max(row)
        weights = [math.exp(v - top) for v in row]
        return [w / sum(weights) for w in weights]

    student_images, student_texts, teacher_images, teacher_texts = (  # plain numbers: no graph to convert
        tensor.detach() for tensor in (student_images, student_texts, teacher_images, teacher_texts))
    n, total = student_images.shape[0], 0.0
    for i in range(n):
        for student_a, student_b, teacher_a, teacher_b in ((student_images, student_texts, teacher_images,
                                                            teacher_texts),
                                                           (student_texts, student_images, teacher_texts,
                                                            teacher_images)):
            p = softmax([teacher_scale * float(teacher_a[i] @ teacher_b[j]) for j in range(n)])
            q = softmax([scale * float(student_a[i] @ student_b[j]) for j in range(n)])
            total += sum(p_j * (math.log(p_j) - math.log(q_j)) for p_j, q_j in zip(p, q))
    return total / (2 * n)
