"""Students smaller than the teacher (`dclip.students`) and the distillation heads that bridge another teacher width."""

import pytest
import torch
from conftest import fused_teacher, random_images

from dclip.students import build_student
from modeling_dclip import DCLIPModel


def test_inherited_layers_are_the_checkpoints_own_evenly_spaced_layers(tokenizer, processor, tmp_path):
    from conftest import tiny_clip_config_kwargs
    from transformers import CLIPConfig, CLIPModel

    config = tiny_clip_config_kwargs(tokenizer)
    config["text_config"]["num_hidden_layers"] = config["vision_config"]["num_hidden_layers"] = 4
    torch.manual_seed(0)
    source = CLIPModel(CLIPConfig(**config))
    source.save_pretrained(tmp_path / "clip")
    student = build_student(str(tmp_path / "clip"), "unused", processor, 32, inherit=2)
    assert student.config.vision_config.num_hidden_layers == student.config.text_config.num_hidden_layers == 2
    for mine, theirs in ((student.vision_model, source.vision_model), (student.text_model, source.text_model)):
        assert len(mine.encoder.layers) == 2
        for kept, index in zip(mine.encoder.layers, (0, 3)):  # the first and the last of 4
            for name, tensor in theirs.encoder.layers[index].state_dict().items():
                torch.testing.assert_close(kept.state_dict()[name], tensor, atol=0, rtol=0, msg=name)
        torch.testing.assert_close(mine.embeddings.state_dict(), theirs.embeddings.state_dict(), atol=0, rtol=0)
    inputs = processor(images=random_images(2), text=["a red circle", "two blue squares"])
    assert student(**inputs).image_embeds.shape == (2, 16)
    assert [len(build_student(str(tmp_path / "clip"), "unused", processor, 32, inherit=n).text_model.encoder.layers)
            for n in (1, 3, 4)] == [1, 3, 4]
    with pytest.raises(ValueError, match="between 1 and the 4 layers"):
        build_student(str(tmp_path / "clip"), "unused", processor, 32, inherit=5)


def test_heads_bridge_another_width_and_are_dropped_for_saving(tiny_clip_dir, processor, tmp_path):
    plain = build_student(None, str(tiny_clip_dir), processor, 32, teacher_embed_dim=16)  # same width: no heads
    assert plain.config.teacher_embed_dim is None and not hasattr(plain, "teacher_head")
    student = build_student(None, str(tiny_clip_dir), processor, 32, teacher_embed_dim=24)
    inputs = processor(images=random_images(3), text=["a red circle", "two blue squares", "a star"])
    out = student(**inputs)
    assert out.distill_image_embeds.shape == out.distill_text_embeds.shape == (3, 24)
    torch.testing.assert_close(out.distill_image_embeds.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out.distill_image_embeds,
                               torch.nn.functional.normalize(student.teacher_head(out.image_embeds), dim=-1))
    torch.testing.assert_close(out.distill_text_embeds,  # the same map for both: their alignment carries over
                               torch.nn.functional.normalize(student.teacher_head(out.text_embeds), dim=-1))
    # the heads never change the student's own embeddings, and the export is exact without them
    torch.testing.assert_close(out.image_embeds, plain(**inputs).image_embeds, atol=0, rtol=0)
    torch.testing.assert_close(student.to_clip()(**inputs).image_embeds, out.image_embeds, atol=0, rtol=0)
    student.drop_teacher_head().save_pretrained(tmp_path / "saved")
    reloaded = DCLIPModel.from_pretrained(tmp_path / "saved")
    assert reloaded.config.teacher_embed_dim is None and not hasattr(reloaded, "teacher_head")
    torch.testing.assert_close(reloaded(**inputs).image_embeds, out.image_embeds)


def test_a_preset_student_starts_the_same_with_heads_or_without(processor):
    bare = build_student(None, "unused", processor, 32, preset="clip-tiny", seed=3)
    headed = build_student(None, "unused", processor, 32, preset="clip-tiny", seed=3, teacher_embed_dim=48)
    assert set(headed.state_dict()) - set(bare.state_dict()) == {"teacher_head.weight"}
    for name, tensor in bare.state_dict().items():
        torch.testing.assert_close(headed.state_dict()[name], tensor, atol=0, rtol=0, msg=name)
    assert bare.config.projection_dim == 64 and bare.config.vision_config.image_size == 32
    with pytest.raises(ValueError, match="from scratch"):
        build_student("some/clip", "unused", processor, 32, preset="clip-tiny")


def test_trainer_distils_through_the_heads(tiny_clip_dir, processor, tmp_path):
    """Cosine terms against a 24-wide teacher read the student through its heads: the loss is the naive
    `1 - cos(head(student), teacher)`, and the head learns from it."""
    from transformers import TrainingArguments

    from dclip.trainer import DCLIPTrainer

    student = build_student(None, str(tiny_clip_dir), processor, 32, teacher_embed_dim=24)
    batch = dict(processor(images=random_images(4), text=["a red circle", "two blue squares", "a star", "a disc"]))
    targets = torch.nn.functional.normalize(torch.randn(4, 24, generator=torch.Generator().manual_seed(0)), dim=-1)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    trainer = DCLIPTrainer(model=student, args=args, loss_weights={"cosine_image": 1.0})
    loss = trainer.compute_loss(student, {**batch, "teacher_image_embeds": targets, "teacher_text_embeds": targets})
    with torch.no_grad():
        image = student(**batch).image_embeds
        mapped = student.teacher_head(image)
    expected = sum(1 - float(torch.nn.functional.cosine_similarity(mapped[i], targets[i], dim=0)) for i in range(4)) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert student.teacher_head.weight.grad.abs().sum() > 0


def test_fused_teacher_zero_shot_scores_every_prompt_by_its_pair_logit(tiny_clip, processor):
    from datasets import Dataset

    from dclip.evaluation import teacher_zero_shot
    from dclip.targets import compute_teacher_features

    teacher = fused_teacher(tiny_clip)
    rows = Dataset.from_dict({"image": random_images(5, seed=4), "caption": ["a red circle"] * 5})
    features = compute_teacher_features(rows, teacher, processor, batch_size=5, device="cpu", use_given_boxes=False,
                                        use_given_spans=False)
    names, templates = ["circle", "square", "star"], ("a photo of a {}.", "a {} on a background.")
    result = teacher_zero_shot(teacher, processor, features, range(5), [0, 1, 2, 0, 1], names, templates)
    # naive: fuse each (image, prompt) pair through the model's forward, average each class's templates
    scores = torch.zeros(5, 3)
    for i in range(5):
        for c, name in enumerate(names):
            for template in templates:
                inputs = processor(images=[rows[i]["image"]], text=[template.format(name)], return_regions=True,
                                   return_spans=True)
                inputs.pop("region_source")
                with torch.no_grad():
                    out = teacher(**inputs)
                scores[i, c] += teacher.fusion_logit_scale.exp() * (out.image_embeds * out.text_embeds).sum() / 2
    expected = (scores.argmax(1) == torch.tensor([0, 1, 2, 0, 1])).float()
    assert result["correct"].tolist() == expected.tolist()
    assert result["acc1"] == pytest.approx(expected.mean().item())
