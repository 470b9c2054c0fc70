"""Dataset manifests: one `Manifest` type for folders of volumes, BraTS case folders, BIDS and tables.

A manifest lists scans (`Entry`: subject, optional session, per-modality image paths, labels) and,
once `split` is called, a subject-level split. Labels are parsed once, with units: numbers may
carry a unit suffix (``45y``, ``18mo``, ``540d``); a column must use one unit throughout, and ages
are stored in years and times in days.
"""

from __future__ import annotations

import csv
import io
import re
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .errors import BrainDINOError, describe, read_text
from .volume import IMAGE_SUFFIXES

#: How subjects are split when nothing else is asked: heads are fitted on train, tuned on val, measured on test.
DEFAULT_SPLIT = {"train": 0.6, "val": 0.2, "test": 0.2}

MODALITIES = ("t1", "t1ce", "t2", "flair", "seg", "brain_mask", "image")
#: Image columns that hold masks, not scans: never pretrained on, never read as a sequence.
MASKS = ("seg", "brain_mask")
#: Columns ``random1``, ``random2``, ... hold images with randomised tissue contrast (`phantoms`): scans
#: to pretrain and segment on, but of no MRI sequence.
RANDOM_CONTRAST = "random"
ID_COLUMNS = ("subject_id", "participant_id", "subject", "id")
BRATS_SUFFIXES = {  # BraTS 2021 and 2023 file naming
    "t1": ("_t1", "-t1n"),
    "t1ce": ("_t1ce", "-t1c"),
    "t2": ("_t2", "-t2w"),
    "flair": ("_flair", "-t2f"),
    "seg": ("_seg", "-seg"),
}
#: Name endings of mask files in a folder of volumes.
MASK_SUFFIXES = (*BRATS_SUFFIXES["seg"], "_brainmask", "_brain_mask")
BIDS_SUFFIXES = {"T1w": "t1", "T2w": "t2", "FLAIR": "flair"}
MISSING = ("", "n/a", "na", "nan", "none")
_UNITS = {
    "years": ("y", "yr", "yrs", "year", "years"),
    "months": ("m", "mo", "mos", "month", "months"),
    "weeks": ("w", "wk", "wks", "week", "weeks"),
    "days": ("d", "day", "days"),
}
_IN_DAYS = {"years": 365.25, "months": 365.25 / 12, "weeks": 7.0, "days": 1.0}
_NUMBER = re.compile(r"^\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*([A-Za-z]*)\s*$")
#: Label columns that must be numbers (anything else that is not all-numeric stays text).
NUMERIC_LABELS = ("age", "survival_days", "survival", "time", "event", "marker", "gm_ml", "wm_ml", "csf_ml")


@dataclass(frozen=True)
class Entry:
    """One scan: who, which files, which labels."""

    subject_id: str
    images: dict[str, Path]
    labels: dict[str, float | str] = field(default_factory=dict)
    session: str = ""

    @property
    def scans(self) -> dict[str, Path]:
        """The images that are scans (masks excluded)."""
        return {m: p for m, p in self.images.items() if m not in MASKS}

    @property
    def sequences(self) -> dict[str, Path]:
        """The scans of a named MRI sequence (randomised contrasts excluded)."""
        return {m: p for m, p in self.scans.items() if not m.startswith(RANDOM_CONTRAST)}


@dataclass(frozen=True)
class Manifest:
    """Scans of a dataset and, after `split`, the split of each subject.

    Attributes:
        entries: scans in a stable order.
        source: where it was read from.
        kind: ``folder``, ``brats``, ``bids`` or ``table``.
        units: label column -> unit after conversion (``years``, ``days``).
        splits: subject id -> split name (empty until `split`).
    """

    entries: tuple[Entry, ...]
    source: str
    kind: str
    units: dict[str, str] = field(default_factory=dict)
    splits: dict[str, str] = field(default_factory=dict)

    @property
    def subjects(self) -> list[str]:
        return sorted({e.subject_id for e in self.entries})

    def image_paths(self, include_masks: bool = False) -> list[Path]:
        """Every image of every scan (masks only when asked), in manifest order."""
        return [p for e in self.entries for p in (e.images if include_masks else e.scans).values()]

    def split(self, fractions: dict[str, float] | None = None, stratify: str | None = None, seed: int = 0) -> Manifest:
        """Subject-level split: all scans of a subject land in one split; stratified by a label if asked.

        Raises:
            BrainDINOError: bad fractions or an unknown stratification label.
        """
        fractions = fractions or DEFAULT_SPLIT
        if any(f < 0 for f in fractions.values()) or abs(sum(fractions.values()) - 1) > 1e-6:
            raise BrainDINOError(f"split fractions must be non-negative and sum to 1, got {fractions}")
        strata: dict[str, list[str]] = defaultdict(list)
        for subject in self.subjects:
            key = ""
            if stratify:
                values = {e.labels.get(stratify) for e in self.entries if e.subject_id == subject} - {None}
                if not values:
                    raise BrainDINOError(f"{self.source}: subject {subject} has no '{stratify}' label to stratify by")
                key = str(sorted(values, key=str)[0])
            strata[key].append(subject)
        rng = np.random.default_rng(seed)
        splits = {}
        for key in sorted(strata):
            members = sorted(strata[key])
            rng.shuffle(members)
            bounds = np.round(np.cumsum(list(fractions.values())) * len(members)).astype(int)
            for name, start, stop in zip(fractions, [0, *bounds[:-1]], bounds, strict=True):
                splits.update({subject: name for subject in members[start:stop]})
        return replace(self, splits=splits)


def _is_image(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(IMAGE_SUFFIXES)


def _stem(path: Path) -> str:
    name = path.name
    return next((name[: -len(s)] for s in IMAGE_SUFFIXES if name.lower().endswith(s)), name)


def load_manifest(source: str | Path) -> Manifest:
    """Discover a dataset: a CSV/TSV table, a folder with ``manifest.csv``, BIDS, BraTS case folders,
    or a plain folder of volumes (in that order of precedence).

    Raises:
        BrainDINOError: missing files, duplicate scans, unparsable labels, mixed units, empty dataset.
    """
    source = Path(source)
    if not source.exists():
        raise BrainDINOError(f"{source}: no such file or folder")
    kind = manifest_kind(source)
    if kind == "table":
        manifest = read_table(source if source.is_file() else source / "manifest.csv")
    else:
        manifest = {"bids": read_bids, "brats": read_brats, "folder": read_folder}[kind](source)
    if not manifest.entries:
        raise BrainDINOError(f"{source}: no images found (looked for {', '.join(IMAGE_SUFFIXES)})")
    return manifest


def manifest_kind(source: Path) -> str:
    """How `load_manifest` reads an existing file or folder: ``table`` (a CSV/TSV, or a folder with
    ``manifest.csv``), ``bids``, ``brats`` (case folders) or ``folder`` (any volumes inside)."""
    if source.is_file() or (source / "manifest.csv").is_file():
        return "table"
    if (source / "participants.tsv").is_file() or any(source.glob("sub-*/**/anat")):
        return "bids"
    if any(_brats_images(case) for case in sorted(source.iterdir()) if case.is_dir()):
        return "brats"
    return "folder"


def is_mask(path: Path) -> bool:
    """A segmentation or brain mask by its name (``*_seg``, ``*-seg``, ``*_brainmask``): never a scan."""
    return _stem(path).lower().endswith(MASK_SUFFIXES)


def read_folder(folder: Path) -> Manifest:
    """Every image file under ``folder`` as a scan of its own, masks left out (nothing says which scan is theirs)."""
    images = sorted(p for p in folder.rglob("*") if _is_image(p) and not is_mask(p))
    entries = [Entry("_".join((*p.relative_to(folder).parent.parts, _stem(p))), {"image": p}) for p in images]
    _check_unique(entries, folder)
    return Manifest(tuple(entries), str(folder), "folder")


def _brats_images(case: Path) -> dict[str, Path]:
    found = {}
    for path in sorted(case.iterdir()):
        if not _is_image(path):
            continue
        stem = _stem(path).lower()
        for modality, suffixes in BRATS_SUFFIXES.items():
            if stem.endswith(suffixes):
                found[modality] = path
    return found


def read_brats(folder: Path) -> Manifest:
    entries = []
    for case in sorted(p for p in folder.iterdir() if p.is_dir()):
        images = _brats_images(case)
        if images:
            entries.append(Entry(case.name, images))
    return Manifest(tuple(entries), str(folder), "brats")


def read_bids(folder: Path) -> Manifest:
    participants = {}
    units: dict[str, str] = {}
    if (folder / "participants.tsv").is_file():
        table = read_table(folder / "participants.tsv", require_images=False)
        participants = {e.subject_id: e.labels for e in table.entries}
        units = table.units
    entries = []
    for anat in sorted(folder.glob("sub-*/**/anat")):
        subject = anat.relative_to(folder).parts[0]
        session = next((p for p in anat.relative_to(folder).parts if p.startswith("ses-")), "")
        images = {}
        for path in sorted(anat.iterdir()):
            if not _is_image(path):
                continue
            suffix = _stem(path).rsplit("_", 1)[-1]
            if suffix in BIDS_SUFFIXES:
                modality = "t1ce" if suffix == "T1w" and "_ce-" in path.name else BIDS_SUFFIXES[suffix]
                images.setdefault(modality, path)
        if images:
            entries.append(Entry(subject, images, dict(participants.get(subject, {})), session))
    _check_unique(entries, folder)
    return Manifest(tuple(entries), str(folder), "bids", units)


def _check_unique(entries: list[Entry], source: Path) -> None:
    seen = set()
    for e in entries:
        key = (e.subject_id, e.session)
        if key in seen:
            raise BrainDINOError(f"{source}: duplicate subject {e.subject_id}{' ' + e.session if e.session else ''}")
        seen.add(key)


def _parse_number(text: str) -> tuple[float, str | None] | None:
    match = _NUMBER.match(text)
    if not match:
        return None
    suffix = match.group(2).lower()
    if not suffix:
        return float(match.group(1)), None
    unit = next((u for u, names in _UNITS.items() if suffix in names), None)
    return (float(match.group(1)), unit) if unit else None


def _parse_column(name: str, values: list[str], source: Path) -> tuple[list[float | str | None], str | None]:
    """Numbers (with one unit per column, converted) or text; missing values become None."""
    present = [(i, v.strip()) for i, v in enumerate(values) if v.strip().lower() not in MISSING]
    parsed = [(i, v, _parse_number(v)) for i, v in present]
    failures = [(i, v) for i, v, p in parsed if p is None]
    numeric_name = name.lower() in NUMERIC_LABELS or name.lower().endswith(("_ml", "_days", "_years"))
    if failures and (numeric_name or len(failures) < len(parsed) / 2):
        row, value = failures[0]
        raise BrainDINOError(f"{source}: row {row + 2}, column '{name}': '{value}' is not a number")
    out: list[float | str | None] = [None] * len(values)
    if failures:
        for i, v in present:
            out[i] = v
        return out, None
    units = {p[1] for _, _, p in parsed if p[1]}
    if len(units) > 1:
        raise BrainDINOError(f"{source}: column '{name}' mixes units ({', '.join(sorted(units))}); use one unit")
    if units and any(p[1] is None for _, _, p in parsed):
        raise BrainDINOError(f"{source}: column '{name}' gives a unit on some rows only; use one unit throughout")
    unit = units.pop() if units else None
    target = "years" if name.lower().startswith("age") else "days"
    scale = _IN_DAYS[unit] / _IN_DAYS[target] if unit else 1.0
    for i, _, p in parsed:
        out[i] = p[0] * scale
    return out, (target if unit else _named_unit(name))


def _named_unit(name: str) -> str | None:
    """The unit plain numbers carry by naming convention: ``age`` and ``*_years`` in years, ``*_days``, ``*_ml``."""
    lowered = name.lower()
    if lowered.startswith("age") or lowered.endswith("_years"):
        return "years"
    return {"_days": "days", "_ml": "mL"}.get(lowered[lowered.rfind("_") :]) if "_" in lowered else None


def read_table(path: Path, *, require_images: bool = True) -> Manifest:
    """A CSV/TSV manifest: an id column, image path columns (relative to the table), label columns."""
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        rows = list(csv.reader(io.StringIO(read_text(path), newline=""), delimiter=delimiter))
    except csv.Error as error:
        raise BrainDINOError(f"{path}: cannot read the table ({describe(error)})") from error
    if len(rows) < 2:
        raise BrainDINOError(f"{path}: the table has no data rows")
    header, body = [h.strip() for h in rows[0]], rows[1:]
    ragged = next((i for i, r in enumerate(body) if len(r) != len(header)), None)
    if ragged is not None:
        raise BrainDINOError(f"{path}: row {ragged + 2} has {len(body[ragged])} fields, the header {len(header)}")
    columns = {h: [r[i] for r in body] for i, h in enumerate(header)}
    id_column = next((c for c in header if c.lower() in ID_COLUMNS), header[0])
    image_columns = [
        c
        for c in header
        if c.lower() in MODALITIES
        or c.lower().endswith("_path")
        or (c != id_column and any(v.lower().endswith(IMAGE_SUFFIXES) for v in columns[c]))
    ]
    if require_images and not image_columns:
        raise BrainDINOError(f"{path}: no image path column (name one {', '.join(MODALITIES)} or *_path)")
    units, labels = {}, {}
    for name in header:
        if name in (id_column, "session", "split", *image_columns):
            continue
        labels[name], unit = _parse_column(name, columns[name], path)
        if unit:
            units[name] = unit
    entries = []
    for row_index in range(len(body)):
        images = {}
        for column in image_columns:
            value = columns[column][row_index].strip()
            if not value:
                continue
            image = (path.parent / value) if not Path(value).is_absolute() else Path(value)
            if not image.exists():
                raise BrainDINOError(f"{path}: row {row_index + 2}, column '{column}': {value} does not exist")
            images[column.lower().removesuffix("_path")] = image
        entry_labels = {k: v[row_index] for k, v in labels.items() if v[row_index] is not None}
        session = columns["session"][row_index].strip() if "session" in columns else ""
        entries.append(Entry(columns[id_column][row_index].strip(), images, entry_labels, session))
    _check_unique(entries, path)
    return Manifest(tuple(entries), str(path), "table", units)
