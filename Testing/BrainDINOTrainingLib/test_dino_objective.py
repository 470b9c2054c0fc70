"""The DINO meta-architecture and multi-crop on phantom slices: a few CPU steps learn."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from BrainDINOLib.encoder import encoder_config
from BrainDINOTrainingLib.augment import MultiCropConfig, multi_crop
from BrainDINOTrainingLib.objectives.dino import DINOConfig, DINOObjective
from BrainDINOTrainingLib.slice_index import SliceDataset

CROPS = MultiCropConfig(global_size=64, local_size=32, local_crops=2)


@pytest.fixture(scope="module")
def slices(index64):
    """16 slices spread over the index."""
    dataset = SliceDataset(index64)
    return torch.stack([dataset[i] for i in range(0, len(dataset), max(1, len(dataset) // 16))][:16])


def test_multi_crop_shapes_and_determinism(slices):
    global_crops, local_crops, plain = multi_crop(slices, CROPS, torch.Generator().manual_seed(0))
    assert [c.shape for c in global_crops] == [(16, 3, 64, 64)] * 2
    assert [c.shape for c in local_crops] == [(16, 3, 32, 32)] * 2 and plain == []
    again, _, _ = multi_crop(slices, CROPS, torch.Generator().manual_seed(0))
    assert torch.equal(global_crops[0], again[0]) and not torch.equal(global_crops[0], global_crops[1])
    assert all(torch.isfinite(c).all() for c in global_crops + local_crops)


def test_the_gram_teachers_views_are_the_global_crops_undistorted_and_larger(slices):
    """Same boxes and flips as the student's global crops, at the teacher's size, without intensity changes; and
    asking for them leaves the student's crops as they were."""
    crops = dataclasses.replace(CROPS, intensity_probability=0.0, gamma_probability=0.0, bias_probability=0.0,
                                blur_probability=0.0, noise_probability=0.0)  # fmt: skip
    student, _, plain = multi_crop(slices, crops, torch.Generator().manual_seed(1), plain_size=128)
    assert [c.shape for c in plain] == [(16, 3, 128, 128)] * 2
    for small, large in zip(student, plain, strict=True):  # without distortions: the same picture, twice as fine
        torch.testing.assert_close(F.avg_pool2d(large, 2), small, atol=0.15, rtol=0)
    distorted, _, plain_again = multi_crop(slices, CROPS, torch.Generator().manual_seed(1), plain_size=128)
    alone, _, _ = multi_crop(slices, CROPS, torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(distorted, alone, strict=True))
    # the first crop's box and flips are drawn before any intensity draw: the same in both runs, never distorted
    assert torch.equal(plain_again[0], plain[0]) and not torch.equal(distorted[0], student[0])


def _objective(**overrides) -> DINOObjective:
    torch.manual_seed(0)
    config = DINOConfig(prototypes=256, head_hidden_dim=128, head_bottleneck_dim=64, **overrides)
    return DINOObjective(encoder_config("vit-tiny16-dinov3"), config, CROPS, image_size=64)


def test_teacher_is_a_separate_copy():
    objective = _objective()
    student = {id(p) for p in objective.student.parameters()}
    assert not student & {id(p) for p in objective.teacher.parameters()}
    assert all(not p.requires_grad for p in objective.teacher.parameters())


def test_a_few_steps_reduce_the_loss_and_export_a_working_encoder(slices):
    objective = _objective()
    generator = torch.Generator().manual_seed(1)
    optimizer = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=5e-4)
    inputs = objective.make_inputs(slices, generator)
    assert inputs["masks"].shape == (32, 4, 4) and inputs["masks"].any()
    losses = []
    for _ in range(12):
        step = objective(inputs, teacher_temperature=0.04)
        optimizer.zero_grad()
        step.losses["loss"].backward()
        optimizer.step()
        objective.after_step(step, 0.9)
        losses.append(step.losses["loss"].item())
    assert set(step.losses) == {"dino", "ibot", "koleo", "loss"}
    assert losses[-1] < losses[0]
    assert torch.count_nonzero(objective.cls_center.center) > 0
    assert objective.export_backbone() is objective.teacher["backbone"]


def test_terms_switch_off_by_weight_and_sinkhorn_runs(slices):
    objective = _objective(ibot_weight=0.0, koleo_weight=0.0, centering="sinkhorn")
    inputs = objective.make_inputs(slices, torch.Generator().manual_seed(2))
    assert not inputs["masks"].any()  # no iBOT term, no masks
    step = objective(inputs, teacher_temperature=0.04)
    assert set(step.losses) == {"dino", "loss"} and torch.isfinite(step.losses["loss"])
    assert 0 < step.metrics["teacher_entropy"] <= torch.log(torch.tensor(256.0)).item() + 1e-4
