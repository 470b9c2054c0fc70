"""``braindino evaluate``: the metrics of a bundle's stored heads on a manifest, on the test subjects of the split
each was fitted with (its `HeadTraining`), or on every subject of another dataset."""

from __future__ import annotations

from pathlib import Path

from BrainDINOLib.bundle import Bundle
from BrainDINOLib.errors import BrainDINOError
from BrainDINOLib.manifest import Manifest

from .features import FeatureCache
from .fit_heads import FitOptions, collect, predict
from .fit_segmentation import SegOptions, collect_segmentation, segmentation_metrics
from .metrics import metrics


def evaluate_bundle(
    bundle: Bundle,
    manifest: Manifest,
    cache_folder: str | Path | None = None,
    device: str = "auto",
    every_subject: bool = False,
    names: tuple[str, ...] = (),
    progress=None,
) -> list[dict]:
    """Metrics of the bundle's heads (or those named) on a manifest: one row per head and metric.

    Args:
        every_subject: score all subjects (an external dataset); otherwise the test subjects of the
            split each head was fitted with (same fractions and seed).
    """
    specs = [s for s in bundle.card.heads if not names or s.name in names]
    missing = sorted(set(names) - {s.name for s in specs})
    if missing or not specs:
        raise BrainDINOError(f"{bundle.path}: no heads named {missing}" if missing else f"{bundle.path}: has no heads")
    rows = []
    for spec in specs:
        fractions = {"test": 1.0} if every_subject else spec.training.split
        stratify = None if every_subject else spec.training.stratify
        split = manifest.split(fractions, stratify=stratify, seed=spec.training.split_seed)
        head = bundle.load_head(spec)
        if spec.kind == "seg":
            options = SegOptions(modalities=spec.modalities, target=spec.target, layers=spec.layers,
                                 label_values=spec.label_values, classes=spec.classes,
                                 image_channels=spec.image_channels)  # fmt: skip
            cache = FeatureCache(bundle, cache_folder, spec.layers, device)
            volumes = collect_segmentation(split, options, cache, progress, splits=("test",))["test"]
            values, count = segmentation_metrics(spec, head, volumes), len(volumes)
        else:
            event = spec.training.event or "event"
            options = FitOptions(spec.kind, spec.target, event, modalities=spec.modalities or ("t1",),
                                 thumbnails=spec.thumbnails)  # fmt: skip
            cache = FeatureCache(bundle, cache_folder, device=device)
            test = collect(split, options, cache, progress, classes=spec.classes, splits=("test",))[0]["test"]
            values, count = metrics(spec.kind, predict(spec, head, test), test), len(test)
        rows += [
            {"head": spec.name, "kind": spec.kind, "samples": count, "metric": k, "value": v} for k, v in values.items()
        ]
    return rows
