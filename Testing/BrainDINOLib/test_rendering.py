"""The module's output nodes as Slicer's own slice views draw them (offscreen, slicer-core displayable managers)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import slicer

from BrainDINOLib import mrml
from BrainDINOLib.sample_data import demo_phantom
from BrainDINOLib.segments import SEGMENT_TERMINOLOGY
from BrainDINOLib.session import InferenceSession, RunOptions, add_run_nodes
from slicer_scene import add_volume_node, axial_view, pixel_of, render
from slicer_scene import slicer_app as new_slicer_app


@pytest.fixture(scope="module")
def drawn_run():
    slicer_app = new_slicer_app()
    scans, _ = demo_phantom()
    nodes = {s: add_volume_node(nib.load(scans[s]), f"phantom {s}") for s in ("flair", "t1", "t1ce")}
    session = InferenceSession()
    run = session.run(nodes["flair"], RunOptions(sequence="flair", device="cpu"))
    yield slicer_app, run, axial_view(slicer_app)
    session.forget()


def _voxel_ras(node, kji) -> np.ndarray:
    return mrml.ijk_to_ras(node) @ np.array([kji[2], kji[1], kji[0], 1.0])


def test_segment_colour_is_drawn_inside_the_tumour(drawn_run, tmp_path):
    """The phantom's true tumour as a run's segmentation (the default model misses this phantom's tumour: README)."""
    app, run, view = drawn_run
    run.segmentations["tumor"].GetDisplayNode().SetVisibility(False)
    out = Path(shutil.copytree(run.out_dir, tmp_path / "run"))  # a copy of the run's files: true tumour, no brain
    result = json.loads((out / "result.json").read_text())
    truth = nib.load(demo_phantom()[0]["seg"])
    nib.save(
        nib.Nifti1Image(np.asarray(truth.dataobj, np.int16), truth.affine),
        out / result["outputs"]["segmentation:tumor"],
    )
    del result["outputs"]["brain_mask"]
    (out / "result.json").write_text(json.dumps(result))
    shown = run.segmentations["tumor"]
    run = add_run_nodes(run.input, run.volume, out)
    segmentation = run.segmentations["tumor"]
    oedema = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, f"{segmentation.GetName()}_2", run.input)
    k = int(np.argmax(oedema.sum(axis=(1, 2))))
    mrml.show_layers(app.scene, run.input, None)
    segmentation.GetDisplayNode().SetVisibility(False)
    plain = render(view, _voxel_ras(run.input, (k, 0, 0))[2]).astype(int)
    segmentation.GetDisplayNode().SetVisibility(True)
    drawn = render(view, _voxel_ras(run.input, (k, 0, 0))[2]).astype(int)
    # deep inside the oedema (not on an outline): the fill blends the segment colour over the grey scan
    inner = np.argwhere(oedema[k] & np.roll(oedema[k], 3, 0) & np.roll(oedema[k], -3, 0) & np.roll(oedema[k], 3, 1))
    color = np.array(SEGMENT_TERMINOLOGY["peritumoral oedema"][2])
    shifts = []
    for j, i in inner[:: max(1, len(inner) // 40)]:
        row, col = pixel_of(view, app.scene, _voxel_ras(run.input, (k, j, i)))
        shifts.append(drawn[row, col] - plain[row, col])
    shift = np.mean(shifts, axis=0)
    assert np.linalg.norm(shift) > 20  # the segment is visible
    hue_shift, hue = shift - shift.mean(), color - color.mean()  # brightness aside, it tints towards its colour
    assert np.dot(hue_shift, hue) / (np.linalg.norm(hue_shift) * np.linalg.norm(hue)) > 0.5
    outside = pixel_of(view, app.scene, _voxel_ras(run.input, (k, 5, 5)))
    assert (drawn[outside] == plain[outside]).all()
    mrml.remove_folder(app.scene, run.folder)  # the shared run's scene as it was
    shown.GetDisplayNode().SetVisibility(True)


def test_attention_overlay_is_hot_where_attention_is_high(drawn_run):
    app, run, view = drawn_run
    for segmentation in run.segmentations.values():
        segmentation.GetDisplayNode().SetVisibility(False)
    attention = slicer.util.arrayFromVolume(run.attention)
    k = attention.shape[0] // 2
    low = run.attention.GetDisplayNode().GetWindowLevelMin()
    mrml.show_layers(app.scene, run.input, None)
    plain = render(view, _voxel_ras(run.input, (k, 0, 0))[2]).astype(int)
    mrml.show_layers(app.scene, run.input, run.attention, opacity=0.6)
    drawn = render(view, _voxel_ras(run.input, (k, 0, 0))[2]).astype(int)
    hot = np.argwhere(attention[k] > np.percentile(attention[k][attention[k] > low], 90))
    cold = np.argwhere((attention[k] < low * 0.5) & (slicer.util.arrayFromVolume(run.input)[k] > 0))
    assert len(hot) > 20 and len(cold) > 20
    pick = np.random.default_rng(0)
    hot_pixels = [pixel_of(view, app.scene, _voxel_ras(run.input, (k, j, i))) for j, i in pick.permutation(hot)[:30]]
    cold_pixels = [pixel_of(view, app.scene, _voxel_ras(run.input, (k, j, i))) for j, i in pick.permutation(cold)[:30]]
    hot_rgb = np.array([drawn[p] for p in hot_pixels])
    # the heat scale runs from red to yellow: red well above blue, green between
    assert (hot_rgb[:, 0] - hot_rgb[:, 2]).mean() > 60 and (hot_rgb[:, 1] - hot_rgb[:, 2]).mean() > 10
    assert all((drawn[p] == plain[p]).all() for p in cold_pixels)  # below the window: transparent
