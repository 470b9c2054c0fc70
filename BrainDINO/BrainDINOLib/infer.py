"""The ``infer`` pipeline: scan -> encoder -> maps written in the scan's own geometry.

Outputs in ``out_dir`` (``<name>`` is the scan's file name without extension):
``<name>_attention.nii.gz``, ``<name>_pca.nii.gz`` (RGB), ``<name>_similarity.nii.gz`` (with a
query voxel), ``<name>_seg.nii.gz`` (with a segmentation head), ``embeddings.safetensors``,
``result.json`` (with the heads' predictions) and ``report.png``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from . import __version__
from .bundle import DEFAULT_MODELS_DIR, find_bundle, load_bundle
from .engine import ProgressCallback, encode_volume, resolve_device
from .errors import BrainDINOError, describe
from .featuremaps import (
    PcaColors,
    attention_mass_threshold,
    mean_attention,
    patch_foreground,
    query_patch,
    similarity_map,
    to_volume,
)
from .heads import predict_volume, prediction_text, segment_slices, segmentation_input, segmentation_summary
from .preprocess import prepare
from .report import write_report
from .volume import NIBABEL_SUFFIXES, SIMPLEITK_SUFFIXES, load_volume, save_like

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class InferenceOptions:
    """Choices of one ``infer`` run (built by the CLI or the Slicer module).

    Attributes:
        bundle: bundle folder or name (None: the catalogue default).
        models_dir: where user bundles live.
        device: ``auto``, ``cpu``, ``cuda[:N]`` or ``mps``.
        batch_size: slices per forward pass (None: device default).
        query: file voxel (i, j, k) whose patch is compared with every patch (similarity map).
        volume_index: volume of a 4D scan.
        dicom_series: series UID when a DICOM folder holds several.
        report: render ``report.png``.
        sequence: the scan's MRI sequence as heads name them (``t1``, ``t1ce``, ``t2``, ``flair``);
            None: the bundle's sequence head decides, if it has one.
        other_scans: other sequences of the same subject (sequence -> file), read by the volume
            heads that need them.
    """

    bundle: str | None = None
    models_dir: Path = DEFAULT_MODELS_DIR
    device: str = "auto"
    batch_size: int | None = None
    query: tuple[int, int, int] | None = None
    volume_index: int | None = None
    dicom_series: str | None = None
    report: bool = True
    sequence: str | None = None
    other_scans: dict[str, Path] = field(default_factory=dict)


def output_stem(scan: str | Path) -> str:
    """The scan's file name without its image extension (folder name for DICOM)."""
    name = Path(scan).resolve().name
    for suffix in sorted(NIBABEL_SUFFIXES + SIMPLEITK_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def run_inference(
    scan: str | Path,
    out_dir: str | Path,
    options: InferenceOptions = InferenceOptions(),
    *,
    progress: ProgressCallback | None = None,
    cancel: Callable[[], bool] | None = None,
) -> dict:
    """Run the whole pipeline and write every output; returns what ``result.json`` holds.

    Raises:
        BrainDINOError: bad scan, bundle, device or query (one line naming the problem).
        Cancelled: when ``cancel()`` returned True; nothing is written.
    """
    clock = time.perf_counter()
    timings = {}

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 3)
        clock = now

    out_dir = Path(out_dir)
    device = resolve_device(options.device)
    bundle = load_bundle(find_bundle(options.bundle, options.models_dir))
    check_sequences(bundle.head_specs, options)
    encoder = bundle.load_encoder()
    lap("load_model")
    volume = load_volume(scan, volume_index=options.volume_index, dicom_series=options.dicom_series)
    lap("load_scan")
    prepared = prepare(volume, bundle.card.preprocessing)
    grid = bundle.card.encoder.patch_grid(bundle.card.preprocessing.image_size)
    query = query_patch(volume, prepared, grid, options.query) if options.query else None  # fail before encoding
    query_xyz = volume.canonical_index(options.query) if options.query else None
    try:  # before encoding, so an unusable folder costs nothing
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / ".braindino-write-test").touch()
        (out_dir / ".braindino-write-test").unlink()
    except OSError as error:
        raise BrainDINOError(f"{out_dir}: cannot write outputs there ({describe(error)})") from error
    lap("prepare")
    layers = sorted({i for spec in bundle.head_specs if len(spec.modalities) == 1 for i in spec.layers})
    encoded = encode_volume(
        prepared,
        encoder,
        device=device,
        batch_size=options.batch_size,
        layers=layers,
        progress=progress,
        cancel=cancel,
    )
    lap("encode")
    predictions, segmentations, head_warnings = _apply_heads(
        bundle, encoder, scan, volume, prepared, encoded, options, device, cancel
    )
    lap("heads")

    attention_grid = mean_attention(encoded.attention)
    attention = to_volume(prepared, attention_grid)
    attention_threshold = dict(zip(prepared.slices.tolist(), attention_mass_threshold(attention_grid), strict=True))
    colors = PcaColors.fit(encoded.patch_tokens, patch_foreground(prepared, encoded.grid))
    pca = to_volume(prepared, colors.rgb(encoded.patch_tokens), rgb=True)
    similarity = None
    if query is not None:
        similarity = to_volume(prepared, similarity_map(encoded.patch_tokens, query))
    lap("maps")

    stem = output_stem(scan)
    outputs = {
        "attention": f"{stem}_attention.nii.gz",
        "pca": f"{stem}_pca.nii.gz",
        "embeddings": "embeddings.safetensors",
    }
    if similarity is not None:
        outputs["similarity"] = f"{stem}_similarity.nii.gz"
    for name in segmentations:
        outputs[f"segmentation:{name}"] = (
            f"{stem}_seg.nii.gz" if len(segmentations) == 1 else f"{stem}_seg_{name}.nii.gz"
        )
    with ThreadPoolExecutor(max_workers=3) as pool:  # gzip and file writes release the GIL
        jobs = [
            pool.submit(save_like, volume, attention, out_dir / outputs["attention"]),
            pool.submit(save_like, volume, pca, out_dir / outputs["pca"]),
            pool.submit(_save_embeddings, out_dir / outputs["embeddings"], encoded, prepared, bundle.card.name),
        ]
        if similarity is not None:
            jobs.append(pool.submit(save_like, volume, similarity, out_dir / outputs["similarity"]))
        for name, labels in segmentations.items():
            jobs.append(pool.submit(save_like, volume, labels, out_dir / outputs[f"segmentation:{name}"]))
        if options.report:
            outputs["report"] = "report.png"
            write_report(
                out_dir / outputs["report"],
                volume,
                prepared,
                bundle.card,
                attention,
                attention_threshold,
                pca,
                similarity,
                query_xyz,
                [prediction_text(name, p) for name, p in predictions.items()],
                next(iter(segmentations.values()), None),
            )
        for job in jobs:
            job.result()
    lap("write")

    warnings = list(volume.warnings) + head_warnings
    if bundle.card.random_init:
        warnings.append(
            f"model '{bundle.card.name}' is randomly initialised: "
            "the maps test the software and carry no learned meaning"
        )
    skipped = volume.data.shape[2] - len(prepared.slices)
    if skipped:
        warnings.append(
            f"{skipped} of {volume.data.shape[2]} axial slices lie outside the brain extent or the slice "
            "filters and were not analysed (their maps are 0)"
        )
    result = {
        "braindino_version": __version__,
        "input": {
            "path": str(scan),
            "shape": list(volume.source_shape),
            "orientation": "".join(volume.source_axcodes),
            "spacing_mm": [round(s, 4) for s in volume.spacing],
            "affine": volume.source_affine.tolist(),
        },
        "model": {
            "name": bundle.card.name,
            "path": str(bundle.path),
            "encoder": bundle.card.encoder.name,
            "random_init": bundle.card.random_init,
            "intended_use": bundle.card.intended_use,
            "sha256": bundle.card.files,
        },
        "preprocessing": bundle.card.preprocessing.to_dict(),
        "slices": {
            "analysed": len(prepared.slices),
            "first": int(prepared.slices[0]),
            "last": int(prepared.slices[-1]),
            "axis": "canonical RAS z (axial)",
        },
        "device": str(device),
        "query_voxel": list(options.query) if options.query else None,
        "predictions": predictions,
        "outputs": outputs,
        "timings_s": {**timings, "total": round(sum(timings.values()), 3)},
        "warnings": warnings,
    }
    (out_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def check_sequences(specs, options: InferenceOptions) -> None:
    """Refuse, before any encoding, a scan sequence the bundle's sequence head does not know and
    ``--also`` files that are missing or that repeat the scan's own sequence.

    Raises:
        BrainDINOError: an unknown sequence, a missing file, or ``--also`` without a way to know the scan's sequence.
    """
    vocabulary = {c for s in specs if s.kind == "seq" for c in s.classes}
    if options.sequence and vocabulary and options.sequence not in vocabulary:
        raise BrainDINOError(
            f"'{options.sequence}' is not a sequence this bundle knows ({', '.join(sorted(vocabulary))})"
        )
    if options.sequence in options.other_scans:
        raise BrainDINOError(f"--also gives a {options.sequence} scan, but the scan itself is {options.sequence}")
    if options.other_scans and options.sequence is None and not vocabulary:
        raise BrainDINOError("this bundle has no sequence head: name the scan's sequence (--sequence) to use --also")
    for name, path in options.other_scans.items():
        if not Path(path).exists():
            raise BrainDINOError(f"{path}: no such file (given as the subject's {name} scan)")


def _apply_heads(bundle, encoder, scan, volume, prepared, encoded, options: InferenceOptions, device, cancel):
    """Predictions of the bundle's heads, label volumes of its segmentation heads, and notes on how each was fed.

    The scan's sequence is ``options.sequence``, else the sequence head's answer. A head runs when
    every sequence it reads is at hand (the scan, or ``options.other_scans``: encoded here, slice
    embeddings only); segmentation heads run on the scan alone. With the scan's sequence unknown,
    single-sequence heads read the scan as their own sequence, and a warning says so.

    Raises:
        BrainDINOError: the sequence head names the scan as a sequence ``--also`` also gives.
    """
    pooling, specs = bundle.card.pooling, bundle.head_specs
    own = encoded.slice_embeddings(pooling)
    predictions, segmentations, warnings = {}, {}, []
    sequence = options.sequence
    for spec in specs:
        if spec.kind == "seq":
            predictions[spec.name] = predict_volume(spec, bundle.load_head(spec), own)
            if sequence is None:
                sequence = predictions[spec.name]["prediction"]
                probability = predictions[spec.name]["probabilities"][sequence]
                warnings.append(f"the scan was identified as {sequence} ({probability:.2f}) by head '{spec.name}'")
    if sequence in options.other_scans:
        raise BrainDINOError(f"the scan looks like {sequence}, and --also gives another {sequence} scan: "
                             "name the scan's sequence with --sequence")  # fmt: skip
    at_hand, embeddings = ({sequence: scan}, {sequence: own}) if sequence else ({}, {})
    needed = {m for s in specs if s.kind != "seg" for m in s.modalities}
    for name, path in options.other_scans.items():
        if name not in needed:
            warnings.append(f"--also {name}: no volume head of this bundle reads {name} scans; not used")
            continue
        other = prepare(load_volume(path), bundle.card.preprocessing)
        encoded_other = encode_volume(other, encoder, device=device, batch_size=options.batch_size, cancel=cancel)
        embeddings[name], at_hand[name] = encoded_other.slice_embeddings(pooling), path
    for spec in specs:
        if spec.kind == "seq":
            continue
        reads = spec.modalities
        if sequence is None and len(reads) == 1 and not options.other_scans:
            sources, embeddings[reads[0]] = {reads[0]: scan}, own
            warnings.append(
                f"head '{spec.name}' read the scan as {reads[0]} (its sequence is unknown: pass --sequence)"
            )
        elif spec.kind == "seg" and reads != (sequence,):
            warnings.append(
                f"head '{spec.name}' segments {'+'.join(reads)} scans; this scan is {sequence or 'unknown'}"
            )
            continue
        elif not all(m in at_hand for m in reads):
            missing = [m for m in reads if m not in at_hand]
            warnings.append(f"head '{spec.name}' reads {'+'.join(reads)}; pass the subject's {'+'.join(missing)} "
                            "scan with --also SEQUENCE=FILE to apply it")  # fmt: skip
            continue
        else:
            sources = {m: at_hand[m] for m in reads}
        head = bundle.load_head(spec)
        if spec.kind == "seg":
            labels = np.zeros(volume.data.shape, dtype=np.int16)
            features = segmentation_input([encoded.layers], spec.layers)
            labels[:, :, prepared.slices] = segment_slices(spec, head, features, prepared.plane).transpose(1, 2, 0)
            segmentations[spec.name] = labels
            predictions[spec.name] = segmentation_summary(spec, labels, volume.spacing)
        else:
            tokens = np.concatenate([embeddings[m] for m in reads])
            predictions[spec.name] = predict_volume(spec, head, tokens)
        predictions[spec.name]["reads"] = {m: str(p) for m, p in sources.items()}
    return predictions, segmentations, warnings


def _save_embeddings(path: Path, encoded, prepared, model_name: str) -> None:
    tensors = {
        "cls": torch.from_numpy(encoded.cls),
        "patch_tokens": torch.from_numpy(encoded.patch_tokens),
        "attention": torch.from_numpy(encoded.attention),
        "slices": torch.from_numpy(encoded.slices.astype(np.int64)),
    }
    plane = prepared.plane
    metadata = {
        "model": model_name,
        "slice_axis": "canonical RAS z",
        "plane": json.dumps(
            {
                "slice_shape": plane.slice_shape,
                "rows": plane.rows,
                "cols": plane.cols,
                "row0": plane.row0,
                "col0": plane.col0,
                "canvas": plane.canvas,
            }
        ),
    }
    save_file(tensors, path, metadata=metadata)
