"""End to end through the command line, as a user runs it: outputs in the scan's own geometry."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image
from safetensors.numpy import load_file

from BrainDINOLib.brain import prepare_scan
from BrainDINOLib.bundle import load_bundle
from BrainDINOLib.cli import main
from BrainDINOLib.encoder import encoder_config
from BrainDINOLib.errors import BrainDINOError
from BrainDINOLib.featuremaps import TokenMaps
from BrainDINOLib.infer import analysis_spec
from BrainDINOLib.preprocess import prepare
from BrainDINOLib.report import CELL_HEIGHT, GAP, HEADER_HEIGHT, LABEL_WIDTH
from BrainDINOLib.sample_data import demo_phantom
from BrainDINOLib.typicality import scan_descriptions
from BrainDINOLib.volume import load_volume
from testdata import reorient, save


def _infer(scan, out_dir, *extra) -> int:
    return main(["infer", str(scan), "-o", str(out_dir), "--quiet", *extra])


@pytest.fixture(scope="module")
def lps_run(tmp_path_factory, mni_2mm):
    root = tmp_path_factory.mktemp("lps")
    scan = save(reorient(mni_2mm, "LPS", np.int16), root / "subject01_T1w.nii.gz")
    assert _infer(scan, root / "out", "--query", "50,60,40") == 0
    return nib.load(scan), root / "out"


def test_lps_int16_outputs_match_input_geometry(lps_run):
    scan, out = lps_run
    for name in ("attention", "pca", "similarity"):
        output = nib.load(out / f"subject01_T1w_{name}.nii.gz")
        assert output.shape[:3] == scan.shape
        np.testing.assert_allclose(output.affine, scan.affine)
    attention = np.asarray(nib.load(out / "subject01_T1w_attention.nii.gz").dataobj)
    result = json.loads((out / "result.json").read_text())
    first, last = result["slices"]["first"], result["slices"]["last"]  # LPS: the third axis is axial
    brain = np.asarray(nib.load(out / "subject01_T1w_brainmask.nii.gz").dataobj) > 0
    analysed = np.zeros_like(brain)
    analysed[:, :, first : last + 1] = True
    assert (attention[brain & analysed] > 0).mean() > 0.9  # positive on brain patches (not those mostly outside)
    assert not attention[~(brain & analysed)].any()
    assert result["input"]["orientation"] == "LPS" and result["input"]["shape"] == list(scan.shape)
    assert result["model"]["name"] == "braindino-tiny-phantom" and result["model"]["random_init"] is False
    assert "demonstration" in result["model"]["intended_use"]
    assert set(result["timings_s"]) >= {"load_scan", "prepare", "encode", "maps", "write", "total"}
    embeddings = load_file(out / "embeddings.safetensors")
    assert embeddings["patch_tokens"].shape == (result["slices"]["analysed"], 14, 14, 96)
    assert (out / "report.png").stat().st_size > 50_000


def test_report_shows_the_scan_in_radiological_view(tmp_path, mni_2mm):
    """A black block planted in the white matter on the patient's right, anterior, and queried: in report.png the
    MRI cell shows it on the image's left and top half (radiological view), and the similarity cross is on it."""
    data = np.asarray(mni_2mm.dataobj)[:, :, 38:50].astype(np.float32)  # RAS: +i right, +j anterior
    block = (slice(62, 70), slice(72, 80), 6)  # right of the midline (i = 49), anterior of the centre (j = 58)
    data[block] = 0
    scan = save(nib.Nifti1Image(data, mni_2mm.affine), tmp_path / "marked.nii.gz")
    assert _infer(scan, tmp_path / "out", "--query", "66,76,6") == 0
    report = np.asarray(Image.open(tmp_path / "out" / "report.png").convert("RGB")).astype(int)
    size_x, size_y = data.shape[:2]
    cell_width = round(CELL_HEIGHT * size_x / size_y)  # isotropic voxels
    similarity_top = HEADER_HEIGHT + 3 * (CELL_HEIGHT + GAP)
    band = report[similarity_top : similarity_top + CELL_HEIGHT]
    green = np.argwhere((band[..., 0] == 0) & (band[..., 1] == 255) & (band[..., 2] == 0))
    cross_y, cross_x = green.mean(axis=0) + (similarity_top, 0)
    left = LABEL_WIDTH + (int(cross_x) - LABEL_WIDTH) // (cell_width + GAP) * (cell_width + GAP)
    # Radiological view: the patient's right (high i) on the image's left, anterior (high j) at the top.
    expected_x = left + (size_x - 1 - 66 + 0.5) * cell_width / size_x
    expected_y = similarity_top + (size_y - 1 - 76 + 0.5) * CELL_HEIGHT / size_y
    assert abs(cross_x - expected_x) < 1.5 and abs(cross_y - expected_y) < 1.5
    mri = report[HEADER_HEIGHT : HEADER_HEIGHT + CELL_HEIGHT, left : left + cell_width, 0]
    row, col = round(expected_y - similarity_top), round(expected_x - left)
    at_block = mri[row - 3 : row + 4, col - 3 : col + 4].mean()
    assert at_block < 10  # the block is black
    for mirrored in (mri[row - 3 : row + 4, cell_width - col - 4 : cell_width - col + 3],
                     mri[CELL_HEIGHT - row - 4 : CELL_HEIGHT - row + 3, col - 3 : col + 4]):  # fmt: skip
        assert mirrored.mean() > at_block + 100  # the white matter mirrored across either axis is not


def test_outputs_read_alike_in_itk_and_slicer(lps_run):
    """ITK (which 3D Slicer uses) reads PCA as a colour volume and the scaled float maps as floats."""
    scan, out = lps_run
    image = sitk.ReadImage(str(out / "subject01_T1w_pca.nii.gz"))
    assert image.GetNumberOfComponentsPerPixel() == 3 and image.GetSize() == scan.shape
    rgb = sitk.GetArrayFromImage(image)
    assert rgb.dtype == np.uint8 and rgb.max() > 200
    for name in ("attention", "similarity"):
        path = out / f"subject01_T1w_{name}.nii.gz"
        itk_values = sitk.GetArrayFromImage(sitk.ReadImage(str(path), sitk.sitkFloat32)).transpose(2, 1, 0)
        nib_values = nib.load(path).get_fdata(dtype=np.float32)
        assert nib.load(path).get_data_dtype() == np.int16
        np.testing.assert_allclose(itk_values, nib_values, atol=1e-6)


def test_similarity_is_highest_near_the_query(lps_run):
    _, out = lps_run
    similarity = np.asarray(nib.load(out / "subject01_T1w_similarity.nii.gz").dataobj)
    neighbourhood = similarity[47:54, 57:64, 40]
    assert neighbourhood.max() > 0.9 and similarity.max() <= 1.0 + 1e-4


def test_orientation_does_not_change_the_maps(tmp_path, mni_2mm, lps_run):
    """The same anatomy stored RAS gives the LPS run's maps, voxel for voxel after reorientation."""
    scan_lps, out_lps = lps_run
    scan = save(mni_2mm, tmp_path / "subject01_T1w.nii.gz")
    assert _infer(scan, tmp_path / "out", "--no-report") == 0
    ras = nib.load(tmp_path / "out" / "subject01_T1w_attention.nii.gz")
    lps = nib.load(out_lps / "subject01_T1w_attention.nii.gz")
    np.testing.assert_allclose(np.asarray(reorient(ras, "LPS").dataobj), np.asarray(lps.dataobj), atol=1e-5)


def test_sagittal_4mm_scan(tmp_path, mni):
    affine = mni.affine.copy()
    affine[0, 0] = 4.0
    scan = reorient(nib.Nifti1Image(np.asarray(mni.dataobj)[::4], affine), "PIR", np.int16)
    path = save(scan, tmp_path / "sag.nii.gz")
    assert _infer(path, tmp_path / "out", "--no-report") == 0
    for name in ("attention", "pca"):
        output = nib.load(tmp_path / "out" / f"sag_{name}.nii.gz")
        assert output.shape[:3] == scan.shape
        np.testing.assert_allclose(output.affine, scan.affine)
    # PIR: the second file axis runs inferior; PCA colours cover the brain on the analysed slices.
    pca = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "sag_pca.nii.gz"))).transpose(2, 1, 0, 3)
    brain = np.asarray(scan.dataobj) > 60
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    analysed = np.zeros(scan.shape[1], bool)
    analysed[scan.shape[1] - 1 - result["slices"]["last"] : scan.shape[1] - result["slices"]["first"]] = True
    covered = pca.any(axis=-1)[brain & analysed[None, :, None]]
    assert covered.mean() > 0.95


def test_same_input_same_output(tmp_path, lps_run):
    scan, out = lps_run
    assert _infer(scan.get_filename(), tmp_path, "--query", "50,60,40", "--no-report") == 0
    for name in ("attention", "pca", "similarity"):
        file = f"subject01_T1w_{name}.nii.gz"
        np.testing.assert_array_equal(
            np.asarray(nib.load(tmp_path / file).dataobj), np.asarray(nib.load(out / file).dataobj)
        )


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (["--query", "5,5,0"], "outside the analysed brain slices"),
        (["--query", "500,5,5"], "outside the volume"),
        (["--bundle", "no-such-model"], "no model bundle 'no-such-model'"),
        (["--device", "tpu7"], "unknown device"),
        (["--batch-size", "0"], "batch size must be at least 1"),
        (["--image-size", "300"], "image size 300 px: choose a multiple of vit-tiny16-dinov3's 16-px patches"),
        (["--image-size", "2048"], "from 112 to 1024 px"),
    ],
)
def test_bad_options_are_one_line_errors(tmp_path, lps_run, capsys, args, problem):
    scan, _ = lps_run
    assert _infer(scan.get_filename(), tmp_path / "out", "--no-report", *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("braindino: error:") and problem in err[0]
    assert not (tmp_path / "out").exists()  # a failed run leaves no trace


def test_unwritable_output_folder_fails_before_encoding(tmp_path, lps_run, capsys):
    scan, _ = lps_run
    (tmp_path / "afile").write_text("")
    assert main(["infer", scan.get_filename(), "-o", str(tmp_path / "afile" / "out")]) == 2
    captured = capsys.readouterr()
    assert "cannot write outputs there" in captured.err and "encoding" not in captured.err


def test_bad_scan_through_the_installed_command(tmp_path):
    """The console script itself: one line on stderr, exit code 2, no traceback."""
    bad = tmp_path / "scan.nii.gz"
    bad.write_bytes(b"\x1f\x8b" + b"not really gzip")
    done = subprocess.run(
        [sys.executable, "-m", "BrainDINOTrainingLib", "infer", str(bad), "-o", str(tmp_path / "o")],
        capture_output=True,
        encoding="utf-8",
        errors="replace",
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and str(bad) in done.stderr
    assert not (tmp_path / "o").exists()


def test_finer_maps_on_a_448_px_canvas(tmp_path, mni_2mm, default_bundle):
    """--image-size 448: tokens, maps and segmentations on a 28 x 28 grid, in the scan's geometry; the brain mask and
    the out-of-distribution verdict are pass 1's, on the bundle's own 224-px canvas."""
    slab = nib.Nifti1Image(np.asarray(mni_2mm.dataobj)[:, :, 40:52], mni_2mm.affine)  # 12 slices keep it fast
    scan = save(slab, tmp_path / "slab.nii.gz")
    assert _infer(scan, tmp_path, "--image-size", "448", "--query", "50,60,8") == 0
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["preprocessing"]["image_size"] == result["options"]["image_size"] == 448
    maps = TokenMaps.load(tmp_path / "embeddings.safetensors")
    assert maps.tokens().shape == (result["slices"]["analysed"], 28, 28, 96) and maps.layout.plane.canvas == 448
    for name in ("attention", "pca", "similarity", "seg", "brainmask"):
        output = nib.load(tmp_path / f"slab_{name}.nii.gz")
        assert output.shape[:3] == slab.shape
        np.testing.assert_allclose(output.affine, slab.affine)
    similarity = np.asarray(nib.load(tmp_path / "slab_similarity.nii.gz").dataobj)
    assert similarity[48:53, 58:63, 8].max() > 0.9
    assert "the heads were fitted on 224-px canvases; at 448 px their predictions may shift" in result["warnings"]
    assert (tmp_path / "report.png").is_file()
    bundle, volume = load_bundle(default_bundle), load_volume(scan)
    whole = prepare(volume, bundle.card.preprocessing)
    _, brain, _, first_pass = prepare_scan(volume, bundle, bundle.load_encoder(), whole=whole, device="cpu")
    np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "slab_brainmask.nii.gz").dataobj) > 0, brain)
    verdict = bundle.load_typicality().verdict(scan_descriptions(whole, first_pass, bundle.card.pooling))
    assert result["ood_score"] == verdict["ood_score"] and result["out_of_distribution"] is False


def test_only_rope_encoders_take_another_canvas(default_bundle):
    card = load_bundle(default_bundle).card
    assert analysis_spec(card, None) == analysis_spec(card, 224) == card.preprocessing
    learned = dataclasses.replace(card, encoder=encoder_config("vit-s14-dinov2"))
    assert analysis_spec(learned, 224) == card.preprocessing  # its own canvas
    with pytest.raises(BrainDINOError, match="vit-s14-dinov2 has a learned position embedding for the bundle's 224"):
        analysis_spec(learned, 448)


def test_the_random_bundle_says_so(tmp_path, lps_run):
    scan, _ = lps_run
    assert _infer(scan.get_filename(), tmp_path, "--bundle", "braindino-tiny-random", "--no-report") == 0
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["model"]["random_init"] is True and not result["predictions"]
    assert any("randomly initialised" in w for w in result["warnings"])


def test_demo_runs_every_head_on_the_held_out_phantom_next_to_the_template(tmp_path, capsys):
    """Every head on the phantom and the template, with the brain mask in each scan's geometry; the tumour head
    misses this phantom's glioma (README), so its overlap is not asserted here but in test_brain.py (FLAIR)."""
    assert main(["demo", "-o", str(tmp_path / "demo"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "held-out phantom" in out and "MNI ICBM152 2009a" in out and "demo.png" in out
    for name in ("report.png", "result.json", "_attention.nii.gz", "_pca.nii.gz", "_similarity.nii.gz", "_seg.nii.gz"):
        assert name in out
    phantom = json.loads((tmp_path / "demo" / "phantom" / "result.json").read_text())
    predictions = phantom["predictions"]
    assert set(predictions) == {"sequence", "diagnosis", "marker", "age", "survival", "tumor"}
    assert sum(predictions["sequence"]["probabilities"].values()) == pytest.approx(1, abs=1e-3)
    assert predictions["age"]["units"] == "years"
    assert predictions["survival"]["reads"]["t1ce"].endswith("heldout-phantom_t1ce.nii.gz")
    scans, truth = demo_phantom()
    segmented = nib.load(tmp_path / "demo" / "phantom" / "heldout-phantom_flair_seg.nii.gz")
    assert segmented.shape == nib.load(scans["seg"]).shape
    assert np.allclose(segmented.affine, nib.load(scans["flair"]).affine)
    brain = np.asarray(nib.load(tmp_path / "demo" / "phantom" / "heldout-phantom_flair_brainmask.nii.gz").dataobj) > 0
    truth_brain = np.asarray(nib.load(scans["brainmask"]).dataobj) > 0
    dice = 2 * (brain & truth_brain).sum() / (brain.sum() + truth_brain.sum())
    assert dice > 0.83  # measured 0.847 (deterministic) on a phantom the encoder and heads never saw
    assert phantom["out_of_distribution"] is False
    mni = json.loads((tmp_path / "demo" / "mni" / "result.json").read_text())
    assert {"age", "diagnosis", "tumor_t1"} <= set(mni["predictions"])  # named T1: the T1 tumour head segments it
    assert "tumor" not in mni["predictions"] and any("instead of head 'tumor'" in w for w in mni["warnings"])
    assert mni["out_of_distribution"] is False and 1900 < mni["brain_mask"]["volume_ml"] < 2150  # measured 2018.7
    assert (tmp_path / "demo" / "demo.png").is_file()


def test_models_commands(tmp_path, capsys):
    assert main(["models", "list"]) == 0
    listing = capsys.readouterr().out
    assert "braindino-tiny-random" in listing and "head tumor (seg, target seg)" in listing
    assert main(["models", "verify", "braindino-tiny-random"]) == 0
    assert "every file matches" in capsys.readouterr().out
