"""Attention masks, PCA colours, similarity maps and their mapping back to voxels."""

from __future__ import annotations

import numpy as np
import pytest

from BrainDINOLib.bundle import load_bundle
from BrainDINOLib.engine import encode_volume
from BrainDINOLib.errors import BrainDINOError
from BrainDINOLib.featuremaps import (
    TokenMaps,
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


def _maps(prepared, encoded, tokens=None) -> TokenMaps:
    """The run's `TokenMaps` as `infer` builds them (the last block only)."""
    return TokenMaps(
        layout=prepared.layout,
        cls=encoded.cls,
        blocks={0: encoded.patch_tokens if tokens is None else tokens},
        kept=(0,),
        attention=encoded.attention,
        foreground=prepared.foreground,
        foreground_patches=prepared.patch_foreground(encoded.grid),
        masked=False,
        model="test",
    )


def test_pca_colours_are_one_volume_level_fit(encoded_mni):
    """One PCA fitted on the foreground patches of every slice colours every slice: a slice's colours equal that
    fit's, and they change when the other slices change the fit."""
    volume, prepared, encoded = encoded_mni
    rgb = _maps(prepared, encoded).pca()
    assert rgb.dtype == np.uint8 and rgb.shape == (*volume.data.shape, 3)
    foreground = prepared.patch_foreground(encoded.grid)
    chosen = encoded.patch_tokens[foreground].astype(np.float32)
    mean = chosen.mean(axis=0)
    axes = np.linalg.svd(chosen - mean, full_matrices=False)[2][:3]
    axes *= np.sign(axes[np.arange(3), np.abs(axes).argmax(axis=1)])[:, None]
    low, high = np.percentile((chosen - mean) @ axes.T, [1, 99], axis=0)
    by_hand = np.clip(((encoded.patch_tokens.astype(np.float32) - mean) @ axes.T - low) / (high - low), 0, 1)
    expected = to_volume(prepared.layout, by_hand, rgb_inside=prepared.foreground)
    assert np.abs(rgb.astype(int) - expected).max() <= 1  # rounding
    assert not rgb[~prepared.foreground].any()  # background is black
    brain = rgb[prepared.foreground]
    assert all(np.std(brain[:, c]) > 10 for c in range(3))  # three informative components
    # Other slices' tokens changed (the upper half reversed along the patch rows): slice 40 is the same, its
    # colours are not, because the fit is the volume's.
    tokens = encoded.patch_tokens.copy()
    upper = len(tokens) // 2 + 10
    tokens[upper:] = tokens[upper:, ::-1] * 1.5
    assert encoded.slices[upper] > 41
    refit = _maps(prepared, encoded, tokens).pca()
    assert np.abs(refit[:, :, 40].astype(int) - rgb[:, :, 40]).max() > 20


def test_similarity_peaks_at_a_planted_patch(encoded_mni):
    """A token planted at one patch and at a second, far patch: the query at the first voxel finds its patch by
    the geometry worked out here by hand, and the similarity map's peak away from the query is the twin."""
    volume, prepared, encoded = encoded_mni
    ijk = (40, 60, 40)  # file (LPS) voxel inside the brain
    x, y, z = volume.canonical_index(ijk)
    plane, (rows, cols) = prepared.plane, encoded.grid
    size_x, size_y = plane.slice_shape
    row = plane.row0 + (size_y - 1 - y + 0.5) * plane.rows / size_y  # canvas pixel of the voxel's centre
    col = plane.col0 + (size_x - 1 - x + 0.5) * plane.cols / size_x
    position = int(np.flatnonzero(prepared.slices == z)[0])
    expected = (position, int(row * rows / plane.canvas), int(col * cols / plane.canvas))
    query = query_patch(volume, prepared.layout, encoded.grid, ijk)
    assert query == expected
    tokens = encoded.patch_tokens.astype(np.float32)
    planted = np.random.default_rng(0).normal(size=tokens.shape[-1]).astype(np.float32) * 50
    twin = (position + 5, 2, cols - 3)
    tokens[query] = tokens[twin] = planted
    similarity = similarity_map(tokens, query)
    assert similarity.max() <= 1 + 1e-3 and similarity.min() >= -1 - 1e-3
    similarity[query] = -1
    assert np.unravel_index(similarity.argmax(), similarity.shape) == twin
    # Slice 41 is a copy of slice 40: the unplanted tokens there match, patch for patch.
    original = similarity_map(encoded.patch_tokens, query)
    assert encoded.slices[position] == 40 and original[query[0] + 1, query[1], query[2]] == pytest.approx(1, abs=1e-3)


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
