import math

import pytest
import torch
import torch.nn.functional as F
from conftest import fused_teacher, naive_affinity_loss, naive_margin_loss, random_images
from transformers import TrainingArguments

from dclip.teachers import as_teacher
from dclip.trainer import DCLIPTrainer
from modeling_dclip import DCLIPModel, DCLIPTeacherModel


@pytest.fixture(scope="module")
def student(tiny_clip):
    return DCLIPModel.from_clip(tiny_clip)


@pytest.fixture(scope="module")
def batch(processor):
    inputs = processor(text=["a red circle", "two blue squares", "a star", "a green triangle above a circle"],
                       images=random_images(4, seed=7))
    return dict(inputs)


def make_trainer(student, tmp_path, **kwargs):
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, logging_steps=1)
    return DCLIPTrainer(model=student, args=args, **kwargs)


def test_hybrid_loss_is_the_weighted_sum_of_naive_terms(student, batch, tmp_path):
    generator = torch.Generator().manual_seed(0)
    teacher_images = F.normalize(torch.randn(4, 16, generator=generator), dim=-1)
    teacher_texts = F.normalize(torch.randn(4, 16, generator=generator), dim=-1)
    weights = {"contrastive": 0.7, "cosine_image": 1.3, "cosine_text": 0.4}
    trainer = make_trainer(student, tmp_path, loss_weights=weights)
    student.train()
    loss = trainer.compute_loss(
        student, {**batch, "teacher_image_embeds": teacher_images, "teacher_text_embeds": teacher_texts}
    )

    with torch.no_grad():
        out = student(**batch)
    scale = student.logit_scale.exp().item()
    n = 4
    contrastive = 0.0
    for i in range(n):
        for own, other in ((out.image_embeds, out.text_embeds), (out.text_embeds, out.image_embeds)):
            logits = [scale * float(own[i] @ other[j]) for j in range(n)]
            contrastive += -logits[i] + math.log(sum(math.exp(v) for v in logits))
    contrastive /= 2 * n
    cos_image = sum(1 - float(F.cosine_similarity(out.image_embeds[i], teacher_images[i], dim=0)) for i in range(n)) / n
    cos_text = sum(1 - float(F.cosine_similarity(out.text_embeds[i], teacher_texts[i], dim=0)) for i in range(n)) / n
    expected = 0.7 * contrastive + 1.3 * cos_image + 0.4 * cos_text
    assert loss.item() == pytest.approx(expected, rel=1e-5)

    # the running sums stay on the device between logging steps (no host sync per term per step)
    assert all(isinstance(total, torch.Tensor) for total in trainer._term_sums.values())
    trainer.log({"loss": loss.item()})
    logged = trainer.state.log_history[-1]
    assert logged["loss_contrastive"] == pytest.approx(contrastive, rel=1e-4)
    assert logged["loss_cosine_image"] == pytest.approx(cos_image, rel=1e-4)


def test_affinity_term_reads_the_student_in_its_own_space(student, batch, tmp_path):
    """TinyCLIP's affinity mimicking through the trainer: the student's own embeddings (width 16) against a teacher
    of another width (24), no distillation head needed; the term is logged on its own."""
    generator = torch.Generator().manual_seed(1)
    teacher_images = F.normalize(torch.randn(4, 24, generator=generator), dim=-1)
    teacher_texts = F.normalize(torch.randn(4, 24, generator=generator), dim=-1)
    trainer = make_trainer(student, tmp_path, loss_weights={"affinity": 0.5})
    student.train()
    loss = trainer.compute_loss(
        student, {**batch, "teacher_image_embeds": teacher_images, "teacher_text_embeds": teacher_texts})
    with torch.no_grad():
        out = student(**batch)
    scale = student.logit_scale.exp().item()
    affinity = naive_affinity_loss(out.image_embeds, out.text_embeds, teacher_images, teacher_texts, scale, scale)
    assert loss.item() == pytest.approx(0.5 * affinity, rel=1e-5)
    trainer.log({"loss": loss.item()})
    assert trainer.state.log_history[-1]["loss_affinity"] == pytest.approx(affinity, rel=1e-4)
    with pytest.raises(ValueError, match="teacher_image_embeds"):
        trainer.compute_loss(student, dict(batch))


def test_online_teacher_gives_the_same_loss_as_cached_targets(student, tiny_clip, batch, processor, tmp_path):
    teacher = DCLIPTeacherModel.from_clip(tiny_clip, fusion_hidden_size=32, fusion_num_heads=4).eval()
    with torch.no_grad():
        targets = teacher(**batch)
    weights = {"contrastive": 1.0, "cosine_image": 1.0, "cosine_text": 1.0}
    student.eval()
    cached = make_trainer(student, tmp_path, loss_weights=weights).compute_loss(
        student, {**batch, "teacher_image_embeds": targets.image_embeds, "teacher_text_embeds": targets.text_embeds}
    )
    trainer = make_trainer(student, tmp_path, loss_weights=weights, teacher=as_teacher(teacher, processor))
    online = trainer.compute_loss(student, {**batch, "teacher_inputs": dict(batch)})
    assert online.item() == pytest.approx(cached.item(), rel=1e-6)
    with pytest.raises(ValueError, match="teacher_inputs"):  # never the student's own inputs in their place
        trainer.compute_loss(student, batch)
    with pytest.raises(TypeError, match="Teacher"):  # a bare model has no processor to make its inputs
        make_trainer(student, tmp_path, loss_weights=weights, teacher=teacher)


def test_online_teacher_gets_each_rows_regions_and_spans(student, tiny_clip, processor, tmp_path):
    """Online mode, batches from `DCLIPCollator(teacher=...)`: the teacher sees each row's region crops and spans, so
    the loss equals the loss on targets cached by `compute_teacher_targets` from the same rows."""
    from datasets import Dataset

    from dclip.data.collator import DCLIPCollator
    from dclip.targets import compute_teacher_targets

    teacher = fused_teacher(tiny_clip)
    boxes = [[[0.0, 0.0, 0.5, 0.5], [0.5, 0.25, 1.0, 1.0]], [[0.1, 0.1, 0.9, 0.6]], [[0.25, 0.5, 0.75, 1.0]] * 2,
             [[0.0, 0.0, 1.0, 0.5], [0.0, 0.5, 1.0, 1.0], [0.4, 0.4, 0.6, 0.6]]]
    rows = Dataset.from_dict({
        "image": random_images(4, seed=3),
        "caption": ["a red circle left of a star", "two blue squares", "a star above a green triangle",
                    "a circle and a square and a star"],
        "boxes": boxes, "spans": [["a red circle", "a star"], ["two blue squares"], ["a star", "a triangle"],
                                  ["a circle", "a square", "a star"]],
    })
    cached = compute_teacher_targets(rows, teacher, processor, batch_size=4, device="cpu")
    weights = {"contrastive": 1.0, "cosine_image": 1.0, "cosine_text": 1.0}
    student.eval()
    online_teacher = as_teacher(teacher, processor)
    online_batch = DCLIPCollator(processor, teacher=online_teacher)([rows[i] for i in range(4)])
    cached_batch = DCLIPCollator(processor)([cached[i] for i in range(4)])
    trainer = make_trainer(student, tmp_path, loss_weights=weights, teacher=online_teacher)
    online = trainer.compute_loss(student, online_batch)
    expected = make_trainer(student, tmp_path, loss_weights=weights).compute_loss(student, cached_batch)
    assert online.item() == pytest.approx(expected.item(), rel=1e-5)

    # the comparison can fail: without its regions, or without its spans, this teacher gives other targets
    student_inputs = {k: online_batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    own = online_batch["teacher_inputs"]
    regions = {k: v for k, v in own.items() if k.startswith("region_")}
    spans = {k: v for k, v in own.items() if k.startswith("span_")}
    plain = {k: v for k, v in own.items() if k not in regions and k not in spans}
    with torch.no_grad():
        without_regions = teacher(**plain, **spans).image_embeds
        without_spans = teacher(**plain, **regions).text_embeds
    assert (without_regions - cached_batch["teacher_image_embeds"]).abs().max() > 1e-3
    assert (without_spans - cached_batch["teacher_text_embeds"]).abs().max() > 1e-3
    for incomplete in ({**plain, **spans}, {**plain, **regions}):
        loss = trainer.compute_loss(student, {**student_inputs, "teacher_inputs": incomplete})
        assert abs(loss.item() - expected.item()) > 1e-5


def test_clip_cid_loss_is_cluster_plus_instance_terms(student, batch, tmp_path):
    generator = torch.Generator().manual_seed(1)
    teacher_images = F.normalize(torch.randn(4, 16, generator=generator), dim=-1)
    teacher_texts = F.normalize(torch.randn(4, 16, generator=generator), dim=-1)
    centers = F.normalize(torch.randn(5, 16, generator=generator), dim=-1)
    weights = {"cluster_image": 0.5, "cluster_text": 0.25, "instance": 2.0}
    trainer = make_trainer(student, tmp_path, loss_weights=weights, cluster_centers=centers, cluster_scale=4.0,
                           cluster_margin=0.3)
    student.eval()
    inputs = {**batch, "teacher_image_embeds": teacher_images, "teacher_text_embeds": teacher_texts}
    labels = torch.tensor([4, 0, 2, 2])
    loss = trainer.compute_loss(student, {**inputs, "cluster_labels": labels})
    with torch.no_grad():
        out = student(**batch)
    scale = student.logit_scale.exp().item()
    instance = 0.0
    for i in range(4):
        for own, other in ((out.image_embeds, teacher_texts), (out.text_embeds, teacher_images)):
            logits = [scale * float(own[i] @ other[j]) for j in range(4)]
            instance += -logits[i] + math.log(sum(math.exp(v) for v in logits))
    instance /= 8
    expected = (0.5 * naive_margin_loss(out.image_embeds, centers, labels, 4.0, 0.3)
                + 0.25 * naive_margin_loss(out.text_embeds, centers, labels, 4.0, 0.3) + 2.0 * instance)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # without labels in the batch, each sample's label is the nearest centre of its teacher image embedding
    nearest = (teacher_images @ centers.t()).argmax(1)
    with_nearest = trainer.compute_loss(student, {**inputs, "cluster_labels": nearest})
    assert trainer.compute_loss(student, dict(inputs)).item() == pytest.approx(with_nearest.item(), rel=1e-6)
    with pytest.raises(ValueError, match="cluster_centers"):
        make_trainer(student, tmp_path, loss_weights={"cluster_image": 1.0})
    # --cluster_sample_size reaches the loss: with 3 of the 5 centres per step, the loss is a different one
    sampled = make_trainer(student, tmp_path, loss_weights=weights, cluster_centers=centers, cluster_scale=4.0,
                           cluster_margin=0.3, cluster_sample_size=3)
    assert sampled.cluster_loss.sample_size == 3
    torch.manual_seed(0)
    assert sampled.compute_loss(student, {**inputs, "cluster_labels": labels}).item() != pytest.approx(loss.item())


def test_bad_loss_configuration_is_named(student, tmp_path):
    with pytest.raises(ValueError, match="unknown loss terms \\['kl'\\]"):
        make_trainer(student, tmp_path, loss_weights={"kl": 1.0})
    with pytest.raises(ValueError, match="weight 0"):
        make_trainer(student, tmp_path, loss_weights={"contrastive": 0.0})
    trainer = make_trainer(student, tmp_path, loss_weights={"cosine_image": 1.0})
    with pytest.raises(ValueError, match="teacher_image_embeds"):
        trainer.compute_loss(
            student, {"input_ids": torch.ones(1, 2, dtype=torch.long), "pixel_values": torch.zeros(1, 3, 32, 32)}
        )


def test_gradient_checkpointing_gives_the_same_gradients(tiny_clip, batch, tmp_path):
    weights = {"contrastive": 1.0, "cosine_image": 1.0}
    teacher_images = F.normalize(torch.randn(4, 16, generator=torch.Generator().manual_seed(1)), dim=-1)
    gradients = []
    for checkpointing in (False, True):
        student = DCLIPModel.from_clip(tiny_clip).train()
        if checkpointing:
            # the Trainer's call for --gradient_checkpointing (the older name is deprecated in transformers 5)
            enable = getattr(student, "activation_checkpointing_enable", None) or student.gradient_checkpointing_enable
            enable()
            assert (
                student.text_model.encoder.gradient_checkpointing
                and student.vision_model.encoder.gradient_checkpointing
            )
        trainer = make_trainer(student, tmp_path, loss_weights=weights)
        trainer.compute_loss(student, {**batch, "teacher_image_embeds": teacher_images}).backward()
        gradients.append({name: p.grad.clone() for name, p in student.named_parameters() if p.grad is not None})
    assert gradients[0].keys() == gradients[1].keys() and len(gradients[0]) > 10
    for name, grad in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_dclip_plus_instance_method_trains_dclips_terms_and_the_instance_term(student, batch, tmp_path):
    """`--method dclip+instance`: DCLIP's hybrid loss plus CLIP-CID's instance term, all against the fused DCLIP
    teacher's embeddings, at DCLIP's default weights and 0.3 for the instance term; each term is computed."""
    from configuration_dclip import DCLIPConfig
    from dclip.arguments import DistillationArguments
    from dclip.stages import STUDENT_CONFIG_METHODS
    from dclip.teachers import FUSION

    args = DistillationArguments(method="dclip+instance", compare_methods="")
    weights = args.loss_weights()
    assert weights == {"contrastive": 1.0, "cosine_image": 10.0, "cosine_text": 3.0, "cluster_image": 0.0,
                       "cluster_text": 0.0, "instance": 0.3, "affinity": 0.0}
    assert args.teacher_kind("dclip+instance") == FUSION
    assert DCLIPConfig(distillation_method=STUDENT_CONFIG_METHODS["dclip+instance"]).distillation_method == \
        "dclip+clip_cid"
    generator = torch.Generator().manual_seed(1)
    targets = {name: F.normalize(torch.randn(4, 16, generator=generator), dim=-1)
               for name in ("teacher_image_embeds", "teacher_text_embeds")}
    trainer = make_trainer(student, tmp_path, loss_weights=weights)
    terms, _ = trainer.compute_terms(student, {**batch, **targets})
    assert set(terms) == {"contrastive", "cosine_image", "cosine_text", "instance"}
    assert all(torch.isfinite(value) and value > 0 for value in terms.values())
