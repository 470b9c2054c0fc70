"""Out-of-distribution check: how typical a scan's slice embeddings are of the scans a bundle was fitted on.

A calibrated bundle keeps ``ood.safetensors``: L2-normalised slice embeddings of its training scans
(prepared as ``infer`` prepares them) and, in its card, ``k`` and a threshold. A slice's atypicality
is the mean cosine distance of its embedding to its ``k`` nearest reference embeddings; a scan's
score is the median over its analysed slices, so a few odd slices (the vertex, a lesion) do not flag
a scan, and a stack of photographs or a terrain map, whose every slice is odd, is flagged. The
threshold is set by `braindino calibrate` from held-out scans of the training data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .errors import BrainDINOError

OOD_FILE = "ood.safetensors"


@dataclass(frozen=True)
class Typicality:
    """Reference embeddings and the calibrated threshold.

    Attributes:
        reference: (N, D) float32 L2-normalised slice embeddings of training scans.
        k: neighbours averaged per slice.
        threshold: scans scoring above it are out of distribution.
    """

    reference: np.ndarray
    k: int
    threshold: float

    def __post_init__(self):
        if self.reference.ndim != 2 or len(self.reference) < self.k or self.k < 1:
            raise BrainDINOError(f"typicality reference of shape {self.reference.shape} cannot serve k={self.k}")

    @classmethod
    def from_embeddings(cls, embeddings: np.ndarray, k: int, threshold: float = float("inf")) -> Typicality:
        """A reference from (N, D) slice embeddings (normalised here)."""
        reference = F.normalize(torch.from_numpy(np.asarray(embeddings, np.float32)), dim=1).numpy()
        return cls(reference, k, threshold)

    def slice_scores(self, embeddings: np.ndarray) -> np.ndarray:
        """(S,) mean cosine distance of each (S, D) slice embedding to its ``k`` nearest reference embeddings."""
        queries = F.normalize(torch.from_numpy(np.asarray(embeddings, np.float32)), dim=1)
        similarity = queries @ torch.from_numpy(self.reference).T
        nearest = similarity.topk(self.k, dim=1).values
        return (1 - nearest.mean(dim=1)).numpy()

    def score(self, embeddings: np.ndarray) -> float:
        """The scan's atypicality: the median of its slices' scores."""
        return float(np.median(self.slice_scores(embeddings)))

    def verdict(self, embeddings: np.ndarray) -> dict:
        """What ``result.json`` records: ``out_of_distribution``, ``ood_score`` and ``ood_threshold``."""
        score = self.score(embeddings)
        return {
            "out_of_distribution": bool(score > self.threshold),
            "ood_score": round(score, 4),
            "ood_threshold": round(self.threshold, 4),
        }
