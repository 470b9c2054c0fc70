"""The Slicer module's logic on a real MRML scene (slicer-core wheel): nodes in, engine, nodes back."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import slicer
import vtk

from BrainDINOLib import mrml
from BrainDINOLib.errors import BrainDINOError
from BrainDINOLib.featuremaps import query_patch
from BrainDINOLib.infer import InferenceOptions, run_inference
from BrainDINOLib.progress import Progress
from BrainDINOLib.sample_data import demo_phantom
from BrainDINOLib.segments import BRATS_CLASSES, SEGMENT_TERMINOLOGY
from BrainDINOLib.session import (
    CohortDone,
    Failed,
    Finished,
    InferenceSession,
    RunOptions,
    Stopped,
    add_run_nodes,
)
from slicer_scene import activate, add_volume_node, slicer_app
from testdata import reorient


def _oblique(image: nib.Nifti1Image, degrees: float = 20.0) -> nib.Nifti1Image:
    """The same voxels with the axes rotated about A-P: an oblique acquisition."""
    angle = np.deg2rad(degrees)
    rotation = np.eye(4)
    rotation[[0, 0, 2, 2], [0, 2, 0, 2]] = np.cos(angle), np.sin(angle), -np.sin(angle), np.cos(angle)
    return nib.Nifti1Image(np.asarray(image.dataobj), rotation @ image.affine)


def _geometry(node) -> np.ndarray:
    return mrml.ijk_to_ras(node)


def _scene_nodes(scene) -> set[str]:
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def _expected_similarity(run, ijk, block=None) -> np.ndarray:
    """(K, J, I) similarity to the patch at input voxel ``ijk``, as Slicer holds the node's voxels."""
    patch = query_patch(run.volume, run.maps.layout, run.maps.grid, ijk)
    return run.volume.to_source(run.maps.similarity(patch, block)).transpose(2, 1, 0)


def _poll_until_done(session) -> list:
    events = []
    while session.running or not events:
        events += session.poll()
        time.sleep(0.01)
    return events


@pytest.fixture(params=["RAS", "LPS", "oblique"])
def oriented_mni(request, mni_2mm):
    if request.param == "oblique":
        return request.param, _oblique(mni_2mm)
    return request.param, reorient(mni_2mm, request.param)


def test_node_to_volume_and_back_is_exact(slicer_app, oriented_mni):
    name, image = oriented_mni
    node = add_volume_node(image, name)
    volume = mrml.volume_from_node(node)
    assert volume.source_shape == image.shape and volume.path == name
    np.testing.assert_allclose(volume.source_affine, image.affine, atol=1e-6)
    np.testing.assert_array_equal(volume.to_source(volume.data), np.asarray(image.dataobj, dtype=np.float32))
    copy = mrml.add_volume_like(node, volume.to_source(volume.data), "copy")
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(copy), slicer.util.arrayFromVolume(node))
    np.testing.assert_allclose(_geometry(copy), _geometry(node), atol=1e-9)


def test_bad_inputs_are_named(slicer_app, mni_2mm, tmp_path):
    scene = slicer_app.scene
    with pytest.raises(BrainDINOError, match="no input volume"):
        mrml.volume_from_node(None)
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(BrainDINOError, match="empty: the volume holds no voxels"):
        mrml.volume_from_node(empty)
    flat = slicer.util.addVolumeFromArray(np.random.default_rng(0).random((1, 40, 50)).astype(np.float32), name="flat")
    with pytest.raises(BrainDINOError, match="flat: a 2D image"):
        mrml.volume_from_node(flat)
    rgb = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "colour")
    slicer.util.updateVolumeFromArray(rgb, np.zeros((4, 5, 6, 3), np.uint8))
    with pytest.raises(BrainDINOError, match="colour: 3 values per voxel"):
        mrml.volume_from_node(rgb)
    labels = slicer.util.addVolumeFromArray(np.ones((4, 5, 6), np.int16), name="labels",
                                            nodeClassName="vtkMRMLLabelMapVolumeNode")  # fmt: skip
    with pytest.raises(BrainDINOError, match="labels: not a greyscale volume"):
        mrml.volume_from_node(labels)
    constant = slicer.util.addVolumeFromArray(np.full((4, 5, 6), 7.0, np.float32), name="constant")
    with pytest.raises(BrainDINOError, match="constant: a constant image"):
        mrml.volume_from_node(constant)
    work = tmp_path / "runs"
    work.mkdir()
    session, mni = InferenceSession(work_dir=work), add_volume_node(mni_2mm, "mni")
    before = _scene_nodes(scene)
    with pytest.raises(BrainDINOError, match="no model bundle .no-such-bundle."):  # the child's own words
        session.run(mni, RunOptions(bundle="no-such-bundle"))
    with pytest.raises(BrainDINOError, match="image size 300 px: choose a multiple"):  # the size reaches the child
        session.run(mni, RunOptions(image_size=300))
    assert not session.running and _scene_nodes(scene) == before and not any(work.iterdir())


@pytest.fixture(scope="module")
def shared_run():
    """One run of the demo phantom (FLAIR, with T1 and T1ce) for the tests that only read or query it, and the
    events its polling gave."""
    app = slicer_app()
    scans, _ = demo_phantom()
    nodes = {
        sequence: add_volume_node(nib.load(scans[sequence]), f"phantom {sequence}")
        for sequence in ("flair", "t1", "t1ce")
    }
    session = InferenceSession()
    session.start(
        nodes["flair"], RunOptions(sequence="flair", device="cpu"), {"t1": nodes["t1"], "t1ce": nodes["t1ce"]}
    )
    events = _poll_until_done(session)
    yield app, session, events[-1].run, nib.load(scans["brainmask"]), events
    session.forget()


@pytest.fixture
def phantom_run(shared_run):
    """The shared run, its scene active again; each test leaves its head and block as it found them."""
    app, session, run, brain, _ = shared_run
    activate(app)
    yield app, session, run, brain
    session.show_head(None)
    session.use_block(None)


def test_phantom_run_makes_named_nodes_in_the_input_geometry(phantom_run):
    app, _, run, truth_image = phantom_run
    scene = app.scene
    assert run.attention.IsA("vtkMRMLScalarVolumeNode") and not run.attention.IsA("vtkMRMLVectorVolumeNode")
    assert run.attention.GetDisplayNode().GetColorNodeID() == mrml.ATTENTION_COLORS
    assert run.pca.IsA("vtkMRMLVectorVolumeNode")
    assert run.table.IsA("vtkMRMLTableNode") and set(run.segmentations) == {"tumor"}
    for node in (run.attention, run.pca):
        np.testing.assert_allclose(_geometry(node), _geometry(run.input), atol=1e-9)
        assert slicer.util.arrayFromVolume(node).shape[:3] == slicer.util.arrayFromVolume(run.input).shape
    made = {run.attention.GetID(), run.pca.GetID(), run.table.GetID(), run.segmentations["tumor"].GetID()}
    queried = {run.similarity.GetID()} if run.similarity else set()  # made by a query test of the shared run
    assert {n.GetID() for n in mrml.folder_nodes(scene, run.folder)} == made | queried

    segmentation = run.segmentations["tumor"]
    segments = segmentation.GetSegmentation()
    names = [segments.GetNthSegment(i).GetName() for i in range(segments.GetNumberOfSegments())]
    assert names == [*BRATS_CLASSES, "Brain"]
    assert list(BRATS_CLASSES) == ["necrotic / non-enhancing tumour core", "peritumoral oedema", "enhancing tumour"]
    terminology = app.terminologies_logic
    for value, class_name in zip((1, 2, 3), BRATS_CLASSES, strict=True):
        (_, code, color), segment = (
            SEGMENT_TERMINOLOGY[class_name],
            segments.GetSegment(f"{segmentation.GetName()}_{value}"),
        )
        np.testing.assert_allclose(segment.GetColor(), color, atol=1e-6)
        entry = slicer.vtkSlicerTerminologyEntry()
        assert terminology.DeserializeTerminologyEntry(segment.GetTerminology(), entry)
        assert entry.GetTypeObject().GetCodeValue() == code[0]
        assert entry.GetCategoryObject().GetCodeMeaning() == "Morphologically Altered Structure"
    # each segment, read back in the input's grid, is the run's own label volume voxel for voxel; the brain is
    # the phantom's (the default model misses this phantom's tumour: README)
    labels = np.asarray(nib.load(run.out_dir / run.result["outputs"]["segmentation:tumor"]).dataobj)
    for value in (1, 2, 3):
        found = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, f"{segmentation.GetName()}_{value}", run.input)
        np.testing.assert_array_equal(found > 0, (labels == value).transpose(2, 1, 0))
    brain = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, f"{segmentation.GetName()}_brain", run.input) > 0
    truth = np.asarray(truth_image.dataobj).transpose(2, 1, 0) > 0
    assert brain.any() and 2 * (brain & truth).sum() / (brain.sum() + truth.sum()) > 0.8

    table = mrml.table_columns(run.table)
    assert list(table) == ["Head", "Task", "Result", "Units", "Details"]
    predictions = run.result["predictions"]
    assert table["Head"] == list(predictions)
    assert set(predictions) == {"sequence", "diagnosis", "survival", "tumor", "marker", "age"}
    assert predictions["age"]["reads"] == {"t1": "phantom t1"} and predictions["tumor"]["reads"] == {
        "flair": "phantom flair"
    }
    rows = dict(zip(table["Head"], zip(table["Result"], table["Units"], strict=True), strict=True))
    assert rows["sequence"] == (predictions["sequence"]["prediction"], "probability")
    assert rows["tumor"] == (f"{predictions['tumor']['total_ml']:.1f}", "mL")
    assert any(line.startswith("tumor: ") for line in run.prediction_lines)
    assert "not a medical device" in run.prediction_lines[-1]


def test_point_and_crosshair_queries_update_similarity_from_cached_tokens(phantom_run):
    app, session, run, _ = phantom_run
    messages = []
    session.on_query_message = messages.append
    points = app.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "query")
    session.observe(points)
    inside = (0.0, -10.0, 10.0)  # brain centre of the MNI-space phantom
    points.AddControlPoint(*inside)
    similarity = run.similarity
    assert similarity is not None and similarity.IsA("vtkMRMLScalarVolumeNode")
    np.testing.assert_allclose(_geometry(similarity), _geometry(run.input), atol=1e-9)
    ijk = mrml.ras_to_ijk(run.input, inside)
    first = slicer.util.arrayFromVolume(similarity).copy()
    np.testing.assert_allclose(first, _expected_similarity(run, ijk), atol=1e-6)
    i, j, k = ijk  # the phantom is 1 mm: a 16-pixel patch spans about 16 mm
    assert first[k, j - 8 : j + 9, i - 8 : i + 9].max() > 0.9 and first.max() <= 1 + 1e-4

    points.SetNthControlPointPosition(0, 40.0, 20.0, 30.0)  # dragging the point updates the same node
    second = slicer.util.arrayFromVolume(similarity)
    assert run.similarity is similarity and not np.allclose(first, second)

    crosshair = app.scene.GetFirstNodeByClass("vtkMRMLCrosshairNode")
    session.observe(crosshair)
    crosshair.SetCrosshairRAS(*inside)
    np.testing.assert_allclose(slicer.util.arrayFromVolume(similarity), first, atol=1e-6)
    crosshair.SetCrosshairRAS(0.0, 0.0, 500.0)
    assert "outside" in messages[-1]
    assert len(mrml.folder_nodes(app.scene, run.folder)) == 5
    session.stop_observing()
    crosshair.SetCrosshairRAS(40.0, 20.0, 30.0)
    np.testing.assert_allclose(slicer.util.arrayFromVolume(similarity), first, atol=1e-6)


def _run_here(node, folder, outputs) -> object:
    """What the session does with a node, with ``infer`` in this process (the child is tested elsewhere)."""
    volume = mrml.volume_from_node(node)
    nib.save(nib.Nifti1Image(volume.to_source(volume.data), volume.source_affine), folder / "scan.nii")
    run_inference(folder / "scan.nii", folder / "out", InferenceOptions(device="cpu", sequence="t1", report=False))
    return add_run_nodes(node, volume, folder / "out", outputs)


def test_outputs_keep_the_geometry_of_lps_and_oblique_inputs(slicer_app, mni_2mm, tmp_path):
    attention = {}
    for name, image in [("RAS", mni_2mm), ("LPS", reorient(mni_2mm, "LPS")), ("oblique", _oblique(mni_2mm))]:
        node = add_volume_node(image, name)
        (tmp_path / name).mkdir()
        run = _run_here(node, tmp_path / name, frozenset({"attention", "pca"}))
        for output in (run.attention, run.pca):
            np.testing.assert_allclose(_geometry(output), _geometry(node), atol=1e-9)
        source = slicer.util.arrayFromVolume(run.attention).transpose(2, 1, 0)
        attention[name] = run.volume.data, run.volume.to_source(run.maps.attention_map()), source
    for name in ("RAS", "LPS", "oblique"):
        np.testing.assert_array_equal(attention[name][1], attention[name][2])
    # an oblique scan keeps its voxel axes (no resampling): the same voxels give the same map
    np.testing.assert_allclose(attention["oblique"][2], attention["RAS"][2], atol=1e-4)
    # the same voxels read in another orientation give the same canonical maps
    np.testing.assert_allclose(
        reorient(nib.Nifti1Image(attention["LPS"][2], reorient(mni_2mm, "LPS").affine), "RAS").get_fdata(),
        attention["RAS"][2],
        atol=1e-4,
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as handle:  # a zombie (ended, not yet reaped) counts as gone
        return handle.read().split(")")[-1].split()[0] != "Z"


def test_cancel_ends_the_child_and_leaves_the_scene_as_it_was(slicer_app, mni_2mm, tmp_path):
    """Cancel while the child encodes (its process ends) and while the nodes are being made (those made go);
    either way the scene is as it was and the run folder is gone."""
    scene = slicer_app.scene
    node = add_volume_node(mni_2mm, "mni")
    before = _scene_nodes(scene)
    session = InferenceSession(work_dir=tmp_path)
    session.start(node, RunOptions(sequence="t1", device="cpu"))
    events = []
    while not any(isinstance(e, Progress) and e.total for e in events):  # the child is encoding
        events += session.poll()
        time.sleep(0.01)
    pid = session._job.pid
    session.cancel()
    events += _poll_until_done(session)
    assert isinstance(events[-1], Stopped) and not any(isinstance(e, Finished) for e in events)
    assert not any(isinstance(e, Progress) and e.total and e.done == e.total for e in events)  # stopped early
    deadline = time.monotonic() + 10
    while _alive(pid):
        assert time.monotonic() < deadline, "the child outlived Cancel"
        time.sleep(0.05)
    assert _scene_nodes(scene) == before and session.latest is None and not any(tmp_path.iterdir())

    session.start(node, RunOptions(sequence="t1", device="cpu"))
    events = []
    while not (events and session._steps is not None and scene.GetNumberOfNodes() > len(before) + 1):
        events += session.poll()  # the child is done and the first nodes are in the scene
        time.sleep(0.01)
    session.cancel()
    events += _poll_until_done(session)
    assert isinstance(events[-1], Stopped) and _scene_nodes(scene) == before and not any(tmp_path.iterdir())
    progress = [e for e in events if isinstance(e, Progress) and e.total]  # the child itself had finished
    assert progress[-1].done == progress[-1].total > 0 and not any(isinstance(e, Failed) for e in events)


def test_outputs_and_queries_follow_a_parent_transform(slicer_app):
    scans, _ = demo_phantom()
    node = add_volume_node(nib.load(scans["flair"]), "moved FLAIR")
    shift = slicer_app.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 100.0)  # 100 mm to the patient's right
    shift.SetMatrixTransformToParent(matrix)
    node.SetAndObserveTransformNodeID(shift.GetID())
    session = InferenceSession()
    run = session.run(node, RunOptions(sequence="flair", device="cpu"))
    segmentation = run.segmentations["tumor"]
    for output in (run.attention, run.pca, segmentation):
        assert output.GetTransformNodeID() == shift.GetID()
    np.testing.assert_allclose(_geometry(run.attention), _geometry(node), atol=1e-9)
    # the segmentation's grid is the input's own, not shifted a second time
    geometry = segmentation.GetSegmentation().GetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    )
    values = [float(v) for v in geometry.strip(";").split(";")]
    np.testing.assert_allclose(np.reshape(values[:16], (4, 4)), _geometry(node), atol=1e-4)
    # a world point is queried in the input's own voxels
    ijk = tuple(n // 2 for n in nib.load(scans["flair"]).shape)
    world = slicer.util.arrayFromVTKMatrix(matrix) @ _geometry(node) @ np.array([*ijk, 1.0])
    session.query(tuple(world[:3]))
    np.testing.assert_allclose(slicer.util.arrayFromVolume(run.similarity), _expected_similarity(run, ijk), atol=1e-6)


def test_moving_any_point_of_a_list_queries_that_point(phantom_run):
    app, session, run, _ = phantom_run
    points = app.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "two points")
    session.observe(points)
    points.AddControlPoint(0.0, -10.0, 10.0)
    points.AddControlPoint(40.0, 20.0, 30.0)
    points.SetNthControlPointPosition(0, -20.0, 0.0, 20.0)  # the first point, not the last, moves
    ijk = mrml.ras_to_ijk(run.input, (-20.0, 0.0, 20.0))
    np.testing.assert_allclose(slicer.util.arrayFromVolume(run.similarity), _expected_similarity(run, ijk), atol=1e-6)
    session.stop_observing()


def test_batched_point_changes_query_the_last_placed_point(phantom_run):
    """StartModify/EndModify deliver the point events without an index (as a script or an undo does)."""
    app, session, run, _ = phantom_run
    points = app.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "batched")
    session.observe(points)
    modifying = points.StartModify()
    points.AddControlPoint(40.0, 20.0, 30.0)
    points.AddControlPoint(-20.0, 0.0, 20.0)
    points.EndModify(modifying)
    ijk = mrml.ras_to_ijk(run.input, (-20.0, 0.0, 20.0))
    np.testing.assert_allclose(slicer.util.arrayFromVolume(run.similarity), _expected_similarity(run, ijk), atol=1e-6)
    session.stop_observing()


def test_progress_counts_the_other_scans_too(shared_run):
    events = shared_run[-1]
    counts = [(e.done, e.total) for e in events if isinstance(e, Progress) and e.total]
    analysed = events[-1].run.result["slices"]["analysed"]
    assert counts[-1][0] == counts[-1][1] > 2 * analysed  # the scan and both other scans, in one count
    assert [done for done, _ in counts] == sorted(done for done, _ in counts)  # never runs backwards
    assert len({total for _, total in counts}) == 1


def test_a_brain_mask_becomes_a_brain_segment_of_the_run(slicer_app, mni_2mm, tmp_path):
    """The run's brain mask is a "Brain" segment with its anatomical terminology in the run's first segmentation,
    in the input's grid voxel for voxel; without a segmentation output it gets a segmentation of its own."""
    node = add_volume_node(reorient(mni_2mm, "LPS"), "mni")
    volume = mrml.volume_from_node(node)
    _run_here(node, tmp_path, ())
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    brain = np.asarray(nib.load(tmp_path / "out" / result["outputs"]["brain_mask"]).dataobj) > 0
    tumour = next(key.split(":", 1)[1] for key in result["outputs"] if key.startswith("segmentation:"))
    for expected in (tumour, "brain"):
        if expected == "brain":  # the same run without its tumour segmentation
            del result["outputs"][f"segmentation:{tumour}"]
            (tmp_path / "out" / "result.json").write_text(json.dumps(result))
        run = add_run_nodes(node, volume, tmp_path / "out")
        assert list(run.segmentations) == [expected]
        segmentation = run.segmentations[expected]
        segment_id = f"{segmentation.GetName()}_brain"
        segment = segmentation.GetSegmentation().GetSegment(segment_id)
        assert segment.GetName() == "Brain" and segmentation.GetDisplayNode().GetSegmentOpacity2DFill(segment_id) == 0
        entry = slicer.vtkSlicerTerminologyEntry()
        assert slicer_app.terminologies_logic.DeserializeTerminologyEntry(segment.GetTerminology(), entry)
        assert entry.GetTypeObject().GetCodeValue() == "12738006"
        assert entry.GetCategoryObject().GetCodeMeaning() == "Anatomical Structure"
        found = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segment_id, node) > 0
        assert found.any()
        np.testing.assert_array_equal(found, brain.transpose(2, 1, 0))


def test_exploring_heads_and_blocks_from_saved_tokens(phantom_run):
    """Any attention head and any block's PCA and similarity, from the run's saved tokens, without re-encoding."""
    app, session, run, _ = phantom_run
    maps = run.maps
    assert maps.kept == tuple(range(6)) and maps.heads == 3  # the default model: 6 blocks, 3 heads, all kept
    mean = slicer.util.arrayFromVolume(run.attention).copy()
    session.show_head(1)
    one = slicer.util.arrayFromVolume(run.attention)
    np.testing.assert_allclose(one, run.volume.to_source(maps.attention_map(1)).transpose(2, 1, 0), atol=1e-6)
    assert not np.allclose(one, mean)
    session.show_head(None)
    np.testing.assert_allclose(slicer.util.arrayFromVolume(run.attention), mean, atol=1e-6)

    ijk = mrml.ras_to_ijk(run.input, (0.0, -10.0, 10.0))
    session.query(mrml.ijk_to_ras(run.input)[:3] @ [*ijk, 1.0])
    last_pca, last_similarity = (slicer.util.arrayFromVolume(n).copy() for n in (run.pca, run.similarity))
    session.use_block(2)
    assert run.block == 2 and list(run.maps.blocks) == [2]
    pca = run.volume.to_source(run.maps.pca(2)).transpose(2, 1, 0, 3)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(run.pca), pca)
    similarity = slicer.util.arrayFromVolume(run.similarity)
    np.testing.assert_allclose(similarity, _expected_similarity(run, ijk, 2), atol=1e-6)
    assert not np.array_equal(slicer.util.arrayFromVolume(run.pca), last_pca)
    assert not np.allclose(slicer.util.arrayFromVolume(run.similarity), last_similarity)
    with pytest.raises(BrainDINOError, match="attention head 3 does not exist"):
        session.show_head(3)
    with pytest.raises(BrainDINOError, match="block 9 was not kept"):
        session.use_block(9)


def test_the_slicer_process_never_imports_torch(tmp_path):
    """A whole session (run, nodes, query, head and block choice) in a process where torch cannot be imported:
    only its child, the inference process, uses torch."""
    script = tmp_path / "session.py"
    script.write_text(
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "import nibabel as nib\n"
        "from BrainDINOLib.sample_data import demo_phantom\n"
        "from BrainDINOLib.session import InferenceSession, RunOptions\n"
        "from slicer_scene import add_volume_node, slicer_app\n"
        "app = slicer_app()\n"
        "node = add_volume_node(nib.load(demo_phantom()[0]['flair']), 'flair')\n"
        "session = InferenceSession()\n"
        "run = session.run(node, RunOptions(sequence='flair', device='cpu'))\n"
        "session.query((0.0, -10.0, 10.0)); session.show_head(0); session.use_block(1)\n"
        "assert run.similarity is not None and sys.modules['torch'] is None\n"
        "session.forget()\n"
        "print('ok')\n"
    )
    helpers = str(Path(__file__).resolve().parents[1] / "helpers")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [helpers, os.environ.get("PYTHONPATH")]))}
    completed = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert completed.returncode == 0 and completed.stdout.strip().endswith("ok"), completed.stderr[-2000:]


def test_a_folder_run_becomes_a_summary_table_and_loads_any_scan(slicer_app, tmp_path, mni_2mm):
    """'Many scans' in Slicer: the folder runs in a child process with progress, its summary.csv becomes a table
    node, and a finished scan loads with its outputs on its file's voxel grid, answers queries and keeps its files
    when another scan is loaded."""
    scans, _ = demo_phantom()
    folder = tmp_path / "scans"
    folder.mkdir()
    shutil.copy(scans["flair"], folder / "flair.nii.gz")
    lps = reorient(mni_2mm, "LPS", np.int16)
    nib.save(lps, folder / "mni_lps.nii.gz")
    (folder / "broken.nii.gz").write_bytes(b"not an image")
    out = tmp_path / "out"
    session = InferenceSession()
    session.start_cohort(slicer_app.scene, folder, out, RunOptions(device="cpu"))
    assert session.running_cohort
    events = _poll_until_done(session)
    assert any(isinstance(e, Progress) and e.stage.startswith("scan ") for e in events)
    done = events[-1]
    assert isinstance(done, CohortDone) and not done.cancelled and not session.running_cohort
    assert [(row["scan"], row["status"]) for row in done.rows] == [("broken", "failed"), ("flair", "ok"),
                                                                   ("mni_lps", "ok")]  # fmt: skip
    with open(out / "summary.csv", newline="") as handle:
        expected = list(csv.DictReader(handle))
    assert mrml.table_columns(done.table) == {key: [row[key] for row in expected] for key in expected[0]}

    run = session.load_cohort_scan(slicer_app.scene, out, "mni_lps")
    assert session.latest is run and run.input.GetName() == "mni_lps" and run.temporary is None
    np.testing.assert_allclose(mrml.ijk_to_ras(run.input), lps.affine, atol=1e-4)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(run.input).transpose(2, 1, 0), np.asarray(lps.dataobj))
    for output in (run.attention, run.pca):
        np.testing.assert_allclose(mrml.ijk_to_ras(output), lps.affine, atol=1e-4)
    # the sequence head calls this copy "t1": the T1 tumour head segments it, and the any-contrast head does not
    assert list(run.segmentations) == ["tumor_t1"] and run.table is not None
    assert session.query((0.0, -18.0, 18.0)) is run.similarity
    session.load_cohort_scan(slicer_app.scene, out, "flair")
    assert (out / "mni_lps" / "embeddings.safetensors").is_file()  # a cohort's files are the user's: they stay
    with pytest.raises(BrainDINOError, match="no finished outputs of scan broken"):
        session.load_cohort_scan(slicer_app.scene, out, "broken")
