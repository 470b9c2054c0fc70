"""Masked autoencoder [0] with an added spectral-domain (FFT) reconstruction term [1].

Slice-level 2D version of the masked 3D pretraining compared in [1]: the encoder sees a random 25 %
of the patches of one lightly augmented crop (random resized crop + flip, as in [0]); a narrow
decoder predicts the pixels of the masked patches. Loss = mean squared error on masked patches
(each target patch normalised by its own mean and std, ``norm_pix_loss`` of [0]) +
``spectral_weight`` x mean |log(1 + |FFT(reconstruction)|) - log(1 + |FFT(slice)|)|, where the
reconstruction is the slice with its masked patches replaced by the predictions. The spectral term
rewards the high-frequency detail that pixel MSE blurs away. The slice's channels are copies of one
image, so only the first channel is reconstructed.

Defaults: mask ratio 0.75, decoder 512 wide, 8 blocks, 16 heads [0]; spectral weight 0.1 (our
choice: [1] does not fix one for 2D slices). The exported encoder's embedding is the mean patch
token (the CLS token receives no loss).

[0] He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022.
[1] arXiv 2606.13315: masked (MAE + spectral loss) vs predictive (JEPA + VCR) pretraining on 3D brain MRI.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from BrainDINOLib.encoder import EncoderConfig, build_vit

from ..augment import MultiCropConfig, crop, crop_boxes, flip
from .common import Objective, StepOutput, TokenTransformer, embedding_std, encode_tokens


@dataclass(frozen=True)
class MAEConfig:
    mask_ratio: float = 0.75
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    norm_pix_loss: bool = True
    spectral_weight: float = 0.1
    crop_scale: tuple[float, float] = (0.2, 1.0)


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, H, W) -> (B, h*w, patch*patch), row-major patches."""
    batch, height, width = images.shape
    x = images.reshape(batch, height // patch, patch, width // patch, patch)
    return x.permute(0, 1, 3, 2, 4).reshape(batch, (height // patch) * (width // patch), patch * patch)


def unpatchify(patches: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Inverse of `patchify`: (B, h*w, p*p) -> (B, h*p, w*p)."""
    batch, _, area = patches.shape
    patch = int(round(area**0.5))
    x = patches.reshape(batch, grid[0], grid[1], patch, patch).permute(0, 1, 3, 2, 4)
    return x.reshape(batch, grid[0] * patch, grid[1] * patch)


def spectral_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of log-amplitude spectra of (B, H, W) images."""
    amplitude = [torch.log1p(torch.fft.rfft2(x.float(), norm="ortho").abs()) for x in (a, b)]
    return (amplitude[0] - amplitude[1]).abs().mean()


class MAEObjective(Objective):
    pooling = "mean"

    def __init__(
        self,
        encoder: EncoderConfig,
        config: MAEConfig,
        crops: MultiCropConfig,
        image_size: int = 224,
        in_chans: int = 3,
    ):
        super().__init__()
        self.config, self.crops, self.patch = config, crops, encoder.patch_size
        self.grid = encoder.patch_grid(crops.global_size)
        self.backbone = build_vit(encoder, image_size, in_chans)
        self.decoder = TokenTransformer(
            encoder.embed_dim, self.patch**2, self.grid, config.decoder_dim, config.decoder_depth, config.decoder_heads
        )

    def make_inputs(self, images, generator, descriptors=None) -> dict:
        boxes = crop_boxes(images, self.config.crop_scale, self.crops.ratio, generator)
        view = flip(crop(images, boxes, self.crops.global_size), self.crops.flip_probability, generator)
        patches = self.grid[0] * self.grid[1]
        keep_count = max(1, int(round(patches * (1 - self.config.mask_ratio))))
        order = torch.rand(images.shape[0], patches, generator=generator).argsort(dim=1).to(images.device)
        return {"view": view, "keep": order[:, :keep_count], "masked": order[:, keep_count:]}

    def forward(self, inputs: dict, teacher_temperature: float) -> StepOutput:
        """inputs: ``view`` (B, C, G, G), ``keep`` (B, n) and ``masked`` (B, m) patch indices."""
        view, keep, masked = inputs["view"], inputs["keep"], inputs["masked"]
        _, visible = encode_tokens(self.backbone, view, keep=keep)
        predicted = self.decoder(visible, keep, masked).float()  # (B, m, p*p)
        target_patches = patchify(view[:, 0].float(), self.patch)
        target = target_patches.gather(1, masked[..., None].expand(-1, -1, target_patches.shape[-1]))
        if self.config.norm_pix_loss:
            mean, std = target.mean(dim=-1, keepdim=True), (target.var(dim=-1, keepdim=True) + 1e-6).sqrt()
            losses = {"pixel": F.mse_loss(predicted, (target - mean) / std)}
            predicted = predicted * std + mean  # back to intensities for the spectrum
        else:
            losses = {"pixel": F.mse_loss(predicted, target)}
        if self.config.spectral_weight > 0:
            reconstruction = target_patches.scatter(1, masked[..., None].expand_as(predicted), predicted)
            losses["spectral"] = spectral_distance(unpatchify(reconstruction, self.grid), view[:, 0])
        losses["loss"] = losses["pixel"] + self.config.spectral_weight * losses.get("spectral", 0.0)
        return StepOutput(losses, {"embedding_std": embedding_std(visible.mean(dim=1))})

    def export_backbone(self) -> nn.Module:
        return self.backbone
