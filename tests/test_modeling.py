import pytest
import torch
import torch.nn.functional as F
from conftest import random_images
from transformers import CLIPModel, pipeline

from configuration_dclip import DCLIPConfig, DCLIPTeacherConfig
from modeling_dclip import DCLIPModel, DCLIPTeacherModel


@pytest.fixture(scope="module")
def text_inputs(tokenizer):
    return tokenizer(["two blue squares above a star", ""], padding=True, return_tensors="pt")


@pytest.fixture(scope="module")
def pixel_values():
    torch.manual_seed(1)
    return torch.randn(2, 3, 32, 32)


def test_from_clip_to_clip_reproduces_embeddings(tiny_clip, text_inputs, pixel_values):
    student = DCLIPModel.from_clip(tiny_clip, distillation_method="dclip").eval()
    exported = student.to_clip().eval()
    assert type(exported) is CLIPModel
    assert student.config.distillation_method == "dclip"
    with torch.no_grad():
        source_image = tiny_clip.get_image_features(pixel_values).pooler_output
        source_text = tiny_clip.get_text_features(**text_inputs).pooler_output
        for model_image, model_text in (
            (student.get_image_features(pixel_values), student.get_text_features(**text_inputs)),
            (
                exported.get_image_features(pixel_values).pooler_output,
                exported.get_text_features(**text_inputs).pooler_output,
            ),
        ):
            assert isinstance(model_image, torch.Tensor) and model_image.shape == (2, 16)
            torch.testing.assert_close(model_image, source_image, atol=1e-5, rtol=0)
            torch.testing.assert_close(model_text, source_text, atol=1e-5, rtol=0)
        source_out = tiny_clip(**text_inputs, pixel_values=pixel_values, return_loss=True)
        student_out = student(**text_inputs, pixel_values=pixel_values, return_loss=True)
    for name in ("logits_per_image", "logits_per_text", "image_embeds", "text_embeds", "loss"):
        torch.testing.assert_close(getattr(student_out, name), getattr(source_out, name), atol=1e-5, rtol=0)


def test_from_clip_loads_a_checkpoint_folder(tiny_clip_dir, tiny_clip):
    student = DCLIPModel.from_clip(str(tiny_clip_dir))
    assert student.config.base_model_name_or_path == str(tiny_clip_dir)
    for name, tensor in tiny_clip.state_dict().items():
        torch.testing.assert_close(student.state_dict()[name], tensor, atol=0, rtol=0)


def test_from_clip_loads_a_dclip_student_folder(tiny_clip, tmp_path):
    """A trained student is a smaller CLIP to start another from (the fine-tuning mode): loaded as its plain-CLIP
    export, weights exact, without transformers' model-type mismatch warning."""
    trained = DCLIPModel.from_clip(tiny_clip)
    with torch.no_grad():
        trained.logit_scale.add_(0.5)  # differs from the CLIP it came from
    trained.save_pretrained(tmp_path / "student")
    from transformers.testing_utils import CaptureLogger
    from transformers.utils import logging

    with CaptureLogger(logging.get_logger("transformers.configuration_utils")) as captured:
        student = DCLIPModel.from_clip(str(tmp_path / "student"))
    assert "model of type" not in captured.out
    for name, tensor in trained.state_dict().items():
        torch.testing.assert_close(student.state_dict()[name], tensor, atol=0, rtol=0)


def test_from_clip_rejects_other_types():
    with pytest.raises(TypeError, match="checkpoint name, a path or a `CLIPModel`"):
        DCLIPModel.from_clip(42)


def test_fresh_student_initialises_like_clip(tokenizer):
    from conftest import tiny_clip_config_kwargs

    torch.manual_seed(0)
    model = DCLIPModel(DCLIPConfig(**tiny_clip_config_kwargs(tokenizer)))
    std = model.visual_projection.weight.std().item()
    assert 0.5 * 32**-0.5 < std < 1.5 * 32**-0.5  # CLIP's projection init, not the generic std=1.0
    assert model.logit_scale.item() == pytest.approx(2.6592)


def test_zero_shot_pipeline_same_scores_as_export(tiny_clip, tokenizer, image_processor):
    student = DCLIPModel.from_clip(tiny_clip).eval()
    labels = ["circle", "square", "star"]
    image = random_images(1)[0]
    results = []
    for model in (student, student.to_clip().eval()):
        classifier = pipeline(
            "zero-shot-image-classification", model=model, tokenizer=tokenizer, image_processor=image_processor
        )
        results.append({r["label"]: r["score"] for r in classifier(image, candidate_labels=labels)})
    assert set(results[0]) == set(labels)
    for label in labels:
        assert results[0][label] == pytest.approx(results[1][label], abs=1e-6)


@pytest.mark.parametrize("output_attentions, output_hidden_states", [(True, True), (True, False), (False, True)])
def test_attentions_and_hidden_states_equal_clip(tiny_clip, text_inputs, pixel_values, output_attentions,
                                                 output_hidden_states):
    student = DCLIPModel.from_clip(tiny_clip).eval()
    student.set_attn_implementation("eager")  # attention weights need eager attention, as in CLIPModel
    assert student.config._attn_implementation == "eager"  # set, not refused by transformers' source heuristic
    clip = student.to_clip().eval()
    assert clip.vision_model.config._attn_implementation == "eager"
    flags = dict(output_attentions=output_attentions, output_hidden_states=output_hidden_states)
    with torch.no_grad():
        ours = student(**text_inputs, pixel_values=pixel_values, **flags)
        theirs = clip(**text_inputs, pixel_values=pixel_values, **flags)
        plain = student(**text_inputs, pixel_values=pixel_values)
    layers = tiny_clip.config.vision_config.num_hidden_layers
    for tower in ("vision_model_output", "text_model_output"):
        for name, wanted, count in (("attentions", output_attentions, layers), ("hidden_states", output_hidden_states,
                                                                                 layers + 1)):
            got, expected = getattr(getattr(ours, tower), name), getattr(getattr(theirs, tower), name)
            if not wanted:
                assert got is None and expected is None, (tower, name)
                continue
            assert len(got) == len(expected) == count, (tower, name)
            for index, (a, b) in enumerate(zip(got, expected)):
                torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=f"{tower}.{name}[{index}]")
        assert getattr(plain, tower).attentions is None and getattr(plain, tower).hidden_states is None
    attentions = ours.vision_model_output.attentions
    if output_attentions:  # real weights: each row of each head sums to one
        assert attentions[0].shape == (2, 2, 17, 17)
        torch.testing.assert_close(attentions[0].sum(-1), torch.ones(2, 2, 17))
    torch.testing.assert_close(ours.logits_per_image, plain.logits_per_image, atol=0, rtol=0)
    # as a tuple too, like CLIPModel's
    with torch.no_grad():
        as_tuple = student(**text_inputs, pixel_values=pixel_values, return_dict=False, **flags)
    assert len(as_tuple[-1]) == len(ours.vision_model_output.to_tuple())


def test_from_clip_keeps_an_eager_clip_eager(tokenizer, text_inputs, pixel_values):
    from conftest import tiny_clip_config_kwargs
    from transformers import CLIPConfig

    config = CLIPConfig(**tiny_clip_config_kwargs(tokenizer))
    config._attn_implementation = "eager"
    eager_clip = CLIPModel(config).eval()
    assert eager_clip.vision_model.config._attn_implementation == "eager"
    for model in (DCLIPModel.from_clip(eager_clip), DCLIPTeacherModel.from_clip(eager_clip, fusion_hidden_size=32,
                                                                                fusion_num_heads=4)):
        for tower in (model.vision_model, model.text_model):
            assert tower.config._attn_implementation == "eager", type(model).__name__
    with torch.no_grad():
        out = DCLIPModel.from_clip(eager_clip).eval()(**text_inputs, pixel_values=pixel_values, output_attentions=True)
    assert len(out.text_model_output.attentions) == config.text_config.num_hidden_layers


def test_towers_attention_implementations_survive_from_clip_and_to_clip(tiny_clip):
    mixed = {"": "sdpa", "text_config": "sdpa", "vision_config": "eager"}
    clip = DCLIPModel.from_clip(tiny_clip).to_clip()
    clip.set_attn_implementation(mixed)
    for model in (DCLIPModel.from_clip(clip), DCLIPModel.from_clip(clip).to_clip()):
        assert model.vision_model.config._attn_implementation == "eager", type(model).__name__
        assert model.text_model.config._attn_implementation == "sdpa", type(model).__name__


def test_attentions_under_sdpa_behave_as_clip(tiny_clip, text_inputs, pixel_values):
    student = DCLIPModel.from_clip(tiny_clip).eval()
    assert student.config._attn_implementation == "sdpa"
    with torch.no_grad():
        ours = student(**text_inputs, pixel_values=pixel_values, output_attentions=True)
        theirs = student.to_clip().eval()(**text_inputs, pixel_values=pixel_values, output_attentions=True)
    assert ours.vision_model_output.attentions == theirs.vision_model_output.attentions == ()


# ----- the teacher ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher(tiny_clip):
    torch.manual_seed(0)
    return DCLIPTeacherModel.from_clip(
        tiny_clip, fusion_hidden_size=32, fusion_num_heads=4, fusion_num_layers=2, max_regions=4, max_spans=4,
        num_negatives=-1, freeze_vision_tower=False,
    )


def mixed_batch(tokenizer, regions=4, spans=4):
    """Three samples with 0, 1 and 3 regions, and 0, 1 and 3 spans, padded to `regions` / `spans` slots."""
    torch.manual_seed(2)
    region_counts, span_counts = (0, 1, 3), (0, 1, 3)
    batch = {
        **tokenizer(
            ["a red circle", "a blue square", "two green stars and a circle"], padding=True, return_tensors="pt"
        ),
        "pixel_values": torch.randn(3, 3, 32, 32),
        "region_pixel_values": torch.randn(3, regions, 3, 32, 32),
        "region_boxes": torch.tensor([[0.1, 0.1, 0.5, 0.6]]).repeat(3, regions, 1),
        "region_mask": torch.tensor([[i < n for i in range(regions)] for n in region_counts]),
    }
    span_ids = tokenizer(
        ["a red circle", "two green stars", "a circle"],
        padding="max_length",
        truncation=True,
        max_length=8,
        return_tensors="pt",
    )
    batch["span_input_ids"] = span_ids["input_ids"][None].repeat(3, 1, 1)[:, [0, 1, 2, 0][:spans]][:, :spans]
    batch["span_attention_mask"] = span_ids["attention_mask"][None].repeat(3, 1, 1)[:, [0, 1, 2, 0][:spans]][:, :spans]
    batch["span_mask"] = torch.tensor([[i < n for i in range(spans)] for n in span_counts])
    return batch


def test_teacher_mixed_regions_and_padding_invariance(teacher, tokenizer):
    teacher.eval()
    batch = mixed_batch(tokenizer, regions=4, spans=4)
    with torch.no_grad():
        out = teacher(**batch)
        # more padding slots, filled with garbage: outputs must not move
        padded = dict(batch)
        extra = 3
        padded["region_pixel_values"] = torch.cat([batch["region_pixel_values"], torch.randn(3, extra, 3, 32, 32)], 1)
        padded["region_boxes"] = torch.cat([batch["region_boxes"], torch.rand(3, extra, 4)], 1)
        padded["region_mask"] = torch.cat([batch["region_mask"], torch.zeros(3, extra, dtype=torch.bool)], 1)
        teacher.config.max_regions = 7
        try:
            out_padded = teacher(**padded)
        finally:
            teacher.config.max_regions = 4
    assert out.image_embeds.shape == (3, 16) and torch.isfinite(out.image_embeds).all()
    torch.testing.assert_close(out_padded.image_embeds, out.image_embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(out_padded.text_embeds, out.text_embeds, atol=1e-5, rtol=0)
    # zero regions and zero spans: the enriched embeddings are the global ones
    torch.testing.assert_close(out.image_embeds[0], out.global_image_embeds[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(out.text_embeds[0], out.global_text_embeds[0], atol=1e-6, rtol=0)
    # with regions the fusion changes the embedding
    assert (out.image_embeds[2] - out.global_image_embeds[2]).abs().max() > 1e-4


def test_teacher_without_any_region_inputs(teacher, tokenizer):
    teacher.eval()
    inputs = tokenizer(["a red circle", "a square"], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = teacher(**inputs, pixel_values=torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(out.image_embeds, out.global_image_embeds, atol=1e-6, rtol=0)


def test_teacher_gradients_reach_fusion_block(teacher, tokenizer):
    teacher.train()
    teacher.zero_grad()
    out = teacher(**mixed_batch(tokenizer), return_loss=True)
    out.loss.backward()
    for name, parameter in teacher.named_parameters():
        if name.startswith(("fusion_layers.", "image_input_projection", "text_input_projection", "box_embedding")):
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    # the text tower is frozen by default, the vision tower was unfrozen for this teacher
    assert all(p.grad is None for p in teacher.text_model.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in teacher.vision_model.parameters())
    teacher.zero_grad()


def test_teacher_loss_matches_naive_pairwise_loop(teacher, tokenizer):
    """With num_negatives=-1 the loss is a cross-entropy over every pair, each pair fused on its own."""
    teacher.eval()
    batch = mixed_batch(tokenizer)
    with torch.no_grad():
        out = teacher(**batch, return_loss=True)
        image_features, text_features = out.image_features, out.text_features
        n = 3
        scores = torch.zeros(n, n)
        for i in range(n):
            for j in range(n):
                img, txt = teacher.fuse(image_features, text_features, torch.tensor([i]), torch.tensor([j]))
                scores[i, j] = teacher.fusion_logit_scale.exp() * (img * txt).sum()
        global_logits = teacher.logit_scale.exp() * out.global_text_embeds @ out.global_image_embeds.t()
        targets = torch.arange(n)
        expected = (F.cross_entropy(scores, targets) + F.cross_entropy(scores.t(), targets)) / 2
        expected = expected + (
            F.cross_entropy(global_logits, targets) + F.cross_entropy(global_logits.t(), targets)
        ) / 2
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.pair_logits[:, 0], scores.diagonal(), atol=1e-5, rtol=0)


def test_teacher_loss_scores_each_image_against_its_captions_own_negatives(teacher, tokenizer):
    """`negative_*`: each image's row of the pairwise loss also holds its caption's own hard negatives (masked ones
    left out), each fused on its own; the caption side and the global term are unchanged."""
    from modeling_dclip import DCLIPTeacherTextFeatures

    teacher.eval()
    batch = mixed_batch(tokenizer)
    generator = torch.Generator().manual_seed(5)
    dim = teacher.config.projection_dim
    negatives = {"negative_text_global_features": torch.randn(3, 2, dim, generator=generator),
                 "negative_span_features": torch.randn(3, 2, 4, dim, generator=generator),
                 "negative_span_mask": torch.tensor([[[True, False, False, False]] * 2] * 3),
                 "negative_mask": torch.tensor([[True, True], [True, False], [False, False]])}
    with torch.no_grad():
        out = teacher(**batch, **negatives, return_loss=True)
        plain = teacher(**batch, return_loss=True)
        image_features, text_features = out.image_features, out.text_features

        def fused(i, text, j):
            img, txt = teacher.fuse(image_features, text, torch.tensor([i]), torch.tensor([j]))
            return teacher.fusion_logit_scale.exp() * (img * txt).sum()

        scores = torch.stack([torch.stack([fused(i, text_features, j) for j in range(3)]) for i in range(3)])
        image_side = []
        for i in range(3):
            row = [scores[i, i]] + [scores[i, j] for j in range(3) if j != i]
            for k in range(2):
                if negatives["negative_mask"][i, k]:
                    own = DCLIPTeacherTextFeatures(
                        global_embeds=negatives["negative_text_global_features"][i, k][None],
                        span_embeds=negatives["negative_span_features"][i, k][None],
                        span_mask=negatives["negative_span_mask"][i, k][None])
                    row.append(fused(i, own, 0))
            image_side.append(F.cross_entropy(torch.stack(row)[None], torch.tensor([0])))
        caption_side = F.cross_entropy(scores.t(), torch.arange(3))
        global_logits = teacher.logit_scale.exp() * out.global_text_embeds @ out.global_image_embeds.t()
        global_term = (F.cross_entropy(global_logits, torch.arange(3))
                       + F.cross_entropy(global_logits.t(), torch.arange(3))) / 2
        expected = (torch.stack(image_side).mean() + caption_side) / 2 + global_term
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out.loss, plain.loss)  # the negatives count
    assert out.pair_logits.shape == (3, 3 + 2) and torch.isinf(out.pair_logits[2, 3:]).all()


def test_teacher_projects_into_student_space(tiny_clip, tokenizer):
    teacher = DCLIPTeacherModel.from_clip(tiny_clip, embed_dim=24, fusion_hidden_size=32, fusion_num_heads=4).eval()
    with torch.no_grad():
        out = teacher(**mixed_batch(tokenizer))
    assert out.image_embeds.shape == (3, 24) and out.text_embeds.shape == (3, 24)
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(3), atol=1e-5, rtol=0)


def test_teacher_config_validation():
    with pytest.raises(ValueError, match="multiple of `fusion_num_heads`"):
        DCLIPTeacherConfig(fusion_hidden_size=30, fusion_num_heads=4)
    with pytest.raises(ValueError, match="max_regions"):
        DCLIPTeacherConfig(max_regions=0)
    with pytest.raises(ValueError, match="distillation_method"):
        DCLIPConfig(distillation_method="kd")


@pytest.mark.parametrize("name", ["output_attentions", "output_hidden_states"])
def test_teacher_refuses_attentions_and_hidden_states(teacher, tokenizer, name):
    teacher.eval()
    batch = mixed_batch(tokenizer)
    with pytest.raises(ValueError, match=rf"DCLIPTeacherModel does not return .*`{name}=True`.*teacher\.vision_model"):
        teacher(**batch, **{name: True})
    with torch.no_grad():  # False (or left out) is no request: the same outputs
        torch.testing.assert_close(teacher(**batch, **{name: False}).image_embeds, teacher(**batch).image_embeds)



def test_teacher_refuses_hidden_states_asked_for_by_its_config(teacher, tokenizer):
    # (a config under sdpa refuses `output_attentions=True` itself)
    teacher.config.output_hidden_states = True
    try:
        with pytest.raises(ValueError, match=r"`output_hidden_states=True` in its config"):
            teacher(**mixed_batch(tokenizer))
    finally:
        teacher.config.output_hidden_states = False
