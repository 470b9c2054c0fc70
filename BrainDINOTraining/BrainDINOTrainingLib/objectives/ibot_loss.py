"""iBOT masked-patch loss [0], as weighted in DINOv2 [1].

[0] Zhou et al., "iBOT: Image BERT Pre-Training with Online Tokenizer", ICLR 2022.
[1] Oquab et al., "DINOv2: Learning Robust Visual Features without Supervision", TMLR 2024.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class IBOTPatchLoss(nn.Module):
    """Cross-entropy between teacher and student prototypes of the patches masked in the student.

    Each image weighs the same whatever its number of masked patches.

    Args:
        student_temperature: softmax temperature of the student (0.1).
    """

    def __init__(self, student_temperature: float = 0.1):
        super().__init__()
        self.student_temperature = student_temperature

    def forward(self, student_logits: torch.Tensor, teacher_probs: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """
        Args:
            student_logits: (M, K) logits of the M masked patches, in ``masks`` order.
            teacher_probs: (M, K) target distributions of the same patches.
            masks: (B, h, w) bool, True where the student's patch was masked (M True entries).

        Returns:
            Loss averaged over patches within an image, then over the B images.
        """
        loss = torch.sum(-teacher_probs * F.log_softmax(student_logits.float() / self.student_temperature, dim=-1), -1)
        per_image = masks.flatten(1).sum(dim=1, keepdim=True).clamp(min=1)
        weights = (1.0 / per_image).expand_as(masks.flatten(1))[masks.flatten(1)]
        return (loss * weights).sum() / masks.shape[0]
