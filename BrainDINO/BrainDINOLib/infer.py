"""The ``infer`` pipeline: scan -> encoder -> maps written in the scan's own geometry.

Outputs in ``out_dir`` (``<name>`` is the scan's file name without extension):
``<name>_attention.nii.gz``, ``<name>_pca.nii.gz`` (RGB), ``<name>_similarity.nii.gz`` (with a
query voxel), ``<name>_seg.nii.gz`` (with a segmentation head), ``<name>_brainmask.nii.gz`` (with a
brain-mask head, which then bounds the analysed slices, the normalisation and every map),
``<name>_seg.dcm`` (a DICOM SEG of those segmentations, for a DICOM series on request),
``embeddings.safetensors``, ``result.json`` (with the heads' predictions) and ``report.png``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .brain import brain_head, prepare_scan
from .bundle import DEFAULT_MODELS_DIR, Bundle, ModelCard, find_bundle, load_bundle
from .engine import EncodedVolume, ProgressCallback, autocast_dtype, encode_volume, precision_name, resolve_device
from .errors import BrainDINOError, describe
from .featuremaps import TOKENS_FILE, TokenMaps, query_patch
from .heads import (
    HeadSpec,
    predict_volume,
    segment_slices,
    segmentation_input,
    segmentation_summary,
    volume_input,
)
from .predictions import ood_warning
from .preprocess import PreparedVolume, PreprocessSpec, prepare
from .report import write_report
from .typicality import scan_descriptions, slice_thumbnails
from .volume import NIBABEL_SUFFIXES, SIMPLEITK_SUFFIXES, Volume, dicom_series_files, load_volume, save_like

logger = logging.getLogger(__name__)


KEEP_BLOCKS = ("last", "all")
IMAGE_SIZE_RANGE = (112, 1024)  # the canvas sides --image-size accepts: from a 7 x 7 to a 64 x 64 grid of 16-px patches


@dataclass(frozen=True)
class InferenceOptions:
    """Choices of one ``infer`` run (built by the CLI or the Slicer module).

    Attributes:
        bundle: bundle folder or name (None: the catalogue default).
        models_dir: where user bundles live.
        device: ``auto``, ``cpu``, ``cuda[:N]`` or ``mps``.
        batch_size: slices per forward pass (None: device default).
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16`` (`engine.autocast_dtype`).
        query: file voxel (i, j, k) whose patch is compared with every patch (similarity map).
        volume_index: volume of a 4D scan.
        dicom_series: series UID when a DICOM folder holds several.
        report: render ``report.png``.
        sequence: the scan's MRI sequence as heads name them (``t1``, ``t1ce``, ``t2``, ``flair``);
            None: the bundle's sequence head decides, if it has one.
        other_scans: other sequences of the same subject (sequence -> file), read by the volume
            heads that need them.
        keep_blocks: ``last`` keeps the last block's patch tokens in ``embeddings.safetensors``; ``all`` every
            block's (PCA and similarity of any block can then be made from the file, as the Slicer module does).
        dicom_seg: for a DICOM series, also write the segmentations as a DICOM SEG referencing it.
        image_size: side in pixels of the canvas the maps and heads are computed on (pass 2; None: the bundle's
            ``preprocessing.image_size``); see `analysis_spec`.
    """

    bundle: str | None = None
    models_dir: Path = DEFAULT_MODELS_DIR
    device: str = "auto"
    batch_size: int | None = None
    precision: str = "auto"
    query: tuple[int, int, int] | None = None
    volume_index: int | None = None
    dicom_series: str | None = None
    report: bool = True
    sequence: str | None = None
    other_scans: dict[str, Path] = field(default_factory=dict)
    keep_blocks: str = "last"
    dicom_seg: bool = False
    image_size: int | None = None

    def __post_init__(self):
        if self.keep_blocks not in KEEP_BLOCKS:
            raise BrainDINOError(f"keep_blocks is one of {', '.join(KEEP_BLOCKS)}, not '{self.keep_blocks}'")

    def record(self) -> dict:
        """The choices that shape a run's outputs, as ``result.json`` keeps them (a cohort rerun compares them)."""
        return {
            "query": list(self.query) if self.query else None,
            "volume_index": self.volume_index,
            "dicom_series": self.dicom_series,
            "sequence": self.sequence,
            "other_scans": {name: str(path) for name, path in sorted(self.other_scans.items())},
            "keep_blocks": self.keep_blocks,
            "report": self.report,
            "dicom_seg": self.dicom_seg,
            "image_size": self.image_size,
        }


def analysis_spec(card: ModelCard, image_size: int | None) -> PreprocessSpec:
    """The preprocessing of the maps and heads: the bundle's, on an ``image_size``-px canvas (None: its own).

    Only RoPE encoders (DINOv3 family) take another canvas: their rotary angles are computed for the patch grid at
    hand, exactly. A learned position embedding (DINOv2 family) is a table for the bundle's grid; timm could
    resample it bicubically, but the positions in between would be interpolated, not learned.

    Raises:
        BrainDINOError: the size is outside `IMAGE_SIZE_RANGE`, not a multiple of the patch size, or not the bundle's
            own for an encoder with a learned position embedding.
    """
    spec, encoder = card.preprocessing, card.encoder
    if image_size is None or image_size == spec.image_size:
        return spec
    low, high = IMAGE_SIZE_RANGE
    if not low <= image_size <= high or image_size % encoder.patch_size:
        raise BrainDINOError(
            f"image size {image_size} px: choose a multiple of {encoder.name}'s {encoder.patch_size}-px patches "
            f"from {low} to {high} px (the bundle's own: {spec.image_size})"
        )
    if not encoder.any_canvas:
        raise BrainDINOError(
            f"image size {image_size} px: {encoder.name} has a learned position embedding for the bundle's "
            f"{spec.image_size}-px canvas; only RoPE encoders (DINOv3 family) run on other canvases"
        )
    return dataclasses.replace(spec, image_size=image_size)


def output_stem(scan: str | Path) -> str:
    """The scan's file name without its image extension (folder name for DICOM)."""
    name = Path(scan).resolve().name
    for suffix in sorted(NIBABEL_SUFFIXES + SIMPLEITK_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


@dataclass(frozen=True)
class Analysis:
    """What one run computed, in memory and in canonical (RAS+) voxel order: the files of ``infer`` are made
    from it (and the Slicer module's nodes from those files).

    Attributes:
        maps: the tokens and attention the maps come from (kept as ``embeddings.safetensors``).
        attention: (X, Y, Z) mean last-block CLS attention (1 = uniform).
        attention_threshold: canonical slice -> attention level bounding 60 % of the slice's attention.
        pca: (X, Y, Z, 3) uint8 colours of the first three principal components of the patch tokens.
        predictions: head name -> prediction (as in ``result.json``).
        segmentations: segmentation head name -> (X, Y, Z) int16 label volume.
        brain: (X, Y, Z) bool brain mask from the bundle's brain-mask head (None without one); attention,
            PCA, similarity and segmentations are zero outside it.
        brain_head: the name of that head.
        ood: `Typicality.verdict` of the scan (None: the bundle has no out-of-distribution reference).
        sequence: the scan's sequence as the heads read it (given, or the sequence head's answer; None: unknown).
    """

    volume: Volume
    prepared: PreparedVolume
    maps: TokenMaps
    card: ModelCard
    device: torch.device
    attention: np.ndarray
    attention_threshold: dict[int, float]
    pca: np.ndarray
    predictions: dict
    segmentations: dict[str, np.ndarray]
    warnings: list[str]
    timings: dict[str, float]
    brain: np.ndarray | None = None
    brain_head: str | None = None
    ood: dict | None = None
    sequence: str | None = None

    def query_patch(self, ijk: tuple[int, int, int]) -> tuple[int, int, int]:
        """(slice position, row, col) of the patch holding source voxel ``ijk``.

        Raises:
            BrainDINOError: the voxel is outside the volume or on a slice that was not analysed.
        """
        return query_patch(self.volume, self.maps.layout, self.maps.grid, ijk)


def analyse(
    volume: Volume,
    bundle: Bundle,
    options: InferenceOptions = InferenceOptions(),
    *,
    others: dict[str, Volume | Path] | None = None,
    progress: ProgressCallback | None = None,
    cancel: Callable[[], bool] | None = None,
) -> Analysis:
    """Encode a volume, apply the bundle's heads and compute the feature maps; writes nothing.

    Args:
        options: checked against the bundle (`check_options`; `run_inference` does so before reading the scan).
        others: the subject's other sequences (sequence -> volume, or its file, read only if a head needs it).

    Raises:
        BrainDINOError: bad device, sequence or query.
        Cancelled: when ``cancel()`` returned True.
    """
    clock = time.perf_counter()
    timings = {}

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 3)
        clock = now

    device = resolve_device(options.device)
    others = others or {}
    final = analysis_spec(bundle.card, options.image_size)  # pass 2: the maps and heads
    encoder = bundle.load_encoder()
    encode = partial(encode_volume, encoder=encoder, device=device, batch_size=options.batch_size,
                     precision=options.precision, cancel=cancel)  # fmt: skip
    typicality = bundle.load_typicality()
    brain_spec = brain_head(bundle.card.heads)
    lap("load_model")
    spec = bundle.card.preprocessing  # pass 1 (the brain) and the out-of-distribution check: the bundle's canvas
    whole = prepare(volume, spec)
    grid = bundle.card.encoder.patch_grid(spec.image_size)
    if options.query:  # fail before encoding
        query_patch(volume, whole.layout, grid, options.query)
    read = {m for s in bundle.card.heads if s.kind != "seg" for m in s.modalities}
    loaded = {name: o if isinstance(o, Volume) else load_volume(o) for name, o in others.items() if name in read}
    wholes = {name: prepare(other, spec) for name, other in loaded.items()}
    lap("prepare")
    passes = 2 if brain_spec else 1  # pass 1 finds the brain, pass 2 encodes it
    checking_whole = typicality is not None and brain_spec is None and final != spec  # the check's own pass 1
    part = _progress_parts(
        progress, passes * sum(len(w.slices) for w in (whole, *wholes.values())) + checking_whole * len(whole.slices)
    )

    def prepared_for_heads(scan: Volume, first: PreparedVolume):
        """(prepared, brain, warnings, pass 1's encoding) of a scan, through the brain-mask head if any."""
        finding = part(len(first.slices)) if passes == 2 else None
        return prepare_scan(
            scan, bundle, encoder, whole=first, final=final, device=device, batch_size=options.batch_size,
            precision=options.precision, progress=finding, cancel=cancel,
        )  # fmt: skip

    prepared, brain, warnings, first_pass = prepared_for_heads(volume, whole)
    if final != spec and any(s != brain_spec for s in bundle.card.heads):
        warnings.append(f"the heads were fitted on {spec.image_size}-px canvases; at {final.image_size} px their "
                        "predictions may shift")  # fmt: skip
    found = {}
    for name, other in loaded.items():
        found[name], _, notes, _ = prepared_for_heads(other, wholes[name])
        warnings += notes
    # the final encodings run in this order, after every pass 1: the scan, then the others (`_apply_heads`)
    encoding = part(len(whole.slices), len(prepared.slices))
    other_scans = {
        name: OtherScan(other.path, found[name], part(len(wholes[name].slices), len(found[name].slices)))
        for name, other in loaded.items()
    }
    checking = part(len(whole.slices)) if checking_whole else None
    lap("brain")
    layers = {i for s in bundle.card.heads if s.kind == "seg" and len(s.modalities) <= 1 and s != brain_spec
              for i in s.layers}  # fmt: skip
    last = bundle.card.encoder.depth - 1
    kept = (*(range(last) if options.keep_blocks == "all" else ()), last)
    encoded = encode(prepared, layers=sorted({*layers, *kept[:-1]}), progress=encoding)
    lap("encode")
    scan = HeadInputs(volume, prepared, encoded, brain, other_scans, [name for name in others if name not in read])
    outcome = _apply_heads(bundle, scan, options.sequence, encode)
    ood = None
    if typicality:  # the whole scan on the bundle's canvas, as pass 1 saw it
        if first_pass is not None:
            seen = first_pass
        elif checking_whole:
            seen = encode(whole, progress=checking)
        else:  # without a brain-mask head, on the bundle's canvas: the only pass
            seen = encoded
        ood = typicality.verdict(scan_descriptions(whole, seen, bundle.card.pooling))
        if ood["out_of_distribution"]:
            warnings.append(ood_warning(bundle.card.name, ood))
            for prediction in outcome.predictions.values():
                prediction["unreliable"] = True
    lap("heads")
    maps = TokenMaps(
        layout=prepared.layout,
        cls=encoded.cls,
        blocks={i: encoded.patch_tokens if i == last else encoded.layers[i] for i in kept},
        kept=kept,
        attention=encoded.attention,
        foreground=prepared.foreground,
        foreground_patches=prepared.patch_foreground(encoded.grid),  # with a brain mask: brain patches
        masked=brain is not None,
        model=bundle.card.name,
    )
    analysis = Analysis(
        volume=volume,
        prepared=prepared,
        maps=maps,
        card=bundle.card,
        device=device,
        attention=maps.attention_map(),
        attention_threshold=dict(zip(prepared.slices.tolist(), maps.attention_levels(), strict=True)),
        pca=maps.pca(),
        predictions=outcome.predictions,
        segmentations=outcome.segmentations,
        warnings=[
            *volume.warnings,
            *warnings,
            *outcome.warnings,
            *_model_and_slice_warnings(bundle.card, volume, prepared),
        ],
        timings=timings,
        brain=brain,
        brain_head=brain_spec.name if brain is not None else None,
        ood=ood,
        sequence=outcome.sequence,
    )
    lap("maps")
    return analysis


def _progress_parts(progress: ProgressCallback | None, total: int):
    """``part(size, steps)`` gives the progress callback of the next ``size`` units of a job of ``total`` units,
    for a task reporting ``steps`` steps (default ``size``: one unit per step)."""
    offset = 0

    def part(size: int, steps: int | None = None) -> ProgressCallback | None:
        nonlocal offset
        start, offset = offset, offset + size
        scale = size / max(steps or size, 1)
        return None if progress is None else lambda done, _: progress(start + round(done * scale), total)

    return part


def _model_and_slice_warnings(card: ModelCard, volume: Volume, prepared: PreparedVolume) -> list[str]:
    warnings = []
    if card.random_init:
        warnings.append(
            f"model '{card.name}' is randomly initialised: the maps test the software and carry no learned meaning"
        )
    skipped = volume.data.shape[2] - len(prepared.slices)
    if skipped:
        warnings.append(
            f"{skipped} of {volume.data.shape[2]} axial slices lie outside the brain extent or the slice "
            "filters and were not analysed (their maps are 0)"
        )
    return warnings


def run_inference(
    scan: str | Path,
    out_dir: str | Path,
    options: InferenceOptions = InferenceOptions(),
    *,
    bundle: Bundle | None = None,
    volume: Volume | None = None,
    progress: ProgressCallback | None = None,
    cancel: Callable[[], bool] | None = None,
) -> dict:
    """Run the whole pipeline and write every output; returns what ``result.json`` holds.

    Args:
        bundle: the model, when the caller has loaded it (a cohort loads it once); default: ``options.bundle``.
        volume: ``scan`` already read with ``options`` (a cohort reads the next scan during this one).

    Raises:
        BrainDINOError: bad scan, bundle, device or query (one line naming the problem).
        Cancelled: when ``cancel()`` returned True; nothing is written.
    """
    clock = time.perf_counter()
    out_dir = Path(out_dir)
    bundle = bundle or load_bundle(find_bundle(options.bundle, options.models_dir))
    check_options(bundle, options)
    volume = volume or read_scan(scan, options)
    load_time = time.perf_counter() - clock
    created = _writable_folder(out_dir)
    try:
        analysis = analyse(volume, bundle, options, others=options.other_scans, progress=progress, cancel=cancel)
    except BaseException:
        if created and not any(out_dir.iterdir()):  # a failed run leaves no trace
            out_dir.rmdir()
        raise
    clock = time.perf_counter()
    similarity = analysis.maps.similarity(analysis.query_patch(options.query)) if options.query else None
    outputs = _write_maps(out_dir, output_stem(scan), analysis, similarity, options)
    if options.dicom_seg:
        outputs.update(_write_dicom_seg(scan, out_dir / f"{output_stem(scan)}_seg.dcm", analysis, bundle, options))
    timings = {"load_scan": round(load_time, 3), **analysis.timings, "write": round(time.perf_counter() - clock, 3)}
    result = _result_record(scan, options, bundle, analysis, outputs, timings)
    (out_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def check_options(bundle: Bundle, options: InferenceOptions) -> None:
    """Refuse, before a scan is read, options the bundle cannot serve: an unknown or repeated sequence, a canvas
    size its encoder cannot take, a precision the device lacks, another scan that is not there.

    Raises:
        BrainDINOError: naming the option and the problem.
    """
    check_sequences(bundle.card.heads, options.sequence, options.other_scans)
    analysis_spec(bundle.card, options.image_size)
    autocast_dtype(resolve_device(options.device), options.precision)
    for name, path in options.other_scans.items():
        if not Path(path).exists():
            raise BrainDINOError(f"{path}: no such file (given as the subject's {name} scan)")


def _writable_folder(out_dir: Path) -> bool:
    """Make ``out_dir`` and check that files can be written there (before encoding, so an unusable folder costs
    nothing); True if it was created."""
    created = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / ".braindino-write-test").touch()
        (out_dir / ".braindino-write-test").unlink()
    except OSError as error:
        raise BrainDINOError(f"{out_dir}: cannot write outputs there ({describe(error)})") from error
    return created


def _write_maps(
    out_dir: Path, stem: str, analysis: Analysis, similarity: np.ndarray | None, options: InferenceOptions
) -> dict[str, str]:
    """Write the maps, masks, segmentations, tokens and report; returns output name -> file name."""
    outputs = {"attention": f"{stem}_attention.nii.gz", "pca": f"{stem}_pca.nii.gz", "embeddings": TOKENS_FILE}
    arrays = {"attention": analysis.attention, "pca": analysis.pca}
    if similarity is not None:
        outputs["similarity"], arrays["similarity"] = f"{stem}_similarity.nii.gz", similarity
    if analysis.brain is not None:
        outputs["brain_mask"], arrays["brain_mask"] = f"{stem}_brainmask.nii.gz", analysis.brain.astype(np.uint8)
    single = len(analysis.segmentations) == 1
    for name, labels in analysis.segmentations.items():
        outputs[f"segmentation:{name}"] = f"{stem}_seg.nii.gz" if single else f"{stem}_seg_{name}.nii.gz"
        arrays[f"segmentation:{name}"] = labels
    with ThreadPoolExecutor(max_workers=3) as pool:  # gzip and file writes release the GIL
        jobs = [
            pool.submit(save_like, analysis.volume, values, out_dir / outputs[key]) for key, values in arrays.items()
        ]
        jobs.append(pool.submit(analysis.maps.save, out_dir / TOKENS_FILE))
        if options.report:
            query_xyz = analysis.volume.canonical_index(options.query) if options.query else None
            outputs["report"] = write_report(out_dir / "report.png", analysis, similarity, query_xyz).name
        for job in jobs:
            job.result()
    return outputs


def _result_record(scan, options: InferenceOptions, bundle: Bundle, analysis: Analysis, outputs: dict,
                   timings: dict) -> dict:  # fmt: skip
    """What ``result.json`` holds."""
    volume, prepared = analysis.volume, analysis.prepared
    return {
        "braindino_version": __version__,
        "input": {
            "path": str(scan),
            "shape": list(volume.source_shape),
            "orientation": "".join(volume.source_axcodes),
            "spacing_mm": [round(s, 4) for s in volume.spacing],
            "affine": volume.source_affine.tolist(),
            "signature": input_signature(scan, *options.other_scans.values()),
        },
        "options": options.record(),
        "sequence": analysis.sequence,
        "model": {
            "name": bundle.card.name,
            "path": str(bundle.path),
            "encoder": bundle.card.encoder.name,
            "random_init": bundle.card.random_init,
            "intended_use": bundle.card.intended_use,
            "sha256": bundle.card.files,
        },
        "preprocessing": prepared.spec.to_dict(),
        "slices": {
            "analysed": len(prepared.slices),
            "first": int(prepared.slices[0]),
            "last": int(prepared.slices[-1]),
            "axis": "canonical RAS z (axial)",
        },
        "device": str(analysis.device),
        "precision": precision_name(autocast_dtype(analysis.device, options.precision)),
        "query_voxel": list(options.query) if options.query else None,
        **(analysis.ood or dict.fromkeys(("out_of_distribution", "ood_score", "ood_threshold", "ood_channels"))),
        "brain_mask": None
        if analysis.brain is None
        else {
            "head": analysis.brain_head,
            "volume_ml": round(float(analysis.brain.sum()) * float(np.prod(volume.spacing)) / 1000, 1),
        },
        "predictions": analysis.predictions,
        "outputs": outputs,
        "timings_s": {**timings, "total": round(sum(timings.values()), 3)},
        "warnings": analysis.warnings,
    }


def read_scan(scan: str | Path, options: InferenceOptions) -> Volume:
    """The scan as ``options`` choose it (the volume of a 4D file, the series of a DICOM folder)."""
    return load_volume(scan, volume_index=options.volume_index, dicom_series=options.dicom_series)


def input_signature(*scans: str | Path) -> str:
    """Names, sizes and modification times of the scans' files (a DICOM folder's every file), hashed: changes when
    a scan does."""
    digest = hashlib.sha256()
    for scan in scans:
        path = Path(scan)
        for file in sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]:
            stat = file.stat()
            digest.update(f"{file.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _write_dicom_seg(scan, path: Path, analysis: Analysis, bundle: Bundle, options: InferenceOptions) -> dict:
    """``{"dicom_seg": file name}`` after writing the run's segments as a DICOM SEG; a warning instead when the scan
    is no DICOM series or nothing was segmented."""
    from .dicomseg import write_dicom_seg

    if not Path(scan).is_dir():
        analysis.warnings.append(f"no DICOM SEG written: {Path(scan).name} is not a DICOM series")
        return {}
    specs = {spec.name: spec for spec in bundle.card.heads}
    segments = [
        (class_name, labels == value)
        for name, labels in analysis.segmentations.items()
        for value, class_name in zip(specs[name].label_values, specs[name].classes, strict=True)
    ]
    if analysis.brain is not None:
        segments.append(("Brain", analysis.brain))
    if not segments:
        analysis.warnings.append(f"no DICOM SEG written: model '{bundle.card.name}' has no segmentation head")
        return {}
    _, files = dicom_series_files(scan, options.dicom_series)
    try:
        write_dicom_seg(files, analysis.volume, segments, path, model=bundle.card.name)
    except BrainDINOError as error:  # the NIfTI outputs stand; the series could not carry a SEG
        analysis.warnings.append(f"no DICOM SEG written: {error}")
        return {}
    return {"dicom_seg": path.name}


_SEQUENCE_HINT = "(--sequence, or 'Sequence' in Slicer)"


def check_sequences(specs, sequence: str | None, others) -> None:
    """Refuse, before any encoding, a scan sequence the bundle's sequence head does not know and other
    scans that repeat the scan's own sequence.

    Args:
        others: the subject's other sequences (names, or a mapping keyed by them).

    Raises:
        BrainDINOError: an unknown sequence, or other scans without a way to know the scan's sequence.
    """
    vocabulary = {c for s in specs if s.kind == "seq" for c in s.classes}
    if sequence and vocabulary and sequence not in vocabulary:
        raise BrainDINOError(f"'{sequence}' is not a sequence this bundle knows ({', '.join(sorted(vocabulary))})")
    if sequence in others:
        raise BrainDINOError(
            f"a {sequence} scan is given among the subject's other scans, but the scan itself is {sequence}"
        )
    if others and sequence is None and not vocabulary:
        raise BrainDINOError(
            f"this bundle has no sequence head: name the scan's sequence {_SEQUENCE_HINT} to use other scans"
        )


@dataclass(frozen=True)
class OtherScan:
    """Another sequence of the subject as the heads read it: its file (or Slicer node name), the prepared volume,
    and the progress callback of its encoding."""

    path: Path | str
    prepared: PreparedVolume
    progress: ProgressCallback | None = None


@dataclass(frozen=True)
class HeadInputs:
    """What the heads read: the scan (prepared, encoded, its brain mask if any) and the subject's other scans
    (``unused``: those no volume head reads)."""

    volume: Volume
    prepared: PreparedVolume
    encoded: EncodedVolume
    brain: np.ndarray | None
    others: dict[str, OtherScan]
    unused: list[str]


@dataclass(frozen=True)
class SliceDescriptions:
    """One scan's analysed slices as volume heads read them: (S, D) embeddings and, where a head reads them,
    (S, 256) thumbnails."""

    embeddings: np.ndarray
    thumbnails: np.ndarray | None

    def input_of(self, spec: HeadSpec) -> np.ndarray:
        return volume_input(self.embeddings, self.thumbnails if spec.thumbnails else None)


@dataclass(frozen=True)
class HeadOutcome:
    """The heads' predictions, the segmentation heads' label volumes, notes on how each head was fed, and the scan's
    sequence as they read it."""

    predictions: dict
    segmentations: dict[str, np.ndarray]
    warnings: list[str]
    sequence: str | None


def _apply_heads(bundle: Bundle, scan: HeadInputs, sequence: str | None, encode) -> HeadOutcome:
    """Apply the bundle's heads (all but the brain-mask head) to a scan; ``encode(prepared, progress=...)`` encodes
    the other scans (slice embeddings only).

    The scan's sequence is ``sequence``, else the sequence head's answer. A head runs when every sequence it reads is
    at hand (the scan or ``scan.others``); segmentation heads run on the scan alone, those that read no named sequence
    on any scan. Where a segmentation head was fitted on the scan's own sequence, it segments the scan instead of
    the any-contrast head with the same target (one contrast is easier to learn than all at once: see heads.md),
    and heads of other sequences stay silent when an any-contrast head stands in for them. ``reads`` in each
    prediction names the volumes a head read (their ``path``: a file, or a Slicer node's name). With the scan's
    sequence unknown, single-sequence heads read the scan as their own sequence, and a warning says so.
    Segmentations are cut to the brain mask when there is one.

    Raises:
        BrainDINOError: the sequence head names the scan as a sequence the other scans also give.
    """
    pooling, specs = bundle.card.pooling, bundle.card.heads
    read_thumbnails = any(spec.thumbnails for spec in specs)

    def described_as_read(encoded: EncodedVolume, prepared: PreparedVolume) -> SliceDescriptions:
        thumbnails = slice_thumbnails(prepared) if read_thumbnails else None
        return SliceDescriptions(encoded.slice_embeddings(pooling), thumbnails)

    own = described_as_read(scan.encoded, scan.prepared)
    named = sequence is not None
    predictions, sequence, warnings = _sequence_predictions(bundle, own, sequence)
    if sequence in scan.others or sequence in scan.unused:
        raise BrainDINOError(f"the scan looks like {sequence}, and another {sequence} scan is among the subject's "
                             f"other scans: name the scan's sequence {_SEQUENCE_HINT}")  # fmt: skip
    at_hand, described = ({sequence: scan.volume.path}, {sequence: own}) if sequence else ({}, {})
    for name in scan.unused:
        warnings.append(f"the other {name} scan was not used: no volume head of this bundle reads {name} scans")
    for name, other in scan.others.items():
        described[name] = described_as_read(encode(other.prepared, progress=other.progress), other.prepared)
        at_hand[name] = other.path
    segmentations = {}
    brain_spec = brain_head(specs)
    own_sequence = {s.target: s for s in specs if s.kind == "seg" and sequence and s.modalities == (sequence,)}
    any_contrast = {s.target for s in specs if s.kind == "seg" and not s.modalities and s != brain_spec}
    for spec in specs:
        if spec.kind == "seq" or spec == brain_spec:
            continue
        reads = spec.modalities
        if spec.kind == "seg" and not reads and spec.target in own_sequence:
            chosen = own_sequence[spec.target]
            hint = "" if named else f"; if the scan is not {sequence}, name its sequence {_SEQUENCE_HINT}"
            warnings.append(f"head '{chosen.name}', fitted on {sequence} scans, segmented the scan instead of "
                            f"head '{spec.name}'{hint}")  # fmt: skip
            continue
        if spec.kind == "seg" and reads and reads != (sequence,) and spec.target in any_contrast:
            continue  # another sequence's head: the any-contrast head segments this scan
        if spec.kind == "seg" and not reads:  # contrast-agnostic: reads the scan, whatever its sequence
            sources = {sequence or "scan": scan.volume.path}
        elif sequence is None and len(reads) == 1 and not scan.others and not scan.unused:
            sources, described[reads[0]] = {reads[0]: scan.volume.path}, own
            warnings.append(
                f"head '{spec.name}' read the scan as {reads[0]} (its sequence is unknown: name it {_SEQUENCE_HINT})"
            )
        elif spec.kind == "seg" and reads != (sequence,):
            warnings.append(
                f"head '{spec.name}' segments {'+'.join(reads)} scans; this scan is {sequence or 'unknown'}"
            )
            continue
        elif not all(m in at_hand for m in reads):
            missing = [m for m in reads if m not in at_hand]
            warnings.append(
                f"head '{spec.name}' reads {'+'.join(reads)}; give the subject's {'+'.join(missing)} scan "
                f"(--also {missing[0]}=FILE, or 'Other scans of this subject' in Slicer) to apply it"
            )
            continue
        else:
            sources = {m: at_hand[m] for m in reads}
        head = bundle.load_head(spec)
        if spec.kind == "seg":
            segmentations[spec.name] = _segment(spec, head, scan)
            predictions[spec.name] = segmentation_summary(spec, segmentations[spec.name], scan.volume.spacing)
        else:
            inputs = np.concatenate([described[m].input_of(spec) for m in reads])
            predictions[spec.name] = predict_volume(spec, head, inputs)
        predictions[spec.name]["reads"] = sources
    return HeadOutcome(predictions, segmentations, warnings, sequence)


def _sequence_predictions(
    bundle: Bundle, own: SliceDescriptions, sequence: str | None
) -> tuple[dict, str | None, list[str]]:
    """The sequence heads' predictions for the scan's slices ``own``, the scan's sequence (``sequence`` if given,
    else the first sequence head's answer) and the note saying which head named it."""
    predictions, warnings = {}, []
    for spec in bundle.card.heads:
        if spec.kind == "seq":
            predictions[spec.name] = predict_volume(spec, bundle.load_head(spec), own.input_of(spec))
            if sequence is None:
                sequence = predictions[spec.name]["prediction"]
                probability = predictions[spec.name]["probabilities"][sequence]
                warnings.append(f"the scan was identified as {sequence} ({probability:.2f}) by head '{spec.name}'")
    return predictions, sequence, warnings


def _segment(spec: HeadSpec, decoder, scan: HeadInputs) -> np.ndarray:
    """The (X, Y, Z) label volume of a segmentation head on the scan, 0 outside the brain mask if there is one."""
    labels = np.zeros(scan.volume.data.shape, dtype=np.int16)
    features = segmentation_input([scan.encoded.layers], spec.layers)
    images = scan.prepared.canvases() if spec.image_channels else None
    found = segment_slices(spec, decoder, features, scan.prepared.plane, images)
    labels[:, :, scan.prepared.slices] = found.transpose(1, 2, 0)
    if scan.brain is not None:
        labels[~scan.brain] = 0
    return labels
