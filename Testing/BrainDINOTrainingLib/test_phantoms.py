"""Phantom cohort: whole heads, realistic and randomised contrasts, acquisition, consistent labels, determinism."""

from __future__ import annotations

import csv
import shutil

import nibabel as nib
import numpy as np
import pytest

from BrainDINOLib.errors import BrainDINOError
from BrainDINOTrainingLib import head_model
from BrainDINOTrainingLib.acquisition import Acquisition, acquire
from BrainDINOTrainingLib.cli import main
from BrainDINOTrainingLib.phantoms import (
    CohortOptions,
    SubjectPlan,
    Template,
    make_cohort,
    make_subject,
    subject_rng,
    write_subject,
)

WHOLE_FOV = ((-200.0, 200.0),) * 3


@pytest.fixture(scope="module")
def template():
    return Template.load(2)


@pytest.fixture(scope="module")
def rows(cohort):
    with open(cohort / "manifest.csv") as handle:
        return list(csv.DictReader(handle))


def _plan(lesion: str = "", marker: int = 0, age: float = 60, enhancing: bool = True) -> SubjectPlan:
    acquisition = Acquisition("axial", "RAS", 2.0, 2.0, WHOLE_FOV)
    return SubjectPlan("x", age, "F", "CN", 1.0, lesion, marker, enhancing, (0.0, 0.0, 0.0), acquisition)


def _means(image: np.ndarray, regions: dict[str, np.ndarray]) -> dict[str, float]:
    return {name: float(image[region].mean()) for name, region in regions.items()}


def test_tissue_contrast_order_per_sequence(template):
    subject = make_subject(template, _plan(), subject_rng(0, 0))
    regions = {name: p > 0.8 for name, p in subject.tissue.items()}
    means = {seq: _means(image, regions) for seq, image in subject.images.items()}
    for seq in ("t1", "t1ce"):
        assert means[seq]["wm"] > means[seq]["gm"] > means[seq]["csf"]
    assert means["t2"]["csf"] > means["t2"]["gm"] > means["t2"]["wm"]
    assert means["flair"]["gm"] > means["flair"]["wm"] > means["flair"]["csf"]  # CSF suppressed


def test_head_tissues_lie_outside_the_brain_and_look_like_a_head(template):
    subject = make_subject(template, _plan(), subject_rng(0, 0))
    head, brain = subject.head, subject.brain > 0.5
    for tissue in (head_model.CSF, head_model.BONE, head_model.MARROW, head_model.FAT, head_model.SKIN):
        voxels = head == tissue
        assert voxels.sum() * template.voxel_ml > 5, head_model.TISSUES[tissue]
        overlap = 0.05 if tissue == head_model.CSF else 0.01  # the CSF rim touches the brain's soft edge
        assert (voxels & brain).sum() < overlap * voxels.sum(), head_model.TISSUES[tissue]
    assert (head == head_model.VITREOUS).sum() * template.voxel_ml > 8  # two eyes of ~7 mL
    # The skull encloses the brain: every brain voxel's column has bone above it.
    columns = brain.any(axis=2)
    assert (head == head_model.BONE).any(axis=2)[columns].all()
    t1 = subject.images["t1"]
    assert t1[head == head_model.FAT].mean() > 1.1 * t1[subject.tissue["wm"] > 0.8].mean()  # fat bright on T1
    assert t1[head == head_model.BONE].mean() < 0.3 * t1[subject.tissue["wm"] > 0.8].mean()  # cortical bone dark
    t1ce, t2 = subject.images["t1ce"], subject.images["t2"]
    vessels = head == head_model.VESSEL
    assert vessels.any() and t1ce[vessels].mean() > 1.5 * t1[vessels].mean()  # vessels enhance
    assert t2[head == head_model.VITREOUS].mean() > 1.5 * t2[subject.tissue["wm"] > 0.8].mean()  # eyes bright on T2


def test_randomised_contrasts_change_tissue_order_between_subjects(template):
    orders = set()
    for index in range(5):
        subject = make_subject(template, _plan(), subject_rng(3, index), CohortOptions(random_contrasts=1))
        regions = {name: p > 0.8 for name, p in subject.tissue.items()}
        regions.update(fat=subject.head == head_model.FAT, bone=subject.head == head_model.BONE)
        means = _means(subject.images["random1"], regions)
        orders.add(tuple(sorted(means, key=means.get)))
        realistic = _means(subject.images["t1"], regions)
        assert sorted(realistic, key=realistic.get) == ["bone", "csf", "gm", "wm", "fat"]
    assert len(orders) >= 4


def test_glioma_compartments(template):
    subject = make_subject(template, _plan("glioma", marker=0), subject_rng(0, 1))
    images, labels = subject.images, subject.labels
    white = subject.tissue["wm"] > 0.8
    assert {1, 2, 3} <= set(np.unique(labels)) and subject.lesion_count == 1
    assert images["t1ce"][labels == 3].mean() > 1.2 * images["t1ce"][white].mean()  # enhancing rim
    assert images["flair"][labels == 2].mean() > 1.5 * images["flair"][white].mean()  # oedema bright on FLAIR
    assert images["t1"][labels == 1].mean() < 0.6 * images["t1"][white].mean()  # necrosis dark on T1
    quiet = make_subject(template, _plan("glioma", marker=1, enhancing=False), subject_rng(0, 1))
    assert 3 not in np.unique(quiet.labels) and {1, 2} <= set(np.unique(quiet.labels))


def test_metastases_are_several_small_enhancing_lesions(template):
    from scipy import ndimage

    subject = make_subject(template, _plan("metastases"), subject_rng(1, 4))
    lesions = subject.labels > 0
    assert subject.lesion_count > 1
    components, found = ndimage.label(subject.labels == 3)
    sizes = np.bincount(components.ravel())[1:] * template.voxel_ml
    assert found >= 2 and sizes.max() < 20
    assert lesions.sum() * template.voxel_ml < 200 and (lesions & (subject.brain < 0.5)).sum() == 0
    white = subject.tissue["wm"] > 0.8
    assert subject.images["t1ce"][subject.labels == 3].mean() > 1.2 * subject.images["t1ce"][white].mean()


def test_thick_slices_blur_through_plane_only():
    """A one-voxel bright point acquired with 6 mm axial slices spreads over ~6 mm in z and ~1 voxel in-plane."""
    volume = np.zeros((41, 41, 61), np.float32)
    volume[20, 20, 30] = 1.0
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    fov = ((-0.5, 40.5), (-0.5, 40.5), (-0.5, 60.5))  # voxel centres on the base grid's
    data, out_affine = acquire(volume, affine, Acquisition("axial", "RAS", 1.0, 6.0, fov))
    assert np.allclose(np.diag(out_affine)[:3], [1, 1, 6])
    peak = np.unravel_index(np.argmax(data), data.shape)
    in_plane = data[:, peak[1], peak[2]]
    assert in_plane[peak[0] + 1] < 0.05 * in_plane[peak[0]]  # in-plane: still one voxel wide
    fine, _ = acquire(volume, affine, Acquisition("axial", "RAS", 1.0, 1.0, fov))
    assert data.max() < 0.3 * fine.max()  # the point's signal is averaged over the thick slice
    # ... which keeps its integral per mm (up to sampling a Gaussian profile of FWHM 6 mm every 6 mm)
    assert data.sum() == pytest.approx(fine.sum() / 6, rel=0.1)


def test_acquisition_keeps_geometry_and_labels_consistent():
    volume = np.zeros((40, 50, 60), np.float32)
    volume[10:20, 20:30, 30:40] = 1
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = (-20, -25, -30)
    acquisition = Acquisition("sagittal", "PIR", 0.8, 3.0, ((-15.0, 15.0), (-20.0, 20.0), (-25.0, 25.0)))
    labels, label_affine = acquire(volume.astype(np.uint8), affine, acquisition, labels=True)
    assert "".join(nib.aff2axcodes(label_affine)) == "PIR"
    world = nib.affines.apply_affine(label_affine, np.argwhere(labels == 1))
    assert world.min(0) == pytest.approx([-10.5, -5.4, 0.0], abs=1.6) and world.max(0) == pytest.approx(
        [-1.5, 4.6, 9.0], abs=1.6
    )
    assert np.allclose(sorted(np.linalg.norm(label_affine[:3, :3], axis=0)), [0.8, 0.8, 3.0])


def test_manifest_volumes_match_masks_and_rules(cohort, rows):
    assert len(rows) == 12 and any(r["tumor"] == "1" for r in rows) and any(r["tumor"] == "0" for r in rows)
    for row in rows:
        seg = nib.load(cohort / row["seg"])
        labels = np.asarray(seg.dataobj)
        voxel_ml = abs(np.linalg.det(seg.affine[:3, :3])) / 1000
        for label, column in ((1, "ncr_ml"), (2, "ed_ml"), (3, "et_ml")):
            assert float(row[column]) == pytest.approx((labels == label).sum() * voxel_ml, abs=1e-3)
        images = [nib.load(cohort / row[s]) for s in ("t1", "t1ce", "t2", "flair", "brain_mask")]
        assert all(i.shape == seg.shape and np.allclose(i.affine, seg.affine) for i in images)
        assert "".join(nib.aff2axcodes(seg.affine)) == row["orientation"]
        brain = np.asarray(images[-1].dataobj) > 0
        t1 = np.asarray(images[0].dataobj).astype(float)
        assert row["head"] == "whole" and (t1[~brain] > 0.3 * np.percentile(t1[brain], 50)).sum() > 0.2 * brain.sum()
        assert not (labels > 0)[~brain].any()  # lesions lie in the brain
        if row["tumor"] == "1":
            assert labels.any() and row["lesion"] in ("glioma", "metastases") and int(row["lesion_count"]) >= 1
        else:
            assert not labels.any() and row["lesion"] == "" and row["survival_days"] == row["marker"] == ""
        if row["lesion"] == "glioma":
            assert float(row["survival_days"]) > 0 and row["event"] in ("0", "1") and row["marker"] in ("0", "1")


def test_skull_stripped_option(tmp_path):
    folder = tmp_path / "stripped"
    args = ["cohort", "make", "2", str(folder), "--seed", "7", "--resolution", "2", "--workers", "1"]
    assert main([*args, "--skull-stripped", "--random-contrasts", "1"]) == 0
    with open(folder / "manifest.csv") as handle:
        row = next(csv.DictReader(handle))
    brain = np.asarray(nib.load(folder / row["brain_mask"]).dataobj) > 0
    for name in ("t1", "flair", "random1"):
        image = np.asarray(nib.load(folder / row[name]).dataobj)
        assert not image[~brain].any() and (image[brain] > 0).mean() > 0.95
    assert row["head"] == "skull-stripped"


def test_csf_grows_with_age(template):
    """Same anatomy draw, different ages: CSF volume increases monotonically (what makes brain age learnable)."""
    csf = [make_subject(template, _plan(age=age), subject_rng(5, 0)).volumes["csf_ml"] for age in (25, 50, 75)]
    assert csf[0] < csf[1] < csf[2] and csf[2] > 1.15 * csf[0]


def test_cohort_csf_fraction_correlates_with_age(rows):
    age = np.array([float(r["age"]) for r in rows])
    csf = np.array([float(r["csf_ml"]) / (float(r["gm_ml"]) + float(r["wm_ml"]) + float(r["csf_ml"])) for r in rows])
    assert np.corrcoef(age, csf)[0, 1] > 0.5


def test_deterministic_by_seed(tmp_path, template, cohort):
    again = write_subject(template, tmp_path, 7, 3)
    for column in ("t1", "flair", "seg", "brain_mask"):
        np.testing.assert_array_equal(
            np.asarray(nib.load(tmp_path / again[column]).dataobj),
            np.asarray(nib.load(cohort / again[column]).dataobj),
        )
    other = write_subject(template, tmp_path / "other", 8, 3)
    assert other["age"] != again["age"]


def test_an_interrupted_cohort_resumes_with_the_same_settings_only(tmp_path, cohort):
    folder = tmp_path / "cohort"  # the shared cohort's first three subjects and settings (seed 7, 2 mm, defaults)
    for subject in ("phantom-0000", "phantom-0001", "phantom-0002"):
        shutil.copytree(cohort / subject, folder / subject)
    shutil.copy(cohort / "cohort.json", folder / "cohort.json")
    first = "".join((cohort / "manifest.csv").read_text().splitlines(keepends=True)[:4])  # header and those three
    # as if stopped before the end (no manifest.csv), with subject 1 unfinished
    (folder / "phantom-0001" / "row.json").unlink()
    done = (folder / "phantom-0000" / "phantom-0000_t1.nii.gz").stat().st_mtime_ns
    make_cohort(3, folder, seed=7, resolution=2)
    assert (folder / "manifest.csv").read_text() == first
    assert (folder / "phantom-0000" / "phantom-0000_t1.nii.gz").stat().st_mtime_ns == done  # not made again
    (folder / "manifest.csv").unlink()
    with pytest.raises(BrainDINOError, match="other settings"):
        make_cohort(3, folder, seed=5, resolution=2)
