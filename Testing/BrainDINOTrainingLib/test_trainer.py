"""The pretraining loop on phantom slices: learns, resumes exactly, stops on non-finite loss, exports."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from BrainDINOLib.bundle import load_bundle
from BrainDINOLib.errors import BrainDINOError
from BrainDINOTrainingLib.augment import MultiCropConfig
from BrainDINOTrainingLib.cli import main
from BrainDINOTrainingLib.objectives.dino import DINOConfig
from BrainDINOTrainingLib.trainer import Schedules, TrainConfig, Trainer


@pytest.fixture(scope="module")
def index(index64):
    return index64


def _config(index, out_dir, **overrides) -> TrainConfig:
    values = dict(
        data=str(index),
        out_dir=str(out_dir),
        epochs=2,
        steps_per_epoch=6,
        batch_size=8,
        base_lr=5e-2,
        warmup_epochs=0.5,
        checkpoint_every=3,
        device="cpu",
        dino=DINOConfig(prototypes=256, head_hidden_dim=128, head_bottleneck_dim=64),
        crops=MultiCropConfig(global_size=64, local_size=32, local_crops=2),
    )
    return TrainConfig(**{**values, **overrides})


def test_schedules_follow_the_recipe():
    config = TrainConfig(epochs=10, batch_size=1024, warmup_epochs=1)
    schedules = Schedules.build(config, steps_per_epoch=10)
    assert schedules.lr[0] == 0 and schedules.lr[10] == pytest.approx(4e-3) and schedules.lr[-1] < 1e-4
    assert schedules.weight_decay[0] == pytest.approx(0.04) and schedules.weight_decay[-1] == pytest.approx(
        0.4, rel=0.01
    )
    assert schedules.momentum[0] == pytest.approx(0.992) and schedules.momentum[-1] == pytest.approx(1.0, abs=1e-4)
    assert schedules.teacher_temperature[0] == pytest.approx(0.04) and schedules.teacher_temperature[-1] == 0.07


def test_resume_is_bit_exact(tmp_path, index):
    straight = Trainer(_config(index, tmp_path / "a"))
    straight.fit()
    first = Trainer(_config(index, tmp_path / "b"))
    first.fit(max_steps=6)  # stops at a checkpoint, like a killed run restarted from its last checkpoint
    resumed = Trainer(_config(index, tmp_path / "b"))
    resumed.fit(resume=True)
    assert resumed.step == straight.step == 12
    for key, value in straight.objective.state_dict().items():
        assert torch.equal(value, resumed.objective.state_dict()[key]), key
    with pytest.raises(BrainDINOError, match="holds a run already"):
        Trainer(_config(index, tmp_path / "a")).fit()


def test_student_learns_the_teacher_targets_and_the_export_drives_inference(tmp_path, index):
    """DINO's raw loss first rises from the identical-copy start towards ln(K) as centering flattens
    the targets, so learning is measured against fixed targets: the final teacher's, on one batch."""
    trainer = Trainer(_config(index, tmp_path / "run", epochs=4, teacher_temperature=(0.04, 0.04)))
    initial_student = copy.deepcopy(trainer.objective.student.state_dict())
    rows = trainer.fit()
    assert {"dino", "ibot", "koleo", "teacher_entropy", "embedding_std", "lr", "wd", "momentum"} <= set(rows[0])
    assert all(np.isfinite(r["loss"]) and r["dino"] < np.log(256) + 0.5 for r in rows)
    batch = next(iter(trainer.loader(0, 1)))

    inputs = trainer.objective.make_inputs(batch, torch.Generator().manual_seed(9))

    def dino_loss() -> float:
        with torch.no_grad():
            return trainer.objective(inputs, 0.04).losses["dino"].item()

    trained = dino_loss()
    final_student = copy.deepcopy(trainer.objective.student.state_dict())
    trainer.objective.student.load_state_dict(initial_student)
    assert trained < dino_loss()
    trainer.objective.student.load_state_dict(final_student)
    bundle = load_bundle(trainer.export(tmp_path / "bundle"))
    assert not bundle.card.random_init and bundle.card.training["steps"] == 24
    encoder = bundle.load_encoder()
    with torch.no_grad():
        assert encoder(torch.zeros(1, 3, 64, 64)).cls.shape == (1, 96)


def test_non_finite_loss_stops_with_the_checkpoint_intact(tmp_path, index):
    trainer = Trainer(_config(index, tmp_path / "nan"))
    trainer.fit(max_steps=3)
    saved = (tmp_path / "nan" / "checkpoint.pt").read_bytes()
    with torch.no_grad():
        trainer.objective.student["backbone"].cls_token.fill_(float("nan"))
    with pytest.raises(BrainDINOError, match="not finite"):
        trainer.train_step(next(iter(trainer.loader(3, 4))))
    assert (tmp_path / "nan" / "checkpoint.pt").read_bytes() == saved


def test_pretrain_command_exports_a_bundle_that_infer_uses(tmp_path, index, cohort, capsys):
    run = tmp_path / "run"
    settings = [
        "epochs=1",
        "steps_per_epoch=3",
        "batch_size=4",
        "crops.global_size=64",
        "crops.local_size=32",
        "crops.local_crops=2",
        "dino.prototypes=128",
        "dino.head_hidden_dim=64",
        "dino.head_bottleneck_dim=32",
    ]
    args = ["pretrain", "--config", "tiny-cpu", "--data", str(index), "-o", str(run), "--device", "cpu"]
    assert main(args + [a for s in settings for a in ("--set", s)]) == 0
    assert "encoder exported to" in capsys.readouterr().out
    assert (run / "checkpoint.pt").is_file() and (run / "log.csv").read_text().count("\n") == 4
    assert any((run / "tensorboard").glob("events.out.tfevents.*"))
    scan = cohort / "phantom-0005" / "phantom-0005_t1.nii.gz"
    assert main(["infer", str(scan), "-o", str(tmp_path / "out"), "--bundle", str(run / "bundle"), "-q"]) == 0
    assert (tmp_path / "out" / "phantom-0005_t1_attention.nii.gz").is_file()
    assert main(["pretrain", "--config", "no-such-config", "--data", str(index)]) == 2
    assert "no training config 'no-such-config'" in capsys.readouterr().err
