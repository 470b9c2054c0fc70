"""DINO self-distillation loss on CLS prototypes [0].

[0] Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DINOLoss(nn.Module):
    """Cross-entropy from every teacher (global) view to every other student view.

    Args:
        student_temperature: softmax temperature of the student (0.1).
    """

    def __init__(self, student_temperature: float = 0.1):
        super().__init__()
        self.student_temperature = student_temperature

    def forward(self, student_logits: list[torch.Tensor], teacher_probs: list[torch.Tensor]) -> torch.Tensor:
        """
        Args:
            student_logits: one (B, K) tensor per crop; the first ``len(teacher_probs)`` are the
                global crops, in the teacher's order.
            teacher_probs: one (B, K) target distribution per global crop (centred and sharpened).

        Returns:
            Mean loss over all (teacher view, different student view) pairs.
        """
        total, pairs = 0.0, 0
        log_probs = [F.log_softmax(s.float() / self.student_temperature, dim=-1) for s in student_logits]
        for t, target in enumerate(teacher_probs):
            for s, log_p in enumerate(log_probs):
                if s == t:
                    continue
                total = total + torch.sum(-target * log_p, dim=-1).mean()
                pairs += 1
        return total / pairs
