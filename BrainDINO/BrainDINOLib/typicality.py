"""Out-of-distribution check: how typical a scan's slices are of the scans a bundle was fitted on.

A calibrated bundle keeps ``ood.safetensors``: for slices of its training scans, prepared whole
(without a brain mask, as ``infer``'s first pass sees them: cut to a brain, a photograph looks like
one), two L2-normalised descriptions, each a channel of the check:

- ``embedding``: the encoder's slice embedding (what the model makes of the slice);
- ``thumbnail``: the 16 x 16 average of the model's input canvas (how the slice is laid out: a head
  or brain surrounded by background, at the intensities the normalisation gives). It does not depend
  on the encoder, which matters for small encoders that map anything onto what they know.

A slice's atypicality in a channel is the mean cosine distance to its ``k`` nearest reference slices;
a scan's is the median over its analysed slices, so a few odd slices (the vertex, a lesion) do not
flag a scan, while a stack of photographs, whose every slice is odd, is flagged. Each channel has
its own threshold (`braindino calibrate`, from held-out training scans); the scan's score is the
largest ratio of channel score to threshold, and it is out of distribution above 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .engine import EncodedVolume
from .errors import BrainDINOError
from .preprocess import PreparedVolume

OOD_FILE = "ood.safetensors"
CHANNELS = ("embedding", "thumbnail")
THUMBNAIL = 16
_CHUNK = 64


def slice_thumbnails(prepared: PreparedVolume) -> np.ndarray:
    """(S, 256) float32: each analysed slice's canvas averaged down to 16 x 16 (the `thumbnail` channel)."""
    parts = []
    for start in range(0, len(prepared.slices), _CHUNK):
        canvas = prepared.model_input(prepared.slices[start : start + _CHUNK])[:, :1]
        parts.append(F.adaptive_avg_pool2d(canvas, THUMBNAIL).flatten(1))
    return torch.cat(parts).numpy()


def scan_descriptions(whole: PreparedVolume, encoded: EncodedVolume, pooling: str) -> dict[str, np.ndarray]:
    """channel -> (S, D) descriptions of the analysed slices of a scan prepared without a brain mask."""
    return {"embedding": encoded.slice_embeddings(pooling), "thumbnail": slice_thumbnails(whole)}


def _normalised(values: np.ndarray) -> torch.Tensor:
    return F.normalize(torch.from_numpy(np.asarray(values, np.float32)), dim=1)


@dataclass(frozen=True)
class Typicality:
    """Reference slices and calibrated thresholds.

    Attributes:
        references: channel -> (N, D) float32 L2-normalised descriptions of training slices.
        k: neighbours averaged per slice.
        thresholds: channel -> the score above which a scan is atypical in that channel.
    """

    references: dict[str, np.ndarray]
    k: int
    thresholds: dict[str, float]

    def __post_init__(self):
        if set(self.references) != set(CHANNELS) or set(self.thresholds) != set(CHANNELS):
            raise BrainDINOError(f"a typicality reference needs the channels {', '.join(CHANNELS)}")
        if self.k < 1 or any(len(r) < self.k for r in self.references.values()):
            raise BrainDINOError(f"typicality reference too small for k={self.k}")

    @classmethod
    def from_slices(cls, descriptions: dict[str, np.ndarray], k: int, thresholds: dict[str, float] | None = None):
        """A reference from per-channel (N, D) slice descriptions (normalised here)."""
        references = {c: _normalised(descriptions[c]).numpy() for c in CHANNELS}
        return cls(references, k, thresholds or dict.fromkeys(CHANNELS, float("inf")))

    def slice_scores(self, channel: str, descriptions: np.ndarray) -> np.ndarray:
        """(S,) mean cosine distance of each (S, D) slice description to its ``k`` nearest reference slices."""
        similarity = _normalised(descriptions) @ torch.from_numpy(self.references[channel]).T
        return (1 - similarity.topk(self.k, dim=1).values.mean(dim=1)).numpy()

    def channel_scores(self, descriptions: dict[str, np.ndarray]) -> dict[str, float]:
        """channel -> the scan's atypicality in it: the median of its slices' scores."""
        return {c: float(np.median(self.slice_scores(c, descriptions[c]))) for c in CHANNELS}

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
