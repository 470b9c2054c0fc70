"""MoCo v3, MAE + spectral loss, JEPA + VCR and AnatCL under the shared trainer on phantom slices,
their building blocks, and the collapse verdict on a deliberately broken DINO configuration."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from BrainDINOLib.bundle import load_bundle
from BrainDINOLib.encoder import build_vit, encoder_config
from BrainDINOLib.errors import BrainDINOError
from BrainDINOLib.preprocess import PreprocessSpec
from BrainDINOTrainingLib.monitor import collapse_verdict
from BrainDINOTrainingLib.objectives.anatcl import y_aware_infonce
from BrainDINOTrainingLib.objectives.common import encode_tokens
from BrainDINOTrainingLib.objectives.jepa import JEPAConfig, jepa_blocks
from BrainDINOTrainingLib.objectives.mae import patchify, spectral_distance, unpatchify
from BrainDINOTrainingLib.slice_index import SliceDataset, build_index
from BrainDINOTrainingLib.trainer import Trainer, load_config

SMALL = [
    "epochs=1",
    "batch_size=16",
    "base_lr=0.02",
    "warmup_epochs=0.1",
    "workers=0",
    "crops.global_size=64",
    "crops.local_size=32",
    "crops.local_crops=2",
    "dino.prototypes=256",
    "dino.head_hidden_dim=128",
    "dino.head_bottleneck_dim=64",
    "moco.hidden_dim=256",
    "moco.out_dim=64",
    "mae.decoder_dim=64",
    "mae.decoder_heads=4",
    "jepa.predictor_dim=64",
    "jepa.predictor_depth=2",
    "anatcl.hidden_dim=128",
    "anatcl.out_dim=32",
]


def _trainer(index, out_dir, *settings: str) -> Trainer:
    overrides = {"data": str(index), "out_dir": str(out_dir), "device": "cpu"}
    return Trainer(load_config("tiny-cpu", overrides, SMALL + list(settings)))


@pytest.mark.parametrize(
    ("objective", "terms", "pooling"),
    [
        ("moco", {"contrastive"}, "cls"),
        ("mae", {"pixel", "spectral"}, "mean"),
        ("jepa", {"prediction", "variance", "covariance"}, "mean"),
        ("anatcl", {"contrastive"}, "cls"),
    ],
)
def test_objective_learns_on_phantom_slices_and_exports_a_bundle_for_inference(
    tmp_path, index64, objective, terms, pooling
):
    """The loss on one fixed batch (fixed views and masks) falls after 40 steps; the export runs."""
    trainer = _trainer(index64, tmp_path / "run", f"objective={objective}", "steps_per_epoch=40", "checkpoint_every=20")
    chosen = np.linspace(0, len(trainer.dataset) - 1, 16).round().astype(int).tolist()
    images = torch.stack([trainer.dataset[i] for i in chosen])
    descriptors = None if trainer.descriptors is None else trainer.descriptors[chosen]
    inputs = trainer.objective.make_inputs(images, torch.Generator().manual_seed(5), descriptors)

    def fixed_batch_loss() -> float:
        with torch.no_grad():
            return trainer.objective(inputs, 0.04).losses["loss"].item()

    before = fixed_batch_loss()
    rows = trainer.fit()
    assert terms | {"loss", "embedding_std"} <= set(rows[-1]) and all(np.isfinite(r["loss"]) for r in rows)
    assert fixed_batch_loss() < 0.95 * before
    assert [r["collapse"] for r in rows if r["step"] % 20 == 0] == ["", ""]
    bundle = load_bundle(trainer.export(tmp_path / "bundle", command="braindino pretrain ..."))
    assert bundle.card.training["objective"] == objective and bundle.card.pooling == pooling
    assert bundle.card.training["command"] == "braindino pretrain ..." and bundle.card.training["steps"] == 40
    with torch.no_grad():
        exported = bundle.load_encoder()(images[:2])
        cls, _ = encode_tokens(trainer.objective.export_backbone().eval(), images[:2])
    assert exported.cls.shape == (2, 96) and torch.allclose(exported.cls, cls, atol=1e-5)


def test_broken_dino_config_is_reported_as_collapse(tmp_path, index64, caplog):
    """No centering and a hot teacher (0.4): targets stop depending on the slice; the healthy recipe does not."""
    settings = ["steps_per_epoch=30", "checkpoint_every=10"]
    healthy = _trainer(index64, tmp_path / "healthy", *settings).fit()
    broken_trainer = _trainer(
        index64, tmp_path / "broken", *settings, "dino.centering=none", "teacher_temperature=[0.4, 0.4]"
    )
    with caplog.at_level(logging.WARNING):
        broken = broken_trainer.fit()
    checkpoints = [10, 20, 30]
    assert [r["collapse"] for r in healthy if r["step"] in checkpoints] == ["", "", ""]
    verdicts = [r["collapse"] for r in broken if r["step"] in checkpoints]
    assert all(v.startswith("collapse: teacher targets carry") and "uniform collapse" in v for v in verdicts)
    assert "step 30: collapse" in caplog.text
    assert "collapse: teacher targets" in (tmp_path / "broken" / "log.csv").read_text()


def test_input_independent_embeddings_are_reported(tmp_path, index64):
    """DINOv2's LayerScale start (1e-5) leaves a fresh ViT's CLS token the same for every slice."""
    rows = _trainer(
        index64, tmp_path / "run", "objective=moco", "layer_scale_init=1e-5", "steps_per_epoch=1", "checkpoint_every=1"
    ).fit()
    assert "embeddings of different slices nearly identical" in rows[0]["collapse"]


def test_descriptors_come_from_the_manifest_standardised(tmp_path, index64, cohort):
    dataset = SliceDataset(index64)
    values = dataset.descriptors(["age", "gm_ml"])
    with open(cohort / "manifest.csv") as handle:
        ages = {row["subject_id"]: float(row["age"]) for row in csv.DictReader(handle)}
    volume_age = {v.volume: ages[Path(v.path).parent.name] for v in dataset.volumes}
    per_volume = np.array(list(volume_age.values()))
    raw = np.array([volume_age[int(v)] for v in dataset.records["volume"]])
    assert values.shape == (len(dataset), 2)
    assert np.allclose(values[:, 0], (raw - per_volume.mean()) / per_volume.std(), atol=1e-5)
    with pytest.raises(BrainDINOError, match="has no survival_months"):
        dataset.descriptors(["survival_months"])
    unlabeled = tmp_path / "idx"
    build_index([cohort / "phantom-0000"], unlabeled, dataset.spec)
    with pytest.raises(BrainDINOError, match="build the index from a manifest"):
        _trainer(unlabeled, tmp_path / "run", "objective=anatcl", "steps_per_epoch=1", "batch_size=4")


def test_y_aware_loss_prefers_embeddings_that_follow_the_descriptors():
    descriptors = torch.tensor([[0.0], [0.1], [3.0], [3.1]])
    aligned = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [0.1, 0.99]]), dim=1)
    crossed = aligned[[0, 2, 1, 3]]
    assert y_aware_infonce(aligned, descriptors, 0.1, 1.0) < y_aware_infonce(crossed, descriptors, 0.1, 1.0)
    equal = torch.zeros(4, 1)  # identical descriptors: every other sample is an equal positive
    logits = aligned @ aligned.t() / 0.1
    logits.fill_diagonal_(-float("inf"))
    log_probs = logits.log_softmax(dim=1)
    expected = -(log_probs.masked_fill(torch.eye(4, dtype=torch.bool), 0).sum(dim=1) / 3).mean()
    assert torch.allclose(y_aware_infonce(aligned, equal, 0.1, 1.0), expected)


def test_the_written_out_forward_agrees_with_timms_forward_features():
    """The forward that edits patch tokens (timm's private ``_pos_embed``, hence the pinned timm) gives timm's own
    ``forward_features`` when nothing is masked, and RoPE positions follow the kept patches: keeping all,
    shuffled, gives the full forward shuffled."""
    torch.manual_seed(0)
    model = build_vit(encoder_config("vit-tiny16-dinov3"), 64).eval()
    images = torch.randn(2, 3, 64, 64)
    order = torch.stack([torch.randperm(16), torch.randperm(16)])
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    with torch.no_grad():
        tokens = model.forward_features(images)
        cls, patches = encode_tokens(model, images)
        unmasked_cls, unmasked = encode_tokens(model, images, torch.randn(96), masks)
        kept_cls, kept = encode_tokens(model, images, keep=order)
        masks[:, 1, 2] = True
        masked = encode_tokens(model, images, torch.randn(96), masks)[1]
    assert torch.equal(cls, tokens[:, 0]) and torch.equal(patches, tokens[:, model.num_prefix_tokens :])
    assert torch.allclose(unmasked, patches, atol=1e-5) and torch.allclose(unmasked_cls, cls, atol=1e-5)
    assert torch.allclose(kept, patches.gather(1, order[..., None].expand(-1, -1, 96)), atol=1e-5)
    assert torch.allclose(kept_cls, cls, atol=1e-5)
    assert not torch.allclose(masked[:, 6], patches[:, 6], atol=1e-3)  # row 1, column 2: the mask token's patch


def test_mae_patches_and_spectrum():
    images = torch.randn(3, 64, 64)
    assert torch.equal(unpatchify(patchify(images, 16), (4, 4)), images)
    assert patchify(images, 16)[0, 1].tolist() == images[0, :16, 16:32].reshape(-1).tolist()
    assert spectral_distance(images, images) == 0 and spectral_distance(images, images * 2) > 0


def test_jepa_blocks_context_excludes_targets():
    config = JEPAConfig()
    context, targets = jepa_blocks(8, (14, 14), config, torch.Generator().manual_seed(0))
    assert targets.shape[:2] == (4, 8) and context.shape[0] == 8
    for sample in range(8):
        assert not set(context[sample].tolist()) & set(targets[:, sample].flatten().tolist())
        assert len(set(context[sample].tolist())) == context.shape[1]
    area = targets.shape[2] / 196
    assert 0.1 <= area <= 0.25
    again = jepa_blocks(8, (14, 14), config, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], context) and torch.equal(again[1], targets)


def test_collapse_verdict_names_the_kind():
    healthy = {"teacher_entropy": 5.40, "teacher_batch_entropy": 5.45, "embedding_std": 0.05}
    assert collapse_verdict(healthy, 96, prototypes=256) == ""
    uniform = {"teacher_entropy": 5.5450, "teacher_batch_entropy": 5.5451, "embedding_std": 0.05}
    assert "uniform collapse" in collapse_verdict(uniform, 96, prototypes=256)
    one_prototype = {"teacher_entropy": 0.001, "teacher_batch_entropy": 0.0015, "embedding_std": 0.05}
    assert "one-prototype collapse" in collapse_verdict(one_prototype, 96, prototypes=256)
    assert "nearly identical" in collapse_verdict({"embedding_std": 1e-4}, 96)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (["encoder.x=1"], "'encoder' is a setting, not a section"),
        (["data.x=1"], "field 'data' must be text, not an object"),
        (["mask_ratio=[0.1, 0.2]"], r"unknown setting mask_ratio \(it moved to dino.mask_ratio\)"),
        (["anatcl.descriptors=[]"], "anatcl.descriptors is empty"),
        (["epochs=two"], "field 'epochs' must be a whole number, not 'two'"),
    ],
)
def test_bad_settings_are_one_line_errors(settings, message):
    with pytest.raises(BrainDINOError, match=message):
        load_config("tiny-cpu", {}, settings)


def test_wrong_encoder_family_and_too_small_jepa_grid_are_clear_errors(tmp_path, index64):
    with pytest.raises(BrainDINOError, match="needs a DINOv3-family encoder"):
        _trainer(index64, tmp_path / "a", "encoder=vit-s14-dinov2", "objective=moco", "steps_per_epoch=1")
    with pytest.raises(BrainDINOError, match="patch grid leaves fewer than 4 context patches"):
        jepa_blocks(4, (2, 2), JEPAConfig(), torch.Generator().manual_seed(0))


def test_changed_manifest_labels_make_a_new_index_not_a_stale_one(tmp_path, cohort):
    manifest = tmp_path / "manifest.csv"
    lines = (cohort / "manifest.csv").read_text().splitlines(keepends=True)
    manifest.write_text(lines[0] + lines[1].replace("phantom-0000/", f"{cohort}/phantom-0000/"))
    out = tmp_path / "idx"
    build_index([manifest], out, PreprocessSpec(image_size=64))
    ages = [v.labels["age"] for v in SliceDataset(out).volumes]
    assert len(set(ages)) == 1 and ages[0] > 0
    manifest.write_text(manifest.read_text().replace(f",{ages[0]:g},", ",99,"))
    with pytest.raises(BrainDINOError, match="other volumes, labels or settings"):
        build_index([manifest], out, PreprocessSpec(image_size=64))


def test_a_fresh_run_replaces_the_log_of_a_run_that_never_checkpointed(tmp_path, index64):
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.csv").write_text("step,loss\n1,5.0\n2,4.0\n")
    rows = _trainer(index64, run, "objective=mae", "steps_per_epoch=2", "batch_size=4").fit()
    assert (
        len(rows) == 2 and (run / "log.csv").read_text().count("\n") == 3 and "pixel" in (run / "log.csv").read_text()
    )
