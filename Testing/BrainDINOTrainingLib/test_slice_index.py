"""Slice index: reproducible, resumable, filtered; SliceDataset feeds a timm ViT under DistributedSampler."""

from __future__ import annotations

import filecmp
import shutil

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from BrainDINOLib.encoder import BrainEncoder, encoder_config
from BrainDINOLib.errors import BrainDINOError
from BrainDINOLib.preprocess import PreprocessSpec
from BrainDINOTrainingLib.cli import main
from BrainDINOTrainingLib.slice_index import SliceDataset, build_index

SPEC = PreprocessSpec(image_size=64)


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory, cohort):
    """Four subjects of the shared cohort (16 volumes), as a manifest."""
    folder = tmp_path_factory.mktemp("small")
    lines = (cohort / "manifest.csv").read_text().splitlines()
    (folder / "manifest.csv").write_text("\n".join(lines[:5]) + "\n")
    for subject in ("phantom-0000", "phantom-0001", "phantom-0002", "phantom-0003"):
        shutil.copytree(cohort / subject, folder / subject)
    return folder


@pytest.fixture(scope="module")
def index(tmp_path_factory, small_cohort):
    out = tmp_path_factory.mktemp("index") / "idx"
    args = ["index", str(small_cohort), "-o", str(out), "--image-size", "64", "--workers", "2"]
    assert main(args) == 0
    return out


def _same_tree(a, b):
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for name in files:
        assert filecmp.cmp(a / name, b / name, shallow=False), name


def test_built_twice_is_identical(tmp_path, small_cohort, index):
    info = build_index([small_cohort], tmp_path / "again", SPEC, workers=1)
    assert info["volumes"] == 16 and info["slices_kept"] > 0
    _same_tree(index, tmp_path / "again")


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, small_cohort, index):
    partial = build_index([small_cohort], tmp_path / "resumed", SPEC, stop_after=5)
    assert partial == {"complete": False, "volumes_done": 5, "volumes": 16}
    assert not (tmp_path / "resumed" / "index.json").exists()
    build_index([small_cohort], tmp_path / "resumed", SPEC, workers=2)
    _same_tree(index, tmp_path / "resumed")
    with pytest.raises(BrainDINOError, match="other volumes, labels or settings"):
        build_index([small_cohort], tmp_path / "resumed", PreprocessSpec(image_size=96))


def test_filters_drop_empty_slices_and_keep_brain_slices(tmp_path, small_cohort, index):
    records = np.load(index / "slices.npy")
    assert not records["kept"][records["foreground"] == 0].any()
    assert records["kept"][records["foreground"] >= 0.05].all()
    filtered = build_index(
        [small_cohort], tmp_path / "filtered", PreprocessSpec(image_size=64, min_entropy=2.0, position_range=(0.2, 0.8))
    )
    kept = np.load(tmp_path / "filtered" / "slices.npy")
    kept = kept[kept["kept"]]
    assert 0 < len(kept) < records["kept"].sum()
    assert kept["entropy"].min() >= 2.0 and kept["position"].min() >= 0.2 and kept["position"].max() <= 0.8
    assert filtered["filters"] == {"min_entropy": 2.0, "position_range": [0.2, 0.8], "min_foreground_fraction": 0.01}


def test_unreadable_volume_is_skipped_and_listed(tmp_path, small_cohort):
    folder = tmp_path / "scans"
    folder.mkdir()
    shutil.copy(small_cohort / "phantom-0000" / "phantom-0000_t1.nii.gz", folder / "good.nii.gz")
    (folder / "broken.nii.gz").write_bytes(b"\x1f\x8b not gzip")
    info = build_index([folder], tmp_path / "idx", SPEC)
    assert info["volumes"] == 2 and info["volumes_skipped"] == 1 and info["slices_kept"] > 0


def test_slice_dataset_feeds_a_vit_under_distributed_sampler(index):
    dataset = SliceDataset(index, max_open_shards=2)
    assert len(dataset) == np.load(index / "slices.npy")["kept"].sum()
    sampler = DistributedSampler(dataset, num_replicas=2, rank=0, shuffle=True, seed=0)
    loader = DataLoader(dataset, batch_size=16, sampler=sampler, num_workers=2)
    torch.manual_seed(0)
    encoder = BrainEncoder(encoder_config("vit-tiny16-dinov3"), img_size=64).eval()
    seen = 0
    with torch.no_grad():
        for batch in loader:
            assert batch.shape[1:] == (3, 64, 64) and batch.dtype == torch.float32
            output = encoder(batch)
            assert output.cls.shape == (len(batch), 96) and torch.isfinite(output.cls).all()
            seen += len(batch)
    assert seen == len(sampler) == -(-len(dataset) // 2)
    for i in range(0, len(dataset), 7):  # random access across volumes keeps at most 2 maps open
        dataset[i]
    assert len(dataset._open) <= 2
