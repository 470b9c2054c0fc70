"""A small phantom cohort (2 mm base grid) shared by the data-layer tests."""

from __future__ import annotations

import pytest

from BrainDINOTrainingLib.cli import main


@pytest.fixture(scope="session")
def cohort(tmp_path_factory):
    """12 phantom subjects made through the command line, as a user would (two workers, one per CI core: subject i
    depends only on the seed and i, see test_deterministic_by_seed)."""
    folder = tmp_path_factory.mktemp("cohort") / "cohort"
    assert main(["cohort", "make", "12", str(folder), "--seed", "7", "--resolution", "2", "--workers", "2"]) == 0
    return folder


@pytest.fixture(scope="session")
def index64(tmp_path_factory, cohort):
    """A slice index (64-px canvases) of three cohort subjects with their manifest labels, for the training tests."""
    import shutil

    from BrainDINOLib.preprocess import PreprocessSpec
    from BrainDINOTrainingLib.slice_index import build_index

    folder = tmp_path_factory.mktemp("train-data")
    subjects = ("phantom-0000", "phantom-0001", "phantom-0002")
    for subject in subjects:
        shutil.copytree(cohort / subject, folder / subject)
    lines = (cohort / "manifest.csv").read_text().splitlines(keepends=True)
    (folder / "manifest.csv").write_text("".join([lines[0]] + [line for line in lines if line.startswith(subjects)]))
    out = tmp_path_factory.mktemp("train-index") / "idx"
    build_index([folder / "manifest.csv"], out, PreprocessSpec(image_size=64))
    return out
