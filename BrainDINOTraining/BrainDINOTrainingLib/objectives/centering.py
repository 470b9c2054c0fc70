"""Teacher-output centering: EMA centering (DINO [0]), Sinkhorn-Knopp (SwAV [1], DINOv2 [2]), or none.

Each is a module with ``probabilities(logits, temperature)``, turning teacher logits into target
probabilities, and ``update(logits)``, called after the optimizer step; only `EMACenter` has state, and
it changes only there. Every cross-rank reduction is guarded so one CPU process works.

[0] Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021.
[1] Caron et al., "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments", NeurIPS 2020.
[2] Oquab et al., "DINOv2: Learning Robust Visual Features without Supervision", TMLR 2024.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in place (a no-op without an initialised process group)."""
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor


class EMACenter(nn.Module):
    """Running mean of teacher logits, subtracted before the sharpened softmax.

    Args:
        dim: number of prototypes K.
        momentum: EMA momentum of the center (0.9 in DINO).
    """

    def __init__(self, dim: int, momentum: float = 0.9):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, dim))

    def probabilities(self, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
        """(N, K) logits -> (N, K) targets softmax((logits - center) / temperature)."""
        return torch.softmax((teacher_logits.float() - self.center) / temperature, dim=-1)

    @torch.no_grad()
    def update(self, teacher_logits: torch.Tensor) -> None:
        """Move the center towards the batch mean of (N, K) logits, averaged over all ranks.

        Every rank must call it, also with N = 0 (no masked patches here): the sums are collectives.
        """
        total = all_reduce_sum(teacher_logits.float().sum(dim=0, keepdim=True))
        count = all_reduce_sum(torch.tensor([teacher_logits.shape[0]], dtype=torch.float32, device=total.device))
        if count.item() > 0:
            self.center.mul_(self.momentum).add_(total / count, alpha=1 - self.momentum)


class SinkhornKnopp(nn.Module):
    """Equipartitioned targets (`sinkhorn_knopp`): stateless, so `update` does nothing."""

    def probabilities(self, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
        return sinkhorn_knopp(teacher_logits, temperature)

    def update(self, teacher_logits: torch.Tensor) -> None:
        """Nothing to update."""


class NoCentering(nn.Module):
    """The sharpened softmax alone: DINO collapses without centering (kept to demonstrate it)."""

    def probabilities(self, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
        return torch.softmax(teacher_logits.float() / temperature, dim=-1)

    def update(self, teacher_logits: torch.Tensor) -> None:
        """Nothing to update."""


def make_centering(kind: str, prototypes: int, momentum: float) -> nn.Module:
    """The centering module ``kind`` names: ``ema``, ``sinkhorn`` or ``none``."""
    return {"ema": lambda: EMACenter(prototypes, momentum), "sinkhorn": SinkhornKnopp, "none": NoCentering}[kind]()


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, temperature: float, iterations: int = 3) -> torch.Tensor:
    """Equipartitioned targets: (N, K) logits -> (N, K) probabilities whose prototype marginals are
    uniform over the global batch (all ranks) and whose rows sum to 1."""
    logits = teacher_logits.float()
    # one stabilising shift for all ranks, or their scales would differ (a rank may hold no rows)
    peak = logits.max().reshape(1) if logits.numel() else torch.full((1,), -torch.inf, device=logits.device)
    if is_distributed():
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    q = torch.exp((logits - peak) / temperature).t()  # (K, N)
    samples = all_reduce_sum(torch.tensor([q.shape[1]], dtype=torch.float32, device=q.device))
    prototypes = q.shape[0]
    q /= all_reduce_sum(q.sum())
    for _ in range(iterations):
        q /= all_reduce_sum(q.sum(dim=1, keepdim=True)).clamp_min(1e-30)  # each prototype gets 1/K of the mass
        q /= prototypes
        q /= q.sum(dim=0, keepdim=True).clamp_min(1e-30)  # each sample gets 1/N of the mass
        q /= samples
    return (q * samples).t()
