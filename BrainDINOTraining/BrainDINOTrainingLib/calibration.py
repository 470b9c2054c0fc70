"""Calibrate a bundle's out-of-distribution check (`BrainDINOLib.typicality`) on its training data.

The manifest's subjects are split: slice embeddings of the reference subjects' scans (every scan,
prepared as ``infer`` prepares it, through the feature cache) form the reference; each held-out scan
is scored against it. The threshold is ``margin`` times the largest held-out score: every held-out
training-like scan passes with room to spare for real scans that differ from the training data in
ways the model handles (contrast, resolution, skull), while images whose every slice is unlike a
brain MRI slice score several times higher. The stored reference then holds all subjects' slices.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from BrainDINOLib.errors import BrainDINOError
from BrainDINOLib.typicality import Typicality

from .data import Manifest
from .features import FeatureCache


@dataclass(frozen=True)
class CalibrationOptions:
    """Attributes:
    k: neighbours per slice.
    reference_size: slice embeddings kept (evenly spaced over all slices of all scans).
    held_out: share of subjects scored against the others to set the threshold.
    margin: threshold = margin x the largest held-out score.
    seed: subject split.
    """

    k: int = 10
    reference_size: int = 4096
    held_out: float = 0.25
    margin: float = 2.0
    seed: int = 0


def _reference(embeddings: list[np.ndarray], size: int) -> np.ndarray:
    stacked = np.concatenate(embeddings)
    return stacked[np.unique(np.linspace(0, len(stacked) - 1, min(size, len(stacked))).round().astype(int))]


def calibrate_typicality(
    manifest: Manifest, cache: FeatureCache, options: CalibrationOptions = CalibrationOptions(), progress=None
) -> tuple[Typicality, dict]:
    """The reference and threshold, and what the card records about them.

    Raises:
        BrainDINOError: fewer than 4 subjects, or too few slices for ``k``.
    """
    subjects = manifest.subjects
    if len(subjects) < 4:
        raise BrainDINOError(f"{manifest.source}: calibration needs at least 4 subjects, got {len(subjects)}")
    order = np.random.default_rng(options.seed).permutation(len(subjects))
    held = {subjects[i] for i in order[: max(1, round(options.held_out * len(subjects)))]}
    scans = [(e.subject_id, p) for e in manifest.entries for p in e.scans.values()]
    embeddings = []
    for done, (_, path) in enumerate(scans):
        if progress:
            progress(done, len(scans))
        embeddings.append(cache.get(path).embeddings)
    if progress:
        progress(len(scans), len(scans))
    reference = [e for (subject, _), e in zip(scans, embeddings, strict=True) if subject not in held]
    if sum(len(e) for e in reference) < options.k:
        raise BrainDINOError(f"{manifest.source}: too few slices to calibrate with k={options.k}")
    trial = Typicality.from_embeddings(_reference(reference, options.reference_size), options.k)
    scores = np.array([trial.score(e) for (s, _), e in zip(scans, embeddings, strict=True) if s in held])
    threshold = float(options.margin * scores.max())
    typicality = Typicality.from_embeddings(_reference(embeddings, options.reference_size), options.k, threshold)
    info = {
        "data": manifest.source,
        "scans": len(scans),
        "reference_slices": len(typicality.reference),
        "held_out_scans": len(scores),
        "held_out_scores": {"median": round(float(np.median(scores)), 4), "max": round(float(scores.max()), 4)},
        "rule": f"threshold = {options.margin:g} x the largest held-out score",
    }
    return typicality, info
