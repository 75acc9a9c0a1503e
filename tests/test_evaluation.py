import numpy as np
import pytest
import torch

from dclip.evaluation import (
    image_groups, recall_from_scores, rerank_scores, retrieval_recall, teacher_retrieval, zero_shot_accuracy,
)


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


def naive_reranked_ranks(scores, pair_score, top_k, truth):
    """Per query: sort its top_k candidates by pair_score, then the rest by the original score; 0-based rank of
    the best true candidate (`truth[q]`: the set of true candidates)."""
    ranks = []
    for q in range(scores.shape[0]):
        order = sorted(range(scores.shape[1]), key=lambda c: -float(scores[q, c]))
        head = sorted(order[:top_k], key=lambda c: -float(pair_score(torch.tensor([q]), torch.tensor([c]))[0]))
        ranking = head + order[top_k:]
        ranks.append(min(ranking.index(c) for c in truth[q]))
    return np.array(ranks)


@pytest.mark.parametrize("top_k", [1, 3, 7])
def test_reranked_recall_matches_a_naive_loop(top_k):
    rng = np.random.default_rng(3)
    images, per_image = 12, 2
    text_to_image = np.repeat(np.arange(images), per_image)
    global_scores = torch.from_numpy(rng.normal(size=(images, images * per_image)).astype(np.float32))
    fused_table = torch.from_numpy(rng.normal(size=(images, images * per_image)).astype(np.float32))
    fused_table[text_to_image, np.arange(images * per_image)] += 1.0  # the re-ranker knows something

    def image_query(image, text):
        return fused_table[image, text]

    def text_query(text, image):
        return fused_table[image, text]

    image_scores = rerank_scores(global_scores, image_query, top_k, batch_size=5)
    text_scores = rerank_scores(global_scores.t(), text_query, top_k, batch_size=5)
    result = recall_from_scores(image_scores, text_scores, text_to_image, ks=(1, 5))
    image_truth = [set(np.flatnonzero(text_to_image == i)) for i in range(images)]
    text_truth = [{text_to_image[t]} for t in range(images * per_image)]
    i2t = naive_reranked_ranks(global_scores, image_query, top_k, image_truth)
    t2i = naive_reranked_ranks(global_scores.t(), text_query, top_k, text_truth)
    for k in (1, 5):
        assert result[f"text_retrieval_recall@{k}"] == pytest.approx((i2t < k).mean())
        assert result[f"image_retrieval_recall@{k}"] == pytest.approx((t2i < k).mean())
    plain = recall_from_scores(global_scores, global_scores.t(), text_to_image, ks=(1,))
    if top_k > 1:  # the re-ranker changed the answer, so the test can tell the two apart
        assert plain != {key: value for key, value in result.items() if key.endswith("@1")}


def test_image_groups_maps_captions_to_first_rows():
    from datasets import Dataset

    rows, text_to_image = image_groups(Dataset.from_dict({"image_id": ["a", "a", "b", "c", "b"]}))
    assert rows.tolist() == [0, 2, 3] and text_to_image.tolist() == [0, 0, 1, 2, 1]
    rows, text_to_image = image_groups(Dataset.from_dict({"caption": ["x", "y"]}))
    assert rows.tolist() == [0, 1] and text_to_image.tolist() == [0, 1]


def test_teacher_retrieval_is_the_fused_score_on_the_shortlist(tiny_clip, processor):
    from dclip.targets import compute_teacher_features
    from modeling_dclip import DCLIPTeacherModel

    from conftest import random_images
    from datasets import Dataset

    captions = ["a red circle", "two blue squares", "a green star", "a triangle above a circle", "a star",
                "three circles"]
    data = Dataset.from_dict({"image": random_images(6, seed=4), "caption": captions})
    torch.manual_seed(0)
    teacher = DCLIPTeacherModel.from_clip(tiny_clip, fusion_hidden_size=32, fusion_num_heads=4).eval()
    for projection in (teacher.image_output_projection, teacher.text_output_projection):  # a fusion with a say
        torch.nn.init.normal_(projection.weight, std=1.0)
    features = compute_teacher_features(data, teacher, processor, batch_size=4)
    result = teacher_retrieval(teacher, features, top_k=3, ks=(1, 3))

    with torch.no_grad():
        inputs = processor(text=captions, images=list(data["image"]), return_regions=True, return_spans=True)
        inputs.pop("region_source")
        out = teacher(**inputs)
    image_features, text_features = out.image_features, out.text_features
    similarity = out.global_image_embeds @ out.global_text_embeds.t()

    def fused(image, text):
        with torch.no_grad():
            return teacher.pair_logits(image_features, text_features, image, text)

    truth = [{i} for i in range(6)]
    i2t = naive_reranked_ranks(similarity, fused, 3, truth)
    t2i = naive_reranked_ranks(similarity.t(), lambda t, i: fused(i, t), 3, truth)
    for k in (1, 3):
        assert result[f"text_retrieval_recall@{k}"] == pytest.approx((i2t < k).mean())
        assert result[f"image_retrieval_recall@{k}"] == pytest.approx((t2i < k).mean())


def test_linear_probe_accuracy_on_separable_and_on_uninformative_features():
    from dclip.evaluation import linear_probe_accuracy

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=300)
    # class k sits at +10 on axis k: separable by a wide margin, so the probe is exact on fresh samples
    features = rng.normal(size=(300, 8)) + 10 * np.eye(8)[labels]
    test_labels = rng.integers(0, 3, size=200)
    test_features = rng.normal(size=(200, 8)) + 10 * np.eye(8)[test_labels]
    assert linear_probe_accuracy(features, labels, test_features, test_labels) == 1.0
    # features that carry no label information: about chance (1/3)
    noise = linear_probe_accuracy(rng.normal(size=(300, 8)), labels, rng.normal(size=(2000, 8)),
                                  rng.integers(0, 3, size=2000))
    assert 0.25 < noise < 0.42
