"""Out-of-distribution check: is a scan like the head MRI a bundle was fitted on?

A calibrated bundle keeps ``ood.safetensors``. Slices are described as ``infer``'s first pass prepares
them (without a brain mask: cut to a brain, a photograph looks like one) in three ways: ``embedding``,
the encoder's slice embedding (what the model makes of the slice); ``patch_mean``, its mean patch token
(what the slice is made of); ``thumbnail``, the 16 x 16 average of the model's input canvas (how the slice
is laid out, at the intensities the normalisation gives; it does not depend on the encoder, which matters
for small encoders that map anything onto what they know). Three channels read them:

- ``embedding`` and ``thumbnail``: a slice's atypicality is the mean cosine distance of that description
  to its ``k`` nearest reference slices of the training scans;
- ``outlier``: a small perceptron on all three descriptions (L2-normalised, concatenated) gives the
  probability that the slice is not head MRI. It was fitted against procedural non-MRI images (outlier
  exposure: `BrainDINOTrainingLib.outliers`), never against photographs, maps or scans of other organs.

A scan's score in a channel is the median over its analysed slices, so a few odd slices (the vertex, a
lesion) do not flag a scan, while a stack of photographs, whose every slice is odd, is flagged. Each
channel has its own threshold (`braindino calibrate`, from held-out training scans); the scan's score is
the largest ratio of channel score to threshold, and it is out of distribution above 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import torch
import torch.nn.functional as F

from .engine import EncodedVolume
from .errors import BrainDINOError
from .preprocess import PreparedVolume

OOD_FILE = "ood.safetensors"
DESCRIPTIONS = ("embedding", "patch_mean", "thumbnail")
NEIGHBOUR_CHANNELS = ("embedding", "thumbnail")
CHANNELS = (*NEIGHBOUR_CHANNELS, "outlier")
THUMBNAIL = 16


def slice_thumbnails(prepared: PreparedVolume) -> np.ndarray:
    """(S, 256) float32: each analysed slice's canvas averaged down to 16 x 16 (the `thumbnail` description)."""
    return F.adaptive_avg_pool2d(prepared.canvases(), THUMBNAIL).flatten(1).numpy()


def scan_descriptions(whole: PreparedVolume, encoded: EncodedVolume, pooling: str) -> dict[str, np.ndarray]:
    """description -> (S, D) float32 of the analysed slices of a scan prepared without a brain mask."""
    return {
        "embedding": encoded.slice_embeddings(pooling),
        "patch_mean": encoded.slice_embeddings("mean"),
        "thumbnail": slice_thumbnails(whole),
    }


def _normalised(values: np.ndarray) -> torch.Tensor:
    return F.normalize(torch.from_numpy(np.asarray(values, np.float32)), dim=1)


def outlier_features(descriptions: dict[str, np.ndarray]) -> np.ndarray:
    """(S, F) float32: the three descriptions of each slice, each L2-normalised, side by side (classifier input)."""
    return torch.cat([_normalised(descriptions[d]) for d in DESCRIPTIONS], dim=1).numpy()


@dataclass(frozen=True)
class Typicality:
    """Reference slices, the outlier classifier and calibrated thresholds.

    Attributes:
        references: neighbour channel -> (N, D) float32 L2-normalised descriptions of training slices.
        k: neighbours averaged per slice.
        outlier_layers: (weights (D_in, D_out), bias (D_out,)) of each layer of the classifier on
            `outlier_features`, a ReLU between layers; the last layer gives one logit.
        thresholds: channel -> the score above which a scan is atypical in that channel.
    """

    references: dict[str, np.ndarray]
    k: int
    outlier_layers: tuple[tuple[np.ndarray, np.ndarray], ...]
    thresholds: dict[str, float]

    def __post_init__(self):
        if set(self.references) != set(NEIGHBOUR_CHANNELS) or set(self.thresholds) != set(CHANNELS):
            raise BrainDINOError(
                f"a typicality reference needs the channels {', '.join(CHANNELS)}; recalibrate (braindino calibrate)"
            )
        if self.k < 1 or any(len(r) < self.k for r in self.references.values()):
            raise BrainDINOError(f"typicality reference too small for k={self.k}")
        layers = self.outlier_layers
        shaped = all(w.ndim == 2 and b.shape == w.shape[1:] for w, b in layers)
        chained = all(w.shape[1] == after.shape[0] for (w, _), (after, _) in pairwise(layers))
        if not (layers and shaped and chained and layers[-1][0].shape[-1] == 1):
            shapes = [w.shape for w, _ in layers]
            raise BrainDINOError(f"the outlier classifier's layers {shapes} do not chain to one logit; recalibrate")

    @classmethod
    def from_slices(
        cls,
        descriptions: dict[str, np.ndarray],
        k: int,
        outlier_layers: Sequence[tuple[np.ndarray, np.ndarray]],
        thresholds: dict[str, float] | None = None,
    ) -> Typicality:
        """A reference from (N, D) slice descriptions (normalised here) and a fitted classifier's layers."""
        references = {c: _normalised(descriptions[c]).numpy() for c in NEIGHBOUR_CHANNELS}
        layers = tuple((np.asarray(w, np.float32), np.asarray(b, np.float32).reshape(-1)) for w, b in outlier_layers)
        return cls(references, k, layers, thresholds or dict.fromkeys(CHANNELS, float("inf")))

    def slice_scores(self, channel: str, descriptions: dict[str, np.ndarray]) -> np.ndarray:
        """(S,) each slice's atypicality in a channel: the mean cosine distance to its ``k`` nearest reference
        slices, or (``outlier``) the classifier's probability that it is not head MRI."""
        if channel == "outlier":
            values = outlier_features(descriptions)
            for weights, bias in self.outlier_layers[:-1]:
                values = np.maximum(values @ weights + bias, 0)
            weights, bias = self.outlier_layers[-1]
            logits = (values @ weights + bias).reshape(-1)
            return 1 / (1 + np.exp(-logits.astype(np.float64)))
        similarity = _normalised(descriptions[channel]) @ torch.from_numpy(self.references[channel]).T
        return (1 - similarity.topk(self.k, dim=1).values.mean(dim=1)).numpy()

    def channel_scores(self, descriptions: dict[str, np.ndarray]) -> dict[str, float]:
        """channel -> the scan's atypicality in it: the median of its slices' scores."""
        return {c: float(np.median(self.slice_scores(c, descriptions))) for c in CHANNELS}

    def verdict(self, descriptions: dict[str, np.ndarray]) -> dict:
        """What ``result.json`` records: ``out_of_distribution``, ``ood_score`` (the largest ratio of a channel's
        score to its threshold), ``ood_threshold`` (1) and the channels' own scores and thresholds."""
        scores = self.channel_scores(descriptions)
        score = max(scores[c] / self.thresholds[c] for c in CHANNELS)
        return {
            "out_of_distribution": bool(score > 1),
            "ood_score": round(score, 4),
            "ood_threshold": 1.0,
            "ood_channels": {
                c: {"score": round(scores[c], 4), "threshold": round(self.thresholds[c], 4)} for c in CHANNELS
            },
        }
