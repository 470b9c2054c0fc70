"""Phantom cohort: realistic contrasts, consistent labels, learnable age, determinism."""

from __future__ import annotations

import csv

import nibabel as nib
import numpy as np
import pytest

from BrainDINOTrainingLib.phantoms import SubjectPlan, Template, make_subject, subject_rng, write_subject


@pytest.fixture(scope="module")
def template():
    return Template.load(2)


@pytest.fixture(scope="module")
def rows(cohort):
    with open(cohort / "manifest.csv") as handle:
        return list(csv.DictReader(handle))


def _plan(tumor: bool, marker: int = 0, age: float = 60) -> SubjectPlan:
    return SubjectPlan("x", age, "F", "CN", 1.0, tumor, marker, "axial", "RAS", 1.0, 1.0)


def test_tissue_contrast_order_per_sequence(template):
    subject = make_subject(template, _plan(tumor=False), subject_rng(0, 0))
    tissue = {name: p > 0.8 for name, p in subject["tissue"].items()}
    means = {
        seq: {name: float(image[m].mean()) for name, m in tissue.items()} for seq, image in subject["images"].items()
    }
    for seq in ("t1", "t1ce"):
        assert means[seq]["wm"] > means[seq]["gm"] > means[seq]["csf"]
    assert means["t2"]["csf"] > means["t2"]["gm"] > means["t2"]["wm"]
    assert means["flair"]["gm"] > means["flair"]["wm"] > means["flair"]["csf"]  # CSF suppressed


def test_tumor_compartments_look_like_glioma(template):
    subject = make_subject(template, _plan(tumor=True, marker=0), subject_rng(0, 1))
    images, labels = subject["images"], subject["labels"]
    white = subject["tissue"]["wm"] > 0.8
    assert {1, 2, 3} <= set(np.unique(labels))
    assert images["t1ce"][labels == 3].mean() > 1.2 * images["t1ce"][white].mean()  # enhancing rim
    assert images["flair"][labels == 2].mean() > 1.5 * images["flair"][white].mean()  # oedema bright on FLAIR
    assert images["t1"][labels == 1].mean() < 0.6 * images["t1"][white].mean()  # necrosis dark on T1


def test_manifest_volumes_match_masks_and_rules(cohort, rows):
    assert len(rows) == 12 and any(r["tumor"] == "1" for r in rows) and any(r["tumor"] == "0" for r in rows)
    for row in rows:
        seg = nib.load(cohort / row["seg"])
        labels = np.asarray(seg.dataobj)
        voxel_ml = abs(np.linalg.det(seg.affine[:3, :3])) / 1000
        for label, column in ((1, "ncr_ml"), (2, "ed_ml"), (3, "et_ml")):
            assert float(row[column]) == pytest.approx((labels == label).sum() * voxel_ml, abs=1e-3)
        images = [nib.load(cohort / row[s]) for s in ("t1", "t1ce", "t2", "flair")]
        assert all(i.shape == seg.shape and np.allclose(i.affine, seg.affine) for i in images)
        assert "".join(nib.aff2axcodes(seg.affine)) == row["orientation"]
        if row["tumor"] == "1":
            assert labels.any() and float(row["survival_days"]) > 0 and row["event"] in ("0", "1")
            assert row["marker"] in ("0", "1")
        else:
            assert not labels.any() and row["survival_days"] == row["marker"] == ""


def test_csf_grows_with_age(template):
    """Same anatomy draw, different ages: CSF volume increases monotonically (what makes brain age learnable)."""
    csf = [make_subject(template, _plan(tumor=False, age=age), subject_rng(5, 0))["csf_ml"] for age in (25, 50, 75)]
    assert csf[0] < csf[1] < csf[2] and csf[2] > 1.15 * csf[0]


def test_cohort_csf_fraction_correlates_with_age(rows):
    age = np.array([float(r["age"]) for r in rows])
    csf = np.array([float(r["csf_ml"]) / (float(r["gm_ml"]) + float(r["wm_ml"]) + float(r["csf_ml"])) for r in rows])
    assert np.corrcoef(age, csf)[0, 1] > 0.5


def test_deterministic_by_seed(tmp_path, template, cohort):
    again = write_subject(template, tmp_path, 7, 3)
    for sequence in ("t1", "flair", "seg"):
        np.testing.assert_array_equal(
            np.asarray(nib.load(tmp_path / again[sequence]).dataobj),
            np.asarray(nib.load(cohort / again[sequence]).dataobj),
        )
    other = write_subject(template, tmp_path / "other", 8, 3)
    assert other["age"] != again["age"]
