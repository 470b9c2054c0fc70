"""Online kNN monitor: reference behaviour, and logged by a training run with a probe set."""

from __future__ import annotations

import csv

import pytest
import torch

from BrainDINOLib.bundle import load_bundle
from BrainDINOTrainingLib.augment import MultiCropConfig
from BrainDINOTrainingLib.monitor import knn_accuracy
from BrainDINOTrainingLib.objectives.dino import DINOConfig
from BrainDINOTrainingLib.trainer import TrainConfig, Trainer


def test_knn_separates_separable_features_and_is_at_chance_on_noise():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(60) % 3
    centres = torch.randn(3, 16, generator=generator) * 5
    clustered = centres[labels] + torch.randn(60, 16, generator=generator) * 0.1
    assert knn_accuracy(clustered, labels) == 1.0
    noise = torch.randn(600, 16, generator=generator)
    chance = knn_accuracy(noise, torch.arange(600) % 3)
    assert 0.2 < chance < 0.47


def test_training_logs_knn_accuracy_at_checkpoints(tmp_path, index64, cohort):
    config = TrainConfig(
        data=str(index64),
        out_dir=str(tmp_path / "run"),
        epochs=1,
        steps_per_epoch=4,
        batch_size=8,
        checkpoint_every=2,
        device="cpu",
        probe=str(cohort),
        probe_label="tumor",
        dino=DINOConfig(prototypes=128, head_hidden_dim=64, head_bottleneck_dim=32),
        crops=MultiCropConfig(global_size=64, local_size=32, local_crops=2),
    )
    trainer = Trainer(config)
    trainer.fit()
    with open(tmp_path / "run" / "log.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["knn_accuracy"] == "" for r in rows] == [True, False, True, False]
    # The last logged value is the probe's accuracy of the final encoder, exported and embedded here.
    encoder = load_bundle(trainer.export(tmp_path / "bundle")).load_encoder()
    with torch.no_grad():
        expected = trainer.probe.accuracy(
            lambda images: encoder(images).cls, trainer.dataset.spec.in_chans, torch.device("cpu")
        )
    assert float(rows[-1]["knn_accuracy"]) == pytest.approx(expected, abs=1e-4)
