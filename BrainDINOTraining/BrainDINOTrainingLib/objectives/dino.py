"""DINOv2/v3-style self-distillation: DINO CLS loss + iBOT masked-patch loss + KoLeo [0, 1, 2], and DINOv3's
Gram anchoring [3] when asked (`gram`).

The objective owns student, teacher (a separate EMA copy, never sharing parameters), heads,
mask token and centering; ``forward`` computes the loss terms and metrics without changing any
state; `DINOObjective.after_step` then moves the teacher and the centers.

[0] Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021.
[1] Zhou et al., "iBOT: Image BERT Pre-Training with Online Tokenizer", ICLR 2022.
[2] Oquab et al., "DINOv2: Learning Robust Visual Features without Supervision", TMLR 2024.
[3] Simeoni et al., "DINOv3", arXiv 2508.10104, 2025.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from BrainDINOLib.encoder import EncoderConfig, build_vit
from BrainDINOLib.errors import BrainDINOError

from ..augment import MultiCropConfig, multi_crop
from .centering import make_centering
from .common import Objective, StepOutput, ema_update, embedding_std, encode_tokens
from .dino_loss import DINOLoss
from .gram import GramConfig, gram_loss, resize_patches
from .heads import DINOHead
from .ibot_loss import IBOTPatchLoss
from .koleo_loss import KoLeoLoss
from .masking import batch_masks


@dataclass(frozen=True)
class DINOConfig:
    """Loss weights (a term is on when its weight is > 0), head, centering and masking settings."""

    prototypes: int = 4096
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    koleo_weight: float = 0.1
    centering: str = "ema"  # "ema", "sinkhorn", or "none" (no centering: collapses; for demonstrations)
    center_momentum: float = 0.9
    student_temperature: float = 0.1
    mask_probability: float = 0.5  # share of global crops with iBOT masks
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    freeze_last_layer_epochs: float = 1.0

    def __post_init__(self):
        if self.centering not in ("ema", "sinkhorn", "none"):
            raise BrainDINOError(f"centering must be 'ema', 'sinkhorn' or 'none', got '{self.centering}'")


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) along the last axis."""
    return -(probs * torch.log(probs.clamp_min(1e-12))).sum(dim=-1)


def collapse_metrics(teacher_probs: torch.Tensor, embeddings: torch.Tensor) -> dict[str, float]:
    """What DINO collapse looks like in numbers [0, 2].

    - ``teacher_entropy``: mean per-sample entropy of the targets; ln(K) = uniform collapse.
    - ``teacher_batch_entropy``: entropy of the batch-mean target; near 0 = one prototype for all.
    - ``embedding_std``: see `common.embedding_std`.
    """
    return {
        "teacher_entropy": float(entropy(teacher_probs).mean()),
        "teacher_batch_entropy": float(entropy(teacher_probs.mean(dim=0))),
        "embedding_std": embedding_std(embeddings),
    }


class DINOObjective(Objective):
    """Student/teacher pair trained with the DINOv2 recipe on 2 global + N local crops.

    Args:
        encoder: architecture of the student backbone (DINOv3 family); the teacher is a deep copy.
        config: loss weights, head sizes, centering, iBOT masking.
        crops: multi-crop recipe.
        image_size, in_chans: canvas size and channels of the slices.
        gram: Gram anchoring; when on, ``gram_teacher`` is a frozen backbone whose weights the trainer loads.
    """

    def __init__(
        self,
        encoder: EncoderConfig,
        config: DINOConfig,
        crops: MultiCropConfig,
        image_size: int = 224,
        in_chans: int = 3,
        gram: GramConfig | None = None,
    ):
        super().__init__()
        gram = gram or GramConfig()
        self.config, self.crops, self.gram = config, crops, gram
        if (
            gram.weight > 0
            and gram.teacher_size
            and (gram.teacher_size < crops.global_size or gram.teacher_size % encoder.patch_size)
        ):
            raise BrainDINOError(f"gram.teacher_size {gram.teacher_size} must be 0 or a multiple of the patch size "
                                 f"{encoder.patch_size} at least crops.global_size {crops.global_size}")  # fmt: skip
        self.grid = encoder.patch_grid(crops.global_size)
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
        self.gram_teacher = copy.deepcopy(self.student["backbone"]).requires_grad_(False) if gram.weight > 0 else None
        self.cls_center = make_centering(config.centering, config.prototypes, config.center_momentum)
        self.patch_center = make_centering(config.centering, config.prototypes, config.center_momentum)
        self.dino_loss = DINOLoss(config.student_temperature)
        self.ibot_loss = IBOTPatchLoss(config.student_temperature)
        self.koleo_loss = KoLeoLoss()

    def make_inputs(self, images, generator, descriptors=None) -> dict:
        plain_size = (self.gram.teacher_size or self.crops.global_size) if self.gram_teacher is not None else 0
        global_crops, local_crops, gram_crops = multi_crop(images, self.crops, generator, plain_size)
        probability = self.config.mask_probability if self.config.ibot_weight > 0 else 0.0
        masks = batch_masks(2 * images.shape[0], self.grid, generator, probability, self.config.mask_ratio)
        inputs = {"global_crops": global_crops, "local_crops": local_crops, "masks": masks.to(images.device)}
        return inputs | ({"gram_crops": gram_crops} if gram_crops else {})

    def forward(self, inputs: dict, teacher_temperature: float) -> StepOutput:
        """
        Args:
            inputs: from `make_inputs`: ``global_crops`` 2 x (B, C, G, G), ``local_crops`` N x (B, C, L, L),
                ``masks`` (2B, g, g) bool iBOT masks in ``torch.cat(global_crops)`` order; with Gram anchoring,
                ``gram_crops`` 2 x (B, C, T, T), the Gram teacher's views of the global crops.
            teacher_temperature: current teacher softmax temperature.
        """
        global_crops, local_crops, masks = inputs["global_crops"], inputs["local_crops"], inputs["masks"]
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
            teacher_probs = self.cls_center.probabilities(teacher_cls_logits, teacher_temperature)

        student_cls, student_patches = encode_tokens(self.student["backbone"], globals_, self.mask_token, masks)
        local_cls = encode_tokens(self.student["backbone"], torch.cat(local_crops))[0] if local_crops else None
        student_tokens = [student_cls] + ([local_cls] if local_crops else [])
        student_tokens += [student_patches[flat_masks]] if use_patches else []
        student_logits = self.student["head"](torch.cat(student_tokens))
        views = 2 + len(local_crops)
        cls_logits = list(student_logits[: views * batch].split(batch))  # one (B, K) per crop

        losses = {}
        if config.dino_weight > 0:
            losses["dino"] = self.dino_loss(cls_logits, list(teacher_probs.chunk(2)))
        if use_patches:
            patch_targets = self.patch_center.probabilities(teacher_patch_logits, teacher_temperature)
            patch_logits = student_logits[views * batch :]
            losses["ibot"] = self.ibot_loss(patch_logits, patch_targets, masks)
        if config.koleo_weight > 0:
            losses["koleo"] = sum(self.koleo_loss(c) for c in student_cls.chunk(2)) / 2
        if self.gram_teacher is not None:  # every patch of the (masked) global crops, as DINOv3's "all" tokens
            with torch.no_grad():
                target = encode_tokens(self.gram_teacher, torch.cat(inputs["gram_crops"]))[1]
            losses["gram"] = gram_loss(student_patches, resize_patches(target, self.grid))
        weights = {"dino": config.dino_weight, "ibot": config.ibot_weight, "koleo": config.koleo_weight,
                   "gram": self.gram.weight}  # fmt: skip
        losses["loss"] = sum(weights[name] * value for name, value in losses.items())

        with torch.no_grad():
            metrics = collapse_metrics(teacher_probs, teacher_cls[:batch])
        state = {"teacher_cls_logits": teacher_cls_logits}
        if use_patches:
            state["teacher_patch_logits"] = teacher_patch_logits
        return StepOutput(losses, metrics, state)

    def after_backward(self, epoch: float) -> None:
        """The prototypes stay fixed during the first epoch(s): an unstable start otherwise [0]."""
        if epoch < self.config.freeze_last_layer_epochs:
            for parameter in self.student["head"].last_layer.parameters():
                parameter.grad = None

    @torch.no_grad()
    def after_step(self, output: StepOutput, momentum: float) -> None:
        """Teacher EMA, then the centers (a no-op but for EMA centering)."""
        ema_update(self.teacher, self.student, momentum)
        self.cls_center.update(output.state["teacher_cls_logits"])
        if "teacher_patch_logits" in output.state:  # on every rank, even one without masked patches
            self.patch_center.update(output.state["teacher_patch_logits"])

    @torch.no_grad()
    def refresh_gram_teacher(self) -> None:
        """The Gram teacher becomes a copy of the EMA teacher's backbone (DINOv3's periodic update)."""
        for gram, teacher in zip(self.gram_teacher.parameters(), self.teacher["backbone"].parameters(), strict=True):
            gram.copy_(teacher)

    def export_backbone(self) -> nn.Module:
        return self.teacher["backbone"]
