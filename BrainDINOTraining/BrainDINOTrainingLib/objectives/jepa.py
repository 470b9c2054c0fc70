"""Joint-embedding predictive architecture (I-JEPA [0]) with variance-covariance regularisation [1, 2].

Slice-level 2D version of the predictive 3D pretraining compared in [2]. Per slice (one global
crop), a target encoder (EMA of the context encoder) embeds all patches; the context encoder sees
one large block with the ``targets`` target blocks removed; a narrow predictor, given the context
tokens and the positions of a target block, predicts that block's target embeddings (layer-normed,
as in [0]). Loss = mean squared prediction error + VICReg-style terms [1] on the context tokens
(all tokens of the batch as samples): ``variance_weight`` x mean(relu(1 - std per dimension)) +
``covariance_weight`` x sum of squared off-diagonal covariances / D. These terms keep the context
encoder from collapsing to a constant, which the EMA target alone only delays.

Block sampling as in [0]: one size per batch for the targets (area 15-20 %, aspect 0.75-1.5) and
for the context (85-100 %, square), positions per sample, drawn again until every sample keeps at
least ``min_context`` (4) context patches; every sample keeps the same number of context patches (a
random subset, the batch minimum). Predictor 384 wide, 6 blocks, 12 heads.
The exported encoder is the target encoder; its embedding is the mean patch token.

[0] Assran et al., "Self-Supervised Learning from Images with a Joint-Embedding Predictive Architecture", CVPR 2023.
[1] Bardes, Ponce, LeCun, "VICReg: Variance-Invariance-Covariance Regularization", ICLR 2022.
[2] arXiv 2606.13315: masked (MAE + spectral loss) vs predictive (JEPA + VCR) pretraining on 3D brain MRI.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from BrainDINOLib.encoder import EncoderConfig, build_vit
from BrainDINOLib.errors import BrainDINOError

from ..augment import MultiCropConfig, augmented_crop
from .common import Objective, StepOutput, TokenTransformer, ema_update, embedding_std, encode_tokens, in_fp32


@dataclass(frozen=True)
class JEPAConfig:
    targets: int = 4
    target_scale: tuple[float, float] = (0.15, 0.2)
    target_aspect: tuple[float, float] = (0.75, 1.5)
    context_scale: tuple[float, float] = (0.85, 1.0)
    min_context: int = 4
    predictor_dim: int = 384
    predictor_depth: int = 6
    predictor_heads: int = 12
    variance_weight: float = 1.0
    covariance_weight: float = 0.04


@in_fp32  # bf16 drops the small covariances the penalty is about
def variance_covariance(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """VICReg's variance hinge and covariance penalty of (N, D) embeddings [1]."""
    x = tokens - tokens.mean(dim=0)
    std = torch.sqrt(x.var(dim=0) + 1e-4)
    covariance = (x.t() @ x) / (len(x) - 1)
    off_diagonal = covariance - torch.diag(torch.diagonal(covariance))
    return F.relu(1 - std).mean(), off_diagonal.pow(2).sum() / x.shape[1]


def _block_size(grid, scale, aspect, generator) -> tuple[int, int]:
    area = float(torch.empty(1).uniform_(*scale, generator=generator)) * grid[0] * grid[1]
    ratio = math.exp(float(torch.empty(1).uniform_(math.log(aspect[0]), math.log(aspect[1]), generator=generator)))
    height = max(1, min(grid[0], round(math.sqrt(area * ratio))))
    width = max(1, min(grid[1], round(math.sqrt(area / ratio))))
    return height, width


def _place(grid, size, count, generator) -> torch.Tensor:
    """(count, h, w) bool masks, each one block of ``size`` at a random position."""
    masks = torch.zeros(count, *grid, dtype=torch.bool)
    tops = torch.randint(0, grid[0] - size[0] + 1, (count,), generator=generator)
    lefts = torch.randint(0, grid[1] - size[1] + 1, (count,), generator=generator)
    for mask, top, left in zip(masks, tops.tolist(), lefts.tolist(), strict=True):
        mask[top : top + size[0], left : left + size[1]] = True
    return masks


def jepa_blocks(batch: int, grid: tuple[int, int], config: JEPAConfig, generator: torch.Generator, tries: int = 20):
    """Context and target patch indices for a batch.

    Blocks are drawn again until every sample keeps at least ``config.min_context`` context patches
    outside the targets (as I-JEPA does).

    Returns:
        context: (B, n) indices in the context block outside every target block.
        targets: (T, B, t) indices of each target block.

    Raises:
        BrainDINOError: the grid is too small for the targets and a context.
    """
    for _ in range(tries):
        target_size = _block_size(grid, config.target_scale, config.target_aspect, generator)
        target_masks = _place(grid, target_size, config.targets * batch, generator).view(config.targets, batch, -1)
        context_masks = _place(grid, _block_size(grid, config.context_scale, (1.0, 1.0), generator), batch, generator)
        context_masks = context_masks.view(batch, -1) & ~target_masks.any(dim=0)
        keep = int(context_masks.sum(dim=1).min())
        if keep >= config.min_context:
            break
    else:
        raise BrainDINOError(
            f"JEPA: a {grid[0]}x{grid[1]} patch grid leaves fewer than {config.min_context} context patches "
            f"beside {config.targets} target blocks; use larger crops or fewer targets (jepa.targets)"
        )
    scores = torch.rand(context_masks.shape, generator=generator) + context_masks  # >= 1 inside the context
    context = scores.topk(keep, dim=1).indices.sort(dim=1).values  # a random subset of equal size
    targets = target_masks.nonzero()[:, 2].view(config.targets, batch, -1)
    return context, targets


class JEPAObjective(Objective):
    pooling = "mean"

    def __init__(
        self,
        encoder: EncoderConfig,
        config: JEPAConfig,
        crops: MultiCropConfig,
        image_size: int = 224,
        in_chans: int = 3,
    ):
        super().__init__()
        self.config, self.crops = config, crops
        self.grid = encoder.patch_grid(crops.global_size)
        self.backbone = build_vit(encoder, image_size, in_chans)
        self.predictor = TokenTransformer(
            encoder.embed_dim,
            encoder.embed_dim,
            self.grid,
            config.predictor_dim,
            config.predictor_depth,
            config.predictor_heads,
        )
        self.target_encoder = copy.deepcopy(self.backbone)
        self.target_encoder.requires_grad_(False)

    def make_inputs(self, images, generator, descriptors=None) -> dict:
        view = augmented_crop(images, self.crops.global_size, self.crops.global_scale, self.crops, generator)
        context, targets = jepa_blocks(images.shape[0], self.grid, self.config, generator)
        return {"view": view, "context": context.to(images.device), "targets": targets.to(images.device)}

    def forward(self, inputs: dict, teacher_temperature: float) -> StepOutput:
        """inputs: ``view`` (B, C, G, G), ``context`` (B, n) and ``targets`` (T, B, t) patch indices."""
        view, context, targets = inputs["view"], inputs["context"], inputs["targets"]
        blocks, batch, size = targets.shape
        with torch.no_grad():
            _, target_tokens = encode_tokens(self.target_encoder, view)
            target_tokens = F.layer_norm(target_tokens.float(), target_tokens.shape[-1:])
            dim = target_tokens.shape[-1]
            wanted = torch.stack([target_tokens.gather(1, t[..., None].expand(-1, -1, dim)) for t in targets])
        _, context_tokens = encode_tokens(self.backbone, view, keep=context)
        predicted = self.predictor(
            context_tokens.repeat(blocks, 1, 1), context.repeat(blocks, 1), targets.reshape(blocks * batch, size)
        )
        prediction = F.mse_loss(predicted.float(), wanted.reshape(blocks * batch, size, -1))
        variance, covariance = variance_covariance(context_tokens.flatten(0, 1))
        loss = prediction + self.config.variance_weight * variance + self.config.covariance_weight * covariance
        losses = {"prediction": prediction, "variance": variance, "covariance": covariance, "loss": loss}
        return StepOutput(losses, {"embedding_std": embedding_std(target_tokens.mean(dim=1))})

    @torch.no_grad()
    def after_step(self, output: StepOutput, momentum: float) -> None:
        ema_update(self.target_encoder, self.backbone, momentum)

    def export_backbone(self) -> nn.Module:
        return self.target_encoder
