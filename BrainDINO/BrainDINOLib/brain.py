"""Brain extraction with a bundle's brain-mask head, and the scan preparation that follows it.

A bundle may hold a segmentation head whose target is ``brain_mask`` (`braindino fit-head --task
brain`), fitted on the frozen encoder's features of whole scans prepared without a mask. For such
a bundle, `prepare_scan` runs it first on every slice with foreground (pass 1), keeps the largest
connected component with its holes filled, and prepares the scan again with that mask (pass 2):
brain statistics for the normalisation, the brain's extent for the slices, the brain as the
foreground. Inference (`infer`) and head fitting (the training library's feature cache) both call
it, so every other head is fitted on exactly what it is applied to. Pass 1 always reads the bundle's
own canvas, the one the head was fitted on; pass 2 may be placed on another (``infer --image-size``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage

from .engine import EncodedVolume, ProgressCallback, encode_volume
from .heads import HeadSpec, segment_slices, segmentation_input
from .preprocess import PreparedVolume, PreprocessSpec, prepare
from .volume import Volume

BRAIN_TARGET = "brain_mask"
BRAIN_CLASSES = ("brain",)


def brain_head(specs: list[HeadSpec]) -> HeadSpec | None:
    """The bundle's brain-mask head, if it has one."""
    return next((s for s in specs if s.kind == "seg" and s.target == BRAIN_TARGET), None)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """(X, Y, Z) bool: the largest 26-connected component of ``mask``, holes filled."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if count == 0:
        return mask.copy()
    largest = np.bincount(labels.ravel())[1:].argmax() + 1
    return ndimage.binary_fill_holes(labels == largest)


def prepare_scan(
    volume: Volume,
    bundle,
    encoder,
    *,
    whole: PreparedVolume | None = None,
    final: PreprocessSpec | None = None,
    device=None,
    batch_size: int | None = None,
    precision: str = "auto",
    progress: ProgressCallback | None = None,
    cancel: Callable[[], bool] | None = None,
) -> tuple[PreparedVolume, np.ndarray | None, list[str], EncodedVolume | None]:
    """The scan prepared as the bundle's heads expect it.

    Args:
        bundle: the model bundle (its preprocessing and, if any, its brain-mask head).
        encoder: the bundle's loaded encoder.
        whole: ``prepare(volume, preprocessing)`` if the caller already has it (pass 1's input).
        final: how the returned scan is prepared (default: the bundle's preprocessing; ``infer --image-size`` gives
            another canvas). Pass 1 always reads the bundle's own canvas, the one the brain-mask head was fitted on.
        progress: follows the encoding of pass 1 (``len(whole.slices)`` slices).

    Returns:
        (prepared, brain, warnings, first_pass): ``brain`` is the (X, Y, Z) bool mask, None without a brain-mask
        head; ``first_pass`` is the encoding of ``whole`` that found it (what the out-of-distribution check reads),
        None without a brain-mask head.

    Raises:
        BrainDINOError: no slice with foreground. Cancelled: when ``cancel()`` returned True.
    """
    spec = bundle.card.preprocessing
    final = final or spec
    whole = whole or prepare(volume, spec)

    def unmasked() -> PreparedVolume:
        return whole if final == spec else prepare(volume, final)

    head_spec = brain_head(bundle.card.heads)
    if head_spec is None:
        return unmasked(), None, [], None
    encoded = encode_volume(
        whole, encoder, device=device, batch_size=batch_size, layers=head_spec.layers, precision=precision,
        progress=progress, cancel=cancel,
    )  # fmt: skip
    features = segmentation_input([encoded.layers], head_spec.layers)
    images = whole.canvases() if head_spec.image_channels else None
    labels = segment_slices(head_spec, bundle.load_head(head_spec), features, whole.plane, images)
    found = np.zeros(volume.data.shape, bool)
    found[:, :, whole.slices] = labels.transpose(1, 2, 0) > 0
    brain = largest_component(found)
    minimum = spec.min_foreground_fraction * volume.data.shape[0] * volume.data.shape[1]
    if brain.sum(axis=(0, 1)).max(initial=0) < minimum:
        warning = (
            f"the brain-mask head '{head_spec.name}' found no brain in {volume.path}: the whole scan was analysed "
            "(is this a brain MRI?)"
        )
        return unmasked(), None, [warning], encoded
    return prepare(volume, final, brain), brain, [], encoded
