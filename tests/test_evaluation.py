import numpy as np
import pytest
import torch

from dclip.evaluation import (
    evaluate_model,
    image_groups,
    recall_from_scores,
    rerank_scores,
    retrieval_metrics,
    teacher_retrieval,
    zero_shot_accuracy,
    zero_shot_classification,
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
    result = retrieval_metrics(image_embeds, text_embeds, text_to_image, ks=(k,))
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

    def __call__(self, images=None, text=None):  # the transformers 5 order, as DCLIPProcessor
        if text is not None:
            return {"input_ids": torch.tensor([[self.words[t.split()[-1].rstrip(".")]] for t in text])}
        return {
            "pixel_values": torch.stack(
                [torch.tensor(np.asarray(im), dtype=torch.float32).permute(2, 0, 1) for im in images]
            )
        }


def test_zero_shot_hand_computed():
    from PIL import Image

    colours = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
    rows = {"image": [Image.new("RGB", (4, 4), colours[c]) for c in ("red", "blue", "blue", "green")],
            "label": [0, 2, 1, 1]}  # the third label is wrong on purpose

    class Rows:
        def __len__(self):
            return 4

        def __getitem__(self, item):
            return rows[item] if isinstance(item, str) else {k: v[item] for k, v in rows.items()}

    accuracy = zero_shot_accuracy(OneHotModel(), FakeProcessor(), Rows(), "label", ["red", "green", "blue"],
                                  template="a {}.")
    assert accuracy == pytest.approx(3 / 4)
    # predictions red, blue, blue, green against labels red, blue, green, green: per class 1, 1/2, 1
    result = zero_shot_classification(OneHotModel(), FakeProcessor(), Rows(), "label", ["red", "green", "blue"],
                                      templates=("a {}.", "the colour {}."))
    assert result["per_class_recall"] == {"red": 1.0, "green": 0.5, "blue": 1.0}
    assert result["mean_per_class_recall"] == pytest.approx(2.5 / 3)
    assert "acc5" not in result  # 3 classes: top-5 says nothing


def test_classification_metrics_hand_computed():
    from dclip.evaluation import classification_metrics

    scores = np.array([[0.9, 0.1, 0.0, 0.0, 0.0, 0.0, 0.5],    # label 0: top-1
                       [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6],    # label 0: last of 7 -> misses top-5
                       [0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1],    # label 4: 5th -> top-5 hit only
                       [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]])   # label 6: top-1
    result = classification_metrics(scores, [0, 0, 4, 6], [f"c{i}" for i in range(7)])
    assert result["acc1"] == pytest.approx(2 / 4)
    assert result["acc5"] == pytest.approx(3 / 4)
    assert result["per_class_recall"] == {"c0": 0.5, "c4": 0.0, "c6": 1.0}
    assert result["mean_per_class_recall"] == pytest.approx(1.5 / 3)


def test_hard_negative_accuracy_hand_computed():
    from dclip.evaluation import hard_negative_accuracy

    rows = {"hard_negatives": [["a red.", "a green."], ["a blue."]],
            "hard_negative_types": [["swap_attribute", "wrong_count"], ["swap_attribute"]]}

    class Rows(dict):
        column_names = list(rows)

    image_embeds = np.array([[1.0, 0.0, 0.0], [0.0, 0.6, 0.8]], dtype=np.float32)
    text_embeds = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=np.float32)  # captions: "green", "blue"
    # image 0 vs its caption 0.0: "red" 1.0 beats it, "green" 0.0 ties (not beaten); image 1: 0.8 vs "blue" 0.8 ties
    result = hard_negative_accuracy(OneHotModel(), FakeProcessor(), Rows(rows), image_embeds, text_embeds)
    assert result == {"hard_negative_accuracy": 0.0, "hard_negative_accuracy_swap_attribute": 0.0,
                      "hard_negative_accuracy_wrong_count": 0.0}
    text_embeds = np.array([[0.6, 0.0, 0.8], [0.0, 0.0, 1.0]], dtype=np.float32)
    image_embeds = np.array([[0.8, 0.0, 0.6], [0.0, 0.6, 0.8]], dtype=np.float32)
    # image 0: caption 0.96 > red 0.8, > green 0.0; image 1: caption 0.8 = blue 0.8 -> 2 of 3
    result = hard_negative_accuracy(OneHotModel(), FakeProcessor(), Rows(rows), image_embeds, text_embeds)
    assert result["hard_negative_accuracy"] == pytest.approx(2 / 3)
    assert result["hard_negative_accuracy_swap_attribute"] == pytest.approx(1 / 2)
    assert result["hard_negative_accuracy_wrong_count"] == 1.0


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


def fused_teacher(tiny_clip):
    """A small DCLIP teacher whose fusion has a say (large output projections), seeded."""
    from modeling_dclip import DCLIPTeacherModel

    torch.manual_seed(0)
    teacher = DCLIPTeacherModel.from_clip(tiny_clip, fusion_hidden_size=32, fusion_num_heads=4).eval()
    for projection in (teacher.image_output_projection, teacher.text_output_projection):
        torch.nn.init.normal_(projection.weight, std=1.0)
    return teacher


def test_teacher_retrieval_is_the_fused_score_on_the_shortlist(tiny_clip, processor):
    from conftest import random_images
    from datasets import Dataset

    from dclip.targets import compute_teacher_features

    captions = ["a red circle", "two blue squares", "a green star", "a triangle above a circle", "a star",
                "three circles"]
    data = Dataset.from_dict({"image": random_images(6, seed=4), "caption": captions})
    teacher = fused_teacher(tiny_clip)
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


def test_teacher_hard_negatives_compare_fused_scores_of_each_image_with_its_caption_and_negatives(tiny_clip,
                                                                                                   processor):
    """Each (image, hard negative) outcome is the fused score of the image with its own caption against the fused
    score with the negative, each computed here by a full teacher forward on that one pair."""
    from conftest import random_images
    from datasets import Dataset

    from dclip.evaluation import teacher_hard_negatives
    from dclip.evaluation.teacher import _encode_prompts
    from dclip.targets import compute_teacher_features

    captions = ["a red circle left of a blue square", "two green stars", "a blue triangle above a red circle"]
    negatives = [["a blue circle left of a red square", "a blue square left of a red circle"], ["three green stars"],
                 ["a red triangle above a blue circle", "a red circle above a blue triangle", "two blue triangles"]]
    kinds = [["swap_attribute", "swap_relation"], ["wrong_count"], ["swap_attribute", "swap_relation", "wrong_count"]]
    data = Dataset.from_dict({"image": random_images(3, seed=5), "caption": captions})
    teacher = fused_teacher(tiny_clip)
    features = compute_teacher_features(data, teacher, processor, batch_size=2)
    outcomes = {}
    result = teacher_hard_negatives(teacher, processor, features, negatives, kinds, batch_size=2, outcomes=outcomes)

    def fused(image, caption):
        with torch.no_grad():
            inputs = processor(text=[caption], images=[image], return_regions=True, return_spans=True)
            inputs.pop("region_source")
            out = teacher(**inputs)
            zero = torch.zeros(1, dtype=torch.long)
            return teacher.pair_logits(out.image_features, out.text_features, zero, zero).item()

    expected = {"all": [], "swap_attribute": [], "swap_relation": [], "wrong_count": []}
    for image, caption, row, row_kinds in zip(data["image"], captions, negatives, kinds):
        for negative, kind in zip(row, row_kinds):
            correct = fused(image, caption) > fused(image, negative)
            expected["all"].append(correct)
            expected[kind].append(correct)
    assert 0 < np.mean(expected["all"]) < 1  # both outcomes occur: the comparison is not trivially one-sided
    assert outcomes["hard_negative_accuracy"].tolist() == [float(c) for c in expected["all"]]
    for kind in ("swap_attribute", "swap_relation", "wrong_count"):
        assert result[f"hard_negative_accuracy_{kind}"] == pytest.approx(np.mean(expected[kind]))
    # prompts encoded in batches that find different numbers of spans: padded to one width, the same scores
    flat = [text for row in negatives for text in row]
    one, several = (_encode_prompts(teacher, processor, flat, "cpu", batch_size=size) for size in (1024, 1))
    image_features, _ = teacher_image_side(features, teacher)
    index = torch.tensor([0, 0, 1, 2, 2, 2])
    texts = torch.arange(len(flat))
    with torch.no_grad():
        torch.testing.assert_close(teacher.pair_logits(image_features, several, index, texts),
                                   teacher.pair_logits(image_features, one, index, texts), atol=1e-5, rtol=1e-5)


def teacher_image_side(features, teacher):
    from dclip.evaluation.teacher import _feature_sides

    return _feature_sides(teacher, features, np.arange(len(features)), torch.device("cpu"))


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


def naive_average_precisions(image_embeds, text_embeds, text_to_image):
    """Textbook AP per query from a full sort: mean over the query's positives of (positives so far) / position."""
    sim = image_embeds.astype(np.float64) @ text_embeds.astype(np.float64).T

    def average_precision(scores, positives):
        order = sorted(range(len(scores)), key=lambda c: -scores[c])
        hits, total = 0, 0.0
        for position, candidate in enumerate(order, start=1):
            if candidate in positives:
                hits += 1
                total += hits / position
        return total / len(positives)

    t2i = [average_precision(sim[:, t], {text_to_image[t]}) for t in range(sim.shape[1])]
    i2t = [average_precision(sim[i], {t for t in range(sim.shape[1]) if text_to_image[t] == i})
           for i in range(sim.shape[0])]
    return np.mean(t2i), np.mean(i2t)


def five_captions_per_image(images=40, dim=16, noise=1.5, seed=0):
    rng = np.random.default_rng(seed)
    image_embeds = rng.normal(size=(images, dim)).astype(np.float32)
    text_to_image = np.repeat(np.arange(images), 5)
    text_embeds = (image_embeds[text_to_image] + noise * rng.normal(size=(images * 5, dim))).astype(np.float32)
    image_embeds /= np.linalg.norm(image_embeds, axis=1, keepdims=True)
    text_embeds /= np.linalg.norm(text_embeds, axis=1, keepdims=True)
    return image_embeds, text_embeds, text_to_image


def test_map_matches_naive_loop_with_five_captions_per_image():
    image_embeds, text_embeds, text_to_image = five_captions_per_image()
    result = retrieval_metrics(image_embeds, text_embeds, text_to_image, backend="exact")
    t2i_map, i2t_map = naive_average_precisions(image_embeds, text_embeds, text_to_image)
    # float32 scores: a rival caption 7e-7 below a positive (float64) counts as a tie, moving mAP by 4e-6
    assert result["image_retrieval_mAP"] == pytest.approx(t2i_map, abs=1e-5)
    assert result["text_retrieval_mAP"] == pytest.approx(i2t_map, abs=1e-5)
    scores = torch.from_numpy(image_embeds) @ torch.from_numpy(text_embeds).t()  # one matrix: no rounding gap
    dense = recall_from_scores(scores, scores.t(), text_to_image)
    assert dense["text_retrieval_mAP"] == pytest.approx(i2t_map, abs=1e-6)
    assert 0.05 < i2t_map < 0.95 and 0.05 < t2i_map < 0.95  # not a trivial case
    # a hand case: one image, captions ranked 1st and 3rd of 3 -> AP = (1/1 + 2/3) / 2
    from dclip.evaluation import metrics_from_ranks

    hand = metrics_from_ranks(np.array([0.0, 0.0]), np.array([0.0, 2.0]), np.array([0, 0]), ks=(1,))
    assert hand["text_retrieval_mAP"] == pytest.approx((1 + 2 / 3) / 2)


def test_map_with_tied_positives_stays_at_most_one():
    from dclip.evaluation import metrics_from_ranks

    # two captions of one image tied at the top: each has no other caption strictly above it
    result = metrics_from_ranks(np.zeros(2), np.zeros(2), np.array([0, 0]), ks=(1,))
    assert result["text_retrieval_mAP"] == pytest.approx(1.0)


def test_exact_blocks_and_faiss_agree_with_the_dense_scores():
    from dclip.evaluation import exact_positive_ranks, faiss_positive_ranks, ranks_from_scores

    image_embeds, text_embeds, text_to_image = five_captions_per_image(images=120, dim=24, noise=1.0, seed=3)
    scores = torch.from_numpy(image_embeds) @ torch.from_numpy(text_embeds).t()
    dense = ranks_from_scores(scores, scores.t(), text_to_image)
    blocked = exact_positive_ranks(image_embeds, text_embeds, text_to_image, max_block_elements=1000)  # 1-image blocks
    np.testing.assert_array_equal(blocked[0], dense[0])
    np.testing.assert_array_equal(blocked[1], dense[1])
    # FAISS flat search to depth 10: the same ranks where they are below 10, inf beyond
    searched = faiss_positive_ranks(image_embeds, text_embeds, text_to_image, depth=10)
    for exact, found in zip(dense, searched):
        np.testing.assert_array_equal(found, np.where(exact < 10, exact, np.inf))
    exact_metrics = retrieval_metrics(image_embeds, text_embeds, text_to_image, backend="exact")
    faiss_metrics = retrieval_metrics(image_embeds, text_embeds, text_to_image, backend="faiss", faiss_depth=10)
    for key in ("image_retrieval_recall@5", "text_retrieval_recall@10"):
        assert faiss_metrics[key] == exact_metrics[key]
    assert faiss_metrics["image_retrieval_mAP@10"] <= exact_metrics["image_retrieval_mAP"]


def test_identical_captions_and_images_tie_instead_of_outranking_each_other():
    """Duplicates score the same up to rounding: the exact pass must count them as ties (the dense ranking of one
    score matrix does), whatever the rounding of the positive's own dot product."""
    from dclip.evaluation import exact_positive_ranks, ranks_from_scores

    image_embeds, text_embeds, text_to_image = five_captions_per_image(images=60, dim=48, noise=1.0, seed=8)
    image_embeds[30:] = image_embeds[:30]  # every image twice
    text_embeds[150:] = text_embeds[:150]  # and every caption, with the copy's image
    scores = torch.from_numpy(image_embeds) @ torch.from_numpy(text_embeds).t()
    dense = ranks_from_scores(scores, scores.t(), text_to_image)
    blocked = exact_positive_ranks(image_embeds, text_embeds, text_to_image, max_block_elements=3000)
    np.testing.assert_array_equal(blocked[0], dense[0])
    np.testing.assert_array_equal(blocked[1], dense[1])


def test_faiss_inverted_file_probing_every_list_is_exact_and_fewer_is_not():
    """Above `faiss_exact_below` the FAISS path searches an inverted file: probing all its lists must give the
    exact metrics; probing one is an approximation (it differs here, on unclustered random embeddings)."""
    image_embeds, text_embeds, text_to_image = five_captions_per_image(images=2000, dim=32, noise=1.2, seed=4)
    exact = retrieval_metrics(image_embeds, text_embeds, text_to_image, backend="faiss", faiss_depth=10)
    every_list = retrieval_metrics(image_embeds, text_embeds, text_to_image, backend="faiss", faiss_depth=10,
                                   faiss_nprobe=10_000, faiss_exact_below=1000)
    one_list = retrieval_metrics(image_embeds, text_embeds, text_to_image, backend="faiss", faiss_depth=10,
                                 faiss_nprobe=1, faiss_exact_below=1000)
    assert every_list == pytest.approx(exact, abs=1e-12)
    assert one_list["image_retrieval_recall@1"] < exact["image_retrieval_recall@1"] - 0.05
    assert 0.2 < exact["image_retrieval_recall@1"] < 0.95


def test_sampled_backend_ranks_its_queries_exactly_and_estimates_within_its_error():
    """The sampled backend ranks a sample of queries against the whole gallery: its figures must be the naive
    loops' over exactly those queries, with the standard error of a mean over them, and the exact figures over all
    queries must lie within a few of those errors."""
    from dclip.evaluation import metrics_from_ranks, ranks_from_scores

    image_embeds, text_embeds, text_to_image = five_captions_per_image(images=400, dim=24, noise=1.3, seed=5)
    exact = retrieval_metrics(image_embeds, text_embeds, text_to_image, backend="exact")
    sampled = retrieval_metrics(image_embeds, text_embeds, text_to_image, backend="sampled", sample_pairs=120_000,
                                seed=7)
    assert (sampled["image_retrieval_queries"], sampled["text_retrieval_queries"]) == (300, 60)
    # the same sample, ranked by a naive per-query loop over the dense scores
    rng = np.random.default_rng(7)
    captions = np.sort(rng.choice(len(text_embeds), 300, replace=False))
    images = np.sort(rng.choice(np.unique(text_to_image), 60, replace=False))
    scores = torch.from_numpy(image_embeds) @ torch.from_numpy(text_embeds).t()
    image_ranks, text_ranks = ranks_from_scores(scores, scores.t(), text_to_image)
    mine = np.isin(text_to_image, images)
    naive = metrics_from_ranks(image_ranks[captions], text_ranks[mine], text_to_image[mine])
    for key in ("image_retrieval_recall@1", "text_retrieval_recall@5", "image_retrieval_mAP", "text_retrieval_mAP"):
        assert sampled[key] == pytest.approx(naive[key], abs=1e-9), key
    hits = image_ranks[captions] < 1
    assert sampled["image_retrieval_recall@1_stderr"] == pytest.approx(np.std(hits, ddof=1) / np.sqrt(300))
    for key in ("image_retrieval_recall@1", "image_retrieval_recall@5", "text_retrieval_recall@1",
                "image_retrieval_mAP", "text_retrieval_mAP"):
        assert 0 < sampled[f"{key}_stderr"] < 0.1
        assert abs(sampled[key] - exact[key]) < 4 * sampled[f"{key}_stderr"], key
    assert 0.1 < exact["image_retrieval_recall@1"] < 0.9  # not a trivial case
    # above `exact_max_pairs`, auto samples; a sample as large as the data is the exact evaluation
    auto = retrieval_metrics(image_embeds, text_embeds, text_to_image, exact_max_pairs=10_000, sample_pairs=120_000,
                             seed=7)
    assert auto == sampled
    everything = retrieval_metrics(image_embeds, text_embeds, text_to_image, backend="sampled", sample_pairs=10**9)
    assert {key: everything[key] for key in exact} == pytest.approx(exact, abs=1e-12)


def test_retrieval_without_captions_gives_nan_not_an_error():
    image_embeds, text_embeds, text_to_image = five_captions_per_image(images=4)
    for backend in ("exact", "sampled"):
        metrics = retrieval_metrics(image_embeds, text_embeds[:0], text_to_image[:0], backend=backend)
        assert np.isnan(metrics["image_retrieval_recall@1"]) and np.isnan(metrics["text_retrieval_mAP"]), backend


def test_metrics_table_shows_estimates_with_their_errors():
    from dclip.evaluation import format_metrics_table

    table = format_metrics_table({
        "sampled": {"image_retrieval_recall@1": 0.8786, "image_retrieval_recall@1_stderr": 0.0021,
                    "image_retrieval_queries": 25000, "text_retrieval_mAP": 0.5,
                    "text_retrieval_mAP_stderr": float("nan")},
        "exact": {"image_retrieval_recall@1": 0.8802, "text_retrieval_mAP": 0.51}})
    rows = {line.split()[0]: line.split()[1:] for line in table.splitlines()[1:]}
    assert set(rows) == {"image_retrieval_recall@1", "text_retrieval_mAP"}  # no stderr or query-count rows
    assert rows["image_retrieval_recall@1"] == ["0.8786±0.0021", "0.8802"]
    assert rows["text_retrieval_mAP"] == ["0.5000", "0.5100"]  # a NaN error (one query) is not shown


def test_retrieval_rejects_inconsistent_inputs():
    image_embeds, text_embeds, text_to_image = five_captions_per_image(images=4)
    with pytest.raises(ValueError, match="one image index per caption"):
        retrieval_metrics(image_embeds, text_embeds, text_to_image[:-1])
    with pytest.raises(ValueError, match="must index the 4 images"):
        retrieval_metrics(image_embeds, text_embeds, text_to_image + 1)
    with pytest.raises(ValueError, match="backend"):
        retrieval_metrics(image_embeds, text_embeds, text_to_image, backend="annoy")


def test_evaluate_metric_module_matches_the_naive_loops():
    import evaluate
    from conftest import REPO_ROOT

    image_embeds, text_embeds, text_to_image = five_captions_per_image(images=30, seed=5)
    scores = (text_embeds @ image_embeds.T).tolist()  # a row per caption
    retrieval = evaluate.load(str(REPO_ROOT / "metrics" / "retrieval"))
    result = retrieval.compute(predictions=scores, references=text_to_image.tolist(), ks=[1, 5])
    t2i_map, i2t_map = naive_average_precisions(image_embeds, text_embeds, text_to_image)
    assert result["image_retrieval_mAP"] == pytest.approx(t2i_map, abs=1e-6)
    assert result["text_retrieval_mAP"] == pytest.approx(i2t_map, abs=1e-6)
    for k in (1, 5):
        i2t, t2i = naive_recall(image_embeds, text_embeds, text_to_image, k)
        assert result[f"image_retrieval_recall@{k}"] == pytest.approx(t2i)
        assert result[f"text_retrieval_recall@{k}"] == pytest.approx(i2t)
    # the docstring's hand case: captions 0, 1, 2 of images 0, 1, 1
    hand = retrieval.compute(predictions=[[0.9, 0.1], [0.2, 0.8], [0.7, 0.6]], references=[0, 1, 1], ks=[1])
    assert hand == pytest.approx({"image_retrieval_recall@1": 2 / 3, "text_retrieval_recall@1": 1.0,
                                  "image_retrieval_mAP": 2.5 / 3, "text_retrieval_mAP": 1.0})
    with pytest.raises(ValueError, match="must index the 2 images"):
        retrieval.compute(predictions=[[0.1, 0.2]], references=[2])


# ----- evaluate_model: each caption scored against its own image ------------------------------------------------


class LookupModel(torch.nn.Module):
    """Embeddings by lookup: image `k` is a solid grey of level `10 * k`, caption `c` is `captions.index(c)`."""

    def __init__(self, image_table, text_table):
        super().__init__()
        self.image_table, self.text_table = torch.tensor(image_table), torch.tensor(text_table)
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def get_image_features(self, pixel_values):
        return self.image_table[(pixel_values[:, 0, 0, 0] / 10).round().long()]

    def get_text_features(self, input_ids, attention_mask=None):
        return self.text_table[input_ids[:, 0]]


class LookupProcessor:
    def __init__(self, captions):
        self.index = {caption: i for i, caption in enumerate(captions)}

    def __call__(self, text=None, images=None):
        if text is not None:
            return {"input_ids": torch.tensor([[self.index[t]] for t in text])}
        return {"pixel_values": torch.stack([torch.tensor(np.asarray(im), dtype=torch.float32).permute(2, 0, 1)
                                             for im in images])}


def captioned_lookup_rows(noise: float, seed: int = 0):
    """12 captions of 7 images, several images with 2 or 3 captions, rows in no particular order; a lookup model
    whose caption embeddings are their image's plus `noise`."""
    from datasets import Dataset
    from PIL import Image

    rng = np.random.default_rng(seed)
    owners = [4, 1, 4, 0, 6, 1, 2, 5, 3, 4, 6, 2]  # the image of each row
    captions = [f"caption {row} of image {owner}" for row, owner in enumerate(owners)]
    image_table = rng.normal(size=(7, 8)).astype(np.float32)
    text_table = (image_table[owners] + noise * rng.normal(size=(len(owners), 8))).astype(np.float32)
    rows = Dataset.from_dict({
        "image": [Image.new("RGB", (4, 4), (10 * owner,) * 3) for owner in owners],
        "caption": captions, "image_id": [f"img-{owner}" for owner in owners],
    })
    return rows, LookupModel(image_table, text_table), LookupProcessor(captions), owners


def test_evaluate_model_scores_each_caption_against_its_own_image():
    # no noise: every caption's embedding is its image's, so every metric is exactly 1
    rows, model, processor, _ = captioned_lookup_rows(noise=0.0)
    result = evaluate_model(model, processor, rows, ks=(1, 5), retrieval_backend="exact")
    assert (result.num_images, result.num_texts) == (7, 12)
    for key in ("image_retrieval_recall@1", "text_retrieval_recall@1", "image_retrieval_mAP", "text_retrieval_mAP"):
        assert result.metrics[key] == pytest.approx(1.0), key

    # with noise: the naive loops on embeddings looked up for each row's own image and caption
    rows, model, processor, owners = captioned_lookup_rows(noise=1.2, seed=3)
    result = evaluate_model(model, processor, rows, ks=(1, 5), retrieval_backend="exact")
    distinct = sorted(set(owners))
    image_embeds = model.image_table[distinct].numpy()
    image_embeds /= np.linalg.norm(image_embeds, axis=1, keepdims=True)
    text_embeds = model.text_table.numpy() / np.linalg.norm(model.text_table.numpy(), axis=1, keepdims=True)
    text_to_image = np.array([distinct.index(owner) for owner in owners])
    for k in (1, 5):
        i2t, t2i = naive_recall(image_embeds, text_embeds, text_to_image, k)
        assert result.metrics[f"image_retrieval_recall@{k}"] == pytest.approx(t2i), k
        assert result.metrics[f"text_retrieval_recall@{k}"] == pytest.approx(i2t), k
    t2i_map, i2t_map = naive_average_precisions(image_embeds, text_embeds, text_to_image)
    assert result.metrics["image_retrieval_mAP"] == pytest.approx(t2i_map, abs=1e-6)
    assert result.metrics["text_retrieval_mAP"] == pytest.approx(i2t_map, abs=1e-6)
    assert 0 < result.metrics["image_retrieval_recall@1"] < 1  # not a trivial case


def test_paired_bootstrap_matches_a_naive_loop_and_normal_theory():
    from dclip.evaluation import paired_bootstrap

    rng = np.random.default_rng(1)
    a = (rng.random(400) < 0.30).astype(float)  # hits of model A on 400 queries
    b = np.where(rng.random(400) < 0.8, a, (rng.random(400) < 0.2).astype(float))  # B: mostly the same queries
    result = paired_bootstrap(a, b, num_resamples=500, seed=3)
    draws = np.random.default_rng(3)
    naive = []
    for _ in range(500):  # resample queries with replacement, the same ones for both models
        rows = draws.integers(0, 400, size=400)
        naive.append(a[rows].mean() - b[rows].mean())
    low, high = np.quantile(naive, [0.025, 0.975])
    assert result["low"] == pytest.approx(low) and result["high"] == pytest.approx(high)
    assert result["difference"] == pytest.approx(a.mean() - b.mean())
    # paired: the interval is about the difference's own standard error, far narrower than unpaired noise
    stderr = np.std(a - b, ddof=1) / np.sqrt(400)
    assert (high - low) == pytest.approx(2 * 1.96 * stderr, rel=0.2)
    assert result["excludes_zero"] == bool(low > 0 or high < 0)
    same = paired_bootstrap(a, a, num_resamples=100)
    assert same["low"] == same["high"] == 0.0 and not same["excludes_zero"]
    better = paired_bootstrap(np.ones(50), np.zeros(50), num_resamples=100)
    assert better["low"] == 1.0 and better["excludes_zero"] and np.isnan(better["relative"])
    with pytest.raises(ValueError, match="paired outcomes"):
        paired_bootstrap(a, b[:10])


def test_a_grouped_bootstrap_resamples_an_images_captions_together():
    """Five captions per image, each caption's outcome its image's: resampled by image, the interval is exactly
    that of one outcome per image (a naive loop over images); resampled by caption, it is about sqrt(5) times too
    narrow and here claims a difference that the images do not support."""
    from dclip.evaluation import GROUPS_SUFFIX, compare_outcomes, metrics_from_ranks, paired_bootstrap

    rng = np.random.default_rng(2)
    a, b = (rng.random(300) < 0.5).astype(float), (rng.random(300) < 0.5).astype(float)  # no true difference
    images = rng.permutation(np.repeat(np.arange(300), 5))  # each caption's image, in no particular order
    grouped = paired_bootstrap(a[images], b[images], num_resamples=400, seed=5, groups=images)
    draws = np.random.default_rng(5)
    naive = []
    for _ in range(400):  # resample images with replacement; every caption of a drawn image counts
        drawn = draws.integers(0, 300, size=300)
        captions = np.concatenate([np.flatnonzero(images == image) for image in drawn])
        naive.append(a[images][captions].mean() - b[images][captions].mean())
    assert (grouped["low"], grouped["high"]) == pytest.approx(tuple(np.quantile(naive, [0.025, 0.975])))
    per_image = paired_bootstrap(a, b, num_resamples=400, seed=5)
    assert grouped["high"] - grouped["low"] == pytest.approx(per_image["high"] - per_image["low"], rel=0.15)
    by_caption = paired_bootstrap(a[images], b[images], num_resamples=400, seed=5)
    assert by_caption["high"] - by_caption["low"] < 0.6 * (grouped["high"] - grouped["low"])
    assert by_caption["excludes_zero"] and not grouped["excludes_zero"]
    with pytest.raises(ValueError, match="one label per query"):
        paired_bootstrap(a, b, groups=images)

    # retrieval outcomes name each caption's image where images have several captions, and comparisons use them
    owner = np.repeat(np.arange(4), 3)
    outcomes: dict = {}
    metrics_from_ranks(np.arange(12) % 4, np.arange(12) % 3, owner, ks=(1,), outcomes=outcomes)
    np.testing.assert_array_equal(outcomes["image_retrieval_recall@1" + GROUPS_SUFFIX], owner)
    assert "text_retrieval_recall@1" + GROUPS_SUFFIX not in outcomes  # one query per image already
    single: dict = {}
    metrics_from_ranks(np.arange(4), np.arange(4), np.arange(4), ks=(1,), outcomes=single)
    assert not [key for key in single if key.endswith(GROUPS_SUFFIX)]
    model = {"m": a[images], "m" + GROUPS_SUFFIX: images}
    assert compare_outcomes(model, {"m": b[images]}, "m", num_resamples=400, seed=5) == grouped
    with pytest.raises(ValueError, match="group their queries differently"):
        compare_outcomes(model, {"m": b[images], "m" + GROUPS_SUFFIX: images[::-1]}, "m")


def test_sampled_retrieval_queries_are_grouped_by_their_own_images_and_one_group_gives_no_interval():
    """With sampled caption queries, each outcome's group is the image of that sampled caption (here the sizes of the
    two samples coincide, which once let the other sample's images pass for them)."""
    from dclip.evaluation import GROUPS_SUFFIX, paired_bootstrap, retrieval_metrics

    rng = np.random.default_rng(0)
    images = rng.standard_normal((100, 8)).astype(np.float32)
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    text_to_image = np.repeat(np.arange(100), 5)
    texts = images[text_to_image] + 0.5 * rng.standard_normal((500, 8)).astype(np.float32)
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    outcomes: dict = {}
    metrics = retrieval_metrics(images, texts, text_to_image, ks=(1,), backend="sampled", sample_pairs=5000, seed=0,
                                outcomes=outcomes)
    caption_sample = np.sort(np.random.default_rng(0).choice(500, metrics["image_retrieval_queries"], replace=False))
    np.testing.assert_array_equal(outcomes["image_retrieval_recall@1" + GROUPS_SUFFIX], text_to_image[caption_sample])
    lonely = paired_bootstrap([1, 0, 1, 1, 1], [0, 0, 0, 1, 0], groups=[7] * 5)  # one image: no spread to measure
    assert np.isnan(lonely["low"]) and np.isnan(lonely["high"]) and not lonely["excludes_zero"]
