"""A small phantom cohort (2 mm base grid) shared by the data-layer tests."""

from __future__ import annotations

import pytest

from BrainDINOTrainingLib.cli import main


@pytest.fixture(scope="session")
def cohort(tmp_path_factory):
    """12 phantom subjects made through the command line, as a user would."""
    folder = tmp_path_factory.mktemp("cohort") / "cohort"
    assert main(["cohort", "make", "12", str(folder), "--seed", "7", "--resolution", "2", "--workers", "1"]) == 0
    return folder
