"""Brain-mask head and out-of-distribution check: fitted and calibrated on whole-head phantoms through the
command line, measured on held-out phantoms of several contrasts and slice thicknesses, the MNI template and
volumes that are not head MRI, and what ``infer`` does with them (mask file, maps, slices, flags)."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest

from BrainDINOLib.brain import BRAIN_TARGET, brain_head, largest_component
from BrainDINOLib.bundle import find_bundle, load_bundle
from BrainDINOLib.sample_data import mni_path
from BrainDINOLib.typicality import CHANNELS
from BrainDINOTrainingLib.cli import main
from BrainDINOTrainingLib.features import FeatureCache
from BrainDINOTrainingLib.phantoms import CohortOptions, make_cohort
from testdata import non_head_volumes, reorient


@pytest.fixture(scope="module")
def brain_bundle(tmp_path_factory):
    """The shipped encoder with a brain-mask head fitted on 8 phantoms (2 mm; four sequences and a randomised
    contrast each, various planes and slice thicknesses; whole heads and about a quarter skull-stripped)."""
    work = tmp_path_factory.mktemp("brain")
    options = CohortOptions(random_contrasts=1, skull_stripped=0.25)
    make_cohort(8, work / "cohort", seed=11, resolution=2, workers=2, options=options)
    command = ["fit-head", "--task", "brain", "--manifest", str(work / "cohort"), "--bundle", str(find_bundle(None))]
    command += ["-o", str(work / "bundle"), "--steps", "300", "--cache", str(work / "cache")]
    assert main([*command, "--report", str(work / "report"), "--device", "cpu"]) == 0
    return work / "bundle"


@pytest.fixture(scope="module")
def calibrated(brain_bundle):
    """The brain bundle with an out-of-distribution reference from the same 8 phantoms."""
    work = brain_bundle.parent
    command = ["calibrate", "--manifest", str(work / "cohort"), "--bundle", str(brain_bundle)]
    assert main([*command, "-o", str(work / "calibrated"), "--cache", str(work / "cache"), "--device", "cpu"]) == 0
    return work / "calibrated"


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """Two phantoms no head saw (another seed), whole heads with their true brain masks."""
    folder = tmp_path_factory.mktemp("held-out") / "cohort"
    make_cohort(2, folder, seed=12, resolution=2, workers=1, options=CohortOptions(random_contrasts=1))
    with open(folder / "manifest.csv") as handle:
        return folder, list(csv.DictReader(handle))


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1)


def test_brain_head_is_stored_with_its_metrics(brain_bundle):
    bundle = load_bundle(brain_bundle)
    spec = brain_head(bundle.head_specs)
    assert spec.name == "brain" and spec.target == BRAIN_TARGET and spec.modalities == () and spec.classes == ("brain",)
    assert spec.metrics["dice_label_1"] > 0.75


def test_brain_masks_of_held_out_phantoms_in_several_contrasts(tmp_path, brain_bundle, held_out):
    """Whole-head phantoms of other seeds, planes and slice thicknesses, in realistic and randomised contrasts. The
    head was fitted on 8 phantoms with 300 steps on the shipped encoder, which was pretrained on skull-stripped
    phantoms only, so the bar is the machinery's, not a retrained bundle's."""
    folder, rows = held_out
    scores = []
    for row in rows:
        truth = np.asarray(nib.load(folder / row["brain_mask"]).dataobj) > 0
        for column in ("t1", "flair", "random1"):
            out = tmp_path / f"{row['subject_id']}-{column}"
            assert main(["infer", str(folder / row[column]), "-o", str(out), "--bundle", str(brain_bundle),
                         "--device", "cpu", "--no-report", "-q"]) == 0  # fmt: skip
            written = nib.load(next(out.glob("*_brainmask.nii.gz")))
            assert np.allclose(written.affine, nib.load(folder / row[column]).affine)
            scores.append(_dice(np.asarray(written.dataobj) > 0, truth))
    assert len({row["spacing_mm"] for row in rows}) > 1 and np.mean(scores) >= 0.75, scores


def test_infer_follows_the_brain_mask(tmp_path, brain_bundle, held_out):
    """Maps are zero outside the mask, slices follow its extent, and an oblique LPS copy of the scan gets the
    same mask in its own geometry."""
    folder, rows = held_out
    scan = folder / rows[0]["t1"]
    out = tmp_path / "plain"
    assert main(["infer", str(scan), "-o", str(out), "--bundle", str(brain_bundle), "--device", "cpu"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["brain_mask"]["head"] == "brain" and result["brain_mask"]["volume_ml"] > 800
    brain = np.asarray(nib.load(out / result["outputs"]["brain_mask"]).dataobj) > 0
    canonical = nib.as_closest_canonical(nib.load(out / result["outputs"]["brain_mask"]))
    extent = np.flatnonzero(np.asarray(canonical.dataobj).any(axis=(0, 1)))
    assert result["slices"]["first"] >= extent[0] and result["slices"]["last"] <= extent[-1]
    for name in ("attention", "pca"):
        data = np.asarray(nib.load(out / result["outputs"][name]).dataobj)
        if data.dtype.names:  # RGB24
            data = np.stack([data[channel] for channel in data.dtype.names], axis=-1)
        assert not data[~brain].any() and data.any(), name
    assert (
        "tumor" not in result["predictions"]
        or not np.asarray(nib.load(out / result["outputs"]["segmentation:tumor"]).dataobj)[~brain].any()
    )

    image = nib.load(scan)
    tilt = np.eye(4)
    tilt[1:3, 1:3] = [[np.cos(0.3), -np.sin(0.3)], [np.sin(0.3), np.cos(0.3)]]
    oblique = reorient(nib.Nifti1Image(np.asarray(image.dataobj), tilt @ image.affine), "LPS")
    nib.save(oblique, tmp_path / "oblique.nii.gz")
    again = tmp_path / "oblique"
    assert main(["infer", str(tmp_path / "oblique.nii.gz"), "-o", str(again), "--bundle", str(brain_bundle),
                       "--device", "cpu", "--no-report"]) == 0  # fmt: skip
    mask = nib.load(again / "oblique_brainmask.nii.gz")
    assert np.allclose(mask.affine, oblique.affine) and mask.shape == oblique.shape
    moved = nib.as_closest_canonical(mask)
    original = nib.as_closest_canonical(nib.load(out / result["outputs"]["brain_mask"]))
    assert _dice(np.asarray(moved.dataobj) > 0, np.asarray(original.dataobj) > 0) > 0.97


def test_largest_component_drops_islands_and_fills_holes():
    mask = np.zeros((20, 20, 20), bool)
    mask[2:12, 2:12, 2:12] = True
    mask[5:8, 5:8, 5:8] = False  # a hole
    mask[16:18, 16:18, 16:18] = True  # an island
    kept = largest_component(mask)
    assert kept[6, 6, 6] and not kept[17, 17, 17] and kept.sum() == 1000


def test_calibration_is_stored_and_describes_whole_scans_as_infer_reads_them(calibrated, held_out, tmp_path):
    """The reference and ``infer`` both describe the scan prepared whole (cut to a brain, anything looks like one),
    so the verdict ``infer`` writes is the reference's verdict on the whole scan's features."""
    bundle = load_bundle(calibrated)
    typicality, ood = bundle.load_typicality(), bundle.card.ood
    for channel in CHANNELS:
        threshold = typicality.thresholds[channel]
        assert threshold == pytest.approx(ood["thresholds"][channel])
        assert threshold > ood["held_out_scores"][channel]["max"]
        assert len(typicality.references[channel]) == ood["reference_slices"] and typicality.k == 10
    folder, rows = held_out
    scan = folder / rows[1]["flair"]
    assert main(["infer", str(scan), "-o", str(tmp_path), "--bundle", str(calibrated), "--no-report", "-q"]) == 0
    written = json.loads((tmp_path / "result.json").read_text())["ood_channels"]
    whole = FeatureCache(bundle, tmp_path / "cache", device="cpu", masked=False).get(scan)
    expected = typicality.verdict({"embedding": whole.embeddings, "thumbnail": whole.thumbnails})["ood_channels"]
    assert written == expected


def test_out_of_distribution_flags_noise_and_passes_held_out_phantoms(tmp_path, calibrated, held_out, capsys):
    """Held-out phantoms pass; a noise volume is flagged, with a warning on stderr and its predictions kept but
    marked unreliable; every scan gets a score per channel. The MNI template, photographs and a terrain map are
    scored too but not asserted: the shipped tiny encoder (pretrained on skull-stripped phantoms) with a reference
    from 8 phantoms does not separate them reliably (the README gives what a retrained candidate scores); the
    retrained default bundle is to be held to all three."""
    folder, rows = held_out
    scans = {f"{r['subject_id']}-t2": folder / r["t2"] for r in rows}
    others = {"mni": mni_path("t1"), **non_head_volumes(tmp_path)}
    flags, scores = {}, {}
    for name, path in {**scans, **others}.items():
        capsys.readouterr()
        out = tmp_path / name
        assert main(["infer", str(path), "-o", str(out), "--bundle", str(calibrated), "--device", "cpu", "-q"]) == 0
        result = json.loads((out / "result.json").read_text())
        flags[name], scores[name] = result["out_of_distribution"], result["ood_score"]
        assert result["ood_threshold"] == 1.0 and set(result["ood_channels"]) == set(CHANNELS)
        assert ("OUT OF DISTRIBUTION" in capsys.readouterr().err) == flags[name]
        if flags[name]:
            assert all(p.get("unreliable") for p in result["predictions"].values())
    assert not any(flags[name] for name in scans), scores
    assert flags["noise"] and scores["noise"] > 2, scores
