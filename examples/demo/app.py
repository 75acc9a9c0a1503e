"""A Gradio demo of a CLIP student: zero-shot classification (an image and comma-separated labels -> label
probabilities) and text-to-image search over a small gallery (a query -> the best-matching images with their cosine
similarities).

The model is any student folder or Hub name: a DCLIP student (its remote code loaded with `trust_remote_code`) or a
plain CLIP folder, such as one written by `dclip.export.export_clip_folder`. This file imports only torch,
transformers, PIL and numpy, plus gradio when the UI is built, so that it runs on a Space where dclip is not
installed; `ZeroShotDemo` works without gradio.

    python examples/demo/app.py --model outputs/default/student/final
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor


HERE = Path(__file__).resolve().parent
# On a Space, set the variable DEMO_MODEL to the model's Hub name.
DEFAULT_MODEL = os.environ.get("DEMO_MODEL", "outputs/default/student/final")
DEFAULT_GALLERY = HERE / "gallery"
DEFAULT_TEMPLATE = "a photo of a {}."  # the prompt dclip's zero-shot evaluation uses
DEFAULT_LABELS = "red circle, blue square, green triangle, yellow star, purple hexagon"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def parse_labels(labels: str | list[str]) -> list[str]:
    """Labels from a comma-separated string (or a list): stripped, empty ones and repeats left out, in order."""
    items = labels.split(",") if isinstance(labels, str) else list(labels)
    found = list(dict.fromkeys(item.strip() for item in items if item and item.strip()))
    if not found:
        raise ValueError("Give at least one label (comma-separated, e.g. 'red circle, blue square').")
    return found


def load_gallery(folder: str | Path) -> list[tuple[str, Image.Image]]:
    """The images of `folder` (sorted by file name) as `(caption, RGB image)`, the caption being the file name
    without its suffix, underscores as spaces."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"Gallery folder '{folder}' does not exist.")
    gallery = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in IMAGE_SUFFIXES:
            with Image.open(path) as image:
                gallery.append((path.stem.replace("_", " "), image.convert("RGB")))
    return gallery


def _projected(features) -> torch.Tensor:
    """Projected features from `get_image_features` / `get_text_features`: a tensor (a DCLIP student) or, for
    `transformers.CLIPModel`, an output whose `pooler_output` holds them."""
    return features if isinstance(features, torch.Tensor) else features.pooler_output


class ZeroShotDemo:
    """The demo's predictions, usable without gradio: `classify(image, labels)` and `search(query, k)`."""

    def __init__(self, model, processor, gallery: list[tuple[str, Image.Image]] | None = None,
                 template: str = DEFAULT_TEMPLATE):
        self.model = model.eval()
        self.processor = processor
        self.gallery = list(gallery or [])
        self.template = template
        self._gallery_embeds: torch.Tensor | None = None  # (images, dim), L2-normalised; computed on first search

    @classmethod
    def from_pretrained(cls, model_name_or_path: str, gallery_dir: str | Path | None = DEFAULT_GALLERY,
                        trust_remote_code: bool = True, **kwargs) -> ZeroShotDemo:
        """Load a model and its processor (a DCLIP student's remote code runs: give models you trust, or set
        `trust_remote_code=False` for plain CLIP folders) and the gallery of `gallery_dir`."""
        model = AutoModel.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
        processor = AutoProcessor.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
        model = model.to("cuda" if torch.cuda.is_available() else "cpu")
        return cls(model, processor, load_gallery(gallery_dir) if gallery_dir else None, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _inputs(self, **inputs) -> dict:
        # explicit, so that any CLIP processor pads and truncates as the zero-shot pipeline needs
        text_options = {"padding": True, "truncation": True} if "text" in inputs else {}
        return self.processor(**inputs, return_tensors="pt", **text_options).to(self.device)

    @torch.no_grad()
    def classify(self, image: Image.Image, labels: str | list[str]) -> dict[str, float]:
        """Probability of each label for `image`, best first: softmax over the scaled similarities of the image and
        each label in the prompt template, as the `zero-shot-image-classification` pipeline computes them."""
        if image is None:
            raise ValueError("Give an image to classify.")
        labels = parse_labels(labels)
        image = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
        inputs = self._inputs(images=[image.convert("RGB")], text=[self.template.format(label) for label in labels])
        probabilities = self.model(**inputs).logits_per_image[0].softmax(dim=-1).tolist()
        return dict(sorted(zip(labels, probabilities), key=lambda item: -item[1]))

    @torch.no_grad()
    def gallery_embeds(self) -> torch.Tensor:
        """L2-normalised embeddings of the gallery images, `(images, dim)`, computed once."""
        if self._gallery_embeds is None:
            chunks = []
            for start in range(0, len(self.gallery), 32):
                images = [image for _, image in self.gallery[start : start + 32]]
                features = _projected(self.model.get_image_features(**self._inputs(images=images)))
                chunks.append(torch.nn.functional.normalize(features.float(), dim=-1))
            self._gallery_embeds = torch.cat(chunks) if chunks else torch.empty(0, 0)
        return self._gallery_embeds

    @torch.no_grad()
    def rank(self, query: str) -> list[tuple[int, float]]:
        """Every gallery image as `(index, cosine similarity to the query)`, most similar first."""
        if not query or not query.strip():
            raise ValueError("Give a query, e.g. 'a red circle'.")
        if not self.gallery:
            raise ValueError("The gallery is empty.")
        text = self._inputs(text=[query.strip()])
        features = _projected(self.model.get_text_features(input_ids=text["input_ids"],
                                                           attention_mask=text["attention_mask"]))
        scores = self.gallery_embeds() @ torch.nn.functional.normalize(features.float(), dim=-1)[0]
        order = sorted(range(len(scores)), key=lambda index: -float(scores[index]))
        return [(index, float(scores[index])) for index in order]

    def search(self, query: str, k: int = 4) -> list[tuple[Image.Image, float]]:
        """The `k` gallery images most similar to `query`, with their cosine similarities, best first."""
        return [(self.gallery[index][1], score) for index, score in self.rank(query)[: max(int(k), 1)]]


def build_ui(demo: ZeroShotDemo, title: str = "DCLIP student"):
    """The Gradio Blocks app (not launched): a zero-shot classification tab and a text-to-image search tab."""
    import gradio as gr

    def classify(image, labels):
        try:
            return demo.classify(image, labels)
        except ValueError as error:
            raise gr.Error(str(error)) from None

    def search(query, k):
        try:
            return [(demo.gallery[index][1], f"{demo.gallery[index][0]} ({score:.3f})")
                    for index, score in demo.rank(query)[: int(k)]]
        except ValueError as error:
            raise gr.Error(str(error)) from None

    with gr.Blocks(title=title) as blocks:
        gr.Markdown(f"# {title}\nZero-shot classification and text-to-image search with a distilled CLIP.")
        with gr.Tab("Zero-shot classification"):
            with gr.Row():
                image = gr.Image(type="pil", image_mode="RGB", label="Image")
                with gr.Column():
                    labels = gr.Textbox(value=DEFAULT_LABELS, label="Labels, comma-separated")
                    classify_button = gr.Button("Classify", variant="primary")
                    probabilities = gr.Label(label="Label probabilities", num_top_classes=10)
            classify_button.click(classify, [image, labels], probabilities)
            if demo.gallery:
                gr.Examples([[gallery_image, DEFAULT_LABELS] for _, gallery_image in demo.gallery[:4]],
                            [image, labels])
        with gr.Tab("Text-to-image search"):
            with gr.Row():
                query = gr.Textbox(value="a red circle", label="Query")
                k = gr.Slider(1, max(len(demo.gallery), 1), value=min(4, max(len(demo.gallery), 1)), step=1,
                              label="Images to show")
            search_button = gr.Button("Search", variant="primary")
            results = gr.Gallery(label=f"Best matches among {len(demo.gallery)} gallery images", columns=4)
            search_button.click(search, [query, k], results)
    return blocks


def main() -> None:
    parser = argparse.ArgumentParser(description="Gradio demo of a CLIP student: zero-shot classification and "
                                                 "text-to-image search.")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="student folder or Hub name (default: $DEMO_MODEL, "
                                                               "else outputs/default/student/final)")
    parser.add_argument("--gallery", default=str(DEFAULT_GALLERY), help="folder of images to search")
    parser.add_argument("--template", default=DEFAULT_TEMPLATE, help="zero-shot prompt, '{}' is the label")
    parser.add_argument("--no_remote_code", action="store_true",
                        help="refuse models that need remote code (a plain CLIP folder needs none)")
    parser.add_argument("--share", action="store_true", help="also serve on a public gradio.live link")
    args = parser.parse_args()
    demo = ZeroShotDemo.from_pretrained(args.model, args.gallery, trust_remote_code=not args.no_remote_code,
                                        template=args.template)
    build_ui(demo).launch(share=args.share)


if __name__ == "__main__":
    main()
