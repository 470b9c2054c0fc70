"""Reading scans in every orientation/format, writing back voxel-for-voxel, and refusing bad input."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from BrainDINOLib.errors import BrainDINOError
from BrainDINOLib.volume import load_volume, save_like
from testdata import reorient, save


@pytest.fixture(scope="module")
def reference(mni_2mm):
    """Canonical array of the 2 mm template: every reorientation must give exactly this back."""
    return np.asarray(mni_2mm.dataobj, dtype=np.float32)


@pytest.mark.parametrize(
    ("axcodes", "dtype"),
    [("RAS", np.uint8), ("LPS", np.int16), ("PIR", np.int32), ("ASL", np.float32), ("LIA", np.uint16)],
)
def test_orientations_give_the_same_canonical_data_and_round_trip(tmp_path, mni_2mm, reference, axcodes, dtype):
    image = reorient(mni_2mm, axcodes, dtype)
    path = save(image, tmp_path / f"scan_{axcodes}.nii.gz")
    volume = load_volume(path)
    assert nib.aff2axcodes(volume.affine) == ("R", "A", "S")
    np.testing.assert_array_equal(volume.data, reference)
    np.testing.assert_allclose(volume.affine, mni_2mm.affine)
    out = nib.load(save_like(volume, volume.data, tmp_path / "out.nii.gz"))
    assert out.shape == image.shape
    np.testing.assert_allclose(out.affine, image.affine)
    original = np.asarray(image.dataobj).astype(np.float32)
    np.testing.assert_allclose(np.asarray(out.dataobj), original, atol=original.max() / 32767)  # int16 storage


def test_oblique_affine_round_trips(tmp_path, mni_2mm):
    angle = np.deg2rad(25)
    rotation = np.eye(4)
    rotation[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    image = reorient(mni_2mm, "LPS", np.int16)
    oblique = nib.Nifti1Image(np.asarray(image.dataobj), rotation @ image.affine)
    volume = load_volume(save(oblique, tmp_path / "oblique.nii.gz"))
    assert volume.source_axcodes == nib.aff2axcodes(oblique.affine)
    out = nib.load(save_like(volume, volume.data, tmp_path / "out.nii.gz"))
    np.testing.assert_allclose(out.affine, oblique.affine, atol=1e-5)
    original = np.asarray(oblique.dataobj).astype(np.float32)
    np.testing.assert_allclose(np.asarray(out.dataobj), original, atol=original.max() / 32767)


def test_anisotropic_sagittal_scan(tmp_path, mni):
    """Sagittal acquisition with 4 mm slices (L-R axis), stored PIR."""
    affine = mni.affine.copy()
    affine[0, 0] = 4.0
    thick = nib.Nifti1Image(np.asarray(mni.dataobj)[::4], affine)
    image = reorient(thick, "PIR", np.int16)
    volume = load_volume(save(image, tmp_path / "sagittal.nii.gz"))
    np.testing.assert_allclose(volume.spacing, (4.0, 1.0, 1.0))
    assert volume.data.shape == (50, 233, 189)
    x, y, z = volume.canonical_index((10, 20, 30))
    np.testing.assert_allclose(volume.affine @ [x, y, z, 1], image.affine @ [10, 20, 30, 1])


def test_simpleitk_formats_match_nifti(tmp_path, mni_2mm, reference):
    """NRRD/MHA (LPS on disk) read into the same canonical array and world geometry as NIfTI."""
    image = sitk.GetImageFromArray(np.asarray(mni_2mm.dataobj).astype(np.int16).transpose(2, 1, 0))
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ mni_2mm.affine
    image.SetSpacing([2.0, 2.0, 2.0])
    image.SetDirection((lps[:3, :3] / 2.0).ravel().tolist())
    image.SetOrigin(lps[:3, 3].tolist())
    for suffix in (".nrrd", ".mha"):
        path = tmp_path / f"scan{suffix}"
        sitk.WriteImage(image, str(path))
        volume = load_volume(path)
        np.testing.assert_array_equal(volume.data, reference)
        np.testing.assert_allclose(volume.affine, mni_2mm.affine, atol=1e-6)


def test_dicom_series_folder(tmp_path, mni_2mm):
    data = np.asarray(mni_2mm.dataobj).astype(np.int16)[20:60, 20:70, 20:50]
    image = sitk.GetImageFromArray(data.transpose(2, 1, 0))
    image.SetSpacing([2.0, 2.0, 2.0])
    image.SetOrigin([-30.5, 12.25, 40.0])  # LPS mm
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series_uid = "1.2.826.0.1.3680043.2.1125.1"
    for k in range(image.GetDepth()):
        slice_image = image[:, :, k]
        origin = image.TransformIndexToPhysicalPoint((0, 0, k))
        for tag, value in (
            ("0020|000e", series_uid),
            ("0020|0032", "\\".join(f"{c:g}" for c in origin)),
            ("0020|0037", "1\\0\\0\\0\\1\\0"),
            ("0020|0013", str(k + 1)),
            ("0008|0060", "MR"),
            ("0028|0030", "2\\2"),
            ("0018|0050", "2"),
        ):
            slice_image.SetMetaData(tag, value)
        writer.SetFileName(str(tmp_path / f"slice{k:03d}.dcm"))
        writer.Execute(slice_image)
    volume = load_volume(tmp_path)
    assert volume.source_shape == data.shape
    written = np.array([[-2.0, 0, 0, 30.5], [0, -2.0, 0, -12.25], [0, 0, 2.0, 40.0], [0, 0, 0, 1]])  # RAS
    np.testing.assert_allclose(volume.source_affine, written, atol=1e-6)  # origin, spacing and directions
    expected = load_volume(save(nib.Nifti1Image(data, written), tmp_path.parent / "same.nii.gz"))
    np.testing.assert_array_equal(volume.data, expected.data)
    np.testing.assert_allclose(volume.affine, expected.affine, atol=1e-6)


def test_4d_needs_a_volume_choice(tmp_path, mni_2mm):
    data = np.asarray(mni_2mm.dataobj)
    stack = nib.Nifti1Image(np.stack([data, data // 2], axis=-1), mni_2mm.affine)
    path = save(stack, tmp_path / "dwi.nii.gz")
    with pytest.raises(BrainDINOError, match="4D image with 2 volumes; choose one with --volume"):
        load_volume(path)
    np.testing.assert_array_equal(load_volume(path, volume_index=1).data, (data // 2).astype(np.float32))
    with pytest.raises(BrainDINOError, match="out of range"):
        load_volume(path, volume_index=2)
    t1 = save(mni_2mm, tmp_path / "t1.nii.gz")  # a 3D image's one volume is number 0; any other is refused
    np.testing.assert_array_equal(load_volume(t1, volume_index=0).data, load_volume(t1).data)
    with pytest.raises(BrainDINOError, match=r"--volume 3 out of range \(a 3D image"):
        load_volume(t1, volume_index=3)


def test_simpleitk_4d_and_5d_read_only_the_chosen_volume(tmp_path, mni_2mm):
    data = np.asarray(mni_2mm.dataobj).astype(np.int16)[::2, ::2, ::2]
    image = sitk.JoinSeries([sitk.GetImageFromArray(v.transpose(2, 1, 0)) for v in (data, data // 2, data // 3)])
    assert image.GetDimension() == 4
    sitk.WriteImage(image, str(tmp_path / "series.mha"))
    ras = (slice(None, None, -1), slice(None, None, -1))  # identity direction in LPS: x and y flip into RAS
    np.testing.assert_array_equal(load_volume(tmp_path / "series.mha", volume_index=2).data, (data // 3)[ras])
    with pytest.raises(BrainDINOError, match="4D image with 3 volumes"):
        load_volume(tmp_path / "series.mha")
    five = sitk.JoinSeries([image])  # a trailing singleton 5th dimension
    assert five.GetDimension() == 5
    sitk.WriteImage(five, str(tmp_path / "series5.nrrd"))
    np.testing.assert_array_equal(load_volume(tmp_path / "series5.nrrd", volume_index=1).data, (data // 2)[ras])


def test_nan_voxels_are_zeroed_and_reported(tmp_path, mni_2mm):
    data = np.asarray(mni_2mm.dataobj).astype(np.float32)
    data[10:12, 10:12, 10] = np.nan
    data[0, 0, 0] = np.inf
    volume = load_volume(save(nib.Nifti1Image(data, mni_2mm.affine), tmp_path / "nan.nii.gz"))
    assert np.isfinite(volume.data).all()
    assert volume.warnings == ("5 NaN/Inf voxels were set to 0",)


def _truncated(tmp_path, mni_2mm, name):
    path = save(mni_2mm, tmp_path / name)
    raw = open(path, "rb").read()
    with open(path, "wb") as handle:
        handle.write(raw[: len(raw) // 2])
    return path


def _absurd_nifti(tmp_path, _):
    header = nib.Nifti1Header()
    header.set_data_dtype(np.float32)
    header.set_data_shape((30_000, 30_000, 30_000))
    path = tmp_path / "absurd.nii"
    with open(path, "wb") as handle:
        handle.write(header.binaryblock + b"\0" * 4 + b"\0" * 1000)
    return str(path)


def _absurd_nrrd(tmp_path, _):
    path = tmp_path / "absurd.nrrd"
    path.write_bytes(
        b"NRRD0004\ntype: float\ndimension: 3\nsizes: 50000 50000 50000\n"
        b"encoding: raw\nendian: little\nspace: left-posterior-superior\n\n" + b"\0" * 1000
    )
    return str(path)


def _nifti_of(array):
    def make(tmp_path, _):
        return save(nib.Nifti1Image(array, np.eye(4)), tmp_path / "bad.nii.gz")

    return make


def _text(name):
    def make(tmp_path, _):
        path = tmp_path / name
        path.write_text("patient notes, not an image\n")
        return str(path)

    return make


def _rgb(tmp_path, _):
    rgb = np.zeros((8, 8, 8), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    return save(nib.Nifti1Image(rgb, np.eye(4)), tmp_path / "colour.nii.gz")


def _corrupt_gzip(tmp_path, _):
    path = tmp_path / "corrupt.nii.gz"
    path.write_bytes(gzip.compress(b"x" * 10)[:-6] + b"garbage")
    return str(path)


def _degenerate(tmp_path, mni_2mm):
    """A header whose sform maps every voxel row onto one plane (written raw: nibabel refuses to make one)."""
    image = nib.Nifti1Image(np.asarray(mni_2mm.dataobj), mni_2mm.affine)
    image.set_qform(None, code=0)
    image.header["srow_y"] = 0
    path = tmp_path / "flat.nii"
    with open(path, "wb") as handle:
        handle.write(image.header.binaryblock + b"\0" * 4 + np.asarray(mni_2mm.dataobj).tobytes(order="F"))
    return str(path)


BAD_INPUTS = {
    "missing": (lambda tmp_path, _: str(tmp_path / "nowhere.nii.gz"), "no such file"),
    "truncated gzip": (lambda t, m: _truncated(t, m, "cut.nii.gz"), "truncated or corrupt"),
    "truncated raw": (lambda t, m: _truncated(t, m, "cut.nii"), "truncated or corrupt"),
    "corrupt gzip": (_corrupt_gzip, "cannot read the image header"),
    "text named .nii": (_text("notes.nii"), "cannot read the image header"),
    "unknown extension": (_text("notes.txt"), "not a recognised image file"),
    "2D image": (_nifti_of(np.ones((64, 64), np.float32)), "2D image"),
    "2D as 3D": (_nifti_of(np.ones((64, 64, 1), np.float32)), "2D image"),
    "5D image": (_nifti_of(np.ones((4, 4, 4, 2, 2), np.float32)), "5D image"),
    "constant": (_nifti_of(np.full((16, 16, 16), 7, np.int16)), "constant image"),
    "all NaN": (_nifti_of(np.full((16, 16, 16), np.nan, np.float32)), "every voxel is NaN"),
    "RGB": (_rgb, "colour"),
    "absurd NIfTI header": (_absurd_nifti, "over the limit"),
    "absurd NRRD header": (_absurd_nrrd, "over the limit"),
    "degenerate affine": (_degenerate, "voxel-to-world matrix is degenerate"),
    "empty DICOM folder": (lambda tmp_path, _: str(tmp_path), "without DICOM series"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_clear_error_naming_the_file(tmp_path, mni_2mm, case):
    make, problem = BAD_INPUTS[case]
    path = make(tmp_path, mni_2mm)
    with pytest.raises(BrainDINOError) as raised:
        load_volume(path)
    message = str(raised.value)
    assert message.startswith(str(path)) and problem in message
    assert "\n" not in message
