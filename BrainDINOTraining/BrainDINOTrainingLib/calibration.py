"""Calibrate a bundle's out-of-distribution check (`BrainDINOLib.typicality`) on its training data.

The manifest's subjects are split: the slice descriptions (both channels) of the reference subjects'
scans (every scan, prepared whole as ``infer``'s first pass prepares it, through the feature cache)
form the reference;
each held-out scan is scored against it. A channel's threshold is ``margin`` times its largest
held-out score: every held-out training-like scan passes with room for real scans that differ from
the training data in ways the model handles (contrast, resolution, skull), while images whose every
slice is unlike a head MRI slice score higher. The stored reference then holds all subjects' slices.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from BrainDINOLib.errors import BrainDINOError
from BrainDINOLib.typicality import CHANNELS, Typicality

from .data import Manifest
from .features import FeatureCache


@dataclass(frozen=True)
class CalibrationOptions:
    """Attributes:
    k: neighbours per slice.
    reference_size: slice embeddings kept (evenly spaced over all slices of all scans).
    held_out: share of subjects scored against the others to set the threshold.
    margin: a channel's threshold = margin x its largest held-out score.
    seed: subject split.
    """

    k: int = 10
    reference_size: int = 4096
    held_out: float = 0.25
    margin: float = 1.5
    seed: int = 0


def _subsample(parts: list[np.ndarray], size: int) -> np.ndarray:
    stacked = np.concatenate(parts)
    return stacked[np.unique(np.linspace(0, len(stacked) - 1, min(size, len(stacked))).round().astype(int))]


def calibrate_typicality(
    manifest: Manifest, cache: FeatureCache, options: CalibrationOptions = CalibrationOptions(), progress=None
) -> tuple[Typicality, dict]:
    """The reference and thresholds, and what the card records about them.

    Raises:
        BrainDINOError: fewer than 4 subjects, or too few slices for ``k``.
    """
    subjects = manifest.subjects
    if len(subjects) < 4:
        raise BrainDINOError(f"{manifest.source}: calibration needs at least 4 subjects, got {len(subjects)}")
    order = np.random.default_rng(options.seed).permutation(len(subjects))
    held = {subjects[i] for i in order[: max(1, round(options.held_out * len(subjects)))]}
    scans = [(e.subject_id, p) for e in manifest.entries for p in e.scans.values()]
    described = []
    for done, (_, path) in enumerate(scans):
        if progress:
            progress(done, len(scans))
        features = cache.get(path)
        described.append({"embedding": features.embeddings, "thumbnail": features.thumbnails})
    if progress:
        progress(len(scans), len(scans))

    def reference(chosen: list[dict]) -> dict[str, np.ndarray]:
        return {c: _subsample([d[c] for d in chosen], options.reference_size) for c in CHANNELS}

    kept = [d for (subject, _), d in zip(scans, described, strict=True) if subject not in held]
    if sum(len(d["embedding"]) for d in kept) < options.k:
        raise BrainDINOError(f"{manifest.source}: too few slices to calibrate with k={options.k}")
    trial = Typicality.from_slices(reference(kept), options.k)
    scores = [trial.channel_scores(d) for (s, _), d in zip(scans, described, strict=True) if s in held]
    largest = {c: max(score[c] for score in scores) for c in CHANNELS}
    thresholds = {c: float(options.margin * largest[c]) for c in CHANNELS}
    typicality = Typicality.from_slices(reference(described), options.k, thresholds)
    info = {
        "data": manifest.source,
        "scans": len(scans),
        "reference_slices": len(typicality.references["embedding"]),
        "held_out_scans": len(scores),
        "held_out_scores": {
            c: {"median": round(float(np.median([s[c] for s in scores])), 4), "max": round(largest[c], 4)}
            for c in CHANNELS
        },
        "rule": f"threshold = {options.margin:g} x the largest held-out score, per channel",
    }
    return typicality, info
