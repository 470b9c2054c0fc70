"""KoLeo regulariser: spreads embeddings by pushing up each one's nearest-neighbour distance [0, 1].

[0] Sablayrolles et al., "Spreading vectors for similarity search", ICLR 2019.
[1] Oquab et al., "DINOv2: Learning Robust Visual Features without Supervision", TMLR 2024.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import in_fp32


class KoLeoLoss(nn.Module):
    """-mean log(distance to the nearest other sample) of L2-normalised embeddings.

    Needs at least two samples per batch (with one, there is no neighbour).
    """

    def __init__(self, eps: float = 1e-8):
        super().__init__()
        self.eps = eps

    @in_fp32  # bf16 similarities pick wrong neighbours
    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, D) embeddings -> scalar."""
        if embeddings.shape[0] < 2:
            raise ValueError("KoLeo needs at least 2 samples per batch")
        x = F.normalize(embeddings, p=2, dim=-1, eps=self.eps)
        similarity = x @ x.t()
        similarity.fill_diagonal_(-2)
        neighbour = similarity.argmax(dim=1)
        distance = F.pairwise_distance(x, x[neighbour], eps=self.eps)
        return -torch.log(distance + self.eps).mean()
