"""Shared fixtures: the real MNI ICBM152 T1 template (from the nilearn wheel) and the shipped bundle."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from BrainDINOLib.bundle import find_bundle
from BrainDINOLib.sample_data import mni_path


def pytest_addoption(parser):
    parser.addoption(
        "--fuzz-scale", type=int, default=1, help="run this many times the cases of the bad-input fuzz corpus"
    )


@pytest.fixture(scope="session")
def fuzz_scale(request) -> int:
    """How many times the default number of fuzz cases to run (``--fuzz-scale``)."""
    return request.config.getoption("--fuzz-scale")


@pytest.fixture(scope="session")
def mni() -> nib.Nifti1Image:
    """The full-resolution MNI T1 template (197x233x189, 1 mm, RAS, uint8)."""
    return nib.load(mni_path("t1"))


@pytest.fixture(scope="session")
def mni_2mm(mni) -> nib.Nifti1Image:
    """The MNI T1 at 2 mm (every other voxel): real anatomy, fast enough for end-to-end tests."""
    affine = mni.affine.copy()
    affine[:3, :3] *= 2
    return nib.Nifti1Image(np.asarray(mni.dataobj)[::2, ::2, ::2], affine)


@pytest.fixture(scope="session")
def default_bundle():
    return find_bundle()


@pytest.fixture
def slicer_app():
    """A fresh real MRML scene with Slicer's module logics (see ``helpers/slicer_scene.py``)."""
    from slicer_scene import slicer_app

    return slicer_app()
