"""Seeded mutations of valid user inputs (scans, manifests, model cards, checkpoints, slice indexes).

Each ``*_cases`` function writes ``count`` broken or odd variants of one valid input into a folder and returns
their paths; the same seed writes the same bytes. The mutations are the ones real files suffer: a header field
set to an extreme, a field or line missing, bytes flipped, a file cut short, a compressed stream damaged.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np

#: Values a header field is set to: limits, signs, special floats and junk.
EXTREMES = (0, -1, 1, 2, 7, 255, 32767, -32768, 2**31 - 1, 1e-30, 1e30, float("nan"), float("inf"), -0.5)
TEXT_VALUES = ("", "-1", "0", "1", "abc", "1e40", "nan", "3 3", "9999999999", "1 2 3 4 5", "(1,0,0)", "\x00", "é")


def base_volume(seed: int = 0) -> nib.Nifti1Image:
    """A small int16 head-like volume: a bright ellipsoid in noise, 2 x 2 x 3 mm."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*(np.linspace(-1, 1, n) for n in (24, 20, 10)), indexing="ij"))
    data = 400 * (np.sum(grid**2, axis=0) < 0.7) + rng.normal(50, 10, grid.shape[1:])
    return nib.Nifti1Image(data.astype(np.int16), np.diag([2.0, 2.0, 3.0, 1.0]))


def _flip_bytes(raw: bytes, rng: np.random.Generator, start: int, stop: int) -> bytes:
    raw = bytearray(raw)
    for position in rng.integers(start, max(start + 1, min(stop, len(raw))), rng.integers(1, 5)):
        raw[position] = int(rng.integers(0, 256))
    return bytes(raw)


def _truncate(raw: bytes, rng: np.random.Generator) -> bytes:
    return raw[: int(rng.integers(0, len(raw)))]


def _nifti_field(raw: bytes, rng: np.random.Generator) -> bytes:
    """Set one NIfTI-1 header field (one element of it) to an extreme value."""
    header = np.frombuffer(raw[:348], dtype=nib.nifti1.header_dtype).copy()
    name = str(rng.choice([n for n in header.dtype.names if header.dtype[n].kind in "iuf" or n == "magic"]))
    if name == "magic":
        header[name] = rng.choice([b"n+1", b"ni1", b"", b"n+2", b"xyz"])
    else:
        field = header[name].reshape(-1)
        value = EXTREMES[int(rng.integers(len(EXTREMES)))]
        kind = header.dtype[name].base
        if kind.kind in "iu":
            info = np.iinfo(kind)
            value = int(np.clip(np.nan_to_num(value, posinf=info.max, neginf=info.min), info.min, info.max))
        field[int(rng.integers(field.size))] = value
        header[name] = field.reshape(header[name].shape)
    return header.tobytes() + raw[348:]


def _nifti_mutations(raw: bytes, rng: np.random.Generator) -> bytes:
    choice = rng.integers(4)
    if choice == 0:
        return _nifti_field(raw, rng)
    if choice == 1:
        return _flip_bytes(raw, rng, 0, 352)
    if choice == 2:
        return _truncate(raw, rng)
    return raw + bytes(rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8))


def _text_header_mutations(raw: bytes, rng: np.random.Generator, header_end: int) -> bytes:
    """Mutate a text header (NRRD, MetaImage): drop, repeat or rewrite a line, or damage header or data bytes."""
    header, data = raw[:header_end], raw[header_end:]
    lines = header.split(b"\n")
    choice = rng.integers(7)
    index = int(rng.integers(1, max(2, len(lines) - 2)))
    if choice == 0:
        del lines[index]
    elif choice == 1:
        lines.insert(index, lines[index])
    elif choice == 2:  # rewrite a value
        parts = re.split(rb"(:=|: | = )", lines[index], maxsplit=1)
        if len(parts) == 3:
            lines[index] = parts[0] + parts[1] + TEXT_VALUES[int(rng.integers(len(TEXT_VALUES)))].encode()
    elif choice == 3:
        return _flip_bytes(raw, rng, 0, header_end)
    elif choice == 4:
        return header + _truncate(data, rng)
    elif choice == 5:
        return _truncate(raw, rng)
    else:
        lines.insert(index, rng.choice([b"garbage line", b"encoding: gzip", b"CompressedData = True", b"type: double"]))
    return b"\n".join(lines) + data


def _header_end(raw: bytes, kind: str) -> int:
    if kind == "nrrd":
        return raw.index(b"\n\n") + 2
    return raw.index(b"ElementDataFile = LOCAL\n") + len(b"ElementDataFile = LOCAL\n")


def image_cases(folder: Path, seed: int, count: int) -> list[Path]:
    """Broken and odd variants of one volume as NIfTI (plain and gzip), NRRD (raw and gzip) and MetaImage (raw and
    compressed) files, and as a DICOM series folder."""
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    image = base_volume(seed)
    valid = folder / "valid"
    valid.mkdir(exist_ok=True)
    nib.save(image, valid / "scan.nii")
    itk = sitk.GetImageFromArray(np.asarray(image.dataobj).transpose(2, 1, 0))
    itk.SetSpacing((2.0, 2.0, 3.0))
    sources = {"nii": (valid / "scan.nii").read_bytes()}
    for name, compress in (("nrrd", False), ("gz.nrrd", True), ("mha", False), ("z.mha", True)):
        sitk.WriteImage(itk, str(valid / f"scan.{name}"), useCompression=compress)
        sources[name] = (valid / f"scan.{name}").read_bytes()
    from testdata import write_dicom_series

    dicom = write_dicom_series(image, valid / "dicom")
    rng = np.random.default_rng(seed)
    cases = []
    for number in range(count):
        kind = str(rng.choice(["nii", "nii.gz", "nrrd", "gz.nrrd", "mha", "z.mha", "dicom"]))
        if kind == "dicom":
            cases.append(_dicom_case(dicom, folder / f"case{number:04d}-dicom", rng))
            continue
        if kind.startswith("nii"):
            mutated = _nifti_mutations(sources["nii"], rng)
            if kind == "nii.gz":
                mutated = gzip.compress(mutated, mtime=0)
                if rng.random() < 0.3:  # damage the compressed stream itself
                    mutated = _truncate(mutated, rng) if rng.random() < 0.5 else _flip_bytes(mutated, rng, 10, 10**9)
        else:
            raw = sources[kind]
            mutated = _text_header_mutations(raw, rng, _header_end(raw, "nrrd" if "nrrd" in kind else "mha"))
        path = folder / f"case{number:04d}.{kind}"
        path.write_bytes(mutated)
        cases.append(path)
    return cases


def _dicom_case(files: list[Path], folder: Path, rng: np.random.Generator) -> Path:
    """A copy of the series with one file damaged, removed or given odd attribute values."""
    import pydicom

    shutil.copytree(files[0].parent, folder)
    target = folder / files[int(rng.integers(len(files)))].name
    choice = rng.integers(6)
    raw = target.read_bytes()
    if choice == 0:
        target.write_bytes(_truncate(raw, rng))
    elif choice == 1:
        target.write_bytes(_flip_bytes(raw, rng, 128, 700))
    elif choice == 2:
        target.write_bytes(raw[132:])  # no preamble and no DICM marker
    elif choice == 3:
        target.write_bytes(b"scanner log, not DICOM\n" * int(rng.integers(1, 40)))
    elif choice == 4:
        target.unlink()
    else:
        dataset = pydicom.dcmread(target)
        keyword = str(rng.choice(["Rows", "Columns", "BitsAllocated", "PixelSpacing", "ImageOrientationPatient",
                                  "ImagePositionPatient", "SamplesPerPixel", "SeriesInstanceUID"]))  # fmt: skip
        value = {
            "PixelSpacing": ["0", "0"],
            "ImageOrientationPatient": [0, 0, 0, 0, 0, 0],
            "ImagePositionPatient": [0, 0, 0],
            "SeriesInstanceUID": "1.2.3",
        }.get(keyword, int(rng.choice([0, 1, 3, 12, 4096])))
        setattr(dataset, keyword, value)
        dataset.save_as(target)
    return folder


def _text_mutations(text: str, rng: np.random.Generator) -> bytes:
    """Damage a table or JSON file as editors and spreadsheets do: a character inserted or deleted, a line cut or
    repeated, a non-UTF-8 byte, a NUL."""
    raw = text.encode()
    choice = rng.integers(6)
    position = int(rng.integers(0, len(raw)))
    if choice == 0:
        return raw[:position] + raw[position + 1 :]
    if choice == 1:
        return raw[:position] + bytes([rng.choice(list(b',\t"\n\x00\xe9\xff{}[]:-.0'))]) + raw[position:]
    if choice == 2:
        lines = raw.split(b"\n")
        lines.insert(int(rng.integers(len(lines))), lines[int(rng.integers(len(lines)))])
        return b"\n".join(lines)
    if choice == 3:
        return _truncate(raw, rng)
    if choice == 4:
        return raw.replace(b"\n", b"\r\n") if rng.random() < 0.5 else b"\xef\xbb\xbf" + raw[:position]
    return raw[:position] + b"\xff\xfe" + raw[position:]


def _json_mutation(value, rng: np.random.Generator):
    """One field of a JSON document deleted, emptied or given a value of another type."""
    containers = []

    def walk(node):
        if isinstance(node, dict | list) and node:
            containers.append(node)
            for child in node.values() if isinstance(node, dict) else node:
                walk(child)

    walk(value)
    node = containers[int(rng.integers(len(containers)))]
    key = list(node)[int(rng.integers(len(node)))] if isinstance(node, dict) else int(rng.integers(len(node)))
    replacement = [None, "", "x", -1, 0, 1e9, float("nan"), [], {}, True, [1, 2], {"a": 1}][int(rng.integers(12))]
    if isinstance(node, dict) and rng.random() < 0.3:
        del node[key]
    else:
        node[key] = replacement
    return value


def manifest_cases(folder: Path, seed: int, count: int, scans: list[Path]) -> list[Path]:
    """Damaged CSV/TSV manifests (naming the scans by paths relative to them) and BIDS ``participants.tsv``
    tables."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [
        f"sub-{i:02d},{os.path.relpath(scan, folder)},{40 + i}y,{i % 2},{'GBM' if i % 2 else 'healthy'}"
        for i, scan in enumerate(scans)
    ]
    table = "subject_id,flair,age,event,diagnosis\n" + "\n".join(rows) + "\n"
    rng = np.random.default_rng(seed)
    cases = []
    for number in range(count):
        if rng.random() < 0.25:  # a BIDS dataset whose participants table is damaged
            bids = folder / f"case{number:04d}-bids"
            anat = bids / "sub-01" / "anat"
            anat.mkdir(parents=True)
            shutil.copy(scans[0], anat / f"sub-01_FLAIR{''.join(scans[0].suffixes)}")
            participants = "participant_id\tage\tsex\nsub-01\t45\tF\nsub-02\t50\tM\n"
            (bids / "participants.tsv").write_bytes(_text_mutations(participants, rng))
            cases.append(bids)
            continue
        tsv = rng.random() < 0.3
        path = folder / f"case{number:04d}.{'tsv' if tsv else 'csv'}"
        path.write_bytes(_text_mutations(table.replace(",", "\t") if tsv else table, rng))
        cases.append(path)
    return cases


def json_file_cases(source: Path, folder: Path, seed: int, count: int) -> list[Path]:
    """Copies of the folder holding the JSON file ``source``, each with that file damaged (as text or as data)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    cases = []
    for number in range(count):
        copy = folder / f"case{number:04d}"
        shutil.copytree(source.parent, copy)
        text = source.read_text()
        if rng.random() < 0.6:
            mutated = json.dumps(_json_mutation(json.loads(text), rng), indent=1).encode()
        else:
            mutated = _text_mutations(text, rng)
        (copy / source.name).write_bytes(mutated)
        cases.append(copy)
    return cases


def binary_file_cases(source: Path, folder: Path, seed: int, count: int, header: Callable[[bytes], int]) -> list[Path]:
    """Copies of a binary file cut short or with bytes flipped, mostly in its header (``header(raw)`` bytes)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    raw = source.read_bytes()
    cases = []
    for number in range(count):
        choice = rng.integers(3)
        if choice == 0:
            mutated = _truncate(raw, rng)
        elif choice == 1:
            mutated = _flip_bytes(raw, rng, 0, header(raw))
        else:
            mutated = _flip_bytes(raw, rng, 0, len(raw))
        path = folder / f"case{number:04d}{''.join(source.suffixes)}"
        path.write_bytes(mutated)
        cases.append(path)
    return cases


def safetensors_header_size(raw: bytes) -> int:
    """Bytes of a safetensors file's length prefix and JSON header."""
    return 8 + struct.unpack("<Q", raw[:8])[0]
