import shutil

import numpy as np
import pytest
import torch
from conftest import fused_teacher
from datasets import load_from_disk

from dclip.data.collator import DCLIPCollator, teacher_inputs
from dclip.data.scenes import SceneConfig, generate_scenes
from dclip.targets import compute_teacher_features, compute_teacher_targets, fuse_teacher_targets, model_fingerprint
from modeling_dclip import DCLIPTeacherModel


@pytest.fixture(scope="module")
def scenes_on_disk(tmp_path_factory):
    path = tmp_path_factory.mktemp("scenes")
    generate_scenes(
        SceneConfig(num_train=6, num_validation=1, num_test=1, seed=2), num_proc=1
    )["train"].save_to_disk(path)
    return load_from_disk(str(path))


@pytest.fixture(scope="module")
def teacher(tiny_clip):
    torch.manual_seed(0)
    model = DCLIPTeacherModel.from_clip(
        tiny_clip, fusion_hidden_size=32, fusion_num_heads=4, max_regions=4, max_spans=4
    )
    with torch.no_grad():
        model.image_output_projection.weight.normal_(std=0.2)
    return model.eval()


def test_targets_are_the_teachers_embeddings_and_cached(scenes_on_disk, teacher, processor):
    with_targets = compute_teacher_targets(scenes_on_disk, teacher, processor, batch_size=4, device="cpu")
    rows = scenes_on_disk[:6]
    inputs = teacher_inputs(processor, rows)
    assert inputs["region_mask"].sum(1).tolist() == [min(n, 4) for n in rows["num_objects"]]  # boxes from the data
    with torch.no_grad():
        expected = teacher(**inputs)
    np.testing.assert_allclose(np.array(with_targets["teacher_image_embeds"]), expected.image_embeds.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.array(with_targets["teacher_text_embeds"]), expected.text_embeds.numpy(), atol=1e-5)

    again = compute_teacher_targets(scenes_on_disk, teacher, processor, batch_size=4, device="cpu")
    assert again._fingerprint == with_targets._fingerprint
    assert again.cache_files == with_targets.cache_files  # read back from the Arrow cache


def test_fingerprint_follows_the_weights(teacher):
    before = model_fingerprint(teacher)
    with torch.no_grad():
        teacher.fusion_logit_scale.add_(1.0)
    try:
        assert model_fingerprint(teacher) != before
    finally:
        with torch.no_grad():
            teacher.fusion_logit_scale.sub_(1.0)
    assert model_fingerprint(teacher) == before


def test_fingerprint_ignores_where_the_folder_lies(teacher, tmp_path):
    teacher.save_pretrained(tmp_path / "here")
    shutil.copytree(tmp_path / "here", tmp_path / "there")
    here, there = (DCLIPTeacherModel.from_pretrained(tmp_path / name) for name in ("here", "there"))
    assert here.config._name_or_path != there.config._name_or_path
    assert model_fingerprint(here) == model_fingerprint(there)


def test_collator_batches_student_inputs_and_targets(scenes_on_disk, teacher, processor):
    with_targets = compute_teacher_targets(scenes_on_disk, teacher, processor, batch_size=4, device="cpu")
    rows = [with_targets[i] for i in range(3)]
    batch = DCLIPCollator(processor)(rows)
    assert set(batch) == {"input_ids", "attention_mask", "pixel_values", "teacher_image_embeds", "teacher_text_embeds"}
    torch.testing.assert_close(batch["teacher_image_embeds"][1], torch.tensor(rows[1]["teacher_image_embeds"]))
    online = DCLIPCollator(processor, with_teacher_inputs=True)(rows)
    assert online["region_mask"].sum(1).tolist() == [min(r["num_objects"], 4) for r in rows]
    assert online["span_mask"].sum(1).tolist() == [min(len(r["spans"]), 4) for r in rows]
    # without the annotations (the pipeline's default), the online inputs are the cached targets' inputs
    detected = DCLIPCollator(processor, with_teacher_inputs=True, use_given_boxes=False, use_given_spans=False)(rows)
    columns = {"image": [r["image"] for r in rows], "caption": [r["caption"] for r in rows]}
    expected = teacher_inputs(processor, columns, use_given_boxes=False, use_given_spans=False)
    for name in ("region_mask", "region_boxes", "span_mask", "span_input_ids"):
        torch.testing.assert_close(detected[name], expected[name], msg=name)
    assert not torch.equal(detected["region_boxes"], online["region_boxes"])  # annotations are not used


def test_cached_tower_features_give_the_same_teacher_outputs(scenes_on_disk, teacher, processor):
    from dclip.data.collator import TeacherFeatureCollator
    from dclip.targets import compute_teacher_features

    with_features = compute_teacher_features(scenes_on_disk, teacher, processor, batch_size=4, device="cpu")
    rows = [with_features[i] for i in range(6)]
    batch = TeacherFeatureCollator(return_loss=False)(rows)
    assert batch["region_features"].shape == (6, processor.max_regions, 16)
    with torch.no_grad():
        from_features = teacher(**batch)
        from_pixels = teacher(**teacher_inputs(processor, scenes_on_disk[:6]))
    torch.testing.assert_close(from_features.image_embeds, from_pixels.image_embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(from_features.text_embeds, from_pixels.text_embeds, atol=1e-5, rtol=0)
    # training the fusion on cached features: the loss is defined and reaches the fusion block
    teacher.train()
    try:
        loss = teacher(**TeacherFeatureCollator()(rows)).loss
        loss.backward()
        assert teacher.fusion_layers[0].image_stream.cross_attn.q_proj.weight.grad.abs().sum() > 0
    finally:
        teacher.zero_grad()
        teacher.eval()


def test_cached_features_are_refused_for_a_trainable_tower(tiny_clip):
    model = DCLIPTeacherModel.from_clip(tiny_clip, fusion_hidden_size=32, fusion_num_heads=4, freeze_vision_tower=False)
    model.train()
    with pytest.raises(ValueError, match="skip the vision tower"):
        model(image_global_features=torch.zeros(2, 16), region_features=torch.zeros(2, 1, 16),
              region_boxes=torch.zeros(2, 1, 4), region_mask=torch.ones(2, 1),
              input_ids=torch.ones(2, 3, dtype=torch.long))


def test_fused_targets_from_features_equal_targets_from_pixels(scenes_on_disk, teacher, processor):
    from dclip.targets import compute_teacher_features, fuse_teacher_targets

    features = compute_teacher_features(scenes_on_disk, teacher, processor, batch_size=4, device="cpu")
    fused = fuse_teacher_targets(features, teacher, batch_size=4, device="cpu")
    direct = compute_teacher_targets(scenes_on_disk, teacher, processor, batch_size=4, device="cpu")
    for column in ("teacher_image_embeds", "teacher_text_embeds"):
        np.testing.assert_allclose(np.array(fused[column]), np.array(direct[column]), atol=1e-5)


def test_cache_key_names_the_detector_by_content_and_sees_the_tokenizer(processor, tokenizer, tmp_path):
    from dclip.data.tokenizer import train_clip_tokenizer
    from dclip.targets import _processor_key
    from processing_dclip import DCLIPProcessor

    (tmp_path / "a.pt").write_bytes(b"weights one")
    (tmp_path / "copy.pt").write_bytes(b"weights one")
    (tmp_path / "b.pt").write_bytes(b"weights two")
    keys = {}
    for name in ("a.pt", "copy.pt", "b.pt"):
        with_detector = DCLIPProcessor(processor.image_processor, tokenizer, detector_path=str(tmp_path / name))
        keys[name] = _processor_key(with_detector)
    assert keys["a.pt"] == keys["copy.pt"] != keys["b.pt"]
    other_tokenizer = train_clip_tokenizer(["a completely different corpus"] * 4, vocab_size=600, model_max_length=24)
    assert _processor_key(DCLIPProcessor(processor.image_processor, other_tokenizer)) != _processor_key(processor)


def test_cache_key_survives_save_and_reload(processor, tmp_path):
    from dclip.targets import _processor_key
    from processing_dclip import DCLIPProcessor

    processor.save_pretrained(tmp_path)
    assert _processor_key(DCLIPProcessor.from_pretrained(tmp_path)) == _processor_key(processor)


# ----- which regions and spans, and which teacher, the cached targets come from ----------------------------------


@pytest.fixture(scope="module")
def annotated_on_disk(tmp_path_factory):
    """Scenes on disk (so `datasets.map` caches) whose annotated spans differ from the ones the processor's
    extractor finds in the captions (on the embedded scenes they are the same)."""
    path = tmp_path_factory.mktemp("annotated")
    scenes = generate_scenes(SceneConfig(num_train=5, num_validation=1, num_test=1, seed=4), num_proc=1)["train"]
    spans = [[f"object number {i}", "the whole scene"][: 1 + i % 2] for i in range(len(scenes))]
    scenes.remove_columns("spans").add_column("spans", spans).save_to_disk(path)
    return load_from_disk(str(path))


def reference_inputs(processor, rows: dict, given: bool) -> dict:
    """Teacher inputs straight from the processor: the rows' boxes and spans, or (no detector) the whole image and
    the extracted spans."""
    inputs = processor(text=rows["caption"], images=rows["image"], return_regions=True, return_spans=True,
                       region_boxes=rows["boxes"] if given else None, spans=rows["spans"] if given else None)
    inputs.pop("region_source")
    return dict(inputs)


@pytest.mark.parametrize("given", [True, False], ids=["annotated", "detected"])
def test_teacher_features_and_targets_use_the_chosen_regions_and_spans(annotated_on_disk, tiny_clip, processor,
                                                                       given):
    teacher = fused_teacher(tiny_clip)
    settings = dict(batch_size=2, device="cpu", use_given_boxes=given, use_given_spans=given)
    features = compute_teacher_features(annotated_on_disk, teacher, processor, **settings)
    targets = compute_teacher_targets(annotated_on_disk, teacher, processor, **settings)
    rows = annotated_on_disk[:]
    region_mask, boxes = np.array(features["region_mask"]), np.array(features["region_boxes"])
    span_mask = np.array(features["span_mask"])
    for i in range(len(annotated_on_disk)):
        if given:
            expected_boxes = np.array(rows["boxes"][i], dtype=np.float32)[: processor.max_regions]
            expected_spans = len(rows["spans"][i])
        else:
            expected_boxes = np.array([[0.0, 0.0, 1.0, 1.0]], dtype=np.float32)
            expected_spans = len(processor.span_extractor(rows["caption"][i]))
        np.testing.assert_allclose(boxes[i][region_mask[i]], expected_boxes, atol=1e-6)
        assert span_mask[i].sum() == min(expected_spans, processor.max_spans)
    with torch.no_grad():
        expected = teacher(**reference_inputs(processor, rows, given))
        other = teacher(**reference_inputs(processor, rows, not given))
    fused = fuse_teacher_targets(features, teacher, batch_size=2, device="cpu")
    for computed in (targets, fused):
        np.testing.assert_allclose(np.array(computed["teacher_image_embeds"]), expected.image_embeds.numpy(), atol=1e-5)
        np.testing.assert_allclose(np.array(computed["teacher_text_embeds"]), expected.text_embeds.numpy(), atol=1e-5)
    # the other choice gives other targets on both sides, so the comparison above can fail
    assert (other.image_embeds - expected.image_embeds).abs().max() > 1e-3
    assert (other.text_embeds - expected.text_embeds).abs().max() > 1e-3


def test_cached_targets_follow_the_teachers_weights(annotated_on_disk, tiny_clip, processor):
    """The `datasets.map` cache of teacher targets is keyed by the teacher's weights: after a change of the fusion
    block the targets are the new teacher's (the tower features stay cached); after a change of a tower the tower
    features are recomputed too."""
    teacher = fused_teacher(tiny_clip, seed=1)  # changed in place below
    settings = dict(batch_size=2, device="cpu")
    rows = annotated_on_disk[:]

    def expected():
        with torch.no_grad():
            return teacher(**reference_inputs(processor, rows, given=True))

    def check(computed, reference):
        np.testing.assert_allclose(np.array(computed["teacher_image_embeds"]), reference.image_embeds.numpy(),
                                   atol=1e-5)
        np.testing.assert_allclose(np.array(computed["teacher_text_embeds"]), reference.text_embeds.numpy(),
                                   atol=1e-5)

    first = compute_teacher_targets(annotated_on_disk, teacher, processor, **settings)
    first_features = compute_teacher_features(annotated_on_disk, teacher, processor, **settings)
    check(first, expected())
    check(fuse_teacher_targets(first_features, teacher, **settings), expected())

    with torch.no_grad():  # the fusion block only
        teacher.image_output_projection.weight.mul_(-1.0)
        teacher.text_output_projection.weight.mul_(-1.0)
    after_fusion = expected()
    assert (after_fusion.image_embeds - torch.tensor(first["teacher_image_embeds"])).abs().max() > 1e-3
    second = compute_teacher_targets(annotated_on_disk, teacher, processor, **settings)
    assert second._fingerprint != first._fingerprint
    check(second, after_fusion)
    same_features = compute_teacher_features(annotated_on_disk, teacher, processor, **settings)
    assert same_features.cache_files == first_features.cache_files  # towers unchanged: read back
    check(fuse_teacher_targets(same_features, teacher, **settings), after_fusion)

    with torch.no_grad():  # a tower
        teacher.visual_projection.weight.add_(0.3 * torch.randn(teacher.visual_projection.weight.shape,
                                                                generator=torch.Generator().manual_seed(0)))
    after_tower = expected()
    new_features = compute_teacher_features(annotated_on_disk, teacher, processor, **settings)
    assert new_features._fingerprint != first_features._fingerprint
    np.testing.assert_raises(AssertionError, np.testing.assert_allclose, np.array(new_features["region_features"]),
                             np.array(first_features["region_features"]), atol=1e-4)
    check(fuse_teacher_targets(new_features, teacher, **settings), after_tower)
    check(compute_teacher_targets(annotated_on_disk, teacher, processor, **settings), after_tower)
