"""DINOv2/v3-style self-distillation: DINO CLS loss + iBOT masked-patch loss + KoLeo [0, 1, 2].

The objective owns student, teacher (a separate EMA copy, never sharing parameters), heads,
mask token and centering; ``forward`` computes the loss terms and metrics without changing any
state; the trainer then calls `DINOObjective.update_teacher` and `DINOObjective.update_centers`.

[0] Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021.
[1] Zhou et al., "iBOT: Image BERT Pre-Training with Online Tokenizer", ICLR 2022.
[2] Oquab et al., "DINOv2: Learning Robust Visual Features without Supervision", TMLR 2024.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from BrainDINOLib.encoder import BrainEncoder, EncoderConfig, build_vit
from BrainDINOLib.errors import BrainDINOError

from .centering import EMACenter, sinkhorn_knopp
from .dino_loss import DINOLoss
from .heads import DINOHead
from .ibot_loss import IBOTPatchLoss
from .koleo_loss import KoLeoLoss


@dataclass(frozen=True)
class DINOConfig:
    """Loss weights (a term is on when its weight is > 0) and head/centering settings."""

    prototypes: int = 4096
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    koleo_weight: float = 0.1
    centering: str = "ema"  # "ema", "sinkhorn", or "none" (no centering: collapses; for demonstrations)
    center_momentum: float = 0.9
    student_temperature: float = 0.1

    def __post_init__(self):
        if self.centering not in ("ema", "sinkhorn", "none"):
            raise BrainDINOError(f"centering must be 'ema', 'sinkhorn' or 'none', got '{self.centering}'")


@dataclass
class StepOutput:
    """Loss terms (``loss`` is their weighted sum), metrics, and the teacher logits for centering."""

    losses: dict[str, torch.Tensor]
    metrics: dict[str, float]
    teacher_cls_logits: torch.Tensor
    teacher_patch_logits: torch.Tensor | None


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) along the last axis."""
    return -(probs * torch.log(probs.clamp_min(1e-12))).sum(dim=-1)


def collapse_metrics(teacher_probs: torch.Tensor, embeddings: torch.Tensor) -> dict[str, float]:
    """What DINO collapse looks like in numbers [0, 2].

    - ``teacher_entropy``: mean per-sample entropy of the targets; ln(K) = uniform collapse.
    - ``teacher_batch_entropy``: entropy of the batch-mean target; near 0 = one prototype for all.
    - ``embedding_std``: mean per-dimension std of L2-normalised embeddings; ~1/sqrt(D) when
      healthy, 0 when every sample maps to the same point.
    """
    normalized = F.normalize(embeddings.float(), dim=-1)
    return {
        "teacher_entropy": float(entropy(teacher_probs).mean()),
        "teacher_batch_entropy": float(entropy(teacher_probs.mean(dim=0))),
        "embedding_std": float(normalized.std(dim=0).mean()),
    }


def encode_tokens(
    model: nn.Module, images: torch.Tensor, mask_token: torch.Tensor | None = None, masks: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a timm DINOv3-family ViT (``Eva``) with masked patches replaced by a mask token.

    Args:
        images: (B, C, H, W).
        mask_token: (D,) learnable embedding for masked patches.
        masks: (B, h, w) bool, True where the patch is masked.

    Returns:
        (cls, patches): (B, D) and (B, h*w, D), final-normed.
    """
    x = model.patch_embed(images)  # (B, h, w, D) for dynamic-size models
    if masks is not None and masks.any():  # index_put is ~3x cheaper than torch.where here (fwd + bwd)
        x = x.clone()
        x[masks] = mask_token.to(x.dtype)
    x, rope = model._pos_embed(x)
    x = model.norm_pre(x)
    for block in model.blocks:
        x = block(x, rope=rope)
    x = model.norm(x)
    return x[:, 0], x[:, model.num_prefix_tokens :]


class DINOObjective(nn.Module):
    """Student/teacher pair trained with the DINOv2 recipe.

    Args:
        encoder: architecture of the student backbone (DINOv3 family); the teacher is a deep copy.
        config: loss weights and head sizes.
        image_size, in_chans: global crop size and channels.
    """

    def __init__(self, encoder: EncoderConfig, config: DINOConfig, image_size: int = 224, in_chans: int = 3):
        super().__init__()
        if encoder.family != "dinov3":
            raise BrainDINOError(f"pretraining needs a DINOv3-family encoder, got {encoder.name}")
        self.config = config
        self.encoder_config, self.image_size, self.in_chans = encoder, image_size, in_chans
        dim = encoder.embed_dim
        self.student = nn.ModuleDict(
            {
                "backbone": build_vit(encoder, image_size, in_chans),
                "head": DINOHead(dim, config.prototypes, config.head_hidden_dim, config.head_bottleneck_dim),
            }
        )
        self.mask_token = nn.Parameter(torch.zeros(dim))
        self.teacher = copy.deepcopy(self.student)
        self.teacher.requires_grad_(False)
        self.cls_center = EMACenter(config.prototypes, config.center_momentum)
        self.patch_center = EMACenter(config.prototypes, config.center_momentum)
        self.dino_loss = DINOLoss(config.student_temperature)
        self.ibot_loss = IBOTPatchLoss(config.student_temperature)
        self.koleo_loss = KoLeoLoss()

    def _targets(self, logits: torch.Tensor, center: EMACenter, temperature: float) -> torch.Tensor:
        if self.config.centering == "sinkhorn":
            return sinkhorn_knopp(logits, temperature)
        if self.config.centering == "none":
            return torch.softmax(logits.float() / temperature, dim=-1)
        return center.probabilities(logits, temperature)

    def forward(
        self,
        global_crops: list[torch.Tensor],
        local_crops: list[torch.Tensor],
        masks: torch.Tensor,
        teacher_temperature: float,
    ) -> StepOutput:
        """
        Args:
            global_crops: 2 tensors (B, C, G, G).
            local_crops: tensors (B, C, L, L).
            masks: (2B, g, g) bool iBOT masks for the global crops (in ``torch.cat(global_crops)`` order).
            teacher_temperature: current teacher softmax temperature.
        """
        batch = global_crops[0].shape[0]
        config = self.config
        globals_ = torch.cat(global_crops)
        flat_masks = masks.flatten(1)
        use_patches = config.ibot_weight > 0
        with torch.no_grad():
            teacher_cls, teacher_patches = encode_tokens(self.teacher["backbone"], globals_)
            # One head call for CLS and masked-patch tokens (the head is shared): bigger, fewer matmuls.
            teacher_tokens = torch.cat([teacher_cls, teacher_patches[flat_masks]]) if use_patches else teacher_cls
            teacher_logits = self.teacher["head"](teacher_tokens)
            teacher_cls_logits, teacher_patch_logits = teacher_logits[: 2 * batch], teacher_logits[2 * batch :]
            teacher_probs = self._targets(teacher_cls_logits, self.cls_center, teacher_temperature)

        student_cls, student_patches = encode_tokens(self.student["backbone"], globals_, self.mask_token, masks)
        local_cls = [encode_tokens(self.student["backbone"], crop)[0] for crop in local_crops]
        student_tokens = [student_cls, *local_cls] + ([student_patches[flat_masks]] if use_patches else [])
        student_logits = self.student["head"](torch.cat(student_tokens))
        views = 2 + len(local_crops)
        cls_logits = list(student_logits[: views * batch].split(batch))  # one (B, K) per crop

        losses = {}
        if config.dino_weight > 0:
            losses["dino"] = self.dino_loss(cls_logits, list(teacher_probs.chunk(2)))
        if use_patches:
            patch_targets = self._targets(teacher_patch_logits, self.patch_center, teacher_temperature)
            patch_logits = student_logits[views * batch :]
            losses["ibot"] = self.ibot_loss(patch_logits, patch_targets, masks)
        if config.koleo_weight > 0:
            losses["koleo"] = sum(self.koleo_loss(c) for c in student_cls.chunk(2)) / 2
        weights = {"dino": config.dino_weight, "ibot": config.ibot_weight, "koleo": config.koleo_weight}
        losses["loss"] = sum(weights[name] * value for name, value in losses.items())

        with torch.no_grad():
            metrics = collapse_metrics(teacher_probs, student_cls[:batch])
        return StepOutput(losses, metrics, teacher_cls_logits, teacher_patch_logits if use_patches else None)

    @torch.no_grad()
    def update_centers(self, step: StepOutput) -> None:
        """EMA centering: fold this step's teacher logits into the centers (no-op with Sinkhorn-Knopp)."""
        if self.config.centering == "ema":
            self.cls_center.update(step.teacher_cls_logits)
            if step.teacher_patch_logits is not None and len(step.teacher_patch_logits):
                self.patch_center.update(step.teacher_patch_logits)

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student."""
        for teacher, student in zip(self.teacher.parameters(), self.student.parameters(), strict=True):
            teacher.mul_(momentum).add_(student.detach(), alpha=1 - momentum)

    def teacher_encoder(self) -> BrainEncoder:
        """The teacher backbone as a `BrainEncoder` (for export as a bundle and for inference)."""
        encoder = BrainEncoder(self.encoder_config, self.image_size, self.in_chans)
        encoder.load_weights(self.teacher["backbone"].state_dict(), "teacher")
        return encoder.eval()
