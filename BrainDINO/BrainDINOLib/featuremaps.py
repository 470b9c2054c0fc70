"""Attention, PCA and patch-similarity maps from encoded slices, and their way back to voxels.

Maps are computed on the patch grid of each encoded slice, then `to_volume` samples them at
every voxel of the canonical volume through the recorded canvas placement; `Volume.to_source`
then gives the scan's own voxel order.

References: [0] Caron et al., "Emerging Properties in Self-Supervised Vision Transformers"
(DINO, attention maps and the 60 % mass threshold). [1] Oquab et al., "DINOv2" (PCA of patch
features, first component separating foreground).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .errors import BrainDINOError
from .preprocess import PreparedVolume
from .volume import Volume

_CHUNK = 32  # slices resampled at once (bounds memory on large scans)


def mean_attention(attention: np.ndarray) -> np.ndarray:
    """(S, heads, h, w) -> (S, h, w) head-averaged attention scaled so 1.0 means uniform attention."""
    return attention.mean(axis=1) * (attention.shape[-1] * attention.shape[-2])


def attention_mass_threshold(attention: np.ndarray, mass: float = 0.6) -> np.ndarray:
    """Per map, the attention value above which the strongest patches hold ``mass`` of the total (DINO [0]).

    Patches at or above it form the smallest set holding that mass; as one number per slice it
    also outlines the mask on the voxel-resolution map.

    Args:
        attention: (..., h, w) non-negative maps.
        mass: fraction of the total attention kept.

    Returns:
        (...) thresholds.
    """
    if not 0 < mass <= 1:
        raise BrainDINOError(f"attention mass must be in (0, 1], got {mass}")
    flat = np.sort(attention.reshape(*attention.shape[:-2], -1).astype(np.float64), axis=-1)  # ascending
    cumulative = np.cumsum(flat, axis=-1) / np.maximum(flat.sum(axis=-1, keepdims=True), 1e-12)
    first_kept = np.argmax(cumulative > 1 - mass, axis=-1)
    return np.take_along_axis(flat, first_kept[..., None], axis=-1)[..., 0]


def attention_mass_mask(attention: np.ndarray, mass: float = 0.6) -> np.ndarray:
    """(..., h, w) bool: the smallest set of patches holding ``mass`` of each map's attention."""
    return attention >= attention_mass_threshold(attention, mass)[..., None, None]


def patch_foreground(prepared: PreparedVolume, grid: tuple[int, int], min_fraction: float = 0.5) -> np.ndarray:
    """(S, h, w) bool: patches whose canvas area is at least ``min_fraction`` foreground."""
    masks = []
    for start in range(0, len(prepared.slices), _CHUNK):
        chosen = prepared.slices[start : start + _CHUNK]
        foreground = torch.from_numpy(prepared.foreground[:, :, chosen]).permute(2, 0, 1).float()
        canvas = prepared.plane.to_canvas(foreground)[:, None]
        masks.append(F.adaptive_avg_pool2d(canvas, grid)[:, 0] >= min_fraction)
    return torch.cat(masks).numpy()


@dataclass(frozen=True)
class PcaColors:
    """A 3-component PCA of patch tokens fitted once per volume, so colours agree across slices.

    Attributes:
        mean: (D,) token mean over the fitted tokens.
        components: (3, D) principal axes, sign fixed so each axis' largest loading is positive.
        low, high: (3,) 1st and 99th percentiles of the projections, mapped to 0 and 1.
    """

    mean: np.ndarray
    components: np.ndarray
    low: np.ndarray
    high: np.ndarray

    @classmethod
    def fit(cls, tokens: np.ndarray, foreground: np.ndarray, max_tokens: int = 65536) -> PcaColors:
        """Fit on foreground tokens (evenly strided subsample beyond ``max_tokens``; deterministic).

        Args:
            tokens: (S, h, w, D) patch tokens.
            foreground: (S, h, w) bool; all patches are used when none is foreground.
        """
        chosen = tokens[foreground] if foreground.any() else tokens.reshape(-1, tokens.shape[-1])
        chosen = chosen[:: max(1, len(chosen) // max_tokens)].astype(np.float32)
        if len(chosen) < 3:
            raise BrainDINOError("too few foreground patches to fit a PCA colour map")
        mean = chosen.mean(axis=0)
        _, _, axes = np.linalg.svd(chosen - mean, full_matrices=False)
        components = axes[:3]
        signs = np.sign(components[np.arange(len(components)), np.abs(components).argmax(axis=1)])
        components = components * signs[:, None]
        projected = (chosen - mean) @ components.T
        low, high = np.percentile(projected, [1, 99], axis=0)
        return cls(mean, components, low, np.maximum(high, low + 1e-6))

    def rgb(self, tokens: np.ndarray) -> np.ndarray:
        """(..., D) tokens -> (..., 3) colours in [0, 1]."""
        projected = (tokens.astype(np.float32) - self.mean) @ self.components.T
        return np.clip((projected - self.low) / (self.high - self.low), 0, 1)


def similarity_map(tokens: np.ndarray, query: tuple[int, int, int]) -> np.ndarray:
    """Cosine similarity of one patch token to every patch of the volume.

    Args:
        tokens: (S, h, w, D) patch tokens.
        query: (slice position in ``tokens``, row, col) of the query patch.

    Returns:
        (S, h, w) float32 similarities in [-1, 1].
    """
    features = torch.from_numpy(tokens).float()
    features = F.normalize(features, dim=-1)
    return (features @ features[query]).numpy()


def query_patch(
    volume: Volume, prepared: PreparedVolume, grid: tuple[int, int], ijk: tuple[int, int, int]
) -> tuple[int, int, int]:
    """(slice position, row, col) of the patch containing the file's voxel ``ijk``.

    Args:
        grid: (h, w) patch grid of the encoder on the canvas.

    Raises:
        BrainDINOError: if the voxel is outside the volume or on a slice that is not encoded.
    """
    x, y, z = volume.canonical_index(ijk)
    positions = np.flatnonzero(prepared.slices == z)
    if positions.size == 0:
        raise BrainDINOError(
            f"{volume.path}: voxel {tuple(ijk)} lies on axial slice {z}, outside the analysed brain slices "
            f"({prepared.slices[0]}-{prepared.slices[-1]}); pick a voxel inside the brain"
        )
    row, col = prepared.plane.canvas_position(x, y)
    rows, cols = grid
    return (
        int(positions[0]),
        min(int(row * rows / prepared.plane.canvas), rows - 1),
        min(int(col * cols / prepared.plane.canvas), cols - 1),
    )


def to_volume(prepared: PreparedVolume, maps: np.ndarray, *, rgb: bool = False) -> np.ndarray:
    """Sample per-slice patch-grid maps at every voxel of the canonical volume.

    The result is laid out in memory slice by slice (Fortran order for the (X, Y, Z) view), as
    NIfTI stores voxels, so filling it and writing it need no transposing copy.

    Args:
        prepared: gives the canvas placement and which slices the maps belong to.
        maps: (S, h, w) or (S, h, w, C) values on the patch grid of ``prepared.slices``.
        rgb: maps are (S, h, w, 3) colours in [0, 1]; return uint8 colours, black outside the
            foreground.

    Returns:
        (X, Y, Z) or (X, Y, Z, C) float32 (uint8 with ``rgb``); slices that were not encoded are 0.
    """
    channels = maps.shape[3:] if maps.ndim == 4 else ()
    size_x, size_y, size_z = prepared.image.shape
    slab = np.zeros((size_z, size_y, size_x, *channels), dtype=np.uint8 if rgb else np.float32)
    for start in range(0, len(prepared.slices), _CHUNK):
        chosen = prepared.slices[start : start + _CHUNK]
        chunk = torch.from_numpy(np.ascontiguousarray(maps[start : start + _CHUNK])).float()
        chunk = chunk.permute(0, 3, 1, 2) if channels else chunk[:, None]
        sampled = prepared.plane.from_canvas(chunk).transpose(-2, -1)  # contiguous (B, C, Y, X)
        if rgb:
            foreground = torch.from_numpy(prepared.foreground[:, :, chosen]).permute(2, 1, 0)[:, None]
            sampled = sampled.mul_(255).add_(0.5).to(torch.uint8).mul_(foreground)
        slab[chosen] = (sampled.permute(0, 2, 3, 1).contiguous() if channels else sampled[:, 0]).numpy()
    return slab.transpose(2, 1, 0, 3) if channels else slab.transpose(2, 1, 0)
