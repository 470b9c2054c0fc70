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
