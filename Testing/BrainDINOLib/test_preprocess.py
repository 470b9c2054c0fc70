"""Normalisation, slice selection and the exact canvas mapping, on the real MNI template."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.transforms import NormalizeIntensity

from BrainDINOLib.errors import BrainDINOError
from BrainDINOLib.layout import PlaneGeometry
from BrainDINOLib.preprocess import PreprocessSpec, normalize, prepare, to_canvas
from BrainDINOLib.volume import load_volume
from testdata import save


@pytest.fixture(scope="module")
def mni_volume(mni):
    return load_volume(mni.get_filename())


def test_normalize_matches_monai_zscore_over_nonzero_after_percentile_clip(mni_volume):
    spec = PreprocessSpec()
    image, foreground = normalize(mni_volume.data, spec)
    nonzero = mni_volume.data != 0
    low, high = np.percentile(mni_volume.data[nonzero], spec.clip_percentiles)
    clipped = np.where(nonzero, np.clip(mni_volume.data, low, high), 0)
    expected = NormalizeIntensity(nonzero=True)(torch.from_numpy(clipped[None])).numpy()[0]
    np.testing.assert_allclose(image, expected, atol=1e-4)
    assert abs(image[nonzero].mean()) < 1e-4 and abs(image[nonzero].std() - 1) < 1e-4
    assert (image[~nonzero] == 0).all()
    assert foreground.sum() < nonzero.sum() and not foreground[~nonzero].any()


def test_brain_extent_and_filters(mni_volume):
    prepared = prepare(mni_volume, PreprocessSpec())
    extent = np.flatnonzero(prepared.foreground_fraction >= 0.01)
    np.testing.assert_array_equal(prepared.slices, np.arange(extent[0], extent[-1] + 1))
    assert prepared.foreground[:, :, : prepared.slices[0]].mean() < 0.01  # dropped slices are (nearly) empty
    assert prepared.position[prepared.slices[0]] == 0 and prepared.position[prepared.slices[-1]] == 1
    middle = prepare(mni_volume, PreprocessSpec(position_range=(0.25, 0.75)))
    assert set(middle.slices) < set(prepared.slices)
    assert np.all((prepared.position[middle.slices] >= 0.25) & (prepared.position[middle.slices] <= 0.75))
    threshold = float(np.median(prepared.entropy[prepared.slices]))
    rich = prepare(mni_volume, PreprocessSpec(min_entropy=threshold))
    assert 0 < len(rich.slices) < len(prepared.slices)
    assert rich.entropy[rich.slices].min() >= threshold


def test_spec_round_trip_and_validation():
    spec = PreprocessSpec(clip_percentiles=(0.5, 99.5), min_entropy=2.0)
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(BrainDINOError, match="unknown field 'clip'"):
        PreprocessSpec.from_dict({"clip": 1})
    with pytest.raises(BrainDINOError, match="clip_percentiles"):
        PreprocessSpec(clip_percentiles=(99, 1))


def test_plane_keeps_physical_aspect_ratio():
    plane = PlaneGeometry.fit((50, 233), (4.0, 1.0), 224)  # 200 mm wide, 233 mm deep
    assert plane.rows == 224 and plane.cols == round(224 * 200 / 233)
    assert plane.col0 == (224 - plane.cols) // 2 and plane.row0 == 0


@pytest.mark.parametrize(
    ("shape", "spacing"), [((197, 233), (1.0, 1.0)), ((50, 233), (4.0, 1.0)), ((64, 40), (1.0, 1.5))]
)
def test_canvas_round_trip_and_positions(shape, spacing):
    plane = PlaneGeometry.fit(shape, spacing, 224)
    x, y = np.meshgrid(np.linspace(0, 1, shape[0]), np.linspace(0, 1, shape[1]), indexing="ij")
    smooth = torch.from_numpy(np.sin(3 * x) + np.cos(2 * y)).float()[None]
    canvas = to_canvas(plane, smooth)
    back = plane.from_canvas(canvas[:, None].numpy())[:, 0]
    inner = (slice(2, -2), slice(2, -2))  # borders blur against the zero padding
    np.testing.assert_allclose(back[0][inner], smooth[0][inner].numpy(), atol=0.05)
    # A single bright voxel lands where canvas_position says.
    dot = torch.zeros(1, *shape)
    dot[0, shape[0] // 3, shape[1] // 4] = 1
    row, col = np.unravel_index(int(to_canvas(plane, dot).argmax()), (224, 224))
    expected_row, expected_col = plane.canvas_position(shape[0] // 3, shape[1] // 4)
    assert abs(row + 0.5 - expected_row) <= max(1.0, plane.rows / shape[1]) and abs(col + 0.5 - expected_col) <= max(
        1.0, plane.cols / shape[0]
    )


def test_radiological_view_on_canvas():
    """Anterior at the top, the patient's right on the left of the canvas."""
    plane = PlaneGeometry.fit((8, 8), (1.0, 1.0), 16)
    marker = torch.zeros(1, 8, 8)
    marker[0, 7, 7] = 1  # most right (x) and most anterior (y)
    row, col = np.unravel_index(int(to_canvas(plane, marker).argmax()), (16, 16))
    assert row <= 1 and col <= 1


def test_no_foreground_is_an_error(tmp_path):
    import nibabel as nib

    data = np.zeros((32, 32, 32), np.float32)
    data[0, 0, 0] = 1000  # one hot voxel: nothing else reaches the foreground level
    data[1:, 1:, 1:] = 1
    volume = load_volume(save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "flat.nii.gz"))
    with pytest.raises(BrainDINOError, match="is this a brain MRI"):
        prepare(volume, PreprocessSpec(clip_percentiles=(0, 100)))
