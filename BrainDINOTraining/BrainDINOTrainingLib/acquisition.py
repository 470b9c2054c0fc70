"""How a phantom is scanned: resolution, slice thickness, field of view, artefacts, storage order.

`acquire` turns an image on the phantom's base grid (RAS voxel order, isotropic) into what a
scanner would store:

1. resolution: the slice profile (a Gaussian whose FWHM is the slice thickness) blurs through the
   plane, the in-plane point-spread function blurs when the in-plane voxels are coarser, then the
   image is sampled on the acquisition grid (thick slices: 1-7 mm; in-plane 0.5-1.5 mm);
2. field of view: a box around the head, sometimes cutting the nose, neck or scalp (steps 1 and 2
   are one resampling onto the acquisition grid);
3. k-space: periodic motion during the scan (ghosts along the phase-encoding direction) and a
   truncated k-space (Gibbs ringing at sharp edges such as the skull), then complex Gaussian
   noise, whose magnitude is Rician;
4. storage: the voxel axes permuted and flipped into the acquisition's on-disk orientation.

Label maps go through steps 1 (nearest neighbour), 2 and 4 only, so they stay on the image's grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np
import torch
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform
from scipy import ndimage

ORIENTATIONS = {"axial": ("RAS", "LPS", "LAS"), "sagittal": ("PIR", "ASR"), "coronal": ("RSA", "LSP")}
SLICE_AXIS = {"axial": 2, "sagittal": 0, "coronal": 1}


@dataclass(frozen=True)
class Acquisition:
    """One subject's scanning geometry, shared by all its images so that they share a voxel grid.

    Attributes:
        plane: ``axial``, ``sagittal`` or ``coronal`` (the slice plane).
        orientation: on-disk axis codes, e.g. ``LPS``.
        in_plane_mm: voxel size within a slice.
        thickness_mm: slice thickness (= slice spacing; no gap).
        fov_mm: per RAS axis, the (low, high) world coordinates kept.
    """

    plane: str
    orientation: str
    in_plane_mm: float
    thickness_mm: float
    fov_mm: tuple[tuple[float, float], tuple[float, float], tuple[float, float]]

    @property
    def spacing_mm(self) -> np.ndarray:
        """(3,) voxel size along R, A, S: ``in_plane_mm`` within the slice plane, ``thickness_mm`` across it."""
        spacing = np.full(3, self.in_plane_mm)
        spacing[SLICE_AXIS[self.plane]] = self.thickness_mm
        return spacing


@dataclass(frozen=True)
class Artefacts:
    """What degrades one image of an acquisition.

    Attributes:
        noise: standard deviation of the complex noise (image intensities are about 0-1).
        kspace_fraction: fraction of k-space kept along each in-plane axis (1: no ringing).
        ghost_voxels: amplitude of the periodic motion along the phase axis, in voxels (0: none).
        ghost_period: period of that motion, in phase-encoding lines.
        phase_axis: 0 or 1, which in-plane axis is phase-encoded.
    """

    noise: float
    kspace_fraction: float = 1.0
    ghost_voxels: float = 0.0
    ghost_period: float = 8.0
    phase_axis: int = 0


def plan_acquisition(rng: np.random.Generator, brain_box: np.ndarray, base_mm: float) -> Acquisition:
    """Draw a clinical-looking acquisition: mostly axial, 2D thick slices or 3D near-isotropic.

    Args:
        brain_box: (2, 3) RAS world bounds (low, high) of the brain in mm.
        base_mm: voxel size of the phantom's base grid (the finest resolution it can show).
    """
    plane = str(rng.choice(["axial", "axial", "axial", "sagittal", "coronal"]))
    orientation = str(rng.choice(ORIENTATIONS[plane]))
    if rng.random() < 0.4:  # 3D sequence: near-isotropic voxels
        thickness = float(rng.choice([1.0, 1.0, 1.2, 1.5]))
        in_plane = float(rng.choice([0.9, 1.0, 1.0, 1.2]))
    else:  # 2D sequence: fine in-plane, thick slices
        thickness = float(rng.choice([2.0, 3.0, 4.0, 5.0, 5.0, 6.0, 6.5, 7.0] if plane == "axial" else [2.0, 3.0, 4.0]))
        in_plane = float(rng.choice([0.5, 0.6, 0.7, 0.9, 1.0, 1.2, 1.5]))
    in_plane = max(in_plane, base_mm / 2)
    thickness = max(thickness, base_mm)
    low, high = brain_box
    centre = (low + high) / 2 + rng.uniform(-8, 8, 3)
    half = np.maximum(rng.uniform(90, 130, 3), (high - low) / 2 + rng.uniform(-2, 12, 3))
    fov = np.stack([centre - half, centre + half])
    axis = SLICE_AXIS[plane]
    if plane == "axial":  # slab from somewhere in the neck or skull base up to, or just past, the vertex
        fov[:, 2] = (low[2] - rng.uniform(-6, 60), high[2] + rng.uniform(-3, 22))
    else:
        fov[:, axis] = (low[axis] - rng.uniform(-2, 25), high[axis] + rng.uniform(-2, 25))
    return Acquisition(plane, orientation, in_plane, thickness, tuple(map(tuple, fov.T.round(1))))


def draw_artefacts(rng: np.random.Generator) -> Artefacts:
    """Noise always; Gibbs ringing in half the images; motion ghosts in a fifth."""
    return Artefacts(
        noise=float(rng.uniform(0.008, 0.04)),
        kspace_fraction=float(rng.uniform(0.7, 0.95)) if rng.random() < 0.5 else 1.0,
        ghost_voxels=float(rng.uniform(0.5, 2.5)) if rng.random() < 0.2 else 0.0,
        ghost_period=float(rng.uniform(5, 16)),
        phase_axis=int(rng.integers(2)),
    )


def acquire(
    volume: np.ndarray,
    affine: np.ndarray,
    acquisition: Acquisition,
    *,
    labels: bool = False,
    artefacts: Artefacts | None = None,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Scan ``volume`` (RAS voxel order, isotropic, diagonal ``affine``) with ``acquisition``.

    Returns:
        (stored array, its affine).

    Args:
        labels: nearest-neighbour sampling, no blur and no artefacts (masks, label maps).
        artefacts, rng: k-space artefacts and noise for images (None: a noiseless image).
    """
    mm = float(np.linalg.norm(affine[:3, 0]))
    axis = SLICE_AXIS[acquisition.plane]
    target = acquisition.spacing_mm
    # The acquisition grid: the field of view (within the base grid) sampled at the target spacing.
    origin = affine[:3, 3]
    extent = np.stack([origin - mm / 2, origin + (np.array(volume.shape) - 0.5) * mm])
    low, high = np.clip(np.array(acquisition.fov_mm).T, extent[0], extent[1])
    shape = np.maximum(np.floor((high - low) / target), 1).astype(int)
    first = low + (high - low - shape * target) / 2 + target / 2  # world position of the first voxel centre
    step, start = target / mm, (first - origin) / mm  # in base voxels
    if labels:
        sampled = _sample(volume, start, step, shape, nearest=True)
    else:
        sigma = np.where(step > 1, step / 2.355, 0)  # slice profile / PSF: FWHM = the voxel size
        sampled = _sample(ndimage.gaussian_filter(volume, sigma), start, step, shape, nearest=False)
    grid_affine = np.diag([*target, 1.0])
    grid_affine[:3, 3] = first

    if artefacts is not None and not labels:
        in_plane = tuple(a for a in range(3) if a != axis)
        sampled = _kspace(sampled, in_plane, artefacts, rng or np.random.default_rng(0))

    transform = ornt_transform(axcodes2ornt(nib.aff2axcodes(grid_affine)), axcodes2ornt(tuple(acquisition.orientation)))
    stored = apply_orientation(sampled, transform)
    return np.ascontiguousarray(stored), grid_affine @ inv_ornt_aff(transform, sampled.shape)


def _sample(volume: np.ndarray, start: np.ndarray, step: np.ndarray, shape: np.ndarray, *, nearest: bool):
    """``volume`` at voxel positions ``start + i * step`` along each axis (zero outside), one axis at a time.

    The grid is axis-aligned, so sampling is separable: three 1-D passes instead of a 3-D
    interpolation, the most shrinking axis first.
    """
    out = volume
    for axis in np.argsort(-step, kind="stable"):
        padded = np.pad(out, [(1, 1) if a == axis else (0, 0) for a in range(3)])  # zeros outside
        positions = np.clip(start[axis] + step[axis] * np.arange(shape[axis]) + 1, 0, padded.shape[axis] - 1)
        if nearest:
            out = np.take(padded, np.floor(positions + 0.5).astype(int), axis=axis)
            continue
        low = np.minimum(np.floor(positions).astype(int), padded.shape[axis] - 2)
        weight = (positions - low).astype(np.float32).reshape([-1 if a == axis else 1 for a in range(3)])
        out = np.take(padded, low, axis=axis) * (1 - weight) + np.take(padded, low + 1, axis=axis) * weight
    return out


def _kspace(image: np.ndarray, axes: tuple[int, int], artefacts: Artefacts, rng: np.random.Generator) -> np.ndarray:
    """Motion ghosts, k-space truncation and complex noise, applied slice by slice in the plane ``axes``."""
    spectrum = torch.fft.fftn(torch.from_numpy(np.asarray(image, np.float32)), dim=axes)
    if artefacts.ghost_voxels:
        phase_axis = axes[artefacts.phase_axis]
        size = image.shape[phase_axis]
        lines = torch.fft.fftfreq(size, dtype=torch.float64) * size
        shift = artefacts.ghost_voxels * torch.sin(
            2 * np.pi * lines / artefacts.ghost_period + rng.uniform(0, 2 * np.pi)
        )
        ramp = torch.polar(torch.ones(size, dtype=torch.float64), -2 * np.pi * lines * shift / size).to(spectrum.dtype)
        spectrum *= ramp.reshape([-1 if a == phase_axis else 1 for a in range(image.ndim)])
    if artefacts.kspace_fraction < 1:
        for a in axes:
            keep = torch.fft.fftfreq(image.shape[a]).abs() <= artefacts.kspace_fraction / 2
            spectrum *= keep.reshape([-1 if b == a else 1 for b in range(image.ndim)])
    complex_image = torch.fft.ifftn(spectrum, dim=axes)
    real, imaginary = (torch.from_numpy(rng.standard_normal(image.shape, dtype=np.float32)) for _ in range(2))
    real = complex_image.real + artefacts.noise * real
    imaginary = complex_image.imag + artefacts.noise * imaginary
    return torch.sqrt(real**2 + imaginary**2).numpy()
