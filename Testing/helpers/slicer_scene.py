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
    return activate(SlicerApp())


def activate(app: SlicerApp) -> SlicerApp:
    """Make ``slicer.mrmlScene`` and ``slicer.modules`` this app's (as inside Slicer), e.g. again after another test."""
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


def axial_view(app: SlicerApp, size: int = 512):
    """An offscreen axial slice view of the app's scene, drawn by Slicer's own displayable managers."""
    from trame_slicer.views import DirectViewFactory, ViewLayoutDefinition

    app.view_manager.register_factory(DirectViewFactory(do_render_offscreen=True))
    view = app.view_manager.create_view(ViewLayoutDefinition.axial_view())
    view.render_window().SetSize(size, size)
    return view


def render(view, slice_s: float) -> np.ndarray:
    """(H, W, 3) uint8 picture of the view at axial position S (mm), rows from the top of the screen."""
    from vtkmodules.util.numpy_support import vtk_to_numpy
    from vtkmodules.vtkRenderingCore import vtkWindowToImageFilter

    view.fit_view_to_content()
    view.set_slice_value(slice_s)
    view.render()
    capture = vtkWindowToImageFilter()
    capture.SetInput(view.render_window())
    capture.Update()
    image = capture.GetOutput()
    width, height, _ = image.GetDimensions()
    pixels = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, -1)
    return np.ascontiguousarray(pixels[::-1, :, :3])


def pixel_of(view, scene, ras) -> tuple[int, int]:
    """(row, col) of the picture from `render` where a RAS point on the current slice is drawn."""
    slice_node = scene.GetNodeByID(view.get_view_node_id())
    xy_to_ras = slicer.util.arrayFromVTKMatrix(slice_node.GetXYToRAS())
    x, y = (np.linalg.inv(xy_to_ras) @ np.array([*ras[:3], 1.0]))[:2]
    height = view.render_window().GetSize()[1]
    return int(round(height - 1 - y)), int(round(x))
