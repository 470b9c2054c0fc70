"""Batched multi-crop augmentation for MRI slices, on the training device.

Input slices are z-scored canvases from the slice index (background 0). Every operation works on
the whole batch at once with per-sample random parameters drawn from one seeded generator, so
augmentation keeps pace with the model on a GPU and is reproducible:

- random resized crops (``torchvision.ops.roi_align``: one box per sample, bilinear);
- left-right flips (anatomically plausible; up-down flips are not);
- intensity scale and shift, gamma (on the per-sample [0, 1]-rescaled intensities), smooth
  multiplicative bias field, Gaussian blur, Gaussian noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align


@dataclass(frozen=True)
class MultiCropConfig:
    """DINOv2's crop recipe with MRI intensity augmentations (probabilities applied as written)."""

    global_size: int = 224
    local_size: int = 96
    local_crops: int = 8
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.32)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_probability: float = 0.5
    intensity_probability: float = 0.8
    scale_range: tuple[float, float] = (0.8, 1.25)
    shift_range: tuple[float, float] = (-0.2, 0.2)
    gamma_probability: float = 0.3
    gamma_range: tuple[float, float] = (0.7, 1.5)
    bias_probability: float = 0.3
    bias_strength: float = 0.3
    blur_probability: float = 0.2
    blur_sigma: tuple[float, float] = (0.1, 1.5)
    noise_probability: float = 0.2
    noise_std: tuple[float, float] = (0.0, 0.1)


def _uniform(n: int, bounds: tuple[float, float], generator: torch.Generator, device) -> torch.Tensor:
    low, high = bounds
    return torch.rand(n, generator=generator).to(device) * (high - low) + low


def _chance(n: int, probability: float, generator: torch.Generator, device) -> torch.Tensor:
    return (torch.rand(n, generator=generator) < probability).to(device)


def _noise(shape: torch.Size, generator: torch.Generator, device, dtype) -> torch.Tensor:
    """Standard normal noise drawn on ``device`` from a seed the shared generator gives.

    A full-batch draw on the CPU generator took longer than a whole GPU training step.
    """
    seed = int(torch.randint(2**62, (1,), generator=generator))
    return torch.randn(shape, generator=torch.Generator(device).manual_seed(seed), device=device, dtype=dtype)


def crop_boxes(
    images: torch.Tensor, scale: tuple[float, float], ratio: tuple[float, float], generator: torch.Generator
) -> torch.Tensor:
    """Per sample of (B, C, H, W), a box of random area fraction and aspect: (B, 5) ``roi_align`` boxes."""
    batch, _, height, width = images.shape
    area = _uniform(batch, scale, generator, "cpu") * height * width
    aspect = torch.exp(_uniform(batch, (math.log(ratio[0]), math.log(ratio[1])), generator, "cpu"))
    box_w = torch.sqrt(area * aspect).clamp(4, width)
    box_h = torch.sqrt(area / aspect).clamp(4, height)
    left = torch.rand(batch, generator=generator) * (width - box_w)
    top = torch.rand(batch, generator=generator) * (height - box_h)
    return torch.stack([torch.arange(batch, dtype=torch.float32), left, top, left + box_w, top + box_h], dim=1)


def crop(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, size, size): each sample's box resampled (bilinear)."""
    return roi_align(
        images, boxes.to(images.device, images.dtype), output_size=(size, size), aligned=True, sampling_ratio=2
    )


def _blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample separable Gaussian blur; sigma (B,) in pixels."""
    batch, channels, height, width = images.shape
    radius = int(math.ceil(3 * float(sigma.max())))
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernels = torch.exp(-(offsets[None] ** 2) / (2 * sigma[:, None].to(images.dtype) ** 2))
    kernels = (kernels / kernels.sum(dim=1, keepdim=True)).repeat_interleave(channels, dim=0)  # (B*C, k)
    x = images.reshape(1, batch * channels, height, width)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), kernels[:, None, None, :], groups=batch * channels)
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), kernels[:, None, :, None], groups=batch * channels)
    return x.reshape(batch, channels, height, width)


def apply_flips(images: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Left-right flip of the samples of the (B, C, H, W) batch where ``chosen`` (B,) is True."""
    return torch.where(chosen[:, None, None, None], images.flip(-1), images)


def flip(images: torch.Tensor, probability: float, generator: torch.Generator) -> torch.Tensor:
    """Left-right flip of a random share of the (B, C, H, W) batch."""
    return apply_flips(images, _chance(images.shape[0], probability, generator, images.device))


def intensity_augment(images: torch.Tensor, config: MultiCropConfig, generator: torch.Generator) -> torch.Tensor:
    """Intensity changes with per-sample parameters; (B, C, H, W) -> same shape."""
    batch, device = images.shape[0], images.device
    out = images
    per_sample = (batch, 1, 1, 1)
    if config.gamma_probability > 0:
        low = out.amin(dim=(1, 2, 3), keepdim=True)
        span = (out.amax(dim=(1, 2, 3), keepdim=True) - low).clamp_min(1e-6)
        gamma = _uniform(batch, config.gamma_range, generator, device).view(per_sample)
        gamma = torch.where(_chance(batch, config.gamma_probability, generator, device).view(per_sample), gamma, 1.0)
        out = ((out - low) / span).clamp(0, 1) ** gamma * span + low
    apply = _chance(batch, config.intensity_probability, generator, device).view(per_sample)
    scale = _uniform(batch, config.scale_range, generator, device).view(per_sample)
    shift = _uniform(batch, config.shift_range, generator, device).view(per_sample)
    out = torch.where(apply, out * scale + shift, out)
    if config.bias_probability > 0:
        coarse = torch.randn(batch, 1, 4, 4, generator=generator).to(device, out.dtype)
        field = F.interpolate(coarse, size=out.shape[-2:], mode="bicubic", align_corners=False)
        strength = config.bias_strength * _chance(batch, config.bias_probability, generator, device).view(per_sample)
        out = out * torch.exp(strength * field)
    if config.blur_probability > 0:
        sigma = _uniform(batch, config.blur_sigma, generator, device)
        blurred = _blur(out, sigma)
        out = torch.where(_chance(batch, config.blur_probability, generator, device).view(per_sample), blurred, out)
    if config.noise_probability > 0:
        std = _uniform(batch, config.noise_std, generator, device).view(per_sample)
        std = std * _chance(batch, config.noise_probability, generator, device).view(per_sample)
        out = out + std * _noise(out.shape, generator, device, out.dtype)
    return out


def augmented_crop(
    images: torch.Tensor, size: int, scale: tuple[float, float], config: MultiCropConfig, generator: torch.Generator,
    plain_size: int = 0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(B, C, H, W) -> (B, C, size, size): a random resized crop, then flips and intensity changes.

    With ``plain_size``, also (the pair's second item) the same boxes at that size, flipped alike, without
    intensity changes: DINOv3's Gram teacher sees the student's crop undistorted (and larger, if asked).
    """
    boxes = crop_boxes(images, scale, config.ratio, generator)
    flips = _chance(images.shape[0], config.flip_probability, generator, images.device)
    augmented = intensity_augment(apply_flips(crop(images, boxes, size), flips), config, generator)
    return (augmented, apply_flips(crop(images, boxes, plain_size), flips)) if plain_size else augmented


def global_views(images: torch.Tensor, config: MultiCropConfig, generator: torch.Generator) -> list[torch.Tensor]:
    """(B, C, H, W) slices -> 2 augmented global crops (B, C, global_size, global_size)."""
    return [augmented_crop(images, config.global_size, config.global_scale, config, generator) for _ in range(2)]


def multi_crop(
    images: torch.Tensor, config: MultiCropConfig, generator: torch.Generator, plain_size: int = 0
) -> tuple[list, list, list]:
    """(B, C, H, W) slices -> (2 global crops, ``local_crops`` local crops, and with ``plain_size`` the global
    crops' undistorted views at that size, else []), each (B, C, size, size)."""
    pairs = [augmented_crop(images, config.global_size, config.global_scale, config, generator, plain_size)
             for _ in range(2)]  # fmt: skip
    global_crops, plain = ([p[0] for p in pairs], [p[1] for p in pairs]) if plain_size else (pairs, [])
    local_crops = [
        augmented_crop(images, config.local_size, config.local_scale, config, generator)
        for _ in range(config.local_crops)
    ]
    return global_crops, local_crops, plain
