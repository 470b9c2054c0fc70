"""Weakly-supervised contrastive learning with continuous subject descriptors (AnatCL [0], y-aware [1]).

Slice-level 2D version of AnatCL, which [0] trains on 3D volumes with anatomical descriptors. Two
global crops per slice are embedded (backbone CLS -> projector -> L2 norm). Each pair of samples
gets a positive weight from a Gaussian kernel on the distance of their subjects' descriptors
(manifest columns such as ``age``, ``gm_ml``, ``wm_ml``, standardised over the index), so slices of
similar brains are pulled together in proportion to their similarity, and the two crops of one
slice (or slices of one subject) count as full positives. Loss for anchor i (y-aware InfoNCE [1]):
``-sum_j w_ij / sum_k w_ik * log(exp(s_ij / t) / sum_k exp(s_ik / t))`` over j, k != i.

Defaults: temperature 0.1, kernel sigma 1 (in standard deviations), projector 2048 -> 128 with BatchNorm
(as MoCo v3's, `common.bn_mlp`).

[0] AnatCL, arXiv 2408.07079: contrastive pretraining for brain MRI weighted by anatomical descriptors.
[1] Dufumier et al., "Contrastive Learning with Continuous Proxy Meta-Data for 3D MRI Classification", MICCAI 2021.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from BrainDINOLib.encoder import EncoderConfig, build_vit
from BrainDINOLib.errors import BrainDINOError

from ..augment import MultiCropConfig, global_views
from .common import Objective, StepOutput, bn_mlp, embedding_std, encode_tokens, in_fp32


@dataclass(frozen=True)
class AnatCLConfig:
    descriptors: tuple[str, ...] = ("age", "gm_ml", "wm_ml")
    temperature: float = 0.1
    kernel_sigma: float = 1.0
    hidden_dim: int = 2048
    out_dim: int = 128

    def __post_init__(self):
        if not self.descriptors:
            raise BrainDINOError("anatcl.descriptors is empty: name at least one numeric manifest column (e.g. age)")


@in_fp32  # bf16 logits blur which pairs are close
def y_aware_infonce(embeddings: torch.Tensor, descriptors: torch.Tensor, temperature: float, sigma: float):
    """y-aware InfoNCE [1] of (N, d) L2-normalised embeddings with (N, k) standardised descriptors."""
    logits = embeddings @ embeddings.t() / temperature
    self_pairs = torch.eye(len(logits), dtype=torch.bool, device=logits.device)
    log_probs = logits.masked_fill(self_pairs, -float("inf")).log_softmax(dim=1).masked_fill(self_pairs, 0.0)
    weights = torch.exp(-torch.cdist(descriptors, descriptors).pow(2) / (2 * sigma**2))
    weights = weights.masked_fill(self_pairs, 0.0)
    weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(1e-12)
    return -(weights * log_probs).sum(dim=1).mean()


class AnatCLObjective(Objective):
    def __init__(
        self,
        encoder: EncoderConfig,
        config: AnatCLConfig,
        crops: MultiCropConfig,
        image_size: int = 224,
        in_chans: int = 3,
    ):
        super().__init__()
        self.config, self.crops = config, crops
        self.descriptor_names = tuple(config.descriptors)
        self.backbone = build_vit(encoder, image_size, in_chans)
        self.projector = bn_mlp(encoder.embed_dim, config.hidden_dim, config.out_dim, layers=2)

    def make_inputs(self, images, generator, descriptors=None) -> dict:
        if descriptors is None:
            raise ValueError("AnatCL needs subject descriptors for every slice")
        return {"views": global_views(images, self.crops, generator), "descriptors": descriptors.to(images.device)}

    def forward(self, inputs: dict, teacher_temperature: float) -> StepOutput:
        """inputs: ``views`` 2 x (B, C, G, G); ``descriptors`` (B, k) standardised."""
        views, descriptors = inputs["views"], inputs["descriptors"]
        cls = encode_tokens(self.backbone, torch.cat(views))[0]
        embeddings = F.normalize(self.projector(cls), dim=-1)
        loss = y_aware_infonce(embeddings, descriptors.repeat(2, 1), self.config.temperature, self.config.kernel_sigma)
        metrics = {"embedding_std": embedding_std(cls[: len(descriptors)])}
        return StepOutput({"contrastive": loss, "loss": loss}, metrics)

    def export_backbone(self) -> nn.Module:
        return self.backbone
