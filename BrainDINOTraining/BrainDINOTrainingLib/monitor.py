"""Collapse monitors: a verdict from the logged metrics, and online kNN accuracy on a labelled probe set.

Each probe volume is embedded as the mean of its slices' L2-normalised CLS tokens; accuracy is
leave-one-out weighted kNN (k = 20, temperature 0.07, as in DINO's evaluation [0]).

[0] Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from BrainDINOLib.errors import BrainDINOError
from BrainDINOLib.manifest import load_manifest
from BrainDINOLib.preprocess import PreprocessSpec, prepare
from BrainDINOLib.volume import load_volume

#: below this, the teacher's targets tell almost nothing about which slice they came from (nats).
MIN_TARGET_INFORMATION = 2e-3
#: below this, embeddings of different slices are nearly the same point (std of normalised
#: embeddings x sqrt(D); about 1 when spread over the sphere).
MIN_EMBEDDING_SPREAD = 0.02


def collapse_verdict(row: dict, embed_dim: int, prototypes: int | None = None) -> str:
    """A one-line warning when a step's metrics show collapse, else "".

    - ``teacher_batch_entropy - teacher_entropy`` (DINO) is the mutual information between a slice
      and its prototype target: ~0 both when every target is uniform (too much centering or too hot a
      teacher) and when every slice gets the same prototype (no centering), the two DINO failure modes [0].
    - ``embedding_std`` (every objective): all slices mapped to one point.

    Args:
        prototypes: K of a DINO head (uniform collapse has per-sample entropy near ln K).
    """
    problems = []
    if "teacher_entropy" in row:
        information = row["teacher_batch_entropy"] - row["teacher_entropy"]
        if information < MIN_TARGET_INFORMATION:
            kind = "uniform" if row["teacher_entropy"] > 0.5 * math.log(prototypes) else "one-prototype"
            problems.append(
                f"teacher targets carry {information:.1e} nats about the input ({kind} collapse; "
                f"check centering and teacher temperature)"
            )
    spread = row["embedding_std"] * embed_dim**0.5
    if spread < MIN_EMBEDDING_SPREAD:
        problems.append(f"embeddings of different slices nearly identical (spread {spread:.1e})")
    return "collapse: " + "; ".join(problems) if problems else ""


def knn_accuracy(features: torch.Tensor, labels: torch.Tensor, k: int = 20, temperature: float = 0.07) -> float:
    """Leave-one-out weighted kNN accuracy.

    Args:
        features: (N, D) embeddings (normalised here).
        labels: (N,) integer classes.
    """
    features = F.normalize(features.float(), dim=-1)
    similarity = features @ features.t()
    similarity.fill_diagonal_(-float("inf"))  # never vote for yourself
    k = min(k, len(features) - 1)
    top, index = similarity.topk(k, dim=1)
    weights = torch.exp(top / temperature)
    classes = int(labels.max()) + 1
    votes = torch.zeros(len(features), classes).scatter_add_(1, labels[index], weights)
    return float((votes.argmax(dim=1) == labels).float().mean())


@dataclass(frozen=True)
class ProbeSet:
    """Preprocessed probe slices (float16 canvases) and integer labels, prepared once."""

    slices: list[torch.Tensor]  # per volume (S, canvas, canvas)
    labels: torch.Tensor
    classes: list[str]

    @classmethod
    def load(cls, source: str, label: str, spec: PreprocessSpec, max_slices: int = 16) -> ProbeSet:
        """The first image of every scan with a ``label`` value; up to ``max_slices`` evenly spaced slices each.

        Raises:
            BrainDINOError: no labelled scans, or a single class.
        """
        entries = [e for e in load_manifest(source).entries if label in e.labels]
        classes = sorted({str(e.labels[label]) for e in entries})
        if len(classes) < 2:
            raise BrainDINOError(f"{source}: the probe needs scans of at least two '{label}' classes")
        slices, labels = [], []
        for entry in entries:
            image = next(iter(entry.scans.values()))
            prepared = prepare(load_volume(image), spec)
            chosen = prepared.slices[np.linspace(0, len(prepared.slices) - 1, max_slices).round().astype(int)]
            slices.append(prepared.model_input(np.unique(chosen))[:, 0].to(torch.float16))
            labels.append(classes.index(str(entry.labels[label])))
        return cls(slices, torch.tensor(labels), classes)

    @torch.no_grad()
    def accuracy(self, backbone_cls, in_chans: int, device: torch.device) -> float:
        """kNN accuracy of volume embeddings from ``backbone_cls(images) -> (B, D)`` CLS tokens."""
        embeddings = []
        for volume in self.slices:
            images = volume.to(device, torch.float32)[:, None].expand(-1, in_chans, -1, -1)
            embeddings.append(F.normalize(backbone_cls(images).float(), dim=-1).mean(dim=0))
        return knn_accuracy(torch.stack(embeddings).cpu(), self.labels)
