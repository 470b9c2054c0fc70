"""Encoder registry and the timm ViT wrapper that yields everything the heads and maps need.

One forward pass per slice batch returns the CLS embedding, the normed patch-token grid,
chosen intermediate layers and the last block's CLS -> patch attention per head. timm's
fused SDPA never materialises attention, so only the last block runs timm's explicit
(q k^T / sqrt(d), softmax) path; its softmax output is read where it passes ``attn_drop``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import timm
import torch
from torch import nn

from .errors import BrainDINOError, from_fields


@dataclass(frozen=True)
class EncoderConfig:
    """A ViT architecture: the timm model plus the sizes that identify it in a checkpoint.

    Attributes:
        name: registry key, e.g. ``vit-b16-dinov3``.
        timm_name: timm model builder.
        family: ``dinov3`` (timm ``Eva``, RoPE, no absolute position embedding) or ``dinov2``
            (timm ``VisionTransformer`` with a learned position embedding).
        embed_dim, depth, num_heads, patch_size: transformer sizes.
        num_reg_tokens: register ("storage") tokens after the CLS token.
        description: one line for ``braindino models list``.
    """

    name: str
    timm_name: str
    family: str
    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    num_reg_tokens: int
    description: str = ""

    def __post_init__(self):
        if not timm.is_model(self.timm_name):
            raise BrainDINOError(f"{self.name}: timm has no model '{self.timm_name}'")
        if self.family not in ("dinov2", "dinov3") or self.embed_dim % self.num_heads:
            raise BrainDINOError(f"{self.name}: family must be dinov2 or dinov3 and embed_dim divisible by num_heads")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def patch_grid(self, image_size: int) -> tuple[int, int]:
        """(h, w) patch grid on a square canvas of ``image_size`` pixels."""
        return (image_size // self.patch_size,) * 2

    @property
    def any_canvas(self) -> bool:
        """Whether the encoder reads canvases of any size: RoPE (dinov3) computes its rotary angles for the patch
        grid at hand, exactly; a learned position embedding (dinov2) is a table for the bundle's grid alone."""
        return self.family == "dinov3"

    @classmethod
    def from_dict(cls, values: dict) -> EncoderConfig:
        return from_fields(cls, values, "encoder")


ENCODERS: dict[str, EncoderConfig] = {
    config.name: config
    for config in (
        EncoderConfig(
            "vit-b16-dinov3",
            "vit_base_patch16_dinov3",
            "dinov3",
            768,
            12,
            12,
            16,
            4,
            "reference: DINOv3-style ViT-B/16, 4 registers, RoPE (the BrainDINO encoder)",
        ),
        EncoderConfig(
            "vit-s16-dinov3",
            "vit_small_patch16_dinov3",
            "dinov3",
            384,
            12,
            6,
            16,
            4,
            "DINOv3-style ViT-S/16, 4 registers, RoPE",
        ),
        EncoderConfig(
            "vit-l16-dinov3",
            "vit_large_patch16_dinov3",
            "dinov3",
            1024,
            24,
            16,
            16,
            4,
            "DINOv3-style ViT-L/16, 4 registers, RoPE",
        ),
        EncoderConfig(
            "vit-tiny16-dinov3",
            "vit_small_patch16_dinov3",
            "dinov3",
            96,
            6,
            3,
            16,
            4,
            "tiny DINOv3-style ViT/16 for CPU tests and demos",
        ),
        EncoderConfig(
            "vit-tiny14-dinov2",
            "vit_small_patch14_dinov2",
            "dinov2",
            96,
            6,
            3,
            14,
            0,
            "tiny DINOv2-style ViT/14 for CPU tests",
        ),
        EncoderConfig("vit-s14-dinov2", "vit_small_patch14_dinov2", "dinov2", 384, 12, 6, 14, 0, "DINOv2 ViT-S/14"),
        EncoderConfig("vit-b14-dinov2", "vit_base_patch14_dinov2", "dinov2", 768, 12, 12, 14, 0, "DINOv2 ViT-B/14"),
        EncoderConfig("vit-l14-dinov2", "vit_large_patch14_dinov2", "dinov2", 1024, 24, 16, 14, 0, "DINOv2 ViT-L/14"),
        EncoderConfig(
            "vit-s14-reg4-dinov2",
            "vit_small_patch14_reg4_dinov2",
            "dinov2",
            384,
            12,
            6,
            14,
            4,
            "DINOv2 ViT-S/14 with 4 registers",
        ),
        EncoderConfig(
            "vit-b14-reg4-dinov2",
            "vit_base_patch14_reg4_dinov2",
            "dinov2",
            768,
            12,
            12,
            14,
            4,
            "DINOv2 ViT-B/14 with 4 registers",
        ),
        EncoderConfig(
            "vit-l14-reg4-dinov2",
            "vit_large_patch14_reg4_dinov2",
            "dinov2",
            1024,
            24,
            16,
            14,
            4,
            "DINOv2 ViT-L/14 with 4 registers",
        ),
    )
}


def encoder_config(name: str) -> EncoderConfig:
    """Registry lookup with a helpful error."""
    if name not in ENCODERS:
        raise BrainDINOError(f"unknown encoder '{name}' (known: {', '.join(ENCODERS)})")
    return ENCODERS[name]


def build_vit(config: EncoderConfig, img_size: int = 224, in_chans: int = 3) -> nn.Module:
    """The plain timm model of an architecture (no head; fused attention everywhere)."""
    model = timm.create_model(
        config.timm_name,
        pretrained=False,
        num_classes=0,
        img_size=img_size,
        dynamic_img_size=config.any_canvas,
        in_chans=in_chans,
        embed_dim=config.embed_dim,
        depth=config.depth,
        num_heads=config.num_heads,
    )
    if model.num_prefix_tokens != 1 + config.num_reg_tokens:
        raise BrainDINOError(
            f"{config.name}: timm built {model.num_prefix_tokens} prefix tokens, expected 1 + {config.num_reg_tokens}"
        )
    return model


@dataclass(frozen=True)
class EncoderOutput:
    """Per-batch encoder features.

    Attributes:
        cls: (B, D) final-normed CLS token.
        patch_tokens: (B, h, w, D) final-normed patch tokens.
        layers: block index -> (B, h, w, D) raw (un-normed) patch tokens of that block.
        attention: (B, heads, h, w) last-block softmax attention from CLS to each patch.
    """

    cls: torch.Tensor
    patch_tokens: torch.Tensor
    layers: dict[int, torch.Tensor]
    attention: torch.Tensor


class BrainEncoder(nn.Module):
    """A timm DINOv2/DINOv3 ViT keeping timm's surface, plus `forward` -> `EncoderOutput`.

    Args:
        config: architecture.
        img_size: canvas side the model is built for (DINOv2 position embeddings are sized to it; RoPE encoders
            also read any other multiple of the patch size, see `EncoderConfig.any_canvas`).
        in_chans: input channels (3 for natural-image checkpoints; grey slices are repeated).
    """

    def __init__(self, config: EncoderConfig, img_size: int = 224, in_chans: int = 3):
        super().__init__()
        self.config = config
        self.model = build_vit(config, img_size, in_chans)
        last_attention = self.model.blocks[-1].attn
        last_attention.fused_attn = False
        last_attention.attn_drop.register_forward_hook(self._keep_cls_attention)
        self._cls_attention: torch.Tensor | None = None

    @property
    def num_prefix_tokens(self) -> int:
        return self.model.num_prefix_tokens

    def load_weights(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Load timm-layout weights; any missing, unexpected or mis-shaped tensor is a one-line error."""
        try:
            result = self.model.load_state_dict(state, strict=False)
        except RuntimeError as error:
            lines = [line.strip() for line in str(error).splitlines()]
            detail = next((line for line in lines if line.startswith("size mismatch")), lines[0])
            raise BrainDINOError(f"{source}: weights do not fit {self.config.name} ({detail})") from error
        if result.missing_keys or result.unexpected_keys:
            raise BrainDINOError(
                f"{source}: weights do not fit {self.config.name}: missing {result.missing_keys[:5]}, "
                f"unexpected {result.unexpected_keys[:5]}"
            )

    def _keep_cls_attention(self, module: nn.Module, inputs: tuple, attention: torch.Tensor) -> None:
        self._cls_attention = attention[:, :, 0, self.num_prefix_tokens :]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, prefix + h*w, D) final-normed tokens (timm's surface)."""
        return self.model.forward_features(x)

    def forward_intermediates(self, x: torch.Tensor, indices: Sequence[int], **kwargs):
        """timm's ``forward_intermediates`` (final tokens, list of chosen block outputs)."""
        return self.model.forward_intermediates(x, indices=list(indices), **kwargs)

    def forward(self, x: torch.Tensor, layers: Sequence[int] = ()) -> EncoderOutput:
        """(B, C, H, W) slices -> `EncoderOutput` with an (H/p, W/p) patch grid."""
        grid = (x.shape[-2] // self.config.patch_size, x.shape[-1] // self.config.patch_size)
        if any(not 0 <= i < self.config.depth for i in layers):
            raise BrainDINOError(f"layers {list(layers)} out of range for a {self.config.depth}-block encoder")
        if layers:
            tokens, intermediates = self.forward_intermediates(x, layers, output_fmt="NLC")
        else:
            tokens, intermediates = self.forward_features(x), []
        batch = x.shape[0]
        patches = tokens[:, self.num_prefix_tokens :].reshape(batch, *grid, -1)
        attention = self._cls_attention.reshape(batch, -1, *grid)
        self._cls_attention = None
        return EncoderOutput(
            cls=tokens[:, 0],
            patch_tokens=patches,
            layers={i: y.reshape(batch, *grid, -1) for i, y in zip(layers, intermediates, strict=True)},
            attention=attention,
        )
