"""Block masks for masked-patch objectives (iBOT [0], BEiT-style block-wise masking [1]).

[0] Zhou et al., "iBOT: Image BERT Pre-Training with Online Tokenizer", ICLR 2022.
[1] Bao et al., "BEiT: BERT Pre-Training of Image Transformers", ICLR 2022.
"""

from __future__ import annotations

import math

import torch


def block_mask(
    grid: tuple[int, int],
    ratio: float,
    generator: torch.Generator,
    min_block: int = 4,
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
) -> torch.Tensor:
    """(h, w) bool mask of about ``ratio * h * w`` patches made of random rectangular blocks."""
    h, w = grid
    target = int(round(ratio * h * w))
    mask = torch.zeros(h, w, dtype=torch.bool)
    for _ in range(10 * max(target, 1)):
        missing = target - int(mask.sum())
        if missing <= 0:
            break
        area = float(torch.empty(1).uniform_(min_block, max(min_block, missing), generator=generator))
        log_aspect = torch.empty(1).uniform_(math.log(aspect[0]), math.log(aspect[1]), generator=generator)
        block_h = max(1, min(h, int(round(math.sqrt(area * math.exp(float(log_aspect)))))))
        block_w = max(1, min(w, int(round(math.sqrt(area / math.exp(float(log_aspect)))))))
        top = int(torch.randint(0, h - block_h + 1, (1,), generator=generator))
        left = int(torch.randint(0, w - block_w + 1, (1,), generator=generator))
        region = mask[top : top + block_h, left : left + block_w]
        if int((~region).sum()) <= missing:
            region[:] = True
    return mask


def batch_masks(
    batch: int,
    grid: tuple[int, int],
    generator: torch.Generator,
    probability: float = 0.5,
    ratio_range: tuple[float, float] = (0.1, 0.5),
) -> torch.Tensor:
    """(B, h, w) masks: a fraction ``probability`` of samples masked, ratios spread evenly over the range (DINOv2)."""
    masks = torch.zeros(batch, *grid, dtype=torch.bool)
    masked = int(round(batch * probability))
    ratios = torch.linspace(*ratio_range, steps=masked + 1)
    for i in range(masked):
        ratio = float(torch.empty(1).uniform_(float(ratios[i]), float(ratios[i + 1]), generator=generator))
        masks[i] = block_mask(grid, ratio, generator)
    return masks[torch.randperm(batch, generator=generator)]
