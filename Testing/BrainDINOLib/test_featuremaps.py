"""Attention masks, PCA colours, similarity maps and their mapping back to voxels."""

from __future__ import annotations

import numpy as np
import pytest

from BrainDINOLib.bundle import load_bundle
from BrainDINOLib.engine import encode_volume
from BrainDINOLib.errors import BrainDINOError
from BrainDINOLib.featuremaps import (
    PcaColors,
    attention_mass_mask,
    attention_mass_threshold,
    mean_attention,
    query_patch,
    similarity_map,
    to_volume,
)
from BrainDINOLib.preprocess import prepare
from BrainDINOLib.volume import load_volume
from testdata import reorient, save


def test_attention_mass_mask_reference_values():
    attention = np.array([[0.5, 0.3], [0.1, 0.1]])
    # Smallest set holding 60 % of the mass: 0.5 + 0.3 (0.5 alone is short of it).
    np.testing.assert_array_equal(attention_mass_mask(attention), [[True, True], [False, False]])
    np.testing.assert_array_equal(attention_mass_mask(attention, mass=0.4), [[True, False], [False, False]])
    assert attention_mass_threshold(attention) == 0.3
    with pytest.raises(BrainDINOError, match="attention mass"):
        attention_mass_threshold(attention, mass=0)
    maps = np.random.default_rng(0).random((2, 3, 14, 14))
    kept = np.where(attention_mass_mask(maps), maps, 0).sum(axis=(-1, -2)) / maps.sum(axis=(-1, -2))
    assert np.all(kept > 0.6) and np.all(kept < 0.6 + maps.max() / maps.sum(axis=(-1, -2)).min())


def test_mean_attention_is_one_where_uniform():
    np.testing.assert_allclose(mean_attention(np.full((2, 4, 7, 7), 1 / 49)), 1.0)


@pytest.fixture(scope="module")
def encoded_mni(tmp_path_factory, mni_2mm, default_bundle):
    """The 2 mm template with axial slice 40 copied onto slice 41, encoded by the shipped bundle."""
    data = np.asarray(mni_2mm.dataobj).copy()
    data[:, :, 41] = data[:, :, 40]
    image = reorient(type(mni_2mm)(data, mni_2mm.affine), "LPS")
    volume = load_volume(save(image, tmp_path_factory.mktemp("maps") / "twin.nii.gz"))
    bundle = load_bundle(default_bundle)
    prepared = prepare(volume, bundle.card.preprocessing)
    return volume, prepared, encode_volume(prepared, bundle.load_encoder(), device="cpu")


def test_pca_colours_are_consistent_across_slices(encoded_mni):
    volume, prepared, encoded = encoded_mni
    colors = PcaColors.fit(encoded.patch_tokens, prepared.patch_foreground(encoded.grid))
    rgb = to_volume(prepared.layout, colors.rgb(encoded.patch_tokens), rgb_inside=prepared.foreground)
    assert rgb.dtype == np.uint8 and rgb.shape == (*volume.data.shape, 3)
    twin_a, twin_b = rgb[:, :, 40], rgb[:, :, 41]
    assert twin_a.any()
    np.testing.assert_array_equal(twin_a, twin_b)
    assert not rgb[~prepared.foreground].any()  # background is black
    # Colours vary within the brain (three informative components).
    brain = rgb[prepared.foreground]
    assert all(np.std(brain[:, c]) > 10 for c in range(3))


def test_similarity_peaks_at_the_query(encoded_mni):
    volume, prepared, encoded = encoded_mni
    ijk = (40, 60, 40)  # file (LPS) voxel inside the brain
    query = query_patch(volume, prepared.layout, encoded.grid, ijk)
    similarity = similarity_map(encoded.patch_tokens, query)
    assert similarity[query] == pytest.approx(1.0, abs=1e-3)
    assert similarity.max() <= 1 + 1e-3 and similarity.min() >= -1 - 1e-3
    # The voxel nearest the query patch's centre gets (almost) the patch's own value, 1.
    plane, patch = prepared.plane, prepared.plane.canvas / encoded.grid[0]
    size_x, size_y = plane.slice_shape
    row, col = (query[1] + 0.5) * patch, (query[2] + 0.5) * patch
    y = round(size_y - 1 - ((row - plane.row0) * size_y / plane.rows - 0.5))
    x = round(size_x - 1 - ((col - plane.col0) * size_x / plane.cols - 0.5))
    canonical = to_volume(prepared.layout, similarity)
    assert canonical[x, y, encoded.slices[query[0]]] > 0.8
    # Slice 41 is a copy of slice 40, so the query patch's twin is just as similar.
    assert encoded.slices[query[0]] == 40
    assert similarity[query[0] + 1, query[1], query[2]] == pytest.approx(1.0, abs=1e-3)


def test_to_volume_places_each_patch_on_its_voxels(encoded_mni):
    volume, prepared, encoded = encoded_mni
    maps = np.zeros((len(prepared.slices), *encoded.grid), np.float32)
    position = len(prepared.slices) // 2
    x, y = 45, 60
    z = int(prepared.slices[position])
    ijk = np.linalg.inv(volume.source_affine) @ volume.affine @ [x, y, z, 1]
    _, row, col = query_patch(volume, prepared.layout, encoded.grid, tuple(int(round(c)) for c in ijk[:3]))
    maps[position, row, col] = 1.0
    canonical = to_volume(prepared.layout, maps)
    assert canonical[x, y, z] > 0.5
    # Only voxels within 1.5 patches of the chosen one receive any of its value (bilinear support).
    plane = prepared.plane
    patch_px = plane.canvas / encoded.grid[0]
    voxels_per_px = max(plane.slice_shape[0] / plane.cols, plane.slice_shape[1] / plane.rows)
    touched = np.argwhere(canonical[:, :, z] > 0)
    assert np.abs(touched - [x, y]).max() <= 1.5 * patch_px * voxels_per_px + 1
