"""MRML nodes <-> BrainDINO arrays: the only file of ``BrainDINOLib`` that touches Slicer.

A volume node becomes a `Volume` by its voxels and IJK -> RAS matrix; outputs go back as nodes
that copy the input's geometry (and parent transform), so output voxel ``[k, j, i]`` lies on
input voxel ``[k, j, i]`` whatever the orientation. Needs only the MRML layer (``slicer.util``
array helpers, the Volumes and Segmentations logics), no widgets.
"""

from __future__ import annotations

import numpy as np
import slicer
import vtk

from .errors import BrainDINOError
from .segments import segment_style, terminology_entry
from .volume import Volume, volume_from_array

#: Colour nodes that Slicer's Colors logic always creates (no colour files needed): a red-to-yellow heat
#: scale for attention, purple-to-red for similarity.
ATTENTION_COLORS = "vtkMRMLColorTableNodeIron"
SIMILARITY_COLORS = "vtkMRMLColorTableNodeReverseRainbow"


def volume_from_node(node) -> Volume:
    """The voxels of a scalar volume node as a canonical `Volume` (named after the node).

    Raises:
        BrainDINOError: no node, not a volume, several components per voxel (colour, 4D), no voxels,
            a 2D image, or constant intensities.
    """
    if node is None:
        raise BrainDINOError("no input volume: load a brain MRI (or the sample) and select it")
    name = node.GetName()
    if not node.IsA("vtkMRMLScalarVolumeNode") or node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise BrainDINOError(f"{name}: not a greyscale volume ({node.GetClassName()}); select an MRI volume")
    image = node.GetImageData()
    if image is None or 0 in image.GetDimensions():
        raise BrainDINOError(f"{name}: the volume holds no voxels")
    if image.GetNumberOfScalarComponents() != 1:
        raise BrainDINOError(
            f"{name}: {image.GetNumberOfScalarComponents()} values per voxel (a colour, vector or 4D volume); "
            "select one 3D greyscale volume (for a 4D series, one of its frames)"
        )
    if 1 in image.GetDimensions():
        raise BrainDINOError(f"{name}: a 2D image ({'x'.join(map(str, image.GetDimensions()))} voxels); BrainDINO "
                             "needs a 3D volume")  # fmt: skip
    voxels = slicer.util.arrayFromVolume(node).transpose(2, 1, 0).astype(np.float32)
    return volume_from_array(voxels, ijk_to_ras(node), name)


def ijk_to_ras(node) -> np.ndarray:
    """(4, 4) IJK -> RAS matrix of a volume node (in its own, untransformed space)."""
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def ras_to_ijk(node, ras: tuple[float, float, float]) -> tuple[int, int, int]:
    """The voxel of a volume node that holds a world RAS point (through the node's parent transforms)."""
    point = list(ras)
    transform = node.GetParentTransformNode()
    if transform is not None:
        world_to_local = vtk.vtkGeneralTransform()
        transform.GetTransformFromWorld(world_to_local)
        point = world_to_local.TransformPoint(point)
    ijk = np.linalg.inv(ijk_to_ras(node)) @ np.array([*point, 1.0])
    return tuple(int(v) for v in np.round(ijk[:3]))


def observe_points(node, on_point) -> list[int]:
    """Call ``on_point(ras)`` when a point of a point list is placed or moved, or when a crosshair node moves;
    returns the observer tags (for ``node.RemoveObserver``)."""
    if node.IsA("vtkMRMLCrosshairNode"):
        moved = vtk.vtkCommand.ModifiedEvent
        return [node.AddObserver(moved, lambda crosshair, _: on_point(crosshair.GetCrosshairRAS()))]

    @vtk.calldata_type(vtk.VTK_INT)
    def on_change(points, _, index=None):
        # Changes batched by StartModify/EndModify arrive without the point's index: then the last placed point.
        candidates = [index] if index is not None else reversed(range(points.GetNumberOfControlPoints()))
        for candidate in candidates:
            if (
                0 <= candidate < points.GetNumberOfControlPoints()
                and points.GetNthControlPointPositionStatus(candidate) == points.PositionDefined
            ):
                on_point(points.GetNthControlPointPositionWorld(candidate))
                return

    return [node.AddObserver(event, on_change) for event in (node.PointPositionDefinedEvent, node.PointModifiedEvent)]


def _new_node(scene, class_name: str, name: str):
    return scene.AddNewNodeByClass(class_name, scene.GenerateUniqueName(name))


def add_volume_like(reference, array: np.ndarray, name: str, *, colors: str | None = None):
    """A new volume node on the reference's voxel grid.

    Args:
        array: (I, J, K) scalar map or (I, J, K, 3) uint8 RGB, in the reference's own voxel order
            (`Volume.to_source`).
        colors: colour node ID for a scalar map.
    """
    rgb = array.ndim == 4
    node = _new_node(reference.GetScene(), "vtkMRMLVectorVolumeNode" if rgb else "vtkMRMLScalarVolumeNode", name)
    node.CopyOrientation(reference)
    node.SetAndObserveTransformNodeID(reference.GetTransformNodeID())
    set_voxels(node, array)
    node.CreateDefaultDisplayNodes()
    if colors:
        node.GetDisplayNode().SetAndObserveColorNodeID(colors)
    return node


def add_volume(scene, volume: Volume, name: str):
    """A scalar volume node of a scan read from disk (`volume.load_volume`), on the file's own voxel grid."""
    node = _new_node(scene, "vtkMRMLScalarVolumeNode", name)
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(volume.source_affine))
    set_voxels(node, volume.to_source(volume.data))
    node.CreateDefaultDisplayNodes()
    return node


def set_voxels(node, array: np.ndarray) -> None:
    """Replace a volume node's voxels with an (I, J, K[, 3]) array (Slicer keeps them as (K, J, I[, 3]))."""
    axes = (2, 1, 0, 3) if array.ndim == 4 else (2, 1, 0)
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array.transpose(axes)))


def show_range(node, low: float, high: float) -> None:
    """Fix a scalar map's display window to [low, high]; voxels below ``low`` become transparent."""
    display = node.GetDisplayNode()
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(low, high)
    display.SetApplyThreshold(True)
    display.SetLowerThreshold(low)
    display.SetUpperThreshold(max(high, float(slicer.util.arrayFromVolume(node).max())))


def show_layers(scene, background, foreground=None, opacity: float = 0.5) -> None:
    """Show a volume in every slice view, with an overlay (or none) at the given opacity."""
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = scene.GetNthNodeByClass(index, "vtkMRMLSliceCompositeNode")
        composite.SetBackgroundVolumeID(background.GetID() if background else None)
        composite.SetForegroundVolumeID(foreground.GetID() if foreground else None)
        composite.SetForegroundOpacity(opacity)


def add_segmentation(reference, labels: np.ndarray, classes, label_values, name: str, brain: np.ndarray | None = None):
    """A segmentation node with one named, coloured segment per label value of an (I, J, K) label volume.

    Segments of the BraTS classes carry the DICOM terminology (necrosis, oedema, neoplasm) and its colours;
    every segment is created, even an empty one, so the legend always lists the head's classes. Segment IDs
    are ``<node name>_<label value>``. An (I, J, K) bool ``brain`` mask adds a "Brain" segment (anatomical
    terminology, ID ``<node name>_brain``) that overlaps the others, drawn as an outline in slice views (filled,
    it would hide the scan).
    """
    node = _new_node(reference.GetScene(), "vtkMRMLSegmentationNode", name)
    node.CreateDefaultDisplayNodes()
    # the transform first: the reference geometry is taken in the segmentation's own (local) frame
    node.SetAndObserveTransformNodeID(reference.GetTransformNodeID())
    node.SetReferenceImageGeometryParameterFromVolumeNode(reference)
    voxels = labels.transpose(2, 1, 0)
    segments = [(f"{node.GetName()}_{value}", class_name, voxels == value) for value, class_name in
                zip(label_values, classes, strict=True)]  # fmt: skip
    brain_id = f"{node.GetName()}_brain"
    if brain is not None:
        segments.append((brain_id, "Brain", brain.transpose(2, 1, 0)))
    for index, (segment_id, segment_name, mask) in enumerate(segments):
        category, kind, color = segment_style(segment_name, index)
        node.GetSegmentation().AddEmptySegment(segment_id, segment_name, color)
        if category:
            entry = terminology_entry(category, kind)
            node.GetSegmentation().GetSegment(segment_id).SetTerminology(entry)
        if mask.any():
            slicer.util.updateSegmentBinaryLabelmapFromArray(mask.astype(np.uint8), node, segment_id, reference)
    if brain is not None:
        node.GetDisplayNode().SetSegmentOpacity2DFill(brain_id, 0.0)
    return node


def add_table(scene, name: str, columns: dict[str, list[str]]):
    """A table node of string columns (equal lengths)."""
    node = _new_node(scene, "vtkMRMLTableNode", name)
    table = node.GetTable()
    for title, values in columns.items():
        column = vtk.vtkStringArray()
        column.SetName(title)
        for value in values:
            column.InsertNextValue(value)
        table.AddColumn(column)
    node.Modified()
    return node


def table_columns(node) -> dict[str, list[str]]:
    """A table node's contents, column title -> values as strings."""
    table = node.GetTable()
    return {
        table.GetColumn(c).GetName(): [table.GetValue(r, c).ToString() for r in range(table.GetNumberOfRows())]
        for c in range(table.GetNumberOfColumns())
    }


def add_folder(near, name: str) -> int:
    """A subject-hierarchy folder beside ``near`` (a node), returned as its item ID."""
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(near.GetScene())
    item = hierarchy.GetItemByDataNode(near)
    parent = hierarchy.GetItemParent(item) if item else hierarchy.GetSceneItemID()
    return hierarchy.CreateFolderItem(parent, name)


def place_in_folder(node, folder: int) -> None:
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(node.GetScene())
    item = hierarchy.GetItemByDataNode(node)
    if item:
        hierarchy.SetItemParent(item, folder)
    else:  # scenes without Slicer's subject-hierarchy plugins do not index nodes themselves
        hierarchy.CreateItem(folder, node)


def folder_nodes(scene, folder: int) -> list:
    """Data nodes under a subject-hierarchy folder."""
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    children = vtk.vtkIdList()
    hierarchy.GetItemChildren(folder, children)
    nodes = [hierarchy.GetItemDataNode(children.GetId(i)) for i in range(children.GetNumberOfIds())]
    return [node for node in nodes if node is not None]


def remove_folder(scene, folder: int) -> None:
    """Remove a folder and every node under it."""
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    for node in folder_nodes(scene, folder):
        scene.RemoveNode(node)
    hierarchy.RemoveItem(folder, False, True)  # its nodes are gone: asking to remove them again logs errors
