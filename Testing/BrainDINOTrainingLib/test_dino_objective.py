"""The DINO meta-architecture and multi-crop on phantom slices: a few CPU steps learn."""

from __future__ import annotations

import pytest
import torch

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
    global_crops, local_crops = multi_crop(slices, CROPS, torch.Generator().manual_seed(0))
    assert [c.shape for c in global_crops] == [(16, 3, 64, 64)] * 2
    assert [c.shape for c in local_crops] == [(16, 3, 32, 32)] * 2
    again, _ = multi_crop(slices, CROPS, torch.Generator().manual_seed(0))
    assert torch.equal(global_crops[0], again[0]) and not torch.equal(global_crops[0], global_crops[1])
    assert all(torch.isfinite(c).all() for c in global_crops + local_crops)


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
