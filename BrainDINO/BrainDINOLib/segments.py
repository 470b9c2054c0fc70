"""What segmentation labels mean, without torch or Slicer: the BraTS class names the tumour heads use, and the
DICOM / SNOMED CT terminology Slicer shows for them (and for the brain mask)."""

from __future__ import annotations

BRATS_CLASSES = ("necrotic / non-enhancing tumour core", "peritumoral oedema", "enhancing tumour")

_ALTERED = ("49755003", "Morphologically Altered Structure")
#: Segment name -> (DICOM / SNOMED CT category, type, display colour): the BraTS classes and the brain.
SEGMENT_TERMINOLOGY = {
    BRATS_CLASSES[0]: (_ALTERED, ("6574001", "Necrosis"), (0.86, 0.27, 0.22)),
    BRATS_CLASSES[1]: (_ALTERED, ("79654002", "Edema"), (0.55, 0.88, 0.89)),
    BRATS_CLASSES[2]: (_ALTERED, ("108369006", "Neoplasm"), (1.0, 0.86, 0.2)),
    "Brain": (("123037004", "Anatomical Structure"), ("12738006", "Brain"), (0.93, 0.78, 0.65)),
}

#: Colours of segments without a terminology entry (a head fitted on other classes), by segment position.
_PALETTE = ((0.3, 0.75, 0.3), (0.85, 0.5, 0.85), (0.4, 0.6, 1.0), (1.0, 0.6, 0.2))


def segment_style(name: str, index: int) -> tuple[tuple[str, str] | None, tuple[str, str] | None, tuple]:
    """(category, type, colour) of the ``index``-th segment: its terminology, or no codes and a palette colour."""
    return SEGMENT_TERMINOLOGY.get(name, (None, None, _PALETTE[index % len(_PALETTE)]))


def terminology_entry(category: tuple[str, str], kind: tuple[str, str]) -> str:
    """Slicer's terminology entry string for a SNOMED CT category and type (``vtkSegment.SetTerminology``)."""
    return (
        f"Segmentation category and type - DICOM master list~SCT^{category[0]}^{category[1]}"
        f"~SCT^{kind[0]}^{kind[1]}~^^~Anatomic codes - DICOM master list~^^~^^"
    )
