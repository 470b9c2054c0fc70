"""Sample data: the real MNI ICBM152 2009a template shipped inside the ``nilearn`` wheel, and the
demo's held-out phantom subject with a tumour (in ``samples/``, shipped with the package)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

from .errors import BrainDINOError

MNI_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}


def mni_path(kind: str = "t1") -> Path:
    """Path of the MNI T1 template (1 mm, 197x233x189) or its grey/white-matter maps.

    Found without importing nilearn (which is slow to import).
    """
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise BrainDINOError("the sample MNI template needs the 'nilearn' package (pip install nilearn)")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / MNI_FILES[kind]
    if not path.is_file():
        raise BrainDINOError(f"{path}: the MNI template is missing from this nilearn installation")
    return path


DEMO_PHANTOM_DIR = Path(__file__).resolve().parent / "samples" / "demo-phantom"


def demo_phantom() -> tuple[dict[str, Path], dict]:
    """The demo phantom's scans (sequence, ``seg`` or ``brainmask`` -> file) and its true labels (``labels.json``).

    Generated with a seed that neither the default bundle's encoder cohort nor its heads cohort used.
    """
    labels = DEMO_PHANTOM_DIR / "labels.json"
    if not labels.is_file():
        raise BrainDINOError(f"{DEMO_PHANTOM_DIR}: the demo phantom is missing (no labels.json)")
    truth = json.loads(labels.read_text())
    prefix = f"{truth['subject_id']}_"
    scans = {p.name[len(prefix) : -len(".nii.gz")]: p for p in sorted(DEMO_PHANTOM_DIR.glob(f"{prefix}*.nii.gz"))}
    return scans, truth


def slicer_sample_source() -> dict:
    """Keyword arguments of Slicer's ``SampleData.SampleDataLogic.registerCustomSampleDataSource`` for the demo
    phantom's FLAIR, T1 and T1ce: ``file://`` URIs of the shipped files with their SHA-256 (Sample Data copies
    them into its cache and checks them), node names as the module's *Load sample* gives them."""
    scans, _ = demo_phantom()
    sequences = ("flair", "t1", "t1ce")
    return {
        "category": "BrainDINO",
        "sampleName": "BrainDINO demo phantom",
        "thumbnailFileName": str(DEMO_PHANTOM_DIR / "thumbnail.png"),
        "uris": [scans[s].as_uri() for s in sequences],
        "fileNames": [scans[s].name for s in sequences],
        "nodeNames": [f"phantom {s.upper()}" for s in sequences],
        "checksums": [f"SHA256:{hashlib.sha256(scans[s].read_bytes()).hexdigest()}" for s in sequences],
    }
