"""Helpers that build real test scans from the MNI template."""

from __future__ import annotations

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform


def file_hashes(folder) -> dict[str, str]:
    """sha256 of every file under ``folder`` by relative path: equal before and after means nothing changed."""
    import hashlib
    from pathlib import Path

    folder = Path(folder)
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


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


def write_dicom_series(image: nib.Nifti1Image, folder, *, series_number: int = 3) -> list:
    """The image as a single-frame MR DICOM series (int16, one file per K slice, in shuffled file-name order), with
    the attributes a scanner writes; exact geometry: the series reads back as the image voxel for voxel."""
    from pathlib import Path

    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import MRImageStorage, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ image.affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    row_direction, column_direction = lps[:3, 0] / spacing[0], lps[:3, 1] / spacing[1]
    data = np.rint(np.asarray(image.dataobj, dtype=np.float64)).astype(np.int16)
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    order = np.random.default_rng(0).permutation(data.shape[2])  # file names do not give the slice order
    paths = []
    for k in range(data.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MRImageStorage, generate_uid()
        meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
        path = folder / f"IM{order[k]:04d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_reference
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^Heldout", "PHANTOM01", "", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", ""
        ds.ReferringPhysicianName, ds.Manufacturer, ds.Modality = "", "Phantom", "MR"
        ds.SeriesNumber, ds.InstanceNumber, ds.SeriesDescription = series_number, k + 1, "FLAIR"
        ds.PositionReferenceIndicator = ""
        ds.ImagePositionPatient = [float(c) for c in lps[:3, 3] + k * lps[:3, 2]]
        ds.ImageOrientationPatient = [float(c) for c in (*row_direction, *column_direction)]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]  # row spacing (between rows), column spacing
        ds.SliceThickness = float(spacing[2])
        ds.Rows, ds.Columns = data.shape[1], data.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = np.ascontiguousarray(data[:, :, k].T).tobytes()
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
