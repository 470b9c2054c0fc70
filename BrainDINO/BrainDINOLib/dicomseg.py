"""Segmentations as a DICOM Segmentation object (SEG) beside the DICOM series they were computed from, so a
PACS or a DICOM viewer stores and shows them with the scan.

One SEG per scan holds every segment of the run (each class of each segmentation head, then the brain mask),
as binary frames on the source series' own frames, each segment with the terminology codes of the Slicer
segments (`segments`). Its UIDs derive from the source series, the BrainDINO version, the model and the
segments' voxels, so the same run gives the same object and different segments never share a UID.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import __version__
from .errors import BrainDINOError, describe
from .segments import segment_style
from .volume import Volume

#: What a segment of unknown meaning is coded as (SNOMED CT "Tissue", a category and type DICOM allows).
_TISSUE = ("85756007", "Tissue")


def write_dicom_seg(
    series_files: list[str], volume: Volume, segments: list[tuple[str, np.ndarray]], path: str | Path, *, model: str
) -> Path:
    """Write the segments of a scan read from a DICOM series as one SEG object.

    Args:
        series_files: the series' files in the order of the volume's K axis (`volume.dicom_series_files`).
        volume: the scan read from them.
        segments: (name, canonical (X, Y, Z) bool mask) in segment-number order.
        model: the model's name (the SEG's algorithm).

    Raises:
        BrainDINOError: a source file cannot be read, or the series cannot carry a SEG (e.g. missing UIDs).
    """
    import hashlib

    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    folder = Path(series_files[0]).parent
    try:
        sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in series_files]
    except (OSError, pydicom.errors.InvalidDicomError) as error:
        raise BrainDINOError(f"{folder}: cannot read the DICOM series ({describe(error)})") from error
    # (I, J, K) masks -> frames (K, rows = J, columns = I): SimpleITK stacks the series' frames along K
    frames = np.stack([volume.to_source(mask) for _, mask in segments], axis=-1).transpose(2, 1, 0, 3)
    frames = frames.astype(bool)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=f"BrainDINO {model}", version=__version__, family=codes.cid7162.ArtificialIntelligence
    )
    descriptions = []
    for number, (name, _) in enumerate(segments, start=1):
        category, kind, colour = segment_style(name, number - 1)
        category, kind = category or _TISSUE, kind or _TISSUE
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=name[:64],
                segmented_property_category=hd.sr.CodedConcept(category[0], "SCT", category[1]),
                segmented_property_type=hd.sr.CodedConcept(kind[0], "SCT", kind[1]),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
                display_color=hd.color.CIELabColor.from_rgb(*(round(255 * c) for c in colour)),
            )
        )
    series = sources[0]
    names = "\0".join(name for name, _ in segments)
    seed = [series.SeriesInstanceUID, __version__, model, names, hashlib.sha256(frames.tobytes()).hexdigest()]
    try:
        seg = hd.seg.Segmentation(
            source_images=sources,
            pixel_array=frames,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=generate_uid(entropy_srcs=[*seed, "series"]),
            series_number=1000 + int(getattr(series, "SeriesNumber", None) or 0),
            sop_instance_uid=generate_uid(entropy_srcs=[*seed, "instance"]),
            instance_number=1,
            manufacturer="BrainDINO",
            manufacturer_model_name=model[:64],
            software_versions=__version__,
            device_serial_number="0",
            content_label="BRAINDINO",
            content_description=f"BrainDINO {model}"[:64],
            series_description=f"BrainDINO segmentation ({model})"[:64],
            omit_empty_frames=bool(frames.any()),  # a SEG needs a frame: all-empty masks keep theirs
        )
    except (ValueError, AttributeError, TypeError) as error:  # highdicom's checks of the source attributes
        raise BrainDINOError(f"{folder}: the series cannot carry a DICOM SEG ({describe(error)})") from error
    path = Path(path)
    seg.save_as(path)
    return path
