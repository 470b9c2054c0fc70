"""Precision and device rules, checked on the CPU: reductions that low precision breaks stay in fp32 under
autocast, bf16 and fp16 (with loss scaling) training steps behave, non-finite gradients stop a step before the
weights change, a resume may change device and precision, and host-to-device copies are asynchronous only where
that is safe."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from BrainDINOLib.engine import autocast_dtype, to_device
from BrainDINOLib.errors import BrainDINOError
from BrainDINOTrainingLib.augment import MultiCropConfig
from BrainDINOTrainingLib.objectives.anatcl import y_aware_infonce
from BrainDINOTrainingLib.objectives.dino import DINOConfig
from BrainDINOTrainingLib.objectives.gram import gram_loss
from BrainDINOTrainingLib.objectives.jepa import variance_covariance
from BrainDINOTrainingLib.objectives.koleo_loss import KoLeoLoss
from BrainDINOTrainingLib.objectives.moco import MoCoObjective
from BrainDINOTrainingLib.trainer import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[2]
G = torch.Generator().manual_seed(0)


def _config(index, out_dir, **overrides) -> TrainConfig:
    values = dict(
        data=str(index), out_dir=str(out_dir), epochs=1, steps_per_epoch=4, batch_size=8, checkpoint_every=2,
        device="cpu", dino=DINOConfig(prototypes=128, head_hidden_dim=64, head_bottleneck_dim=32),
        crops=MultiCropConfig(global_size=64, local_size=32, local_crops=2),
    )  # fmt: skip
    return TrainConfig(**{**values, **overrides})


def test_precision_sensitive_reductions_ignore_autocast():
    """Nearly collapsed embeddings, as early in training: under bf16 autocast, each reduction gives exactly its
    fp32 value (a bf16 matmul picks other KoLeo neighbours and InfoNCE positives, and loses small covariances)."""
    collapsed = torch.randn(1, 32, generator=G) + 0.01 * torch.randn(64, 32, generator=G)
    descriptors = torch.randn(64, 3, generator=G)
    patches = torch.randn(2, 16, 32, generator=G)
    moco = SimpleNamespace(config=SimpleNamespace(temperature=0.2))
    reductions = {
        "koleo": lambda: KoLeoLoss()(collapsed),
        "y-aware InfoNCE": lambda: y_aware_infonce(
            torch.nn.functional.normalize(collapsed, dim=1), descriptors, 0.1, 1
        ),
        "variance-covariance": lambda: torch.stack(variance_covariance(collapsed)),
        "gram": lambda: gram_loss(patches, patches.flip(1)),
        "moco contrast": lambda: MoCoObjective._contrast(moco, collapsed, collapsed.flip(0)),
    }
    for name, reduce in reductions.items():
        expected = reduce()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(reduce(), expected), name
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what the decorator prevents: bf16 similarities
        similarity = collapsed @ collapsed.t()
    assert similarity.dtype == torch.bfloat16


def test_precision_choices_per_device():
    cpu = torch.device("cpu")
    assert autocast_dtype(cpu) is None and autocast_dtype(torch.device("mps")) == torch.float16
    assert autocast_dtype(cpu, "bf16") == torch.bfloat16 and autocast_dtype(cpu, "fp16") == torch.float16
    with pytest.raises(BrainDINOError, match="precision must be one of auto, fp32, bf16, fp16, not 'half'"):
        autocast_dtype(cpu, "half")
    with pytest.raises(BrainDINOError, match="precision must be one of"):
        TrainConfig(precision="half")


def test_copies_to_a_device_are_asynchronous_only_from_pinned_memory_to_cuda():
    """MPS can read an asynchronously copied CPU tensor after it is freed; so every host-to-device copy goes through
    `to_device`, which keeps ``non_blocking`` for pinned memory and CUDA."""
    written = [
        f"{path.relative_to(ROOT)}:{number}"
        for folder in ("BrainDINO", "BrainDINOTraining", "benchmarks", "tools")
        for path in sorted((ROOT / folder).rglob("*.py"))
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if re.search(r"non_blocking\s*=\s*True", line)
    ]
    assert written == [f"BrainDINO/BrainDINOLib/engine.py:{_line_of('engine.py', 'non_blocking=True')}"]
    tensor = torch.randn(4)
    assert to_device(tensor, torch.device("cpu")) is tensor  # no copy where none is needed


def _line_of(name: str, text: str) -> int:
    lines = (ROOT / "BrainDINO" / "BrainDINOLib" / name).read_text(encoding="utf-8").splitlines()
    return next(number for number, line in enumerate(lines, 1) if text in line)


def test_bf16_training_steps_match_fp32(tmp_path, index64):
    """CPU bf16 autocast, the same seed and data: each step's loss and KoLeo term within 2 % of fp32's (measured:
    0.06-0.14 % and 0.6-1.2 %)."""
    rows = {}
    for precision in ("fp32", "bf16"):
        trainer = Trainer(_config(index64, tmp_path / precision, precision=precision))
        rows[precision] = trainer.fit(max_steps=2)
    for fp32, bf16 in zip(rows["fp32"], rows["bf16"], strict=True):
        assert bf16["loss"] == pytest.approx(fp32["loss"], rel=0.02)
        assert bf16["koleo"] == pytest.approx(fp32["koleo"], rel=0.02)


def test_fp16_scales_the_loss_and_skips_an_overflowing_step(tmp_path, index64, caplog):
    trainer = Trainer(_config(index64, tmp_path / "fp16", precision="fp16"))
    assert trainer.scaler.is_enabled() and trainer.autocast == torch.float16
    rows = trainer.fit(max_steps=2)
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in rows)
    scale = trainer.scaler.get_scale()
    weights = {k: v.clone() for k, v in trainer.objective.student.state_dict().items()}
    token = trainer.objective.student["backbone"].cls_token
    overflow = token.register_hook(lambda grad: grad * float("inf"))
    with caplog.at_level(logging.INFO, logger="BrainDINOTrainingLib.trainer"):
        trainer.train_step(next(iter(trainer.loader(2, 3))))
    overflow.remove()
    assert "overflowed; the step is skipped" in caplog.text and trainer.scaler.get_scale() < scale
    for key, value in trainer.objective.student.state_dict().items():
        assert torch.equal(value, weights[key]), key  # the optimizer step was skipped


def test_a_non_finite_gradient_stops_the_step_before_the_weights_change(tmp_path, index64):
    """A finite loss with a NaN gradient (what fp16 without loss scaling produced): one line, weights unchanged."""
    trainer = Trainer(_config(index64, tmp_path / "nan-grad", precision="fp32"))
    trainer.fit(max_steps=2)
    saved = (tmp_path / "nan-grad" / "checkpoint.pt").read_bytes()
    weights = {k: v.clone() for k, v in trainer.objective.state_dict().items()}
    trainer.objective.student["backbone"].cls_token.register_hook(lambda grad: grad * float("nan"))
    with pytest.raises(BrainDINOError, match="step 2: a gradient is not finite; stopped before the weights changed"):
        trainer.train_step(next(iter(trainer.loader(2, 3))))
    assert all(torch.equal(v, weights[k]) for k, v in trainer.objective.state_dict().items())
    assert (tmp_path / "nan-grad" / "checkpoint.pt").read_bytes() == saved


def test_a_resume_may_change_precision_and_says_so(tmp_path, index64, caplog):
    Trainer(_config(index64, tmp_path / "run", precision="fp32")).fit(max_steps=2)
    resumed = Trainer(_config(index64, tmp_path / "run", precision="bf16"))
    with caplog.at_level(logging.WARNING, logger="BrainDINOTrainingLib.trainer"):
        resumed.fit(resume=True, max_steps=1)
    assert "resuming with precision bf16 (the checkpoint was written with fp32)" in caplog.text
    assert resumed.step == 3
    with pytest.raises(BrainDINOError, match=r"only device, precision, workers may change"):
        Trainer(_config(index64, tmp_path / "run", batch_size=4)).fit(resume=True)
