"""The preprocessing spec shared by training and inference, and its exact in-plane mapping.

A `PreprocessSpec` is stored in every model card, so a bundle is always fed slices prepared
the way it was trained. Steps (BrainDINO paper, downstream protocol):

1. clip intensities to percentiles (default 1-99) of the non-zero voxels, z-score over them,
   leave zero voxels at 0; with a brain mask (a bundle's brain-mask head, see `brain`), the
   percentiles, mean and std come from the brain's voxels and the brain is the foreground;
2. keep the axial slices of the brain extent (slices with enough foreground), optionally
   filtered by image entropy and relative position in that extent (tailored MoCo v3 pretraining);
3. place each slice on a square canvas (default 224 px) in radiological view (anterior up,
   patient right on the left), resized to keep its physical aspect ratio and centred with zero
   padding; `layout.PlaneGeometry` records this so maps computed on the canvas go back exactly;
4. repeat the grey channel when the encoder expects 3 channels.

MONAI's ``NormalizeIntensity(nonzero=True)`` and ``Resize`` do steps 1 and 3 for whole images;
they are not used here because the clip must ignore the zero background, the mapping must be
recorded for the way back, and importing MONAI adds ~2 s to every command.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .errors import BrainDINOError, from_fields
from .layout import PlaneGeometry, SliceLayout
from .volume import Volume

_ENTROPY_BINS = 256
_CHUNK = 32  # slices per chunk for whole-volume statistics, to bound memory on large scans


@dataclass(frozen=True)
class PreprocessSpec:
    """How a volume becomes model input (serialised into every model card).

    Attributes:
        clip_percentiles: lower/upper percentile of non-zero voxels to clip to.
        image_size: side of the square model canvas in pixels.
        in_chans: channels the encoder expects (the grey slice is repeated).
        foreground_level: foreground = non-zero voxels above this fraction of the clipped range.
        min_foreground_fraction: a slice is in the brain extent when at least this fraction of
            its voxels is foreground.
        min_entropy: drop slices whose intensity entropy (bits, 256 bins) is below this (0 = off).
        position_range: keep slices whose relative position in the brain extent (0 = lowest
            brain slice, 1 = highest) lies in this closed range.
    """

    clip_percentiles: tuple[float, float] = (1.0, 99.0)
    image_size: int = 224
    in_chans: int = 3
    foreground_level: float = 0.1
    min_foreground_fraction: float = 0.01
    min_entropy: float = 0.0
    position_range: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self):
        low, high = self.clip_percentiles
        if not 0 <= low < high <= 100:
            raise BrainDINOError(f"clip_percentiles must satisfy 0 <= low < high <= 100, got {self.clip_percentiles}")
        if self.image_size < 16 or self.in_chans not in (1, 3):
            raise BrainDINOError(
                f"image_size must be >= 16 and in_chans 1 or 3, got {self.image_size}, {self.in_chans}"
            )
        start, stop = self.position_range
        if not 0 <= start <= stop <= 1:
            raise BrainDINOError(f"position_range must satisfy 0 <= start <= stop <= 1, got {self.position_range}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> PreprocessSpec:
        return from_fields(cls, values, "preprocessing")


def to_canvas(plane: PlaneGeometry, slices: torch.Tensor) -> torch.Tensor:
    """(B, X, Y) canonical slices -> (B, canvas, canvas) canvas images (zero padded, antialiased)."""
    view = torch.flip(slices, dims=(1, 2)).transpose(1, 2)[:, None]
    resized = F.interpolate(
        view.float(), size=(plane.rows, plane.cols), mode="bilinear", align_corners=False, antialias=True
    )
    pad = (plane.col0, plane.canvas - plane.cols - plane.col0, plane.row0, plane.canvas - plane.rows - plane.row0)
    return F.pad(resized, pad)[:, 0]


def labels_to_canvas(plane: PlaneGeometry, labels: torch.Tensor) -> torch.Tensor:
    """(B, X, Y) integer label slices -> (B, canvas, canvas) labels, nearest neighbour (0 outside)."""
    view = torch.flip(labels, dims=(1, 2)).transpose(1, 2)[:, None].float()
    resized = F.interpolate(view, size=(plane.rows, plane.cols), mode="nearest-exact")
    pad = (plane.col0, plane.canvas - plane.cols - plane.col0, plane.row0, plane.canvas - plane.rows - plane.row0)
    return F.pad(resized, pad)[:, 0].round().to(labels.dtype)


@dataclass(frozen=True)
class PreparedVolume:
    """A volume normalised per the spec, with its slice selection and canvas placement.

    Attributes:
        image: (X, Y, Z) float32 z-scored intensities (0 where the scan is 0).
        foreground: (X, Y, Z) bool foreground mask.
        slices: (S,) canonical z indices fed to the encoder, ascending.
        position: (Z,) relative position in the brain extent (NaN outside it).
        entropy: (Z,) intensity entropy in bits.
        foreground_fraction: (Z,) fraction of foreground voxels per slice.
        plane: canvas placement shared by all slices.
        spec: the spec that produced it.
    """

    image: np.ndarray
    foreground: np.ndarray
    slices: np.ndarray
    position: np.ndarray
    entropy: np.ndarray
    foreground_fraction: np.ndarray
    plane: PlaneGeometry
    spec: PreprocessSpec

    def model_input(self, slice_indices: np.ndarray) -> torch.Tensor:
        """(B, in_chans, canvas, canvas) float32 encoder input for canonical slices ``slice_indices``."""
        slices = torch.from_numpy(self.image[:, :, slice_indices]).permute(2, 0, 1)
        canvas = to_canvas(self.plane, slices)[:, None]
        return canvas.expand(-1, self.spec.in_chans, -1, -1)

    def canvases(self) -> torch.Tensor:
        """(S, 1, canvas, canvas) float32: every analysed slice as the encoder sees it, one channel."""
        chunks = [self.slices[start : start + _CHUNK] for start in range(0, len(self.slices), _CHUNK)]
        return torch.cat([self.model_input(chosen)[:, :1] for chosen in chunks])

    @property
    def layout(self) -> SliceLayout:
        return SliceLayout(self.image.shape, self.slices, self.plane)

    def patch_foreground(self, grid: tuple[int, int], min_fraction: float = 0.5) -> np.ndarray:
        """(S, h, w) bool: patches whose canvas area is at least ``min_fraction`` foreground."""
        masks = []
        for start in range(0, len(self.slices), _CHUNK):
            chosen = self.slices[start : start + _CHUNK]
            foreground = torch.from_numpy(self.foreground[:, :, chosen]).permute(2, 0, 1).float()
            canvas = to_canvas(self.plane, foreground)[:, None]
            masks.append(F.adaptive_avg_pool2d(canvas, grid)[:, 0] >= min_fraction)
        return torch.cat(masks).numpy()


def normalize(data: np.ndarray, spec: PreprocessSpec, brain: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Percentile clip + z-score of the non-zero voxels, with statistics of the non-zero voxels or of ``brain``.

    Args:
        brain: (X, Y, Z) bool brain mask: clip levels, mean and std come from its voxels (so a scan with
            skull and one without get the same brain intensities), and it is the foreground.

    Returns:
        (image, foreground): (X, Y, Z) float32 normalised intensities and bool foreground.
    """
    nonzero = data != 0
    values = data[nonzero]
    inside = brain[nonzero] if brain is not None and (brain & nonzero).any() else slice(None)
    low, high = np.percentile(values[inside], spec.clip_percentiles)
    np.clip(values, low, high, out=values)
    mean, std = float(values[inside].mean(dtype=np.float64)), float(values[inside].std(dtype=np.float64))
    image = np.zeros(data.shape, dtype=np.float32)
    image[nonzero] = (values - mean) / max(std, 1e-6)
    foreground = brain.copy() if brain is not None else nonzero & (data > low + spec.foreground_level * (high - low))
    return image, foreground


def slice_entropy(image: np.ndarray, value_range: tuple[float, float]) -> np.ndarray:
    """(Z,) Shannon entropy in bits of each axial slice's 256-bin intensity histogram."""
    low, high = value_range
    scale = (_ENTROPY_BINS - 1) / max(high - low, 1e-6)
    entropy = np.zeros(image.shape[2])
    for start in range(0, image.shape[2], _CHUNK):
        chunk = image[:, :, start : start + _CHUNK]
        bins = np.clip((chunk - low) * scale, 0, _ENTROPY_BINS - 1).astype(np.int64)
        offsets = np.arange(chunk.shape[2]) * _ENTROPY_BINS
        counts = np.bincount((bins + offsets).ravel(), minlength=chunk.shape[2] * _ENTROPY_BINS)
        p = counts.reshape(chunk.shape[2], _ENTROPY_BINS) / (chunk.shape[0] * chunk.shape[1])
        entropy[start : start + chunk.shape[2]] = -np.sum(
            np.where(p > 0, p * np.log2(np.where(p > 0, p, 1)), 0), axis=1
        )
    return entropy


def prepare(volume: Volume, spec: PreprocessSpec, brain: np.ndarray | None = None) -> PreparedVolume:
    """Normalise a volume and choose the slices to encode.

    Args:
        brain: (X, Y, Z) bool brain mask in the volume's canonical voxel order: it gives the
            normalisation statistics, the foreground and so the analysed slices (its extent).

    Raises:
        BrainDINOError: if no slice passes the selection.
    """
    if brain is not None and brain.shape != volume.data.shape:
        raise BrainDINOError(f"{volume.path}: brain mask of shape {brain.shape} for a volume of {volume.data.shape}")
    image, foreground = normalize(volume.data, spec, brain)
    fraction = foreground.mean(axis=(0, 1))
    brain = np.flatnonzero(fraction >= spec.min_foreground_fraction)
    if brain.size == 0:
        raise BrainDINOError(
            f"{volume.path}: no axial slice has {spec.min_foreground_fraction:.0%} foreground voxels; "
            "is this a brain MRI?"
        )
    first, last = int(brain[0]), int(brain[-1])
    position = np.full(image.shape[2], np.nan)
    position[first : last + 1] = (np.arange(first, last + 1) - first) / max(last - first, 1)
    entropy = slice_entropy(image, (float(image.min()), float(image.max())))
    start, stop = spec.position_range
    keep = (position >= start) & (position <= stop) & (entropy >= spec.min_entropy)  # NaN (outside) compares False
    slices = np.flatnonzero(keep)
    if slices.size == 0:
        raise BrainDINOError(f"{volume.path}: the entropy/position filters removed every slice (spec: {spec})")
    spacing = volume.spacing
    plane = PlaneGeometry.fit(image.shape[:2], (spacing[0], spacing[1]), spec.image_size)
    return PreparedVolume(image, foreground, slices, position, entropy, fraction, plane, spec)
