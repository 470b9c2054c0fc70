"""What every objective shares: the interface the trainer drives, ViT token encoding with masked or
dropped patches, EMA updates, 2D sin-cos positions, a small transformer for decoders/predictors,
and the embedding-spread collapse monitor."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers.pos_embed_sincos import apply_keep_indices_nlc
from timm.models.vision_transformer import Block
from torch import nn


@dataclass
class StepOutput:
    """Loss terms (``loss`` is their weighted sum), float metrics, and tensors ``after_step`` needs."""

    losses: dict[str, torch.Tensor]
    metrics: dict[str, float]
    state: dict[str, torch.Tensor] = field(default_factory=dict)


class Objective(nn.Module):
    """The contract between an objective and the trainer.

    Naming: the trained ViT's parameters live under a module called ``backbone`` (for layer-wise
    lr decay); modules that only follow the student (EMA teachers, momentum encoders) have
    ``requires_grad=False``. ``forward(inputs, teacher_temperature)`` must not change any state;
    the trainer calls `after_backward` and `after_step` around the optimizer step.
    """

    #: subject descriptors (manifest label columns) each slice must carry, e.g. ("age",).
    descriptor_names: tuple[str, ...] = ()
    #: how the exported encoder's tokens pool to one embedding (kNN probe, model card): "cls" or "mean" patch.
    pooling: str = "cls"

    def make_inputs(
        self, images: torch.Tensor, generator: torch.Generator, descriptors: torch.Tensor | None = None
    ) -> dict:
        """Views, masks, descriptors of one batch of (B, C, H, W) slices (random draws from ``generator``)."""
        raise NotImplementedError

    def after_backward(self, epoch: float) -> None:
        """Adjust gradients before clipping (e.g. keep a layer frozen early in training)."""

    def after_step(self, output: StepOutput, momentum: float) -> None:
        """State updates after the optimizer step (EMA teachers, centers)."""

    def export_backbone(self) -> nn.Module:
        """The ViT exported as the model bundle's encoder."""
        raise NotImplementedError


def encode_tokens(
    model: nn.Module,
    images: torch.Tensor,
    mask_token: torch.Tensor | None = None,
    masks: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a timm DINOv3-family ViT (``Eva``) with masked patches replaced, or with only some kept.

    Without either, this is timm's ``forward_features``. With them, it is that forward written out, since timm
    has no public way to edit patch tokens before the blocks; it uses timm's ``_pos_embed``, so timm is pinned to
    a minor version and a test checks this forward against ``forward_features``.

    Args:
        images: (B, C, H, W).
        mask_token, masks: (D,) embedding put in place of the patches where masks (B, h, w) is True
            (the token gets a zero gradient when nothing is masked, so every rank has one).
        keep: (B, n) indices (row-major in the patch grid) of the only patches to encode (MAE, JEPA).

    Returns:
        (cls, patches): (B, D) and (B, h*w or n, D), final-normed.
    """
    if mask_token is None and keep is None:
        x = model.forward_features(images)
        return x[:, 0], x[:, model.num_prefix_tokens :]
    x = model.patch_embed(images)  # (B, h, w, D) for dynamic-size models
    if mask_token is not None and masks.any():  # index_put is ~3x cheaper than torch.where here (fwd + bwd)
        x = x.clone()
        x[masks] = mask_token.to(x.dtype)
    elif mask_token is not None:  # keep the token in the graph: FSDP reduce-scatters only what has a gradient
        x = x + 0 * mask_token.to(x.dtype)
    x, rope = model._pos_embed(x)
    if keep is not None:
        prefix = model.num_prefix_tokens
        patches = x[:, prefix:].gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :prefix], patches], dim=1)
        rope = apply_keep_indices_nlc(patches, rope, keep).unsqueeze(1)  # (B, 1, n, rope_dim): per-sample positions
    x = model.norm_pre(x)
    for block in model.blocks:
        x = block(x, rope=rope)
    x = model.norm(x)
    return x[:, 0], x[:, model.num_prefix_tokens :]


def in_fp32(function):
    """Run ``function`` with autocast off and its floating tensor arguments in float32.

    For the reductions whose meaning low precision changes: nearest neighbours and positives picked from bf16
    similarities are often the wrong ones, and covariances lose their small entries (DINOv2/v3 turn autocast off
    around KoLeo for this reason). Autocast's own lists keep only matmuls in bf16, and those are what matter here.
    """

    def fp32(value):
        return value.float() if isinstance(value, torch.Tensor) and value.is_floating_point() else value

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        device = next(a.device.type for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
        with torch.autocast(device, enabled=False):
            return function(*map(fp32, args), **{name: fp32(value) for name, value in kwargs.items()})

    return wrapper


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * source, over all parameters at once."""
    targets, sources = list(target.parameters()), [p.detach() for p in source.parameters()]
    if len(targets) != len(sources):
        raise ValueError("EMA between modules of different structure")
    torch._foreach_lerp_(targets, sources, 1.0 - momentum)


def embedding_std(embeddings: torch.Tensor) -> float:
    """Mean per-dimension std of L2-normalised (B, D) embeddings: ~1/sqrt(D) when spread, 0 when collapsed."""
    return float(F.normalize(embeddings.detach().float(), dim=-1).std(dim=0).mean())


def sincos_positions(grid: tuple[int, int], dim: int) -> torch.Tensor:
    """(h*w, dim) fixed 2D sin-cos position embedding (half the channels per axis), row-major."""
    h, w = grid
    quarter = dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter) / quarter)
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    parts = []
    for coords in (rows.ravel(), cols.ravel()):
        angles = coords[:, None] * omega[None]
        parts += [np.sin(angles), np.cos(angles)]
    table = np.concatenate(parts, axis=1)
    return torch.from_numpy(np.pad(table, ((0, 0), (0, dim - table.shape[1])))).float()


def bn_mlp(in_dim: int, hidden_dim: int, out_dim: int, layers: int, last_bn: bool = True) -> nn.Sequential:
    """Linear-BN-ReLU blocks, then Linear and (``last_bn``) an affine-free BN on the output (MoCo v3's MLPs).

    BatchNorm across the batch also breaks the symmetry of a fresh ViT whose CLS tokens are still
    almost identical for every image (LayerScale starts near 0), so contrastive losses get a gradient.
    """
    modules, dim = [], in_dim
    for _ in range(layers - 1):
        modules += [nn.Linear(dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
        dim = hidden_dim
    modules.append(nn.Linear(dim, out_dim, bias=False))
    if last_bn:
        modules.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*modules)


class TokenTransformer(nn.Module):
    """A narrow ViT over a token subset with fixed sin-cos positions: MAE's decoder, JEPA's predictor.

    ``forward(tokens, positions)`` projects (B, n, in_dim) tokens to ``dim``, adds the position
    embedding of each token's grid index, runs ``depth`` blocks and projects to ``out_dim``.
    """

    def __init__(self, in_dim: int, out_dim: int, grid: tuple[int, int], dim: int, depth: int, heads: int):
        super().__init__()
        self.embed = nn.Linear(in_dim, dim)
        self.register_buffer("positions", sincos_positions(grid, dim), persistent=False)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, out_dim)
        self.mask_token = nn.Parameter(torch.zeros(dim))
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """
        Args:
            tokens: (B, n, in_dim) known tokens at grid indices ``positions`` (B, n).
            queries: (B, m) grid indices whose tokens are predicted (they enter as the mask token).

        Returns:
            (B, m, out_dim) predictions for ``queries``.
        """
        x = self.embed(tokens) + self.positions[positions]
        q = self.mask_token.to(x.dtype) + self.positions[queries]
        x = torch.cat([x, q], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.out(self.norm(x[:, tokens.shape[1] :]))
