"""Every damaged input a user can hand us gives a result or one clean line: the seeded fuzz corpus of
``helpers/fuzz.py`` (scans in every format, manifests, model cards, checkpoints, slice indexes) and the broken
files users met.

A clean line names the user's file, is one line, holds no other path (no library's source or build folder), and
nothing else reaches stderr or Python's warnings while it is produced.
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
import struct
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from fuzz import (
    base_volume,
    binary_file_cases,
    image_cases,
    json_file_cases,
    manifest_cases,
    safetensors_header_size,
)

from BrainDINOLib.errors import BrainDINOError
from BrainDINOLib.volume import load_volume
from testdata import write_dicom_series

SEED = 2026
#: A path with at least two separators: what a library's source or build folder looks like in a message.
OTHER_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[\\/][^\s\\/:\"'()]+){2,}")


def outcome(action, root: Path, capfd) -> tuple[str, str]:
    """("ok" | "error", message) of ``action()``; fails on any other exception, on output to stderr or stdout,
    on a Python warning, and on a message of several lines or naming a path outside ``root``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = action()
            kind, message = "ok", "; ".join(getattr(result, "warnings", ()))
        except BrainDINOError as error:
            kind, message = "error", str(error)
    printed = capfd.readouterr()
    assert printed.err == "" and printed.out == "", (message, printed)
    assert not caught, [str(w.message) for w in caught]
    assert "\n" not in message, message
    assert not OTHER_PATH.search(without_user_text(message, root)), message
    if kind == "error":
        assert message.startswith(str(root)), message
    return kind, message


def without_user_text(message: str, root: Path) -> str:
    """The message less the user's own paths (under ``root``) and quoted text from the user's files."""
    return re.sub(r"'[^']*'", "''", re.sub(re.escape(str(root)) + r"[^\s:,;)]*", "ROOT", message))


def run_cli(*argv: str) -> tuple[int, str]:
    """(exit code, stderr) of the installed command line in a child process."""
    command = [sys.executable, "-m", "BrainDINOLib", *argv]
    done = subprocess.run(command, capture_output=True, encoding="utf-8", errors="replace", timeout=300)
    return done.returncode, done.stderr


def tally(outcomes: list[tuple[str, str]]) -> Counter:
    """Outcomes by kind and message shape (numbers and names folded), to show the corpus reaches many problems."""
    return Counter((kind, re.sub(r"\d+", "N", message.split(": ", 1)[-1])[:60]) for kind, message in outcomes)


def test_damaged_scans_load_or_fail_with_one_clean_line(tmp_path, capfd, fuzz_scale):
    """NIfTI (plain, gzip), NRRD (raw, gzip), MetaImage (raw, compressed) and DICOM series with header fields set
    to extremes, lines dropped or repeated, bytes flipped and data cut short."""
    cases = image_cases(tmp_path, SEED, 240 * fuzz_scale)
    capfd.readouterr()
    outcomes = [outcome(lambda case=case: load_volume(case), tmp_path, capfd) for case in cases]
    shapes = tally(outcomes)
    assert sum(n for (kind, _), n in shapes.items() if kind == "ok") >= 20  # some damage is harmless
    assert sum(n for (kind, _), n in shapes.items() if kind == "error") >= 120
    assert len(shapes) >= 40, shapes  # many different problems, each with its own message

    # A sample through the command line: its stderr is that one line, nothing more.
    failures = [(case, message) for case, (kind, message) in zip(cases, outcomes, strict=True) if kind == "error"]
    for case, message in failures[:: len(failures) // 5][:5]:
        assert run_cli("infer", str(case), "-o", str(tmp_path / "out")) == (2, f"braindino: error: {message}\n")


def test_damaged_manifests(tmp_path, capfd, fuzz_scale):
    scans = []
    for i in range(3):
        scans.append(tmp_path / f"scan{i}.nii.gz")
        nib.save(base_volume(i), scans[-1])
    from BrainDINOLib.batch import find_scans

    cases = manifest_cases(tmp_path / "cases", SEED, 80 * fuzz_scale, scans)
    capfd.readouterr()
    outcomes = [outcome(lambda case=case: find_scans([case]), tmp_path, capfd) for case in cases]
    assert len(tally(outcomes)) >= 8


def test_damaged_model_cards(tmp_path, capfd, default_bundle, fuzz_scale):
    """model.json damaged as text or as data: refused on loading, naming the field, or the bundle still runs."""
    from BrainDINOLib.bundle import load_bundle
    from BrainDINOLib.infer import InferenceOptions, run_inference

    scan = tmp_path / "scan.nii.gz"
    nib.save(base_volume(0), scan)
    cases = json_file_cases(Path(default_bundle) / "model.json", tmp_path / "cases", SEED, 40 * fuzz_scale)

    def use(bundle_dir: Path):
        bundle = load_bundle(bundle_dir)
        return run_inference(scan, tmp_path / "out" / bundle_dir.name, InferenceOptions(report=False), bundle=bundle)

    capfd.readouterr()
    outcomes = [outcome(lambda case=case: use(case), tmp_path, capfd) for case in cases]
    assert sum(kind == "error" for kind, _ in outcomes) >= 20
    assert any("field '" in message for _, message in outcomes)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_damaged_checkpoints(tmp_path, capfd, default_bundle, suffix, fuzz_scale):
    import torch
    from safetensors.torch import load_file, save_file

    from BrainDINOLib.importers import import_checkpoint

    state = load_file(Path(default_bundle) / "encoder.safetensors")
    source = tmp_path / f"encoder{suffix}"
    save_file(state, source) if suffix == ".safetensors" else torch.save({"teacher": state}, source)
    header = safetensors_header_size if suffix == ".safetensors" else (lambda raw: 2048)
    cases = binary_file_cases(source, tmp_path / "cases", SEED, 30 * fuzz_scale, header)
    capfd.readouterr()
    outcomes = [
        outcome(lambda case=case: import_checkpoint(case, tmp_path / "out" / case.stem), tmp_path, capfd)
        for case in cases
    ]
    assert sum(kind == "error" for kind, _ in outcomes) >= 10


def test_damaged_slice_index(tmp_path, capfd, fuzz_scale):
    from BrainDINOTrainingLib.slice_index import SliceDataset, build_index

    for i in range(2):
        nib.save(base_volume(i), tmp_path / f"scan{i}.nii.gz")
    index = tmp_path / "index"
    build_index([tmp_path], index)
    cases = []
    for name in ("index.json", "volumes.json"):
        cases += json_file_cases(index / name, tmp_path / name, SEED, 12 * fuzz_scale)
    for name in ("slices.npy", "shards/000000.npy"):
        for i, damaged in enumerate(
            binary_file_cases(index / name, tmp_path / f"{name}-cases", SEED, 12 * fuzz_scale, lambda _: 128)
        ):
            copy = tmp_path / f"{Path(name).stem}-{i}"
            shutil.copytree(index, copy)
            shutil.copy(damaged, copy / name)
            cases.append(copy)

    def use(folder: Path):
        dataset = SliceDataset(folder)
        return [dataset[i] for i in range(len(dataset))]

    capfd.readouterr()
    outcomes = [outcome(lambda case=case: use(case), tmp_path, capfd) for case in cases]
    assert sum(kind == "error" for kind, _ in outcomes) >= 20


# ---- the broken files users met, through the command line ----


def _meta_without_element_type(folder: Path) -> Path:
    path = folder / "bad.mha"
    path.write_bytes(b"ObjectType = Image\nNDims = 3\nDimSize = 4 4 4\nElementDataFile = LOCAL\n" + bytes(128))
    return path


def _nrrd_claiming_gzip(folder: Path) -> Path:
    path = folder / "fake-gzip.nrrd"
    header = b"NRRD0004\ntype: short\ndimension: 3\nsizes: 8 8 8\nendian: little\nencoding: gzip\n\n"
    path.write_bytes(header + bytes(300))  # neither gzip nor the 1024 raw bytes that zlib would pass through
    return path


def _unreadable_dicom_folder(folder: Path) -> Path:
    dicom = folder / "series"
    dicom.mkdir()
    (dicom / "IM0001.dcm").write_bytes(b"exported by a viewer, not DICOM\n" * 10)
    return dicom


def _crashing_meta_header(folder: Path) -> Path:
    """NDims far beyond any image: the MetaImage reader of ITK crashes the process on it."""
    path = folder / "huge-ndims.mha"
    path.write_bytes(
        b"ObjectType = Image\nNDims = 9999999999\nDimSize = 4 4 4\nElementType = MET_SHORT\n"
        b"ElementDataFile = LOCAL\n" + bytes(128)
    )
    return path


BROKEN = {
    "MetaImage without ElementType": (_meta_without_element_type, "the MetaImage header has no ElementType field"),
    "NRRD header says gzip": (_nrrd_claiming_gzip, "the header declares gzip-compressed data but the data is not gzip"),
    "folder with an unreadable .dcm": (_unreadable_dicom_folder, "IM0001.dcm: not a readable DICOM file"),
    "MetaImage header that crashes ITK": (_crashing_meta_header, "as the number of dimensions"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_broken_files_users_met_give_one_line_and_exit_2(tmp_path, case):
    make, problem = BROKEN[case]
    path = make(tmp_path)
    code, stderr = run_cli("infer", str(path), "-o", str(tmp_path / "out"))
    assert code == 2, stderr
    assert stderr.count("\n") == 1 and stderr.startswith(f"braindino: error: {path}"), stderr
    assert problem in stderr
    assert not OTHER_PATH.search(without_user_text(stderr, tmp_path))


def test_repaired_header_loads_with_a_warning_in_the_result(tmp_path, capfd):
    """A NIfTI header with a wrong header size and a negative spacing: nibabel repairs both; the repair is a warning
    of the run (result.json), never raw text on the terminal."""
    path = tmp_path / "repaired.nii"
    nib.save(base_volume(0), path)
    raw = bytearray(path.read_bytes())
    raw[0:4] = struct.pack("<i", 340)  # sizeof_hdr
    raw[80:84] = struct.pack("<f", -2.0)  # pixdim[1]
    path.write_bytes(bytes(raw))
    repaired = "header fields were repaired: header size field corrected, pixel spacing made positive"
    capfd.readouterr()
    volume = load_volume(path)
    assert capfd.readouterr().err == ""
    assert volume.warnings == (repaired,)
    np.testing.assert_array_equal(volume.data, np.asarray(base_volume(0).dataobj))

    from BrainDINOTrainingLib.cli import main

    assert main(["infer", str(path), "-o", str(tmp_path / "out"), "--no-report", "-q"]) == 0
    assert json.loads((tmp_path / "out" / "result.json").read_text())["warnings"][0] == repaired
    assert f"warning: {repaired}\n" in capfd.readouterr().err


def test_a_series_with_a_missing_slice_is_read_with_a_warning(tmp_path, capfd):
    image = nib.Nifti1Image(np.asarray(base_volume(0).dataobj), np.diag([2.0, 2.0, 3.0, 1.0]))
    files = write_dicom_series(image, tmp_path / "series")
    by_position = sorted(files, key=lambda f: pydicom.dcmread(f).InstanceNumber)
    by_position[4].unlink()  # a slice in the middle
    capfd.readouterr()
    volume = load_volume(tmp_path / "series")
    assert capfd.readouterr().err == ""
    assert volume.data.shape[2] == 9
    assert volume.spacing[2] == pytest.approx(27 / 8)  # 9 slices over the 10 slices' extent
    assert any("one is missing (positions deviate from even spacing by up to 2.62 mm)" in w for w in volume.warnings)


def test_a_cohort_records_each_broken_file_as_its_one_line(tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    nib.save(base_volume(0), folder / "good.nii.gz")
    expected = {}
    for make, problem in BROKEN.values():
        path = make(folder)
        expected[path] = problem
    (folder / "cut.nii.gz").write_bytes(gzip.compress((folder / "good.nii.gz").read_bytes())[:200])
    out = tmp_path / "out"
    code, stderr = run_cli("infer", str(folder), "-o", str(out), "-q", "--no-report")
    assert code == 1, stderr
    rows = {row["input"]: row for row in json.loads((out / "summary.json").read_text())["scans"]}
    assert rows[str(folder / "good.nii.gz")]["status"] == "ok"
    for path, problem in expected.items():
        row = rows[str(path.resolve())]
        assert row["status"] == "failed" and problem in row["error"] and "\n" not in row["error"]
        assert f"failed: {row['error']}\n" in stderr
    assert len(stderr.splitlines()) == len(expected) + 1  # one line per broken file, the cut one's too


def _ragged_manifest(folder: Path, bundle: Path) -> list[str]:
    nib.save(base_volume(0), folder / "scan.nii.gz")
    (folder / "cohort.csv").write_text("subject_id,flair,age\nsub-01,scan.nii.gz,45\nsub-02,scan.nii.gz\n")
    return ["infer", str(folder / "cohort.csv"), "-o", str(folder / "out")]


def _damaged_card(folder: Path, bundle: Path) -> list[str]:
    nib.save(base_volume(0), folder / "scan.nii.gz")
    shutil.copytree(bundle, folder / "bundle")
    card = json.loads((folder / "bundle" / "model.json").read_text())
    next(head for head in card["heads"] if head["name"] == "tumor")["layers"] = [True]
    (folder / "bundle" / "model.json").write_text(json.dumps(card))
    return ["infer", str(folder / "scan.nii.gz"), "-o", str(folder / "out"), "--bundle", str(folder / "bundle")]


def _truncated_checkpoint(folder: Path, bundle: Path) -> list[str]:
    (folder / "encoder.safetensors").write_bytes((bundle / "encoder.safetensors").read_bytes()[:5000])
    return ["models", "import", str(folder / "encoder.safetensors"), "--models-dir", str(folder / "models")]


def _damaged_index(folder: Path, bundle: Path) -> list[str]:
    from BrainDINOTrainingLib.slice_index import build_index

    (folder / "scans").mkdir()
    nib.save(base_volume(0), folder / "scans" / "scan.nii.gz")
    build_index([folder / "scans"], folder / "index")
    (folder / "index" / "volumes.json").write_text('[{"volume": 0, "path": "scan.nii.gz"}]')
    return ["pretrain", "--config", "tiny-cpu", "--data", str(folder / "index"), "--out-dir", str(folder / "run")]


OTHER_INPUTS = {
    "manifest": (_ragged_manifest, "cohort.csv: row 3 has 2 fields, the header 3"),
    "model card": (_damaged_card, "model.json: head 'tumor': field 'layers[0]' must be a whole number, not true"),
    "checkpoint": (_truncated_checkpoint, "encoder.safetensors: not a readable checkpoint, the file is truncated"),
    "slice index": (_damaged_index, "volumes.json: volume 0: the field 'shard' is missing"),
}


@pytest.mark.parametrize("case", OTHER_INPUTS)
def test_other_damaged_inputs_give_one_line_and_exit_2(tmp_path, capfd, default_bundle, case):
    """Manifests, model cards, checkpoints and slice indexes through the command's own code (in this process)."""
    from BrainDINOTrainingLib.cli import main

    make, problem = OTHER_INPUTS[case]
    argv = make(tmp_path, Path(default_bundle))
    capfd.readouterr()
    assert main(argv) == 2
    printed = capfd.readouterr()
    assert printed.err.count("\n") == 1 and printed.err.startswith(f"braindino: error: {tmp_path}"), printed.err
    assert problem in printed.err and printed.out == ""
