"""Fit volume heads (classification, regression, survival, sequence type) on a frozen encoder.

Samples come from a manifest: one per scan group of a subject (the chosen modalities' slice CLS
tokens together) for cls/reg/surv, one per image for sequence type; with ``thumbnails`` each slice's
token is followed by its thumbnail. The split is by subject (`Manifest.split`, stratified for
classification); label scarcity is simulated by keeping a fraction of the training subjects (stratified,
seeded). Each head is fitted full-batch with AdamW for a fixed number of epochs at a few weight decays, and
the one with the best validation loss is kept (heads are small and data often tiny: strong decoupled weight
decay is the regulariser).
`fit_and_evaluate` measures each fitted head and the baselines (`baselines`) on the same test subjects
(`metrics`).

Losses: cross-entropy (cls, seq), mean squared error on standardised targets (reg), negative Cox
partial log-likelihood with Breslow handling of ties (surv).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from BrainDINOLib.bundle import ENCODER_FILE
from BrainDINOLib.errors import BrainDINOError
from BrainDINOLib.heads import (
    VOLUME_KINDS,
    HeadSpec,
    HeadTraining,
    VolumeHead,
    decode_outputs,
    masked_mean,
    volume_input,
)
from BrainDINOLib.manifest import DEFAULT_SPLIT, Manifest

from .baselines import baseline_predictions
from .features import FeatureCache
from .metrics import cox_loss, metrics


@dataclass(frozen=True)
class FitOptions:
    """A head-fitting run.

    Attributes:
        task: cls | reg | surv | seq.
        target: manifest column (cls: required; reg: ``age``; surv: the time column, default
            ``survival_days``); seq predicts the modality and ignores it.
        event: surv: the event column (1 = event observed, 0 = censored).
        modalities: scans read per subject (cls, reg, surv); seq uses every image.
        thumbnails: each slice's embedding is followed by its thumbnail (`HeadSpec.thumbnails`).
    """

    task: str
    target: str = ""
    event: str = "event"
    modalities: tuple[str, ...] = ("t1",)
    aggregation: str = "mean"
    thumbnails: bool = False
    label_fractions: tuple[float, ...] = (1.0,)
    seeds: tuple[int, ...] = (0,)
    epochs: int = 300
    lr: float = 1e-3
    weight_decays: tuple[float, ...] = (0.1, 1.0, 10.0)
    split: dict = field(default_factory=lambda: dict(DEFAULT_SPLIT))
    split_seed: int = 0

    def __post_init__(self):
        if self.task not in VOLUME_KINDS:
            raise BrainDINOError(f"task must be one of {', '.join(VOLUME_KINDS)}, got '{self.task}'")
        if self.task == "cls" and not self.target:
            raise BrainDINOError("a classification head needs --target (the label column)")
        if any(not 0 < f <= 1 for f in self.label_fractions):
            raise BrainDINOError(f"label fractions must lie in (0, 1], got {list(self.label_fractions)}")

    @property
    def column(self) -> str:
        return self.target or {"reg": "age", "surv": "survival_days", "seq": "modality"}.get(self.task, "")


@dataclass(frozen=True)
class Samples:
    """Volumes of one split: padded slice tokens, targets, events, subjects."""

    tokens: torch.Tensor  # (N, S, D) float32, zero-padded
    mask: torch.Tensor  # (N, S) bool
    targets: torch.Tensor  # (N,) long class index or float value
    events: torch.Tensor  # (N,) float, surv only (else ones)
    subjects: list[str]

    def __len__(self) -> int:
        return len(self.subjects)

    def pooled(self) -> np.ndarray:
        return masked_mean(self.tokens, self.mask).numpy()

    def subset(self, keep: np.ndarray) -> Samples:
        keep_t = torch.as_tensor(keep)
        return Samples(
            self.tokens[keep_t], self.mask[keep_t], self.targets[keep_t], self.events[keep_t],
            [self.subjects[i] for i in keep],
        )  # fmt: skip


@dataclass(frozen=True)
class FitResult:
    """The head to keep (largest label fraction, first seed), every row, and for volume heads the
    test samples with the kept head's predictions."""

    spec: HeadSpec
    head: torch.nn.Module
    rows: list[dict]
    test: Samples | None = None
    test_predictions: np.ndarray | None = None


def collect(
    manifest: Manifest,
    options: FitOptions,
    cache: FeatureCache,
    progress=None,
    classes: tuple[str, ...] = (),
    splits: tuple[str, ...] = ("train", "val", "test"),
) -> tuple[dict[str, Samples], tuple]:
    """Samples of ``splits`` and the class names (empty for reg/surv); ``progress(done, total)`` per scan.

    Args:
        classes: a fitted head's classes (the data's own, sorted, when empty); scans of other classes are an error.

    Raises:
        BrainDINOError: no usable scans, a split without samples, or fewer than two classes.
    """
    rows = []  # (split, subject, tokens, raw target, event)
    for done, entry in enumerate(manifest.entries):
        if progress:
            progress(done, len(manifest.entries))
        split = manifest.splits.get(entry.subject_id)
        if split not in splits:
            continue
        if options.task == "seq":
            for modality, path in entry.sequences.items():
                rows.append((split, entry.subject_id, _slice_inputs(cache, path, options), modality, 1.0))
            continue
        if options.column not in entry.labels or not all(m in entry.images for m in options.modalities):
            continue
        event = 1.0
        if options.task == "surv":
            if options.event not in entry.labels:
                continue
            event = float(entry.labels[options.event])
        tokens = np.concatenate([_slice_inputs(cache, entry.images[m], options) for m in options.modalities])
        rows.append((split, entry.subject_id, tokens, entry.labels[options.column], event))
    if progress:
        progress(len(manifest.entries), len(manifest.entries))
    if not rows:
        wanted = "images" if options.task == "seq" else f"'{options.column}' and scans {list(options.modalities)}"
        raise BrainDINOError(f"{manifest.source}: no scan has {wanted}")
    if options.task in ("cls", "seq"):
        found = tuple(sorted({class_name(r[3]) for r in rows}))
        unknown = sorted(set(found) - set(classes)) if classes else []
        if unknown:
            raise BrainDINOError(f"{manifest.source}: '{options.column}' values {unknown} are not the head's {classes}")
        classes = classes or found
        if len(classes) < 2:
            raise BrainDINOError(f"{manifest.source}: '{options.column}' has a single class ({classes[0]})")
    length = max(len(r[2]) for r in rows)
    samples = {}
    for split in splits:
        chosen = [r for r in rows if r[0] == split]
        if not chosen:
            raise BrainDINOError(f"{manifest.source}: no '{split}' subjects with usable scans; use more subjects")
        tokens = torch.zeros(len(chosen), length, chosen[0][2].shape[1])
        mask = torch.zeros(len(chosen), length, dtype=torch.bool)
        for i, row in enumerate(chosen):
            tokens[i, : len(row[2])] = torch.from_numpy(row[2].astype(np.float32))
            mask[i, : len(row[2])] = True
        if classes:
            targets = torch.tensor([classes.index(class_name(r[3])) for r in chosen])
        else:
            targets = torch.tensor([float(r[3]) for r in chosen])
        events = torch.tensor([r[4] for r in chosen])
        samples[split] = Samples(tokens, mask, targets, events, [r[1] for r in chosen])
    return samples, classes


def _slice_inputs(cache: FeatureCache, scan, options: FitOptions) -> np.ndarray:
    features = cache.get(scan)
    return volume_input(features.embeddings, features.thumbnails if options.thumbnails else None)


def class_name(value) -> str:
    """A label value as a class name: whole numbers without a decimal point (marker 1, not 1.0)."""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def label_subset(train: Samples, fraction: float, seed: int, classification: bool) -> Samples:
    """A seeded ``fraction`` of the training samples (stratified for classes; at least one per class)."""
    rng = np.random.default_rng(seed)
    if fraction >= 1:
        return train
    groups = (
        [np.flatnonzero(train.targets.numpy() == c) for c in np.unique(train.targets)]
        if classification
        else [np.arange(len(train))]
    )
    keep = [rng.choice(g, max(1, int(round(fraction * len(g)))), replace=False) for g in groups]
    return train.subset(np.sort(np.concatenate(keep)))


def head_loss(task: str, outputs: torch.Tensor, samples: Samples, mean: float, std: float) -> torch.Tensor:
    if task in ("cls", "seq"):
        return F.cross_entropy(outputs, samples.targets)
    if task == "reg":
        return F.mse_loss(outputs[:, 0], (samples.targets - mean) / std)
    return cox_loss(outputs[:, 0], samples.targets, samples.events)


def fit_volume_head(
    spec: HeadSpec, splits: dict[str, Samples], options: FitOptions, seed: int
) -> tuple[VolumeHead, float]:
    """Full-batch AdamW on ``splits['train']`` for ``options.epochs``, once per weight decay of
    ``options.weight_decays``; returns the head with the lowest validation loss and its weight decay.

    Choosing among a few fully trained candidates is steadier than picking an epoch when the
    validation set holds only a handful of subjects.
    """
    train, val = splits["train"], splits["val"]
    best = (float("inf"), None, 0.0)
    for weight_decay in options.weight_decays:
        torch.manual_seed(seed)
        head = VolumeHead(train.tokens.shape[-1], spec.outputs, spec.aggregation)
        head.fit_standardisation(train.tokens, train.mask)
        optimizer = torch.optim.AdamW(head.parameters(), lr=options.lr, weight_decay=weight_decay)
        for _ in range(options.epochs):
            loss = head_loss(spec.kind, head(train.tokens, train.mask), train, spec.target_mean, spec.target_std)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        head.eval()
        with torch.no_grad():
            val_loss = float(head_loss(spec.kind, head(val.tokens, val.mask), val, spec.target_mean, spec.target_std))
        if val_loss < best[0]:
            best = (val_loss, head, weight_decay)
    return best[1], best[2]


def predict(spec: HeadSpec, head: VolumeHead, samples: Samples) -> np.ndarray:
    """Class probabilities (N, K), values in units (N,), or risk scores (N,)."""
    with torch.no_grad():
        return decode_outputs(spec, head(samples.tokens, samples.mask))


def fit_and_evaluate(
    manifest: Manifest, cache: FeatureCache, options: FitOptions, name: str, progress=None
) -> FitResult:
    """Fit a head for every label fraction and seed, measure it and the baselines on the test split
    (one row per fraction, seed and model). ``progress(done, total)`` follows the feature extraction."""
    stratify = options.column if options.task == "cls" else None
    if stratify:  # subjects without the label take no part (and cannot be stratified)
        manifest = dataclasses.replace(manifest, entries=tuple(e for e in manifest.entries if stratify in e.labels))
    split = manifest.split(options.split, stratify=stratify, seed=options.split_seed)
    splits, classes = collect(split, options, cache, progress)
    spec = HeadSpec(
        name=name,
        kind=options.task,
        target=options.column,
        modalities=() if options.task == "seq" else options.modalities,
        classes=classes,
        units={"reg": manifest.units.get(options.column, ""), "surv": "relative risk (log hazard)"}.get(
            options.task, ""
        ),
        aggregation=options.aggregation,
        thumbnails=options.thumbnails,
        width=splits["train"].tokens.shape[-1],
        encoder_sha256=cache.bundle.card.files[ENCODER_FILE],
    )
    rows, kept = [], None
    for fraction in sorted(options.label_fractions, reverse=True):
        for seed in options.seeds:
            train = label_subset(splits["train"], fraction, seed, options.task in ("cls", "seq"))
            run = spec
            if options.task == "reg":  # targets standardised with the labels this run may see
                targets = train.targets.float()
                std = float(targets.std()) if len(targets) > 1 else 1.0
                run = dataclasses.replace(spec, target_mean=float(targets.mean()), target_std=max(std, 1e-6))
            head, weight_decay = fit_volume_head(run, {**splits, "train": train}, options, seed)
            predictions = {"head": predict(run, head, splits["test"])}
            predictions.update(baseline_predictions(options.task, train, splits["test"], len(classes), seed))
            for model, values in predictions.items():
                row = {"label_fraction": fraction, "seed": seed, "model": model, "train_samples": len(train)}
                row["weight_decay"] = weight_decay if model == "head" else ""
                rows.append({**row, **metrics(options.task, values, splits["test"])})
            if kept is None:
                kept = (head, predictions["head"], run)
    first = [r for r in rows if r["model"] == "head"][0]
    spec = dataclasses.replace(
        kept[2],
        metrics={k: v for k, v in first.items() if k not in ("label_fraction", "seed", "model", "weight_decay")},
        training=HeadTraining(
            data=manifest.source,
            split=options.split,
            split_seed=options.split_seed,
            stratify=stratify,
            event=options.event if options.task == "surv" else None,
            label_fraction=first["label_fraction"],
            seed=first["seed"],
            epochs=options.epochs,
            weight_decay=first["weight_decay"],
            test_subjects=len(set(splits["test"].subjects)),
        ),
    )
    return FitResult(spec, kept[0], rows, splits["test"], kept[1])
