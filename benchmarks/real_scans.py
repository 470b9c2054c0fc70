"""How a bundle behaves on real scans: one JSON object per scan.

    python benchmarks/real_scans.py SCAN_OR_FOLDER ... [--bundle NAME] [--references refs.csv]
    python benchmarks/real_scans.py --mni          # the MNI template (the one real scan that ships here)

For each scan (image files; folders are searched recursively for image files): the sequence head's
answer and its probability, the out-of-distribution score, threshold and flag, and, where a
reference is given, the Dice of the bundle's brain mask and of its lesion segmentation (any label; and
of the tumour core, every BraTS label but oedema (2), which is what a post-contrast T1 shows) against it,
the share of the attention mass inside the reference brain mask, and the share of the reference lesion
inside the brain mask the bundle found (the rest is neither analysed nor segmented), and which head segmented
the lesion. The sequence head names each scan's sequence, as when a user leaves it to the bundle; with
``--name-sequences`` each scan is given its reference sequence instead, as a user who names it would (a
segmentation head fitted on that sequence then segments it).
``--references`` is a CSV with a ``scan`` column (path as given or file name) and optional ``sequence`` (the truth),
``brain_mask`` and ``lesion_mask`` columns (paths relative to the CSV). With ``--mni`` the template's
own non-zero voxels are its brain mask. A scan that cannot be read or analysed gives a JSON object
with its error, and the others go on.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np

from BrainDINOLib.bundle import find_bundle, load_bundle
from BrainDINOLib.errors import BrainDINOError
from BrainDINOLib.infer import InferenceOptions, analyse
from BrainDINOLib.sample_data import mni_path
from BrainDINOLib.volume import NIBABEL_SUFFIXES, SIMPLEITK_SUFFIXES, load_labels, load_volume

BRATS_OEDEMA = 2  # the oedema label in every BraTS edition (the core's labels differ: 1 and 3 or 4)


def scans_of(paths: list[Path]) -> list[Path]:
    suffixes = NIBABEL_SUFFIXES + SIMPLEITK_SUFFIXES
    found = []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.name.lower().endswith(suffixes))
        else:
            found.append(path)
    return found


def read_references(table: Path | None) -> dict[str, dict]:
    """scan (as given, and its file name) -> its reference columns, with paths resolved against the table."""
    if table is None:
        return {}
    references = {}
    with open(table, newline="") as handle:
        for row in csv.DictReader(handle):
            entry = {k: v.strip() for k, v in row.items() if k != "scan" and v and v.strip()}
            for key in ("brain_mask", "lesion_mask"):
                if key in entry:
                    entry[key] = table.parent / entry[key]
            references[row["scan"]] = references[Path(row["scan"]).name] = entry
    return references


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return round(2 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0), 4)


def measure(scan: Path, bundle, reference: dict, device: str, name_sequence: bool = False) -> dict:
    """One scan's JSON object (canonical voxel order throughout)."""
    start = time.perf_counter()
    volume = load_volume(scan)
    given = reference["sequence"].lower() if name_sequence and "sequence" in reference else None
    analysis = analyse(volume, bundle, InferenceOptions(sequence=given, device=device))
    result = {
        "scan": str(scan),
        "shape": list(volume.source_shape),
        "spacing_mm": [round(s, 3) for s in volume.spacing],
    }
    sequence = next((p for p in analysis.predictions.values() if p["kind"] == "seq"), None)
    if sequence:
        result["sequence"] = sequence["prediction"]
        result["sequence_probability"] = sequence["probabilities"][sequence["prediction"]]
        if "sequence" in reference:
            result["sequence_truth"] = reference["sequence"]
            result["sequence_correct"] = sequence["prediction"] == reference["sequence"]
    result.update(analysis.ood or {"out_of_distribution": None, "ood_score": None, "ood_threshold": None})
    brain_truth = None
    if "brain_mask" in reference:
        brain_truth = load_labels(reference["brain_mask"], volume) > 0
    elif reference.get("brain_is_nonzero"):
        brain_truth = volume.data != 0
    if analysis.brain is not None:
        result["brain_ml"] = round(float(analysis.brain.sum()) * float(np.prod(volume.spacing)) / 1000, 1)
        if brain_truth is not None:
            result["brain_dice"] = dice(analysis.brain, brain_truth)
    if brain_truth is not None:
        mass = float(analysis.attention.sum())
        result["attention_in_brain"] = round(float(analysis.attention[brain_truth].sum()) / max(mass, 1e-12), 4)
    if "lesion_mask" in reference:
        labels = load_labels(reference["lesion_mask"], volume)
        lesion = labels > 0
        result["lesion_truth_ml"] = round(float(lesion.sum()) * float(np.prod(volume.spacing)) / 1000, 2)
        if analysis.brain is not None and lesion.any():  # what the brain mask leaves out is never analysed
            result["lesion_in_brain_mask"] = round(float((lesion & analysis.brain).sum()) / float(lesion.sum()), 4)
        if analysis.segmentations:
            result["lesion_head"], found = next(iter(analysis.segmentations.items()))
            result["lesion_dice"] = dice(found > 0, lesion)
            core = lesion & (labels != BRATS_OEDEMA)
            if core.any():
                result["lesion_core_dice"] = dice((found > 0) & (found != BRATS_OEDEMA), core)
    result["warnings"] = analysis.warnings
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scans", nargs="*", type=Path, help="scan files or folders")
    parser.add_argument(
        "--mni", action="store_true", help="also run the MNI ICBM152 2009a T1 template (skull-stripped)"
    )
    parser.add_argument("--references", type=Path, help="CSV: scan, sequence, brain_mask, lesion_mask")
    parser.add_argument(
        "--name-sequences",
        action="store_true",
        help="give each scan its reference sequence, as a user who names it would (default: the sequence head "
        "names it)",
    )
    parser.add_argument("--bundle", help="bundle name or folder (default: the shipped default)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if not args.scans and not args.mni:
        parser.error("give scans or folders, or --mni")
    bundle = load_bundle(find_bundle(args.bundle))
    references = read_references(args.references)
    jobs = [(scan, references.get(str(scan), references.get(scan.name, {}))) for scan in scans_of(args.scans)]
    if args.mni:
        jobs.append((Path(mni_path("t1")), {"sequence": "t1", "brain_is_nonzero": True}))
    failed = 0
    for scan, reference in jobs:
        try:
            row = {"bundle": bundle.card.name, **measure(scan, bundle, reference, args.device, args.name_sequences)}
        except (BrainDINOError, OSError) as error:
            row, failed = {"bundle": bundle.card.name, "scan": str(scan), "error": str(error)}, failed + 1
        print(json.dumps(row), flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
