"""The pretraining loop on phantom slices: learns, resumes exactly, stops on non-finite loss, exports."""

from __future__ import annotations

import copy
import csv
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from BrainDINOLib.bundle import find_bundle, load_bundle
from BrainDINOLib.errors import BrainDINOError
from BrainDINOLib.preprocess import PreprocessSpec
from BrainDINOTrainingLib.augment import MultiCropConfig
from BrainDINOTrainingLib.cli import main
from BrainDINOTrainingLib.objectives.common import encode_tokens
from BrainDINOTrainingLib.objectives.dino import DINOConfig
from BrainDINOTrainingLib.objectives.gram import gram_loss
from BrainDINOTrainingLib.slice_index import build_index
from BrainDINOTrainingLib.trainer import Schedules, TrainConfig, Trainer, load_config


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
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exported = bundle.load_encoder()(images).cls
        teacher, _ = encode_tokens(trainer.objective.teacher["backbone"].eval(), images)
        student, _ = encode_tokens(trainer.objective.student["backbone"].eval(), images)
    assert exported.shape == (2, 96) and torch.allclose(exported, teacher, atol=1e-5)
    assert not torch.allclose(exported, student, atol=1e-3)  # DINO exports its EMA teacher, not the student


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


def test_gram_loss_is_dinov3s_image_level_gram_mse_in_fp32():
    """A hand computation: per image, cosine-similarity matrices of the patches, mean squared difference; the same
    under bf16 autocast (the similarities are not quantised)."""
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 8, generator=generator), torch.randn(2, 5, 8, generator=generator)
    expected = 0.0
    for s, t in zip(student.double().numpy(), teacher.double().numpy(), strict=True):
        s, t = s / np.linalg.norm(s, axis=1, keepdims=True), t / np.linalg.norm(t, axis=1, keepdims=True)
        expected += ((s @ s.T - t @ t.T) ** 2).sum()
    expected /= 2 * 5 * 5
    assert float(gram_loss(student, teacher)) == pytest.approx(expected, rel=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert float(gram_loss(student, teacher)) == pytest.approx(expected, rel=1e-6)
    assert float(gram_loss(teacher, teacher)) == 0.0


def _stage(index, out_dir, config: str, init, *sets: str) -> list[str]:
    return ["pretrain", "--config", config, "--init", str(init), "--data", str(index), "-o", str(out_dir), "--device",
            "cpu", "--set", "workers=0", *(a for s in sets for a in ("--set", s))]  # fmt: skip


def test_three_stage_recipe_from_earlier_weights_to_a_448_px_bundle(tmp_path, index, cohort, mni_2mm):
    """The tiny recipe chained: --init (student and teacher from the weights, heads fresh) -> Gram anchoring (a
    gram column; resume exact; the teacher refreshed) -> 448-px canvases, whose bundle infer runs on a 28 x 28
    grid. A config naming another architecture than the weights is one line before any training."""
    small = ("crops.global_size=64", "crops.local_size=32", "crops.local_crops=2", "batch_size=8",
             "steps_per_epoch=2", "dino.prototypes=256")  # fmt: skip
    init = load_bundle(find_bundle("braindino-tiny-phantom")).load_encoder().model.state_dict()
    started = Trainer(load_config("tiny-stage1", {"init": "braindino-tiny-phantom", "data": str(index),
                                                  "out_dir": str(tmp_path / "s0"), "device": "cpu"}))  # fmt: skip
    started.fit(max_steps=0)
    for name in ("student", "teacher"):
        backbone = getattr(started.objective, name)["backbone"].state_dict()
        assert all(torch.equal(backbone[key], value) for key, value in init.items())
    with pytest.raises(BrainDINOError, match="the config trains vit-s16-dinov3 but --init braindino-tiny-phantom"):
        load_config("tiny-stage1", {"init": "braindino-tiny-phantom"}, ["encoder=vit-s16-dinov3"])

    assert main(_stage(index, tmp_path / "s1", "tiny-stage1", "braindino-tiny-phantom", *small)) == 0
    stage2 = _stage(index, tmp_path / "s2", "tiny-stage2-gram", tmp_path / "s1" / "bundle", *small,
                    "steps_per_epoch=4", "gram.refresh=2", "checkpoint_every=2")  # fmt: skip
    assert main(stage2) == 0
    with open(tmp_path / "s2" / "log.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 and all(0 < float(row["gram"]) < 1 for row in rows)
    config = load_config("tiny-stage2-gram", {"init": str(tmp_path / "s1" / "bundle"), "data": str(index),
                                              "out_dir": str(tmp_path / "s2b"), "device": "cpu"},
                         [*small[:-2], "steps_per_epoch=4", "gram.refresh=2", "checkpoint_every=2", "workers=0",
                          "dino.prototypes=256"])  # fmt: skip
    first = Trainer(config)
    first.fit(max_steps=0)
    stage1 = load_bundle(tmp_path / "s1" / "bundle").load_encoder().model.state_dict()
    assert all(torch.equal(value, stage1[key]) for key, value in first.objective.gram_teacher.state_dict().items())
    first.fit(max_steps=2)
    resumed = Trainer(config)
    resumed.fit(resume=True)
    straight = torch.load(tmp_path / "s2" / "checkpoint.pt", weights_only=True)["objective"]
    assert all(torch.equal(value, straight[key]) for key, value in resumed.objective.state_dict().items())
    gram, teacher = resumed.objective.gram_teacher.state_dict(), resumed.objective.teacher["backbone"].state_dict()
    assert all(torch.equal(gram[key], teacher[key]) for key in gram)  # refreshed at step 4

    index448, scans = tmp_path / "index448", tmp_path / "scans448"
    scans.mkdir()
    shutil.copy(cohort / "phantom-0000" / "phantom-0000_flair.nii.gz", scans)
    build_index([scans], index448, PreprocessSpec(image_size=448))
    stage3 = _stage(index448, tmp_path / "s3", "tiny-stage3-448", tmp_path / "s2" / "bundle", "batch_size=2",
                    "steps_per_epoch=1", "crops.local_crops=1", "dino.prototypes=256")  # fmt: skip
    assert main(stage3) == 0
    scan = tmp_path / "mni.nii.gz"
    nib.save(mni_2mm, scan)
    assert main(["infer", str(scan), "-o", str(tmp_path / "out"), "--bundle", str(tmp_path / "s3" / "bundle"),
                 "--no-report", "-q"]) == 0  # fmt: skip
    assert load_file(tmp_path / "out" / "embeddings.safetensors")["patch_tokens"].shape[1:3] == (28, 28)
