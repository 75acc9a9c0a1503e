import numpy as np
import pytest
import torch

from dclip.evaluation import retrieval_recall, zero_shot_accuracy


def naive_recall(image_embeds, text_embeds, text_to_image, k):
    images, texts = len(image_embeds), len(text_embeds)
    sim = [[float(np.dot(image_embeds[i], text_embeds[t])) for t in range(texts)] for i in range(images)]
    t2i = 0
    for t in range(texts):
        order = sorted(range(images), key=lambda i: -sim[i][t])
        t2i += text_to_image[t] in order[:k]
    i2t = 0
    for i in range(images):
        order = sorted(range(texts), key=lambda t: -sim[i][t])
        i2t += any(text_to_image[t] == i for t in order[:k])
    return i2t / images, t2i / texts


@pytest.mark.parametrize("k", [1, 5, 10])
def test_recall_matches_naive_loop_with_five_captions_per_image(k):
    rng = np.random.default_rng(0)
    images, per_image, dim = 40, 5, 16
    image_embeds = rng.normal(size=(images, dim)).astype(np.float32)
    text_to_image = np.repeat(np.arange(images), per_image)
    text_embeds = (image_embeds[text_to_image] + 1.5 * rng.normal(size=(images * per_image, dim))).astype(np.float32)
    image_embeds /= np.linalg.norm(image_embeds, axis=1, keepdims=True)
    text_embeds /= np.linalg.norm(text_embeds, axis=1, keepdims=True)
    result = retrieval_recall(image_embeds, text_embeds, text_to_image, ks=(k,))
    i2t, t2i = naive_recall(image_embeds, text_embeds, text_to_image, k)
    assert result[f"text_retrieval_recall@{k}"] == pytest.approx(i2t)
    assert result[f"image_retrieval_recall@{k}"] == pytest.approx(t2i)
    assert 0 < t2i < 1  # the case is not trivial


class OneHotModel(torch.nn.Module):
    """Image features = mean colour; text features = one-hot of the colour word. Hand-checkable."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def get_text_features(self, input_ids, attention_mask=None):
        return torch.eye(3)[input_ids[:, 0]]

    def get_image_features(self, pixel_values):
        return pixel_values.mean(dim=(2, 3))


class FakeProcessor:
    words = {"red": 0, "green": 1, "blue": 2}

    def __call__(self, text=None, images=None):
        if text is not None:
            return {"input_ids": torch.tensor([[self.words[t.split()[-1].rstrip(".")]] for t in text])}
        return {"pixel_values": torch.stack([torch.tensor(np.asarray(im), dtype=torch.float32).permute(2, 0, 1) for im in images])}


def test_zero_shot_hand_computed():
    from PIL import Image

    colours = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
    rows = {"image": [Image.new("RGB", (4, 4), colours[c]) for c in ("red", "blue", "blue", "green")],
            "label": [0, 2, 1, 1]}  # the third label is wrong on purpose

    class Rows:
        def __len__(self):
            return 4

        def __getitem__(self, item):
            return {k: v[item] for k, v in rows.items()}

    accuracy = zero_shot_accuracy(OneHotModel(), FakeProcessor(), Rows(), "label", ["red", "green", "blue"],
                                  template="a {}.")
    assert accuracy == pytest.approx(3 / 4)
