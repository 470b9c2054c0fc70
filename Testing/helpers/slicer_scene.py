"""A real MRML scene without the Slicer application (``slicer-core`` wheel, via trame-slicer's SlicerApp).

SlicerApp registers the Colors, Volumes, Segmentations, Subject hierarchy and Terminologies logics on
a ``vtkSlicerApplicationLogic``; ``slicer.util`` helpers find them through ``slicer.mrmlScene`` and
``slicer.modules`` as inside Slicer.
"""

from __future__ import annotations

from types import SimpleNamespace

import nibabel as nib
import numpy as np
import slicer
from trame_slicer.core import SlicerApp


def slicer_app() -> SlicerApp:
    app = SlicerApp()
    slicer.mrmlScene = app.scene
    slicer.modules = SimpleNamespace(
        volumes=SimpleNamespace(logic=lambda: app.volumes_logic),
        segmentations=SimpleNamespace(logic=lambda: app.segmentations_logic),
        terminologies=SimpleNamespace(logic=lambda: app.terminologies_logic),
    )
    return app


def add_volume_node(image: nib.Nifti1Image, name: str):
    """A scalar volume node holding a NIfTI image's voxels with its affine as IJK -> RAS."""
    voxels = np.asarray(image.dataobj, dtype=np.float32).transpose(2, 1, 0)
    return slicer.util.addVolumeFromArray(voxels, image.affine, name)
