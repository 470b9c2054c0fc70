"""Manifests of every kind on generated files; subject-level splits; clear errors."""

from __future__ import annotations

import shutil

import pytest

from BrainDINOLib.errors import BrainDINOError
from BrainDINOLib.manifest import load_manifest
from BrainDINOTrainingLib.slice_index import collect_volumes


def test_table_manifest_of_the_cohort(cohort):
    manifest = load_manifest(cohort)
    assert manifest.kind == "table" and len(manifest.entries) == 12
    entry = manifest.entries[0]
    assert set(entry.images) == {"t1", "t1ce", "t2", "flair", "seg", "brain_mask"}
    assert all(p.is_file() for p in entry.images.values()) and set(entry.scans) == {"t1", "t1ce", "t2", "flair"}
    assert isinstance(entry.labels["age"], float) and entry.labels["diagnosis"] in ("CN", "MCI", "AD")
    assert len(manifest.image_paths()) == 48 and len(manifest.image_paths(include_masks=True)) == 72


def test_folder_of_volumes_leaves_masks_out(tmp_path, cohort):
    for name in ("a", "b"):
        shutil.copy(cohort / "phantom-0000" / "phantom-0000_t1.nii.gz", tmp_path / f"{name}.nii.gz")
    for mask in ("seg", "brainmask"):
        shutil.copy(cohort / "phantom-0000" / f"phantom-0000_{mask}.nii.gz", tmp_path / f"a_{mask}.nii.gz")
    (tmp_path / "notes.txt").write_text("not an image")
    manifest = load_manifest(tmp_path)
    assert manifest.kind == "folder" and [e.subject_id for e in manifest.entries] == ["a", "b"]
    assert collect_volumes([tmp_path]) == {(tmp_path / f"{name}.nii.gz").resolve(): {} for name in ("a", "b")}


def test_brats_case_folders(tmp_path, cohort):
    for i, naming in ((0, "2021"), (1, "2023")):
        case = tmp_path / f"BraTS-{i:05d}"
        case.mkdir()
        names = (
            {"t1": "_t1", "t1ce": "_t1ce", "t2": "_t2", "flair": "_flair", "seg": "_seg"}
            if naming == "2021"
            else {"t1": "-t1n", "t1ce": "-t1c", "t2": "-t2w", "flair": "-t2f", "seg": "-seg"}
        )
        for modality, suffix in names.items():
            shutil.copy(
                cohort / f"phantom-000{i}" / f"phantom-000{i}_{modality}.nii.gz", case / f"{case.name}{suffix}.nii.gz"
            )
    manifest = load_manifest(tmp_path)
    assert manifest.kind == "brats" and len(manifest.entries) == 2
    assert all(set(e.images) == {"t1", "t1ce", "t2", "flair", "seg"} for e in manifest.entries)


def _bids(tmp_path, cohort, participants: str):
    layout = {"sub-01": ["anat"], "sub-02": ["ses-1/anat", "ses-2/anat"]}
    for subject, folders in layout.items():
        for folder in folders:
            anat = tmp_path / subject / folder
            anat.mkdir(parents=True)
            session = folder.split("/")[0] + "_" if folder.startswith("ses") else ""
            shutil.copy(cohort / "phantom-0000" / "phantom-0000_t1.nii.gz", anat / f"{subject}_{session}T1w.nii.gz")
            shutil.copy(
                cohort / "phantom-0000" / "phantom-0000_flair.nii.gz", anat / f"{subject}_{session}FLAIR.nii.gz"
            )
    (tmp_path / "participants.tsv").write_text(participants)
    return tmp_path


def test_bids_with_sessions_and_participants(tmp_path, cohort):
    folder = _bids(tmp_path, cohort, "participant_id\tage\tsex\tdiagnosis\nsub-01\t34y\tF\tCN\nsub-02\t61y\tM\tn/a\n")
    manifest = load_manifest(folder)
    assert manifest.kind == "bids" and [(e.subject_id, e.session) for e in manifest.entries] == [
        ("sub-01", ""),
        ("sub-02", "ses-1"),
        ("sub-02", "ses-2"),
    ]
    assert manifest.entries[0].labels == {"age": 34.0, "sex": "F", "diagnosis": "CN"}
    assert "diagnosis" not in manifest.entries[1].labels and manifest.units == {"age": "years"}
    assert set(manifest.entries[1].images) == {"t1", "flair"}
    split = manifest.split({"train": 0.5, "test": 0.5}, seed=1)
    assert split.splits.keys() == {"sub-01", "sub-02"}  # one split per subject: both sessions follow sub-02
    assert sorted(split.splits.values()) == ["test", "train"]


def test_units_are_converted_and_mixed_units_refused(tmp_path, cohort):
    image = cohort / "phantom-0000" / "phantom-0000_t1.nii.gz"
    table = tmp_path / "m.csv"
    table.write_text(f"subject_id,image,age,survival\na,{image},18mo,2y\nb,{image},30mo,6mo\n")
    with pytest.raises(BrainDINOError, match="column 'survival' mixes units"):
        load_manifest(table)
    table.write_text(f"subject_id,image,age,survival\na,{image},18mo,24mo\nb,{image},30mo,6mo\n")
    manifest = load_manifest(table)
    assert manifest.entries[0].labels["age"] == pytest.approx(1.5)
    assert manifest.entries[1].labels["survival"] == pytest.approx(182.625)
    assert manifest.units == {"age": "years", "survival": "days"}


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ("a,{image},40\nb,missing.nii.gz,50\n", "row 3, column 'image': missing.nii.gz does not exist"),
        ("a,{image},40\na,{image},50\n", "duplicate subject a"),
        ("a,{image},40\nb,{image},forty\n", "row 3, column 'age': 'forty' is not a number"),
        ("a,{image},40y\nb,{image},50\n", "gives a unit on some rows only"),
    ],
)
def test_table_errors_name_the_row_and_problem(tmp_path, cohort, body, problem):
    image = cohort / "phantom-0000" / "phantom-0000_t1.nii.gz"
    table = tmp_path / "m.csv"
    table.write_text("subject_id,image,age\n" + body.format(image=image))
    with pytest.raises(BrainDINOError, match=problem) as raised:
        load_manifest(table)
    assert str(raised.value).startswith(str(table))


def test_subject_level_stratified_seeded_splits(cohort):
    manifest = load_manifest(cohort)
    split = manifest.split(stratify="sex", seed=0)
    assert set(split.splits) == set(manifest.subjects)
    assert manifest.split(stratify="sex", seed=0).splits == split.splits
    assert manifest.split(stratify="sex", seed=1).splits != split.splits
    for sex in ("F", "M"):
        members = [e.subject_id for e in manifest.entries if e.labels["sex"] == sex]
        assert sum(split.splits[s] == "train" for s in members) == round(0.7 * len(members))
    with pytest.raises(BrainDINOError, match="sum to 1"):
        manifest.split({"train": 0.9, "test": 0.3})
    with pytest.raises(BrainDINOError, match="no 'marker' label"):
        manifest.split(stratify="marker")  # tumor-free subjects have none
