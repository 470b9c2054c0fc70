"""Reading scans into RAS+ canonical `Volume`s and writing results back in the scan's own geometry.

Every scan is reduced to one representation: a float32 voxel array in the file's own voxel
order plus its voxel -> RAS (mm) affine. That array is then permuted/flipped (never resampled)
to the closest RAS+ orientation, so axial slices are the last axis. Outputs go through the
inverse permutation, so output voxel ``[i, j, k]`` belongs to input voxel ``[i, j, k]``.

NIfTI/MGZ are read with nibabel; NRRD/NHDR/MHA/MHD and DICOM series folders with SimpleITK, each inside
`diagnose.LibraryOutput`, so that what a library says about a bad file becomes our one line or a warning.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

from .diagnose import (
    LibraryOutput,
    check_text_header,
    dicom_file_problem,
    failed_silently,
    library_problem,
    repairs,
    text_header_problem,
)
from .errors import BrainDINOError

#: Largest number of voxels accepted (2**30 = 4 GiB as float32); checked from the header,
#: before any voxel memory is allocated.
MAX_VOXELS = 2**30

NIBABEL_SUFFIXES = (".nii", ".nii.gz", ".mgz", ".mgh")
SIMPLEITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
IMAGE_SUFFIXES = NIBABEL_SUFFIXES + SIMPLEITK_SUFFIXES
#: Files that never hold DICOM (a folder of only these and images is not probed for series).
NOT_DICOM_SUFFIXES = (".csv", ".tsv", ".json", ".txt", ".md", ".png", ".jpg", ".jpeg", ".pdf", ".html", ".safetensors")
DICOM_SUFFIXES = (".dcm", ".ima", ".dicom")
_RAS = axcodes2ornt(("R", "A", "S"))
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class Volume:
    """A 3D scan in RAS+ canonical voxel order, with what is needed to write outputs back.

    Attributes:
        data: (X, Y, Z) float32 intensities; X runs to the patient's Right, Y Anterior, Z
            Superior; axial slices are ``data[:, :, z]``.
        affine: (4, 4) canonical voxel -> RAS mm.
        source_affine: (4, 4) voxel -> RAS mm of the file's own voxel grid.
        source_shape: the file's own (I, J, K).
        path: where it was read from.
        warnings: problems that were handled (e.g. NaN voxels) and should be reported.
    """

    data: np.ndarray
    affine: np.ndarray
    source_affine: np.ndarray
    source_shape: tuple[int, int, int]
    path: str
    warnings: tuple[str, ...] = field(default=())

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the canonical X, Y, Z axes."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def source_axcodes(self) -> tuple[str, str, str]:
        return nib.aff2axcodes(self.source_affine)

    def _to_source_ornt(self) -> np.ndarray:
        return ornt_transform(_RAS, io_orientation(self.source_affine))

    def to_source(self, array: np.ndarray) -> np.ndarray:
        """Reorder a canonical (X, Y, Z, ...) array into the file's voxel order (I, J, K, ...)."""
        if array.shape[:3] != self.data.shape:
            raise ValueError(f"array shape {array.shape[:3]} does not match volume {self.data.shape}")
        return apply_orientation(array, self._to_source_ornt())

    def canonical_index(self, ijk: tuple[int, int, int]) -> tuple[int, int, int]:
        """Canonical (x, y, z) of the file's voxel (i, j, k).

        Raises:
            BrainDINOError: if the voxel lies outside the volume.
        """
        if any(not 0 <= c < s for c, s in zip(ijk, self.source_shape, strict=True)):
            raise BrainDINOError(
                f"{self.path}: voxel {tuple(ijk)} lies outside the volume of shape {self.source_shape}"
            )
        source_to_canonical = np.linalg.inv(self.affine) @ self.source_affine
        xyz = source_to_canonical @ np.array([*ijk, 1.0])
        return tuple(int(round(c)) for c in xyz[:3])


def load_volume(
    path: str | Path, *, volume_index: int | None = None, dicom_series: str | None = None, allow_constant: bool = False
) -> Volume:
    """Read a 3D scan (NIfTI, MGZ, NRRD, MHA, or a DICOM series folder) as a canonical `Volume`.

    Args:
        path: image file or a folder holding one DICOM series.
        volume_index: which volume of a 4D image to use (required for 4D images).
        dicom_series: SeriesInstanceUID to read when a folder holds several series.
        allow_constant: accept a constant image (an empty label mask is one).

    Raises:
        BrainDINOError: one line naming the file and the problem (missing, corrupt, not an image,
            2D, 4D without ``volume_index``, colour, absurd header, constant intensities).
    """
    path = Path(path)
    if not path.exists():
        raise BrainDINOError(f"{path}: no such file or folder")
    if path.is_file() and path.stat().st_size == 0:
        raise BrainDINOError(f"{path}: an empty file (0 bytes)")
    if path.is_dir():
        array, affine, said = _read_dicom_series(path, dicom_series)
    elif path.name.lower().endswith(NIBABEL_SUFFIXES):
        array, affine, said = _read_nibabel(path, volume_index)
    elif path.name.lower().endswith(SIMPLEITK_SUFFIXES):
        array, affine, said = _read_simpleitk(path, volume_index)
    else:
        known = ", ".join(IMAGE_SUFFIXES)
        raise BrainDINOError(f"{path}: not a recognised image file (expected {known} or a DICOM folder)")
    return volume_from_array(array, affine, str(path), allow_constant=allow_constant, notes=repairs(said))


def is_single_scan(inputs: Sequence[Path]) -> bool:
    """One image file, or one folder of DICOM files (no subfolders, no image files): ``infer`` as for one scan."""
    if len(inputs) != 1:
        return False
    path = inputs[0]
    if path.is_file():
        return path.name.lower().endswith(IMAGE_SUFFIXES)
    if not path.is_dir():
        return False
    entries = [p for p in path.iterdir() if not p.name.startswith(".")]
    return not any(p.is_dir() or p.name.lower().endswith(IMAGE_SUFFIXES) for p in entries) and any(
        not p.name.lower().endswith(NOT_DICOM_SUFFIXES) for p in entries
    )


def load_labels(path: str | Path, like: Volume) -> np.ndarray:
    """A label mask (e.g. BraTS segmentation) as (X, Y, Z) int16 in ``like``'s canonical grid.

    Raises:
        BrainDINOError: unreadable, or not on the same voxel grid as ``like``.
    """
    labels = load_volume(path, allow_constant=True)
    if labels.data.shape != like.data.shape or not np.allclose(labels.affine, like.affine, atol=1e-3):
        raise BrainDINOError(
            f"{path}: the mask is not on the voxel grid of {like.path}; resample it to the image first"
        )
    return np.rint(labels.data).astype(np.int16)


def _check_shape(path: Path, shape: tuple[int, ...], volume_index: int | None) -> tuple[int, ...]:
    """Validate a header's shape before reading voxels; return the 3D shape that will be read."""
    shape = tuple(int(s) for s in shape)
    if any(s <= 0 for s in shape):
        raise BrainDINOError(f"{path}: header gives an invalid image size {shape}")
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) < 3 or min(shape[:3]) == 1:
        raise BrainDINOError(f"{path}: a 2D image of size {shape}; BrainDINO needs a 3D volume")
    if len(shape) > 4:
        raise BrainDINOError(f"{path}: a {len(shape)}D image of size {shape} is not supported (need a 3D volume)")
    if len(shape) == 3 and volume_index not in (None, 0):
        raise BrainDINOError(f"{path}: --volume {volume_index} out of range (a 3D image: one volume, number 0)")
    if len(shape) == 4:
        if volume_index is None:
            raise BrainDINOError(
                f"{path}: a 4D image with {shape[3]} volumes; choose one with --volume N (0 to {shape[3] - 1})"
            )
        if not 0 <= volume_index < shape[3]:
            raise BrainDINOError(f"{path}: --volume {volume_index} out of range (0 to {shape[3] - 1})")
    n_voxels = int(np.prod(shape[:3], dtype=np.int64))
    if n_voxels > MAX_VOXELS:
        raise BrainDINOError(
            f"{path}: header claims {shape[:3]} = {n_voxels:,} voxels, over the limit of {MAX_VOXELS:,}; "
            "the header is corrupt or the image is far larger than a brain MRI"
        )
    return shape


def _read_nibabel(path: Path, volume_index: int | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(voxels, affine, what nibabel said while reading)."""
    header = LibraryOutput()
    try:
        with header:
            image = nib.load(path)
            affine = np.asarray(image.affine, dtype=np.float64)
    except Exception as error:  # nibabel raises many types for bad headers
        raise BrainDINOError(
            f"{path}: cannot read the image header ({library_problem(path, error, header.lines)})"
        ) from error
    if image.get_data_dtype().names is not None:
        raise BrainDINOError(f"{path}: a colour (RGB) image; BrainDINO needs a greyscale MRI volume")
    shape = _check_shape(path, image.shape, volume_index)
    voxels = LibraryOutput()
    try:
        with voxels:
            array = _nibabel_voxels(image, shape, volume_index)
    except Exception as error:  # truncated gzip, short file, corrupt data
        raise BrainDINOError(
            f"{path}: cannot read the voxel data, the file is truncated or corrupt "
            f"({library_problem(path, error, voxels.lines)})"
        ) from error
    return array, affine, header.lines + voxels.lines


def _nibabel_voxels(image, shape: tuple[int, ...], volume_index: int | None) -> np.ndarray:
    if len(image.shape) > 3:
        # Squeeze trailing singleton dims, then pick the requested volume without loading the rest.
        chosen = (volume_index,) if len(shape) == 4 else ()
        index = (slice(None),) * 3 + chosen + (0,) * (len(image.shape) - len(shape))
        return np.asarray(image.dataobj[index], dtype=np.float32)
    return np.asarray(image.dataobj, dtype=np.float32)


def _sitk_affine(image) -> np.ndarray:
    """voxel (x, y, z index) -> RAS mm, from SimpleITK's LPS origin/spacing/direction."""
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.asarray(image.GetSpacing(), dtype=np.float64)
    lps[:3, 3] = image.GetOrigin()
    return _LPS_TO_RAS @ lps


def _read_simpleitk(path: Path, volume_index: int | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(voxels, affine, what ITK said while reading)."""
    import SimpleITK as sitk

    check_text_header(path, lambda shape: _check_shape(path, shape, volume_index))
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    header = LibraryOutput()
    try:
        with header:
            reader.ReadImageInformation()
    except RuntimeError as error:
        problem = text_header_problem(path, failed=True) or library_problem(path, error, header.lines)
        raise BrainDINOError(f"{path}: cannot read the image header ({problem})") from error
    if reader.GetNumberOfComponents() != 1:
        raise BrainDINOError(
            f"{path}: {reader.GetNumberOfComponents()} components per voxel (colour or vector image); "
            "BrainDINO needs a greyscale MRI volume"
        )
    size = list(reader.GetSize())
    shape = _check_shape(path, size, volume_index)
    if len(size) > 3:  # read only the chosen 3D volume (extent 0 drops a dimension)
        reader.SetExtractSize(size[:3] + [0] * (len(size) - 3))
        reader.SetExtractIndex([0, 0, 0] + [volume_index if len(shape) == 4 else 0] + [0] * (len(size) - 4))
    voxels = LibraryOutput()
    try:
        with voxels:
            image = reader.Execute()
    except RuntimeError as error:
        raise BrainDINOError(
            f"{path}: cannot read the voxel data, the file is truncated or corrupt "
            f"({library_problem(path, error, voxels.lines)})"
        ) from error
    if failed_silently(voxels.lines):
        raise BrainDINOError(f"{path}: cannot read the voxel data ({library_problem(path, '', voxels.lines)})")
    array = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
    return np.ascontiguousarray(array.transpose(2, 1, 0)), _sitk_affine(image), header.lines + voxels.lines


def dicom_series_in(folder: str | Path) -> list[str]:
    """SeriesInstanceUIDs of the DICOM series whose files lie directly in ``folder``."""
    import SimpleITK as sitk

    said = LibraryOutput()
    try:
        with said:  # GDCM warns on stderr when there is none
            return list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    except RuntimeError as error:  # a file with impossible values stops GDCM's whole scan
        raise BrainDINOError(
            f"{folder}: cannot list its DICOM series ({library_problem(folder, error, said.lines)})"
        ) from error


def unreadable_dicom(folder: Path, files: list[str]) -> str:
    """The one line for a folder of files where no DICOM series can be read: the first file and its problem."""
    others = f" (and {len(files) - 1} other files)" if len(files) > 1 else ""
    first = folder / files[0]
    problem = dicom_file_problem(first) or "a DICOM file without a readable image series (no series UID or pixel data)"
    return f"{first}: {problem}{others}"


def dicom_series_files(folder: str | Path, series_uid: str | None = None) -> tuple[str, list[str]]:
    """(series UID, its files in slice order) of a DICOM folder's series: the order of the volume's K axis.

    Raises:
        BrainDINOError: no series there, several and none chosen, or not the chosen one.
    """
    import SimpleITK as sitk

    folder = Path(folder)
    series = dicom_series_in(folder)
    if not series:
        candidates = (p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        files = sorted(n for n in candidates if not n.lower().endswith(NOT_DICOM_SUFFIXES + IMAGE_SUFFIXES))
        if files:
            raise BrainDINOError(unreadable_dicom(folder, files))
        raise BrainDINOError(f"{folder}: a folder without DICOM series (pass an image file or a DICOM series folder)")
    if series_uid is None:
        if len(series) > 1:
            raise BrainDINOError(
                f"{folder}: holds {len(series)} DICOM series; choose one with --dicom-series {{{', '.join(series)}}}"
            )
        series_uid = series[0]
    elif series_uid not in series:
        raise BrainDINOError(f"{folder}: no DICOM series {series_uid} (found {', '.join(series)})")
    with LibraryOutput():
        return series_uid, list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_uid))


def _read_dicom_series(folder: Path, series_uid: str | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(voxels, affine, what GDCM and ITK said while reading)."""
    import SimpleITK as sitk

    series_uid, files = dicom_series_files(folder, series_uid)
    first = sitk.ImageFileReader()
    first.SetFileName(files[0])
    header = LibraryOutput()
    try:
        with header:
            first.ReadImageInformation()
    except RuntimeError as error:
        problem = dicom_file_problem(Path(files[0])) or library_problem(files[0], error, header.lines)
        raise BrainDINOError(f"{files[0]}: cannot read the DICOM header ({problem})") from error
    size = first.GetSize()
    frames = size[2] if len(size) == 3 else 1  # enhanced (multi-frame) DICOM holds the volume in one file
    _check_shape(folder, (size[0], size[1], len(files) * frames), None)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    voxels = LibraryOutput()
    try:
        with voxels:
            image = reader.Execute()
    except RuntimeError as error:
        problem = _odd_series_file(files) or library_problem(folder, error, voxels.lines)
        raise BrainDINOError(f"{folder}: cannot read the DICOM series ({problem})") from error
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise BrainDINOError(f"{folder}: a colour DICOM series; BrainDINO needs a greyscale MRI volume")
    array = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
    return np.ascontiguousarray(array.transpose(2, 1, 0)), _sitk_affine(image), header.lines + voxels.lines


def _odd_series_file(files: list[str]) -> str | None:
    """'file: problem' for the first file of a series that cannot be read or whose image differs from the first's
    (read only when the series failed: the reason a whole-series read gives is rarely about one file)."""
    import SimpleITK as sitk

    first = None
    for file in files:
        reader = sitk.ImageFileReader()
        reader.SetFileName(file)
        said = LibraryOutput()
        try:
            with said:
                reader.ReadImageInformation()
        except RuntimeError as error:
            return f"{Path(file).name}: {dicom_file_problem(Path(file)) or library_problem(file, error, said.lines)}"
        image = "x".join(str(s) for s in reader.GetSize()[:2]), sitk.GetPixelIDValueAsString(reader.GetPixelID())
        if first is None:
            first = image
        elif image != first:
            return f"{Path(file).name}: a {image[0]} {image[1]} image in a series of {first[0]} {first[1]} images"
    return None


def volume_from_array(
    array: np.ndarray, affine: np.ndarray, path: str, *, allow_constant: bool = False, notes: Sequence[str] = ()
) -> Volume:
    """A canonical `Volume` from voxels in their own (I, J, K) order and their voxel -> RAS affine.

    Args:
        array: (I, J, K) intensities.
        affine: (4, 4) voxel -> RAS mm.
        path: names the source in messages and outputs (a file, or a Slicer node's name).
        notes: warnings from reading it (header repairs), kept in the volume's ``warnings``.

    Raises:
        BrainDINOError: degenerate affine, only NaN/Inf voxels, or constant intensities.
    """
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise BrainDINOError(f"{path}: the header's voxel-to-world matrix is degenerate (zero or non-finite spacing)")
    warnings = list(notes)
    finite = np.isfinite(array)
    if not finite.all():
        n_bad = int(array.size - np.count_nonzero(finite))
        if n_bad == array.size:
            raise BrainDINOError(f"{path}: every voxel is NaN or infinite")
        array = np.where(finite, array, 0.0).astype(np.float32)
        warnings.append(f"{n_bad:,} NaN/Inf voxels were set to 0")
    low, high = float(array.min()), float(array.max())
    if low == high and not allow_constant:
        raise BrainDINOError(f"{path}: a constant image (every voxel is {low:g}); nothing to analyse")
    orientation = io_orientation(affine)
    if np.isnan(orientation).any():  # two voxel axes run along one world axis
        raise BrainDINOError(f"{path}: the header's voxel-to-world matrix is too skewed to tell the scan's axes apart")
    to_canonical = ornt_transform(orientation, _RAS)
    data = np.ascontiguousarray(apply_orientation(array, to_canonical), dtype=np.float32)
    canonical_affine = affine @ nib.orientations.inv_ornt_aff(to_canonical, array.shape)
    return Volume(
        data=data,
        affine=canonical_affine,
        source_affine=affine,
        source_shape=tuple(int(s) for s in array.shape),
        path=str(path),
        warnings=tuple(warnings),
    )


def save_like(volume: Volume, array: np.ndarray, path: str | Path) -> Path:
    """Write a canonical-space array as NIfTI in the source file's own voxel grid and affine.

    Args:
        volume: the volume the array was computed from.
        array: (X, Y, Z) scalar map, or (X, Y, Z, 3) uint8 RGB (stored as NIfTI RGB24, which
            3D Slicer and ITK read as a colour vector volume). Float maps are stored as int16 with
            NIfTI scaling (error <= max|value| / 32767; half the size, twice as fast to write);
            every NIfTI reader returns them as floats.
        path: output file (``.nii.gz``).
    """
    path = Path(path)
    data = volume.to_source(array)
    if data.ndim == 4:
        if data.shape[3] != 3 or data.dtype != np.uint8:
            raise ValueError("4D outputs must be (X, Y, Z, 3) uint8 RGB")
        rgb = np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])
        data = data.view(rgb)[..., 0]  # the colour axis is contiguous: each voxel becomes one RGB24 value
    image = nib.Nifti1Image(data, volume.source_affine)
    if data.dtype.kind == "f":
        image.set_data_dtype(np.int16)
    image.set_qform(volume.source_affine, code=1)
    image.set_sform(volume.source_affine, code=1)
    nib.save(image, path)
    return path
