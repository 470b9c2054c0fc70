"""MoCo v3 [0]: a query encoder (backbone, projector, predictor) against a momentum key encoder.

Slice-level 2D version of the contrastive pretraining that related brain-MRI work tailors to 3D
volumes: two global crops of each slice, symmetric InfoNCE with the keys of every rank as
negatives, momentum encoder = EMA of backbone + projector. As in [0] for ViTs, the patch
embedding stays at its random initialisation (``freeze_patch_embed``), which stabilises training.

Defaults from [0] (ViT): temperature 0.2, projector 3 layers 4096 -> 256 (BatchNorm on its output
too), predictor 2 layers 4096 -> 256, BatchNorm statistics per view (SyncBatchNorm across CUDA
ranks), momentum 0.99 -> 1.

[0] Chen, Xie, He, "An Empirical Study of Training Self-Supervised Vision Transformers", ICCV 2021.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from BrainDINOLib.encoder import EncoderConfig, build_vit

from ..augment import MultiCropConfig, global_views
from .centering import is_distributed
from .common import Objective, StepOutput, bn_mlp, ema_update, embedding_std, encode_tokens, in_fp32


@dataclass(frozen=True)
class MoCoConfig:
    temperature: float = 0.2
    hidden_dim: int = 4096
    out_dim: int = 256
    freeze_patch_embed: bool = True


def gather_keys(keys: torch.Tensor) -> torch.Tensor:
    """(B, d) keys of this rank -> (world * B, d) keys of all ranks, rank order (no gradient)."""
    if not is_distributed():
        return keys
    parts = [torch.empty_like(keys) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, keys.contiguous())
    return torch.cat(parts)


class MoCoObjective(Objective):
    """Symmetric MoCo v3 loss on two global crops per slice."""

    def __init__(
        self,
        encoder: EncoderConfig,
        config: MoCoConfig,
        crops: MultiCropConfig,
        image_size: int = 224,
        in_chans: int = 3,
    ):
        super().__init__()
        self.config, self.crops = config, crops
        self.student = nn.ModuleDict(
            {
                "backbone": build_vit(encoder, image_size, in_chans),
                "projector": bn_mlp(encoder.embed_dim, config.hidden_dim, config.out_dim, layers=3),
            }
        )
        if config.freeze_patch_embed:
            self.student["backbone"].patch_embed.requires_grad_(False)
        self.predictor = bn_mlp(config.out_dim, config.hidden_dim, config.out_dim, layers=2, last_bn=False)
        self.momentum_encoder = copy.deepcopy(self.student)
        self.momentum_encoder.requires_grad_(False)

    def make_inputs(self, images, generator, descriptors=None) -> dict:
        return {"views": global_views(images, self.crops, generator)}

    @in_fp32  # bf16 logits blur which key is the positive
    def _contrast(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """InfoNCE of (B, d) queries against all ranks' keys; the positive of query i is this rank's key i."""
        queries, keys = F.normalize(queries, dim=1), F.normalize(gather_keys(keys), dim=1)
        rank = dist.get_rank() if is_distributed() else 0
        labels = torch.arange(len(queries), device=queries.device) + rank * len(queries)
        logits = queries @ keys.t() / self.config.temperature
        return F.cross_entropy(logits, labels) * 2 * self.config.temperature

    def forward(self, inputs: dict, teacher_temperature: float) -> StepOutput:
        """inputs["views"]: 2 x (B, C, G, G). ``teacher_temperature`` is not used."""
        views = inputs["views"]
        batch = views[0].shape[0]
        both = torch.cat(views)  # the backbones see both views at once; BatchNorm statistics stay per view
        cls = encode_tokens(self.student["backbone"], both)[0]
        q1, q2 = [self.predictor(self.student["projector"](c)) for c in cls.split(batch)]
        with torch.no_grad():
            keys = encode_tokens(self.momentum_encoder["backbone"], both)[0]
            k1, k2 = [self.momentum_encoder["projector"](k) for k in keys.split(batch)]
        loss = self._contrast(q1, k2) + self._contrast(q2, k1)
        return StepOutput({"contrastive": loss, "loss": loss}, {"embedding_std": embedding_std(cls[:batch])})

    @torch.no_grad()
    def after_step(self, output: StepOutput, momentum: float) -> None:
        ema_update(self.momentum_encoder, self.student, momentum)

    def export_backbone(self) -> nn.Module:
        """The query encoder's backbone, as MoCo v3 evaluates [0]."""
        return self.student["backbone"]
