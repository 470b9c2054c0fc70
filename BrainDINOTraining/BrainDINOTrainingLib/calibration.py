"""Calibrate a bundle's out-of-distribution check (`BrainDINOLib.typicality`) on its training data.

The manifest's subjects are split. The reference subjects' scans (every scan, prepared whole as ``infer``'s
first pass prepares it, through the feature cache) give the neighbour channels' reference slices and the
outlier classifier's positive slices; its negative slices come from procedural non-MRI volumes
(`outliers`). Each held-out scan is then scored. A neighbour channel's threshold is ``margin`` times its
largest held-out score: every held-out training-like scan passes with room for real scans that differ from
the training data in ways the model handles (contrast, resolution, skull), while images whose every slice
is unlike a head MRI slice score higher. The outlier channel's threshold is the same rule, but never below
0.5, the classifier's own boundary. The stored reference and classifier then use all subjects.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.neural_network import MLPClassifier

from BrainDINOLib.errors import BrainDINOError
from BrainDINOLib.manifest import Manifest
from BrainDINOLib.typicality import CHANNELS, Typicality, outlier_features

from .features import FeatureCache
from .outliers import outlier_volumes

#: The outlier classifier's threshold never goes below its own decision boundary.
OUTLIER_FLOOR = 0.5


@dataclass(frozen=True)
class CalibrationOptions:
    """Attributes:
    k: neighbours per slice.
    reference_size: slices kept for the neighbour channels and as the classifier's positives (evenly
        spaced over all slices of all scans).
    held_out: share of subjects scored against the others to set the thresholds.
    margin: a channel's threshold = margin x its largest held-out score.
    outliers: procedural non-MRI volumes (16 slices each) the classifier learns to reject.
    hidden: units of the classifier's one hidden layer.
    regularisation: L2 penalty (alpha) of the classifier's weights.
    seed: subject split and procedural volumes.
    """

    k: int = 10
    reference_size: int = 4096
    held_out: float = 0.25
    margin: float = 1.5
    outliers: int = 240
    hidden: int = 64
    regularisation: float = 1e-3
    seed: int = 0


def _evenly(rows: int, size: int) -> np.ndarray:
    return np.unique(np.linspace(0, rows - 1, min(size, rows)).round().astype(int))


def _reference(described: list[dict[str, np.ndarray]], size: int) -> dict[str, np.ndarray]:
    """The descriptions of ``size`` slices evenly spaced over all slices of the scans (rows aligned)."""
    stacked = {d: np.concatenate([scan[d] for scan in described]) for d in described[0]}
    chosen = _evenly(len(stacked["embedding"]), size)
    return {d: values[chosen] for d, values in stacked.items()}


def _fit_typicality(positives, negatives, options: CalibrationOptions, thresholds=None) -> Typicality:
    """Neighbour references from the positive slices and the classifier of positives against negatives."""
    features = np.concatenate([outlier_features(positives), outlier_features(negatives)])
    is_outlier = np.r_[np.zeros(len(positives["embedding"])), np.ones(len(negatives["embedding"]))]
    share = np.bincount(is_outlier.astype(int)) / len(is_outlier)  # both classes weigh the same
    classifier = MLPClassifier((options.hidden,), alpha=options.regularisation, max_iter=500, random_state=options.seed)
    classifier.fit(features, is_outlier, sample_weight=0.5 / share[is_outlier.astype(int)])
    layers = list(zip(classifier.coefs_, classifier.intercepts_, strict=True))
    return Typicality.from_slices(positives, options.k, layers, thresholds)


def calibrate_typicality(
    manifest: Manifest, cache: FeatureCache, options: CalibrationOptions = CalibrationOptions(), progress=None
) -> tuple[Typicality, dict]:
    """The reference, classifier and thresholds, and what the card records about them.

    Args:
        cache: features of whole scans (``masked=False``), as ``infer``'s first pass sees them.

    Raises:
        BrainDINOError: fewer than 4 subjects, or too few slices for ``k``.
    """
    subjects = manifest.subjects
    if len(subjects) < 4:
        raise BrainDINOError(f"{manifest.source}: calibration needs at least 4 subjects, got {len(subjects)}")
    order = np.random.default_rng(options.seed).permutation(len(subjects))
    held = {subjects[i] for i in order[: max(1, round(options.held_out * len(subjects)))]}
    scans = [(e.subject_id, p) for e in manifest.entries for p in e.scans.values()]
    steps = len(scans) + options.outliers
    described = []
    for done, (_, path) in enumerate(scans):
        if progress:
            progress(done, steps)
        described.append(cache.get(path).descriptions())
    outliers = []
    for done, volume in enumerate(outlier_volumes(options.outliers, options.seed)):
        if progress:
            progress(len(scans) + done, steps)
        try:
            outliers.append(cache.compute(volume).descriptions())
        except BrainDINOError:  # no foreground: infer refuses such a volume before any check
            continue
    if progress:
        progress(steps, steps)
    negatives = {d: np.concatenate([o[d] for o in outliers]) for d in outliers[0]}

    kept = [d for (subject, _), d in zip(scans, described, strict=True) if subject not in held]
    if sum(len(d["embedding"]) for d in kept) < options.k:
        raise BrainDINOError(f"{manifest.source}: too few slices to calibrate with k={options.k}")
    trial = _fit_typicality(_reference(kept, options.reference_size), negatives, options)
    scores = [trial.channel_scores(d) for (s, _), d in zip(scans, described, strict=True) if s in held]
    largest = {c: max(score[c] for score in scores) for c in CHANNELS}
    thresholds = {c: float(options.margin * largest[c]) for c in CHANNELS}
    thresholds["outlier"] = max(thresholds["outlier"], OUTLIER_FLOOR)
    typicality = _fit_typicality(_reference(described, options.reference_size), negatives, options, thresholds)
    info = {
        "data": manifest.source,
        "scans": len(scans),
        "reference_slices": len(typicality.references["embedding"]),
        "outlier_volumes": len(outliers),
        "outlier_slices": len(negatives["embedding"]),
        "held_out_scans": len(scores),
        "held_out_scores": {
            c: {"median": round(float(np.median([s[c] for s in scores])), 4), "max": round(largest[c], 4)}
            for c in CHANNELS
        },
        "rule": (
            f"threshold = {options.margin:g} x the largest held-out score, per channel (outlier: at least "
            f"{OUTLIER_FLOOR:g}); outlier classifier: perceptron, one hidden layer of {options.hidden} ReLU "
            f"units, L2 {options.regularisation:g}, against procedural non-MRI volumes"
        ),
    }
    return typicality, info
