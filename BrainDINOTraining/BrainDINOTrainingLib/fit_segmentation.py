"""Fit a segmentation decoder on the frozen encoder's multi-layer patch tokens, and measure it in voxels.

Training pairs are the encoded axial slices of each subject: decoder input = the patch tokens of
``layers`` of every chosen sequence (from the feature cache), target = the subject's mask mapped
onto the same canvas by nearest neighbour. Loss: Dice + cross-entropy (MONAI ``DiceCELoss``).
Evaluation happens where clinicians look: the predicted canvas probabilities are sampled back to
every voxel of the scan (as ``braindino infer`` does) and compared with the mask by Dice per label
and for the whole tumour, and the 95th-percentile Hausdorff distance in mm (MONAI).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

from BrainDINOLib.brain import BRAIN_TARGET, largest_component
from BrainDINOLib.bundle import ENCODER_FILE
from BrainDINOLib.errors import BrainDINOError
from BrainDINOLib.heads import (
    HeadSpec,
    HeadTraining,
    SegmentationDecoder,
    build_head,
    segment_slices,
    segmentation_input,
)
from BrainDINOLib.layout import PlaneGeometry
from BrainDINOLib.manifest import DEFAULT_SPLIT, Manifest
from BrainDINOLib.preprocess import labels_to_canvas
from BrainDINOLib.segments import BRATS_CLASSES
from BrainDINOLib.volume import load_labels, load_volume

from .features import FeatureCache
from .fit_heads import FitResult

#: BraTS 2023 labels 1, 2, 3 (also the phantoms').


def default_layers(depth: int) -> tuple[int, ...]:
    """Four evenly spaced blocks ending with the last: (2, 5, 8, 11) for 12 blocks, as BrainDINO uses."""
    return tuple(sorted({round(depth * (i + 1) / 4) - 1 for i in range(4)}))


@dataclass(frozen=True)
class SegOptions:
    """How a segmentation head is fitted.

    Attributes:
        modalities: the scans the decoder reads; several (e.g. t1 t1ce t2 flair) are fused; empty: every scan
            of a subject is a sample of its own, so the head learns to read any contrast (and ``infer``
            applies it to any scan).
        target: the manifest column of the masks (``seg``: tumour labels; ``brain_mask``: a brain-mask head).
        slices_per_scan: training slices kept per scan, evenly spaced (0: all); bounds memory when every
            scan of many subjects is a sample.
        image_channels: the decoder also reads the canvas pixels (`SegmentationDecoder`); 0: tokens alone.
        lesion_share: share of each batch drawn from the training slices that hold a label (0: every slice alike).
            A lesion fills a small share of the slices, and each contrast shows it differently; drawing it more
            often lets the decoder learn each contrast's lesion within the same steps.
    """

    modalities: tuple[str, ...] = ("flair",)
    target: str = "seg"
    slices_per_scan: int = 0
    layers: tuple[int, ...] = ()  # default: `default_layers`
    label_values: tuple[int, ...] = (1, 2, 3)
    classes: tuple[str, ...] = BRATS_CLASSES
    width: int = 128
    image_channels: int = 0
    lesion_share: float = 0.0
    steps: int = 1000  # optimizer steps, the same at every label fraction: fractions compare like for like
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    label_fractions: tuple[float, ...] = (1.0,)
    seeds: tuple[int, ...] = (0,)
    split: dict = field(default_factory=lambda: dict(DEFAULT_SPLIT))
    split_seed: int = 0


@dataclass(frozen=True)
class SegVolume:
    """One subject: decoder inputs and canvas targets of its encoded slices, and the voxel mask."""

    subject: str
    features: torch.Tensor  # (S, C, h, w) float16
    images: torch.Tensor | None  # (S, sequences, canvas, canvas) float16, for decoders that read pixels
    targets: torch.Tensor  # (S, canvas, canvas) uint8 class indices
    labels: np.ndarray  # (X, Y, Z) label values, canonical
    slices: np.ndarray
    plane: PlaneGeometry
    spacing: tuple[float, float, float]


def collect_segmentation(
    manifest: Manifest,
    options: SegOptions,
    cache: FeatureCache,
    progress=None,
    splits: tuple[str, ...] = ("train", "val", "test"),
) -> dict[str, list[SegVolume]]:
    """Samples (subjects with a mask and every chosen sequence, or each scan of such subjects) for each of ``splits``.

    Raises:
        BrainDINOError: no such subjects, a split without them, or mask values outside ``label_values``.
    """
    found: dict[str, list[SegVolume]] = {name: [] for name in splits}
    lookup = np.zeros(max(options.label_values) + 1, dtype=np.int64)
    lookup[list(options.label_values)] = np.arange(1, len(options.label_values) + 1)
    for done, entry in enumerate(manifest.entries):
        if progress:
            progress(done, len(manifest.entries))
        split = manifest.splits.get(entry.subject_id)
        if split not in found or options.target not in entry.images:
            continue
        samples = [options.modalities] if options.modalities else [(m,) for m in entry.scans]
        for modalities in samples:
            if all(m in entry.images for m in modalities):
                volume = _seg_volume(entry, modalities, options, cache, lookup)
                found[split].append(_thin(volume, options.slices_per_scan) if split == "train" else volume)
    if progress:
        progress(len(manifest.entries), len(manifest.entries))
    for name, volumes in found.items():
        if not volumes:
            raise BrainDINOError(
                f"{manifest.source}: no '{name}' subjects with a '{options.target}' mask and "
                f"{list(options.modalities) or 'a scan'}; use more subjects"
            )
    return found


def _seg_volume(entry, modalities: tuple[str, ...], options: SegOptions, cache: FeatureCache, lookup) -> SegVolume:
    """One sample: the decoder input of ``modalities`` of a subject and the canvas targets of its mask."""
    reference = load_volume(entry.images[modalities[0]])
    labels = load_labels(entry.images[options.target], reference)
    for modality in modalities[1:]:  # tokens are concatenated slice by slice: one voxel grid
        other = load_volume(entry.images[modality])
        if other.data.shape != reference.data.shape or not np.allclose(other.affine, reference.affine, atol=1e-3):
            raise BrainDINOError(f"{entry.images[modality]}: not on the voxel grid of {reference.path}")
    unknown = set(np.unique(labels).tolist()) - {0, *options.label_values}
    if unknown:
        mask = entry.images[options.target]
        raise BrainDINOError(f"{mask}: label values {sorted(unknown)} not in {options.label_values}")
    features = [cache.get(entry.images[m]) for m in modalities]
    slices = features[0].slices
    if any(not np.array_equal(f.slices, slices) for f in features[1:]):  # other extents: common slices only
        slices = np.array(sorted(set.intersection(*(set(f.slices.tolist()) for f in features))), dtype=int)
    if not len(slices):
        raise BrainDINOError(f"{entry.subject_id}: its sequences share no analysed axial slice")
    rows = [np.searchsorted(f.slices, slices) for f in features]
    layers = [{i: f.layers[i][r] for i in f.layers} for f, r in zip(features, rows, strict=True)]
    spacing, size = reference.spacing, cache.bundle.card.preprocessing.image_size
    plane = PlaneGeometry.fit(reference.data.shape[:2], (spacing[0], spacing[1]), size)  # as prepare() places it
    classes = torch.from_numpy(lookup[labels[:, :, slices]]).permute(2, 0, 1)
    images = None
    if options.image_channels:
        images = torch.from_numpy(np.stack([f.canvas[r] for f, r in zip(features, rows, strict=True)], axis=1))
    return SegVolume(
        entry.subject_id,
        segmentation_input(layers, cache.layers).to(torch.float16),
        images,
        labels_to_canvas(plane, classes).to(torch.uint8),
        labels,
        slices,
        plane,
        reference.spacing,
    )


def _thin(volume: SegVolume, count: int) -> SegVolume:
    """At most ``count`` evenly spaced slices of a training sample (0: all)."""
    if not count or len(volume.slices) <= count:
        return volume
    keep = np.unique(np.linspace(0, len(volume.slices) - 1, count).round().astype(int))
    images = None if volume.images is None else volume.images[keep]
    return dataclasses.replace(volume, features=volume.features[keep], images=images, targets=volume.targets[keep],
                               slices=volume.slices[keep])  # fmt: skip


def fit_decoder(
    spec: HeadSpec,
    train: list[SegVolume],
    options: SegOptions,
    seed: int,
    embed_dim: int,
    patch: int,
    progress=None,
    device: torch.device | str = "cpu",
):
    """``options.steps`` mini-batches of AdamW (cosine-decayed learning rate) over the training slices
    (`training_batches`), Dice + cross-entropy;
    ``progress(step)`` after each step. Steps run on ``device`` (a GPU takes ~10 ms a step, 2 CPU cores ~0.5 s);
    the decoder comes back on the CPU."""
    from monai.losses import DiceCELoss

    torch.manual_seed(seed)
    decoder = build_head(spec, embed_dim, patch).to(device)
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=options.lr, weight_decay=options.weight_decay)
    # at a constant rate the decoder kept swinging between contrasts to the last step
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=options.steps)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)  # Dice over the batch: most slices hold no tumour
    features = torch.cat([v.features for v in train])
    images = torch.cat([v.images for v in train]) if spec.image_channels else None
    targets = torch.cat([v.targets for v in train])
    batches = training_batches(targets, options, torch.Generator().manual_seed(seed))
    decoder.train()
    for step in range(options.steps):
        batch = next(batches)
        inputs, wanted = features[batch].to(device).float(), targets[batch][:, None].to(device).long()
        pixels = images[batch].to(device).float() if images is not None else None
        loss = loss_fn(decoder(inputs, pixels), wanted)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if progress:
            progress(step + 1)
    return decoder.cpu().eval()


def training_batches(targets: torch.Tensor, options: SegOptions, generator: torch.Generator):
    """Index batches of the training slices, each pool reshuffled whenever it runs out: one pool of every slice,
    or with ``options.lesion_share`` that share of each batch (at least one slice, and one short of all) from the
    slices that hold a label, the rest from the others."""
    everything = torch.arange(len(targets))
    pools, counts = [everything], [options.batch_size]
    if options.lesion_share:
        lesion = targets.flatten(1).amax(dim=1) > 0
        if not lesion.any() or lesion.all():
            raise BrainDINOError("--lesion-share needs training slices both with and without a label")
        lesion_count = min(max(round(options.lesion_share * options.batch_size), 1), options.batch_size - 1)
        pools, counts = [everything[lesion], everything[~lesion]], [lesion_count, options.batch_size - lesion_count]
    orders = [torch.empty(0, dtype=torch.long) for _ in pools]
    while True:
        for k, (pool, count) in enumerate(zip(pools, counts, strict=True)):
            while len(orders[k]) < count:
                orders[k] = torch.cat([orders[k], pool[torch.randperm(len(pool), generator=generator)]])
        yield torch.cat([order[:count] for order, count in zip(orders, counts, strict=True)])
        orders = [order[count:] for order, count in zip(orders, counts, strict=True)]


def segmentation_metrics(spec: HeadSpec, decoder: SegmentationDecoder, volumes: list[SegVolume]) -> dict[str, float]:
    """Mean over subjects: Dice per label and for the whole tumour (any label); whole-tumour HD95 (mm)
    over subjects where both prediction and mask hold tumour."""
    from monai.metrics import compute_dice, compute_hausdorff_distance

    dice = {name: [] for name in ("whole_tumor", *[f"label_{v}" for v in spec.label_values])}
    hd95 = []
    for volume in volumes:
        predicted = np.zeros_like(volume.labels)
        found = segment_slices(spec, decoder, volume.features, volume.plane, volume.images)
        predicted[:, :, volume.slices] = found.transpose(1, 2, 0)
        if spec.target == BRAIN_TARGET:  # as prepare_scan keeps it
            predicted = largest_component(predicted > 0).astype(predicted.dtype)
        pairs = {"whole_tumor": (predicted > 0, volume.labels > 0)}
        pairs.update({f"label_{v}": (predicted == v, volume.labels == v) for v in spec.label_values})
        for name, (p, t) in pairs.items():
            if t.any() or p.any():  # both empty: nothing to score
                score = compute_dice(_onehot(p), _onehot(t), include_background=False, ignore_empty=False)
                dice[name].append(float(score))  # tumour predicted where there is none scores 0
        whole_p, whole_t = pairs["whole_tumor"]
        if whole_p.any() and whole_t.any():
            distance = compute_hausdorff_distance(
                _onehot(whole_p), _onehot(whole_t), percentile=95, spacing=volume.spacing
            )
            hd95.append(float(distance))
    result = {f"dice_{k}": float(np.mean(v)) if v else float("nan") for k, v in dice.items()}
    result["hd95_whole_tumor_mm"] = float(np.mean(hd95)) if hd95 else float("nan")
    return result


def _onehot(mask: np.ndarray) -> torch.Tensor:
    """(X, Y, Z) bool -> (1, 2, X, Y, Z) background/foreground one-hot, as MONAI's metrics take."""
    foreground = torch.from_numpy(mask)[None, None].float()
    return torch.cat([1 - foreground, foreground], dim=1)


def fit_and_evaluate_segmentation(
    manifest: Manifest, cache: FeatureCache, options: SegOptions, name: str, progress=None, training_progress=None
) -> FitResult:
    """Fit a decoder per label fraction and seed; measure each on the test subjects.

    ``progress(done, total)`` follows the feature extraction, ``training_progress(done, total)`` the decoder steps.
    """
    card = cache.bundle.card
    layers = options.layers or default_layers(card.encoder.depth)
    if tuple(cache.layers) != tuple(sorted(layers)):
        raise BrainDINOError(f"the feature cache keeps layers {list(cache.layers)}, the head needs {list(layers)}")
    splits = collect_segmentation(manifest.split(options.split, seed=options.split_seed), options, cache, progress)
    spec = HeadSpec(
        name=name,
        kind="seg",
        target=options.target,
        modalities=options.modalities,
        classes=options.classes,
        label_values=options.label_values,
        layers=tuple(sorted(layers)),
        width=options.width,
        image_channels=options.image_channels,
        encoder_sha256=card.files[ENCODER_FILE],
    )
    rows, kept = [], None
    runs = [(fraction, seed) for fraction in sorted(options.label_fractions, reverse=True) for seed in options.seeds]
    for run, (fraction, seed) in enumerate(runs):
        count = max(1, int(round(fraction * len(splits["train"]))))
        chosen = np.random.default_rng(seed).choice(len(splits["train"]), count, replace=False)
        train = [splits["train"][i] for i in sorted(chosen)]

        def report(step: int, offset: int = run * options.steps) -> None:
            training_progress(offset + step, len(runs) * options.steps)

        decoder = fit_decoder(spec, train, options, seed, card.encoder.embed_dim, card.encoder.patch_size,
                              report if training_progress else None, cache.device)  # fmt: skip
        row = {"label_fraction": fraction, "seed": seed, "model": "head", "train_samples": len(train)}
        rows.append({**row, **segmentation_metrics(spec, decoder, splits["test"])})
        kept = kept or decoder
    first = rows[0]
    spec = dataclasses.replace(
        spec,
        metrics={k: v for k, v in first.items() if k not in ("label_fraction", "seed", "model")},
        training=HeadTraining(
            data=manifest.source,
            split=options.split,
            split_seed=options.split_seed,
            label_fraction=first["label_fraction"],
            seed=first["seed"],
            steps=options.steps,
            test_subjects=len(splits["test"]),
        ),
    )
    return FitResult(spec, kept, rows)
