"""Projection heads for self-distillation.

[0] Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


class DINOHead(nn.Module):
    """MLP -> L2-normalised bottleneck -> weight-normalised prototypes (DINO [0]).

    The prototype layer's norm is fixed to 1 (``original0`` frozen), as in DINO's
    ``norm_last_layer``; the trainer also freezes its direction during the first epoch.

    Args:
        in_dim: backbone embedding size D.
        prototypes: number of prototypes K.
        hidden_dim, bottleneck_dim, layers: MLP shape (2048, 256, 3 in DINOv2).
    """

    def __init__(
        self, in_dim: int, prototypes: int, hidden_dim: int = 2048, bottleneck_dim: int = 256, layers: int = 3
    ):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (layers - 1) + [bottleneck_dim]
        blocks = []
        for i in range(layers):
            blocks.append(nn.Linear(dims[i], dims[i + 1]))
            if i < layers - 1:
                blocks.append(nn.GELU())
        self.mlp = nn.Sequential(*blocks)
        self.apply(self._init)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, prototypes, bias=False))
        self.last_layer.parametrizations.weight.original0.data.fill_(1.0)
        self.last_layer.parametrizations.weight.original0.requires_grad = False

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., K) prototype logits."""
        return self.last_layer(F.normalize(self.mlp(x), dim=-1, p=2))
