"""Gram anchoring (DINOv3 [0]): the student's patch features keep the pairwise similarities a frozen Gram
teacher has on the same image, so dense features stay sharp through long training.

Per image, the Gram matrix of the L2-normalised patch features (N x N cosine similarities) of the student is
pulled to the teacher's with a mean squared error, as DINOv3's ``GramLoss`` does at image level, without
removing negative similarities (its released configs). In the high-resolution variant the Gram teacher sees
the crop at a larger size and its features are resized (bicubic) to the student's patch grid.

[0] Simeoni et al., "DINOv3", arXiv 2508.10104, 2025.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .common import in_fp32


@dataclass(frozen=True)
class GramConfig:
    """Gram anchoring of a DINO run; on when ``weight`` > 0.

    Attributes:
        weight: the loss weight (DINOv3 ends its Gram stage at 2.0 and adapts to high resolution at 1.5).
        teacher: bundle or checkpoint of the Gram teacher ("": the run's ``--init`` weights).
        refresh: every this many steps the Gram teacher becomes a copy of the EMA teacher (0: never).
        teacher_size: side of the Gram teacher's view of each global crop (0: the global crop size; larger:
            DINOv3's high-resolution variant).
    """

    weight: float = 0.0
    teacher: str = ""
    refresh: int = 0
    teacher_size: int = 0


@in_fp32  # coarse similarities would be the target otherwise
def gram_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE between the per-image Gram matrices of L2-normalised patch features, both (B, N, D)."""
    student, teacher = F.normalize(student, dim=-1), F.normalize(teacher, dim=-1)
    return F.mse_loss(student @ student.transpose(-1, -2), teacher @ teacher.transpose(-1, -2))


def resize_patches(patches: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, h*w, D) patch features of a square grid, resized (bicubic) to ``grid`` -> (B, gh*gw, D)."""
    side = int(round(patches.shape[1] ** 0.5))
    if (side, side) == tuple(grid):
        return patches
    maps = patches.transpose(1, 2).unflatten(-1, (side, side))  # (B, D, h, w)
    resized = F.interpolate(maps.float(), size=tuple(grid), mode="bicubic", align_corners=False)
    return resized.flatten(2).transpose(1, 2).to(patches.dtype)
