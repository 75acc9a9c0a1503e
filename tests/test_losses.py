import math
import warnings

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import naive_affinity_loss, naive_margin_loss

from dclip.losses import AffinityDistillLoss, ClipLoss, ClusterMarginLoss, CosineDistillLoss, InstanceDistillLoss


def normalized(*shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=generator), dim=-1)


def naive_clip_loss(images, texts, scale):
    """Symmetric InfoNCE written out sample by sample."""
    n = images.shape[0]
    total = 0.0
    for i in range(n):
        image_row = [scale * float(images[i] @ texts[j]) for j in range(n)]
        text_row = [scale * float(texts[i] @ images[j]) for j in range(n)]
        for row in (image_row, text_row):
            total += -row[i] + math.log(sum(math.exp(v) for v in row))
    return total / (2 * n)


def test_clip_loss_matches_naive_loop():
    images, texts = normalized(6, 8, seed=1), normalized(6, 8, seed=2)
    logit_scale = torch.tensor(math.log(10.0))
    loss = ClipLoss()(images, texts, logit_scale)
    assert loss.item() == pytest.approx(naive_clip_loss(images, texts, 10.0), rel=1e-5)


def test_clip_loss_hand_computed_case():
    # two orthogonal pairs, scale 1: each row is softmax over [1, 0] -> loss = log(1 + e^-1)
    eye = torch.eye(2)
    assert ClipLoss()(eye, eye, torch.tensor(0.0)).item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-6)


def test_cosine_distill_loss_matches_formula_and_stops_teacher_gradient():
    student = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)
    teacher = torch.tensor([[1.0, 1.0], [0.0, -1.0]], requires_grad=True)
    loss = CosineDistillLoss()(student, teacher)
    expected = ((1 - 1 / math.sqrt(2)) + (1 - (-1))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert teacher.grad is None and student.grad is not None


def test_cluster_margin_loss_hand_computed_case():
    # centres e0, e1; a feature 30 degrees from e0 (60 from e1), true cluster 0, s = 2, m = 0.5:
    # logits [2 cos(pi/6 + 0.5), 2 cos(pi/3)]; the feature's length does not matter (it is normalised)
    centers = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    feature = 5 * torch.tensor([[math.cos(math.pi / 6), math.sin(math.pi / 6)]])
    loss_fn = ClusterMarginLoss(centers, scale=2.0, margin=0.5)
    target, other = 2 * math.cos(math.pi / 6 + 0.5), 2 * 0.5
    expected = -target + math.log(math.exp(target) + math.exp(other))
    assert loss_fn(feature, torch.tensor([0])).item() == pytest.approx(expected, rel=1e-5)
    # no margin: plain softmax over scaled cosines; label 1 gets no margin on label 0's logit
    plain = ClusterMarginLoss(centers, scale=2.0, margin=0.0)(feature, torch.tensor([1]))
    logits = [2 * math.cos(math.pi / 6), 2 * 0.5]
    assert plain.item() == pytest.approx(-logits[1] + math.log(sum(math.exp(v) for v in logits)), rel=1e-5)


def test_cluster_margin_loss_past_pi_falls_back_and_keeps_gradients():
    # a feature opposite its centre: theta + m > pi, target logit s * (cos(theta) - m sin(m)) = 2 * (-1 - 0.5 sin 0.5)
    centers = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    feature = torch.tensor([[-1.0, 0.0]], requires_grad=True)
    loss_fn = ClusterMarginLoss(centers, scale=2.0, margin=0.5)
    logits = loss_fn.logits(feature, torch.tensor([0]))
    assert logits[0, 0].item() == pytest.approx(2 * (-1 - 0.5 * math.sin(0.5)), rel=1e-6)
    assert logits[0, 1].item() == pytest.approx(0.0, abs=1e-6)
    loss_fn(feature, torch.tensor([0])).backward()
    assert torch.isfinite(feature.grad).all()


def test_cluster_margin_logits_stay_float32_under_autocast():
    centers = F.normalize(torch.randn(3, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    features = normalized(4, 8, seed=9)
    loss_fn = ClusterMarginLoss(centers, scale=16.0, margin=0.2)
    reference = loss_fn.logits(features, torch.tensor([0, 1, 2, 0]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = loss_fn.logits(features.bfloat16(), torch.tensor([0, 1, 2, 0]))
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, reference, atol=0.05, rtol=0.01)  # bf16 inputs, float32 maths


def test_sampled_cluster_margin_loss():
    """PartialFC: every centre of the batch is scored, with random others up to `sample_size`; the loss is the
    margin softmax over exactly those centres (against a naive loop), and the full one when the sample covers all."""
    centers = normalized(50, 8, seed=3)
    features = centers[[4, 4, 17, 30, 30, 30]] + 0.3 * normalized(6, 8, seed=5)  # near their true centres
    labels = torch.tensor([4, 4, 17, 30, 30, 30])
    full = ClusterMarginLoss(centers, scale=4.0, margin=0.3)(features, labels)
    assert full.item() == pytest.approx(naive_margin_loss(features, centers, labels, 4.0, 0.3), rel=1e-5)
    for covering in (50, 80):
        torch.testing.assert_close(ClusterMarginLoss(centers, 4.0, 0.3, sample_size=covering)(features, labels), full)
    sampled = ClusterMarginLoss(centers, scale=4.0, margin=0.3, sample_size=8)
    torch.manual_seed(0)
    loss = sampled(features, labels)
    torch.manual_seed(0)
    chosen, renumbered = sampled.sample(labels)
    assert len(chosen) == 8 == len(set(chosen.tolist())) and {4, 17, 30} <= set(chosen.tolist())
    assert torch.equal(chosen[renumbered], labels)
    expected = naive_margin_loss(features, centers[chosen], renumbered, 4.0, 0.3)
    assert loss.item() == pytest.approx(expected, rel=1e-5) and loss.item() < full.item()  # fewer negatives
    # more distinct labels in the batch than the sample size: every one of them is still scored
    many = torch.arange(0, 50, 5)
    chosen, renumbered = ClusterMarginLoss(centers, sample_size=4).sample(many)
    assert set(chosen.tolist()) == set(many.tolist()) and torch.equal(chosen[renumbered], many)
    with pytest.raises(ValueError, match="at least 1"):
        ClusterMarginLoss(centers, sample_size=0)


def test_cluster_margin_loss_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_clusters, dim"):
        ClusterMarginLoss(torch.zeros(4))
    with pytest.raises(ValueError, match="margin"):
        ClusterMarginLoss(torch.eye(2), margin=2.0)


def naive_instance_loss(student_images, student_texts, teacher_images, teacher_texts, scale):
    """Cross-modal student->teacher InfoNCE written out sample by sample."""
    student_images, student_texts, teacher_images, teacher_texts = (  # plain numbers: no graph to convert
        tensor.detach() for tensor in (student_images, student_texts, teacher_images, teacher_texts))
    n, total = student_images.shape[0], 0.0
    for i in range(n):
        for student, teacher in ((student_images, teacher_texts), (student_texts, teacher_images)):
            row = [scale * float(student[i] @ teacher[j]) for j in range(n)]
            total += -row[i] + math.log(sum(math.exp(v) for v in row))
    return total / (2 * n)


def test_instance_distill_loss_matches_naive_loop_and_stops_teacher_gradient():
    student_images, student_texts = normalized(5, 8, seed=3).requires_grad_(True), normalized(5, 8, seed=4)
    teacher_images = normalized(5, 8, seed=5).requires_grad_(True)
    teacher_texts = normalized(5, 8, seed=6)
    loss = InstanceDistillLoss()(
        student_images, student_texts, teacher_images, teacher_texts, torch.tensor(math.log(7.0))
    )
    expected = naive_instance_loss(student_images, student_texts, teacher_images, teacher_texts, 7.0)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    same_modality = InstanceDistillLoss(cross_modal=False)(
        student_images, student_texts, teacher_images, teacher_texts, torch.tensor(math.log(7.0)))
    swapped = naive_instance_loss(student_images, student_texts, teacher_texts, teacher_images, 7.0)
    assert same_modality.item() == pytest.approx(swapped, rel=1e-5)
    loss.backward()
    assert teacher_images.grad is None and student_images.grad is not None


def test_affinity_distill_loss_matches_naive_loop_across_widths_and_stops_teacher_gradient():
    # the student (width 8) and the teacher (width 12) are compared through their in-batch relations only
    student_images = normalized(5, 8, seed=3).requires_grad_(True)
    student_texts = normalized(5, 8, seed=4)
    teacher_images, teacher_texts = normalized(5, 12, seed=5).requires_grad_(True), normalized(5, 12, seed=6)
    scale = torch.tensor(math.log(7.0), requires_grad=True)
    loss = AffinityDistillLoss()(student_images, student_texts, teacher_images, teacher_texts, scale)
    assert loss.item() == pytest.approx(
        naive_affinity_loss(student_images, student_texts, teacher_images, teacher_texts, 7.0, 7.0), rel=1e-5)
    fixed = AffinityDistillLoss(teacher_scale=20.0)(student_images, student_texts, teacher_images, teacher_texts,
                                                   scale)
    assert fixed.item() == pytest.approx(
        naive_affinity_loss(student_images, student_texts, teacher_images, teacher_texts, 7.0, 20.0), rel=1e-5)
    loss.backward()
    assert teacher_images.grad is None and student_images.grad is not None
    # the temperature learns through the student's side only: the teacher's copy of it is a constant
    reference_scale = torch.tensor(math.log(7.0), requires_grad=True)
    log_q = [F.log_softmax(reference_scale.exp() * a.detach() @ b.t(), dim=-1)
             for a, b in ((student_images, student_texts), (student_texts, student_images))]
    log_p = [F.log_softmax(7.0 * a.detach() @ b.t(), dim=-1)
             for a, b in ((teacher_images, teacher_texts), (teacher_texts, teacher_images))]
    (sum((p.exp() * (p - q)).sum() for p, q in zip(log_p, log_q)) / (2 * 5)).backward()
    assert scale.grad.item() == pytest.approx(reference_scale.grad.item(), rel=1e-4)
    # a student whose relations are the teacher's has nothing left to learn
    same = AffinityDistillLoss()(teacher_images.detach(), teacher_texts, teacher_images, teacher_texts, scale)
    assert same.item() == pytest.approx(0.0, abs=1e-6)


def _distributed_worker(rank, world_size, store, queue):
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    images, texts = normalized(8, 4, seed=1), normalized(8, 4, seed=2)
    per_rank = 8 // world_size
    results = {}
    for name, loss_fn in (("global", ClipLoss()), ("local", ClipLoss(local_loss=True)), ("older torch", ClipLoss())):
        local_images = images[rank * per_rank : (rank + 1) * per_rank].clone().requires_grad_(True)
        local_texts = texts[rank * per_rank : (rank + 1) * per_rank].clone().requires_grad_(True)
        from torch.distributed import _functional_collectives as collectives

        gather = collectives.all_gather_single_autograd
        with warnings.catch_warnings():
            if name == "older torch":  # a torch without the functional gather: torch.distributed.nn's (deprecated here)
                collectives.all_gather_single_autograd = None
            else:
                warnings.simplefilter("error", FutureWarning)  # no deprecated call where torch has the new one
            loss = loss_fn(local_images, local_texts, torch.tensor(math.log(5.0)))
            loss.backward()
        collectives.all_gather_single_autograd = gather
        results[name] = (loss.item(), local_images.grad.tolist())  # plain lists: no shared memory
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    instance = InstanceDistillLoss()(images[rows], texts[rows], normalized(8, 4, seed=3)[rows],
                                     normalized(8, 4, seed=4)[rows], torch.tensor(math.log(5.0)))
    results["instance"] = (instance.item(), None)
    affinity = AffinityDistillLoss()(images[rows], texts[rows], normalized(8, 4, seed=3)[rows],
                                     normalized(8, 4, seed=4)[rows], torch.tensor(math.log(5.0)))
    results["affinity"] = (affinity.item(), None)
    queue.put((rank, results))
    # both ranks leave gloo together: a rank tearing down while its peer still has a collective in flight
    # aborts the process ("terminate called without an active exception", about 1 run in 8 without this)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_two_process_gather_with_gradients(tmp_path):
    """2 gloo processes: same loss as one process over the global batch; gradients flow through the gather."""
    world_size = 2
    context = mp.get_context("spawn")
    queue = context.Queue()
    processes = [
        context.Process(target=_distributed_worker, args=(rank, world_size, str(tmp_path / "store"), queue))
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    results = dict(queue.get(timeout=120) for _ in range(world_size))  # a crashed worker fails, not hangs
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0

    images = normalized(8, 4, seed=1).requires_grad_(True)
    texts = normalized(8, 4, seed=2)
    full = ClipLoss()(images, texts, torch.tensor(math.log(5.0)))
    full.backward()
    local_losses = []
    for rank in range(world_size):
        loss, grad = results[rank]["global"]
        assert loss == pytest.approx(full.item(), rel=1e-5)
        # every rank's loss reaches this rank's features through the gather: world_size x the one-process gradient
        torch.testing.assert_close(
            torch.tensor(grad), world_size * images.grad[rank * 4 : (rank + 1) * 4], atol=1e-6, rtol=1e-5
        )
        local_losses.append(results[rank]["local"][0])
        assert results[rank]["older torch"] == results[rank]["global"]  # the same gather, value and gradient
    # local losses (own rows against the global batch) average to the global loss
    assert sum(local_losses) / world_size == pytest.approx(full.item(), rel=1e-5)
    # the instance term scores each rank's student rows against the gathered teacher batch
    instance = InstanceDistillLoss()(images.detach(), texts, normalized(8, 4, seed=3), normalized(8, 4, seed=4),
                                     torch.tensor(math.log(5.0)))
    assert sum(results[rank]["instance"][0] for rank in range(world_size)) / world_size == pytest.approx(
        instance.item(), rel=1e-5)
    # so does the affinity term, against the gathered student and teacher batches
    affinity = AffinityDistillLoss()(images.detach(), texts, normalized(8, 4, seed=3), normalized(8, 4, seed=4),
                                     torch.tensor(math.log(5.0)))
    assert sum(results[rank]["affinity"][0] for rank in range(world_size)) / world_size == pytest.approx(
        affinity.item(), rel=1e-5)
