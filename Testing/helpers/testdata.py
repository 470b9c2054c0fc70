"""Helpers that build real test scans from the MNI template."""

from __future__ import annotations

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform


def reorient(image: nib.Nifti1Image, axcodes: str, dtype=None) -> nib.Nifti1Image:
    """The same anatomy stored in another voxel order (world geometry unchanged)."""
    data = np.asarray(image.dataobj)
    transform = ornt_transform(axcodes2ornt(nib.aff2axcodes(image.affine)), axcodes2ornt(tuple(axcodes)))
    new_data = apply_orientation(data, transform)
    new_affine = image.affine @ inv_ornt_aff(transform, data.shape)
    out = nib.Nifti1Image(np.ascontiguousarray(new_data).astype(dtype or data.dtype), new_affine)
    out.set_qform(new_affine, code=1)
    out.set_sform(new_affine, code=1)
    return out


def save(image: nib.Nifti1Image, path) -> str:
    nib.save(image, path)
    return str(path)


def non_head_volumes(folder) -> dict[str, str]:
    """Volumes that are not head MRI, saved as NIfTI as a user might load them: a stack of photographs, a
    terrain map (a digital elevation model) stacked with drift, and uniform noise; all from files that ship
    with matplotlib."""
    from pathlib import Path

    import matplotlib.image as mpimg
    from matplotlib import cbook
    from scipy import ndimage

    folder = Path(folder)
    photo = mpimg.imread(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).astype(np.float32).mean(axis=2)
    photo = ndimage.zoom(photo, 0.4)[::-1].T  # (x, y), upright in RAS
    photos = np.stack([np.roll(photo, 3 * i, axis=0) for i in range(24)], axis=2)
    elevation = cbook.get_sample_data("jacksboro_fault_dem.npz")["elevation"].astype(np.float32)
    elevation = ndimage.zoom(elevation, 0.6)
    terrain = np.stack([np.roll(elevation, (2 * i, i), axis=(0, 1)) for i in range(30)], axis=2)
    noise = np.random.default_rng(0).uniform(0, 1000, (160, 160, 40)).astype(np.float32)
    paths = {}
    for name, data, spacing in (("photos", photos, 1.0), ("terrain", terrain, 2.0), ("noise", noise, 1.0)):
        affine = np.diag([spacing, spacing, 3.0, 1.0])
        paths[name] = save(nib.Nifti1Image(data - data.min(), affine), folder / f"{name}.nii.gz")
    return paths
