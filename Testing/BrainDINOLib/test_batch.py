"""Many scans in one command: a folder of mixed formats with broken files, manifests, reruns that skip what is
done, and DICOM SEG output read back as a DICOM reader does."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from BrainDINOLib.batch import find_scans
from BrainDINOLib.cli import main
from BrainDINOLib.errors import BrainDINOError
from BrainDINOLib.infer import InferenceOptions, run_inference
from BrainDINOLib.sample_data import demo_phantom
from BrainDINOLib.segments import SEGMENT_TERMINOLOGY
from BrainDINOLib.volume import dicom_series_files, load_volume
from testdata import save, write_dicom_series


def _summary(out) -> list[dict]:
    with open(out / "summary.csv", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    """The held-out phantom as NIfTI (T1), NRRD (T2) and a DICOM series (FLAIR, in a subfolder), a file that is not
    NIfTI though named so, a folder whose only DICOM file is unreadable, and a text file."""
    scans, _ = demo_phantom()
    folder = tmp_path_factory.mktemp("cohort") / "scans"
    folder.mkdir()
    shutil.copy(scans["t1"], folder / "phantom_t1.nii.gz")
    sitk.WriteImage(sitk.ReadImage(str(scans["t2"])), str(folder / "phantom_t2.nrrd"))
    write_dicom_series(nib.load(scans["flair"]), folder / "dicom" / "flair_series")
    (folder / "broken.nii.gz").write_bytes(b"a file named like NIfTI that is not one")
    (folder / "bad").mkdir()
    (folder / "bad" / "IM0001.dcm").write_bytes(b"\0" * 200)
    (folder / "notes.txt").write_text("not a scan")
    return folder


def test_a_folder_of_mixed_formats_with_broken_files(mixed_folder, tmp_path, capsys):
    """Good scans are processed, broken ones named on stderr and in the summary, exit code 1; the same command
    again skips the finished scans and leaves their files untouched."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "BrainDINOLib", "infer", str(mixed_folder), "-o", str(out), "-q"]
    first = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert first.returncode == 1, first.stderr
    failures = [line for line in first.stderr.splitlines() if line.startswith("braindino:")]
    assert len(failures) == 2 and "broken: failed:" in failures[0] and "bad: failed:" in failures[1]
    assert "broken.nii.gz" in failures[0] and "IM0001.dcm: not a readable DICOM file" in failures[1]
    rows = {row["scan"]: row for row in _summary(out)}
    assert {name: row["status"] for name, row in rows.items()} == {
        "broken": "failed", "bad": "failed", "phantom_t1": "ok", "phantom_t2": "ok", "dicom_flair_series": "ok",
    }  # fmt: skip
    assert rows["broken"]["error"].startswith(f"{mixed_folder / 'broken.nii.gz'}: cannot read the image header")
    for name, source in (("phantom_t1", "phantom_t1.nii.gz"), ("phantom_t2", "phantom_t2.nrrd")):
        row = rows[name]
        assert row["outputs"] == name and row["out_of_distribution"] == "False" and float(row["seconds"]) > 0
        volume = load_volume(mixed_folder / source)
        attention = nib.load(out / name / f"{name}_attention.nii.gz")
        np.testing.assert_allclose(attention.affine, volume.source_affine, atol=1e-4)
        assert attention.shape == volume.source_shape
    assert float(rows["phantom_t1"]["age [years]"]) > 0 and rows["phantom_t1"]["diagnosis"] in ("AD", "CN", "MCI")
    assert 0 < float(rows["phantom_t1"]["diagnosis [probability]"]) <= 1
    assert rows["phantom_t1"]["sequence"] == "t1" and rows["phantom_t1"]["tumor_t1 [mL]"] != ""  # its own head
    assert rows["phantom_t1"]["tumor [mL]"] == "" and rows["dicom_flair_series"]["tumor [mL]"] != ""
    assert rows["dicom_flair_series"]["sequence"] in ("t1", "t1ce", "t2", "flair")
    document = json.loads((out / "summary.json").read_text())
    assert [row["scan"] for row in document["scans"]] == list(rows)
    t1 = next(row for row in document["scans"] if row["scan"] == "phantom_t1")
    assert t1["predictions"]["age"]["units"] == "years"

    stamps = {p: p.stat().st_mtime_ns for p in (out / "phantom_t1").iterdir()}
    assert main(["infer", str(mixed_folder), "-o", str(out), "-q"]) == 1  # the same command, in this process
    assert "broken: failed:" in capsys.readouterr().err
    statuses = {row["scan"]: row["status"] for row in _summary(out)}
    assert [statuses[n] for n in ("phantom_t1", "phantom_t2", "dicom_flair_series")] == ["skipped"] * 3
    assert statuses["broken"] == "failed" and {p: p.stat().st_mtime_ns for p in stamps} == stamps
    again_t1 = next(r for r in json.loads((out / "summary.json").read_text())["scans"] if r["scan"] == "phantom_t1")
    assert again_t1["predictions"] == t1["predictions"]  # a skipped scan's row keeps its predictions


def test_reruns_redo_what_changed(tmp_path, mni_2mm):
    """``--force`` redoes every scan, other options redo it without leaving the old run's files, a changed input
    is read again."""
    scans = tmp_path / "scans"
    for sub in ("a", "b"):
        (scans / sub).mkdir(parents=True)
        save(nib.Nifti1Image(np.asarray(mni_2mm.dataobj)[:, :, 20:60], mni_2mm.affine), scans / sub / "scan.nii.gz")
    out = tmp_path / "out"

    def run(*extra) -> dict:
        assert main(["infer", str(scans), "-o", str(out), "-q", "--bundle", "braindino-tiny-random", *extra]) == 0
        return {row["scan"]: row["status"] for row in _summary(out)}

    assert run() == {"a_scan": "ok", "b_scan": "ok"}
    assert (out / "b_scan" / "report.png").is_file()
    assert run() == {"a_scan": "skipped", "b_scan": "skipped"}
    assert run("--force") == {"a_scan": "ok", "b_scan": "ok"}
    assert run("--no-report") == {"a_scan": "ok", "b_scan": "ok"}
    assert not (out / "a_scan" / "report.png").exists()  # the earlier run's report went with it
    later = (scans / "b" / "scan.nii.gz").stat().st_mtime_ns + 10**9
    os.utime(scans / "b" / "scan.nii.gz", ns=(later, later))
    assert run("--no-report") == {"a_scan": "skipped", "b_scan": "ok"}


def test_manifests_give_the_scan_and_its_other_sequences(tmp_path):
    """A BraTS folder and a CSV table: the FLAIR is analysed, the other sequences feed the heads that read them."""
    scans, _ = demo_phantom()
    case = tmp_path / "brats" / "BraTS-00001"
    case.mkdir(parents=True)
    for sequence in ("t1", "t1ce", "t2", "flair", "seg"):
        shutil.copy(scans[sequence], case / f"BraTS-00001_{sequence}.nii.gz")
    (job,) = find_scans([tmp_path / "brats"])
    assert (job.name, job.sequence, job.path.name) == ("BraTS-00001", "flair", "BraTS-00001_flair.nii.gz")
    assert sorted(job.others) == ["t1", "t1ce", "t2"]
    table = tmp_path / "cohort.csv"
    table.write_text(f"subject_id,t1,t2\ns1,{scans['t1']},{scans['t2']}\n")
    (job,) = find_scans([table], sequence="t1")
    assert (job.name, job.sequence, list(job.others)) == ("s1", "t1", ["t2"])
    with pytest.raises(BrainDINOError, match="s1 has no flair scan"):
        find_scans([table], sequence="flair")

    out = tmp_path / "out"
    assert main(["infer", str(tmp_path / "brats"), "-o", str(out), "-q", "--no-report"]) == 0
    result = json.loads((out / "BraTS-00001" / "result.json").read_text())
    assert result["sequence"] == "flair"
    assert result["predictions"]["age"]["reads"] == {"t1": str(case / "BraTS-00001_t1.nii.gz")}
    assert result["predictions"]["marker"]["reads"] == {"t1ce": str(case / "BraTS-00001_t1ce.nii.gz")}


def _oblique(image: nib.Nifti1Image, degrees: float = 20.0) -> nib.Nifti1Image:
    angle = np.deg2rad(degrees)
    rotation = np.eye(4)
    rotation[:3, :3] = [[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]]
    return nib.Nifti1Image(np.asarray(image.dataobj), rotation @ image.affine)


def test_dicom_seg_references_the_series_and_matches_the_label_volumes(tmp_path):
    """An oblique DICOM series in, a SEG out that a DICOM reader accepts: SOP class, referenced series and
    instances, segment terminology, every frame on a source frame, pixels equal to the NIfTI label volumes."""
    import highdicom as hd

    scans, _ = demo_phantom()
    write_dicom_series(_oblique(nib.load(scans["flair"])), tmp_path / "series")
    out = tmp_path / "out"
    result = run_inference(tmp_path / "series", out, InferenceOptions(sequence="flair", dicom_seg=True, report=False))
    assert result["outputs"]["dicom_seg"] == "series_seg.dcm"

    _, files = dicom_series_files(tmp_path / "series")
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    seg = hd.seg.segread(out / "series_seg.dcm")
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and seg.Modality == "SEG"
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    (referenced,) = seg.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in referenced.ReferencedInstanceSequence} == {
        s.SOPInstanceUID for s in sources
    }
    names = [*(c for c in ("necrotic / non-enhancing tumour core", "peritumoral oedema", "enhancing tumour")), "Brain"]
    for number, name in enumerate(names, start=1):
        description = seg.get_segment_description(number)
        category, kind, _ = SEGMENT_TERMINOLOGY[name]
        assert description.segment_label == name
        assert (description.segmented_property_category.value, description.segmented_property_type.value) == (
            category[0], kind[0],
        )  # fmt: skip
    positions = {tuple(np.round(np.asarray(s.ImagePositionPatient, float), 3)) for s in sources}
    shared = seg.SharedFunctionalGroupsSequence[0]
    np.testing.assert_allclose(
        shared.PlaneOrientationSequence[0].ImageOrientationPatient, sources[0].ImageOrientationPatient, atol=1e-6
    )
    assert list(shared.PixelMeasuresSequence[0].PixelSpacing) == list(sources[0].PixelSpacing)
    for frame in seg.PerFrameFunctionalGroupsSequence:
        position = frame.PlanePositionSequence[0].ImagePositionPatient
        assert tuple(np.round(np.asarray(position, float), 3)) in positions

    # (frames = K, rows = J, columns = I, segments) -> (I, J, K) label volumes as the NIfTI outputs hold them
    pixels = seg.get_pixels_by_source_instance([s.SOPInstanceUID for s in sources]).transpose(2, 1, 0, 3) > 0
    labels = np.asarray(nib.load(out / result["outputs"]["segmentation:tumor"]).dataobj)
    brain = np.asarray(nib.load(out / result["outputs"]["brain_mask"]).dataobj) > 0
    assert brain.sum() > 50_000 and labels.any()
    for value in (1, 2, 3):
        np.testing.assert_array_equal(pixels[..., value - 1], labels == value)
    np.testing.assert_array_equal(pixels[..., 3], brain)

    again = run_inference(tmp_path / "series", tmp_path / "again", InferenceOptions(sequence="flair", dicom_seg=True,
                                                                                    report=False))  # fmt: skip
    assert again["outputs"]["dicom_seg"] == "series_seg.dcm"
    assert pydicom.dcmread(tmp_path / "again" / "series_seg.dcm").SOPInstanceUID == seg.SOPInstanceUID  # same run


def test_scan_names_are_stable_unique_folder_names_inside_the_output(tmp_path, mni_2mm, monkeypatch):
    """Names follow each scan's place under its input (adding a scan renames no other), stay unique whatever the
    files are called, never leave the output folder; an output folder that holds the scans is refused."""
    scans = tmp_path / "scans"
    image = nib.Nifti1Image(np.asarray(mni_2mm.dataobj)[:, :, 20:40], mni_2mm.affine)
    for relative in ("a.nii.gz", "a-2.nii.gz", "sub/a.nii.gz", "p1/T1.nii.gz", "p2/T1.nii.gz", "odd name!.nii.gz"):
        (scans / relative).parent.mkdir(parents=True, exist_ok=True)
        save(image, scans / relative)
    for mask in ("a_seg.nii.gz", "p1/T1_brainmask.nii.gz"):  # masks beside their scans are not scans
        save(image, scans / mask)
    names = {job.path.relative_to(scans).as_posix(): job.name for job in find_scans([scans])}
    assert names == {"a.nii.gz": "a", "a-2.nii.gz": "a-2", "odd name!.nii.gz": "odd_name", "p1/T1.nii.gz": "p1_T1",
                     "p2/T1.nii.gz": "p2_T1", "sub/a.nii.gz": "sub_a"}  # fmt: skip
    twice = [job.name for job in find_scans([scans / "a.nii.gz", scans / "sub" / "a.nii.gz", scans / "a-2.nii.gz"])]
    assert twice == ["a", "a-2", "a-2-2"]
    table = tmp_path / "rows.csv"
    table.write_text(f"subject_id,image\n../outside,{scans / 'a.nii.gz'}\n/abs,{scans / 'a.nii.gz'}\n")
    rows = find_scans([table])
    assert [job.name for job in rows] == ["outside", "abs"] and all(job.sequence is None for job in rows)
    monkeypatch.chdir(tmp_path)  # relative and absolute inputs are the same scans
    assert [job.path for job in find_scans([Path(os.path.relpath(scans))])] == [job.path for job in find_scans([scans])]
    for out in (scans, tmp_path):
        with pytest.raises(BrainDINOError, match="holds these scans; choose one outside it"):
            find_scans([scans / "p1"], exclude=out)
