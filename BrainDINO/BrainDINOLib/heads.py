"""Task heads on the frozen encoder's features, stored inside a model bundle.

Volume heads (classification, regression, survival risk, sequence type) read the slice embeddings
(CLS tokens, or mean patch tokens for encoders pretrained that way, e.g. MAE) of one or more of a
subject's scans, pool them over the volume (mean, or learned attention weights) and apply
LayerNorm -> Linear(D, D) -> GELU -> Linear(K), as the BrainDINO paper's heads do. The
segmentation decoder reads the patch tokens of several encoder blocks (concatenated, optionally for
several MRI sequences, fused by a 1x1 convolution) and upsamples them x2 per stage back to the canvas.

A head lives in the bundle as ``heads/<name>.safetensors`` plus an entry of the model card
(`HeadSpec`), which records the sha256 of the encoder weights it was fitted on: a head refuses to
load on any other encoder.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .errors import BrainDINOError, from_fields
from .manifest import DEFAULT_SPLIT

HEAD_KINDS = ("seg", "cls", "reg", "surv", "seq")
VOLUME_KINDS = ("cls", "reg", "surv", "seq")


@dataclass(frozen=True)
class HeadTraining:
    """How a head was fitted (the ``training`` of its card entry); `evaluate` rebuilds its test split from it.

    Attributes:
        data: the manifest it was fitted on.
        split, split_seed, stratify: the subject split (`Manifest.split`).
        event: survival heads: the event column.
        label_fraction, seed: the run whose head was kept.
        epochs: volume heads' training epochs; steps: a segmentation decoder's optimizer steps.
        weight_decay: the one chosen on the validation subjects (volume heads).
        test_subjects: how many subjects ``metrics`` were measured on.
        command: the command line that fitted it.
    """

    data: str = ""
    split: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_SPLIT))
    split_seed: int = 0
    stratify: str | None = None
    event: str | None = None
    label_fraction: float = 1.0
    seed: int = 0
    epochs: int | None = None
    steps: int | None = None
    weight_decay: float | None = None
    test_subjects: int = 0
    command: str = ""


@dataclass(frozen=True)
class HeadSpec:
    """What a head predicts and how to rebuild it (one entry of the model card's ``heads``).

    Attributes:
        name: file stem under ``heads/`` and the key of its predictions.
        kind: seg | cls | reg | surv | seq.
        target: the manifest column it predicts (``seg`` for masks, ``modality`` for sequence type).
        modalities: the scans of a subject it reads (e.g. ("t1ce", "flair")); empty: the scan given.
        classes: class names (cls, seq) or segment names (seg, in label order 1..K).
        label_values: seg only: the label value written for each segment (e.g. BraTS 1, 2, 3).
        units: regression units (``years``); survival: what the risk means.
        target_mean, target_std: regression targets are fitted standardised; predictions undo it.
        aggregation: volume heads: ``mean`` or ``attention`` pooling over slices.
        layers: seg only: encoder blocks whose patch tokens are concatenated.
        width: volume heads: the size of a slice's input (the encoder dim, + 256 with thumbnails); seg: channels after
            fusion.
        image_channels: seg only: width of the convolutional branch that also reads the canvas pixels of the
            scans (0: the patch tokens alone).
        thumbnails: volume heads only: each slice's embedding is followed by its 16 x 16 thumbnail, the canvas
            averaged down (`volume_input`), so the head reads the slice's intensities as well as the encoder's
            features.
        encoder_sha256: sha256 of the encoder weights the head was fitted on.
        metrics: held-out metrics measured when it was fitted.
        training: how it was fitted (`HeadTraining`).
    """

    name: str
    kind: str
    target: str
    modalities: tuple[str, ...] = ()
    classes: tuple[str, ...] = ()
    label_values: tuple[int, ...] = ()
    units: str = ""
    target_mean: float = 0.0
    target_std: float = 1.0
    aggregation: str = "mean"
    layers: tuple[int, ...] = ()
    width: int = 0
    image_channels: int = 0
    thumbnails: bool = False
    encoder_sha256: str = ""
    metrics: dict = field(default_factory=dict)
    training: HeadTraining = field(default_factory=HeadTraining)

    def __post_init__(self):
        if self.kind not in HEAD_KINDS:
            raise BrainDINOError(f"head '{self.name}': kind must be one of {', '.join(HEAD_KINDS)}, got '{self.kind}'")
        if self.aggregation not in ("mean", "attention"):
            raise BrainDINOError(f"head '{self.name}': aggregation must be mean or attention")
        if self.kind in ("cls", "seq", "seg") and len(self.classes) < (1 if self.kind == "seg" else 2):
            raise BrainDINOError(f"head '{self.name}': a {self.kind} head needs class names")
        if self.kind == "seg" and (len(self.label_values) != len(self.classes) or not self.layers):
            raise BrainDINOError(f"head '{self.name}': a seg head needs one label value per class and its layers")
        if self.kind == "seg" and self.thumbnails:
            raise BrainDINOError(f"head '{self.name}': thumbnails are read by volume heads, not seg heads")

    @property
    def outputs(self) -> int:
        """Output channels: classes (+ background for seg), or one value (regression, risk)."""
        if self.kind == "seg":
            return len(self.classes) + 1
        return len(self.classes) if self.kind in ("cls", "seq") else 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)  # tuples are written as JSON lists and read back as tuples

    @classmethod
    def from_dict(cls, values: dict) -> HeadSpec:
        name = values.get("name") if isinstance(values, dict) else None
        return from_fields(cls, values, f"head '{name}'" if isinstance(name, str) else "a head entry")


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, S, D) slice tokens, zero-padded, and their (B, S) bool mask of real slices -> (B, D) mean of the real."""
    weights = mask.to(tokens.dtype)[..., None]
    return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1)


class AttentionPool(nn.Module):
    """Softmax-weighted mean of slice tokens with one learned scoring vector (attention-based MIL)."""

    def __init__(self, dim: int):
        super().__init__()
        self.score = nn.Linear(dim, 1)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, S, D) tokens, (B, S) bool mask of real slices -> (B, D)."""
        scores = self.score(tokens).squeeze(-1).masked_fill(~mask, -torch.inf)
        return (torch.softmax(scores, dim=1)[..., None] * tokens).sum(dim=1)


class VolumeHead(nn.Module):
    """Standardise slice embeddings, pool them over the volume, then LayerNorm -> Linear -> GELU -> Linear.

    The per-dimension standardisation (fixed buffers from the training volumes) comes first because
    encoder tokens can share a large common offset (a fresh or lightly trained ViT's CLS tokens differ
    little between images), which LayerNorm alone would leave dominating.
    """

    def __init__(self, dim: int, outputs: int, aggregation: str = "mean"):
        super().__init__()
        self.register_buffer("token_mean", torch.zeros(dim))
        self.register_buffer("token_std", torch.ones(dim))
        self.pool = AttentionPool(dim) if aggregation == "attention" else masked_mean
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, outputs))

    @torch.no_grad()
    def fit_standardisation(self, tokens: torch.Tensor, mask: torch.Tensor) -> None:
        """Set the shift and scale from (B, S, D) training volumes so that their mean-pooled embeddings
        have zero mean and unit std per dimension (what separates volumes, not slices)."""
        pooled = masked_mean(tokens, mask)
        self.token_mean.copy_(pooled.mean(dim=0))
        std = pooled.std(dim=0) if len(pooled) > 1 else torch.ones_like(pooled[0])
        self.token_std.copy_(std.clamp_min(1e-3 * float(std.median()) + 1e-12))  # no dimension blown up from noise

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, S, D) slice tokens (zero-padded), (B, S) bool mask -> (B, outputs)."""
        tokens = (tokens - self.token_mean) / self.token_std
        return self.mlp(self.pool(tokens, mask))


class SegmentationDecoder(nn.Module):
    """Multi-layer patch tokens (and, optionally, the canvas pixels) -> per-pixel class logits on the canvas.

    A 1x1 convolution fuses the concatenated tokens (all chosen layers of all sequences) to
    ``width`` channels; ``log2(patch)`` stages of (x2 upsampling, GroupNorm, GELU) halve the
    channels and double the resolution; a 1x1 convolution gives the class logits. Each x2 step is
    a 1x1 convolution to 4x the channels and a pixel shuffle: the same map as a stride-2 2x2
    transposed convolution, but a plain matrix product (its backward pass is ~1.5x faster on CPU).

    With ``image_channels``, a small convolutional pyramid also reads the canvas itself (one channel per
    sequence): two 3x3 convolutions at full resolution, then one stride-2 convolution per halving, down to the
    token grid's double. After each x2 step a 3x3 convolution mixes the upsampled tokens with the pyramid level
    of the same resolution (U-Net-style skips, as UNETR gives a ViT). A 16-pixel token grid cannot place a
    boundary or a thin enhancing rim; full-resolution pixels can, and the coarser levels see a rim's context.
    """

    def __init__(
        self, in_channels: int, classes: int, patch_size: int = 16, width: int = 256, image_channels: int = 0,
        sequences: int = 1,
    ):  # fmt: skip
        super().__init__()
        stages = int(round(math.log2(patch_size)))
        if 2**stages != patch_size:
            raise BrainDINOError(f"the decoder upsamples by powers of 2; patch size {patch_size} is not one")
        self.fuse = nn.Conv2d(in_channels, width, kernel_size=1)
        blocks, channels = [], width
        for _ in range(stages):
            out = max(channels // 2, 16)
            blocks += [nn.Conv2d(channels, 4 * out, 1), nn.PixelShuffle(2), nn.GroupNorm(1, out), nn.GELU()]
            channels = out
        self.up = nn.Sequential(*blocks)
        self.image = self.mix = None
        if image_channels:
            widths = [image_channels * 2 ** min(level, 2) for level in range(stages)]  # full resolution first
            levels = [nn.Sequential(*_conv3x3(sequences, widths[0]), *_conv3x3(widths[0], widths[0]))]
            levels += [nn.Sequential(*_conv3x3(widths[k - 1], widths[k], stride=2)) for k in range(1, stages)]
            self.image = nn.ModuleList(levels)
            decoded = [max(width // 2 ** (i + 1), 16) for i in range(stages)]  # the channels after each x2 step
            mixes = [_conv3x3(c + widths[stages - 1 - i], c) for i, c in enumerate(decoded)]
            self.mix = nn.ModuleList(nn.Sequential(*mix) for mix in mixes)
        self.classify = nn.Conv2d(channels, classes, kernel_size=1)

    def forward(self, features: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        """(B, in_channels, h, w) tokens and, for a decoder that reads pixels, the (B, sequences, h * patch,
        w * patch) canvas -> (B, classes, h * patch, w * patch)."""
        decoded = self.fuse(features)
        if self.image is None:
            return self.classify(self.up(decoded))
        if image is None:
            raise BrainDINOError("this segmentation head reads the canvas pixels too; none were given")
        pyramid = []
        for level in self.image:
            image = level(image)
            pyramid.append(image)
        for stage, mix in enumerate(self.mix):
            decoded = self.up[4 * stage : 4 * stage + 4](decoded)  # one x2 step: conv, shuffle, norm, GELU
            decoded = mix(torch.cat([decoded, pyramid[-1 - stage]], dim=1))
        return self.classify(decoded)


def _conv3x3(inputs: int, outputs: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(inputs, outputs, 3, stride=stride, padding=1), nn.GroupNorm(1, outputs), nn.GELU()]


def build_head(spec: HeadSpec, embed_dim: int, patch_size: int) -> nn.Module:
    """The untrained module a spec describes."""
    if spec.kind == "seg":
        sequences = max(1, len(spec.modalities))
        channels = embed_dim * len(spec.layers) * sequences
        width = spec.width or 256
        return SegmentationDecoder(channels, spec.outputs, patch_size, width, spec.image_channels, sequences)
    return VolumeHead(spec.width or embed_dim, spec.outputs, spec.aggregation)


def volume_input(embeddings: np.ndarray, thumbnails: np.ndarray | None = None) -> np.ndarray:
    """A volume head's (S, D) per-slice input: the slice embeddings, followed by the slices' (S, 256) thumbnails
    (`typicality.slice_thumbnails` of the scan as the heads read it) for a head that reads them."""
    return embeddings if thumbnails is None else np.concatenate([embeddings, thumbnails], axis=1, dtype=np.float32)


def decode_outputs(spec: HeadSpec, outputs: torch.Tensor) -> np.ndarray:
    """(N, outputs) head outputs -> class probabilities (N, K), values in the target's units (N,), or risks (N,)."""
    if spec.kind in ("cls", "seq"):
        return torch.softmax(outputs.float(), dim=1).numpy()
    values = outputs[:, 0].float().numpy()
    return values * spec.target_std + spec.target_mean if spec.kind == "reg" else values


def predict_volume(spec: HeadSpec, head: VolumeHead, embeddings: np.ndarray) -> dict:
    """The prediction of a volume head for its (S, D) per-slice inputs (`volume_input`; several sequences' slices
    concatenated), as ``result.json`` keeps it."""
    tokens = torch.from_numpy(np.asarray(embeddings, dtype=np.float32))[None]
    with torch.no_grad():
        decoded = decode_outputs(spec, head(tokens, torch.ones(tokens.shape[:2], dtype=torch.bool)))[0]
    result = {"kind": spec.kind, "target": spec.target}
    if spec.kind in ("cls", "seq"):
        result["prediction"] = spec.classes[int(decoded.argmax())]
        result["probabilities"] = {c: round(float(p), 4) for c, p in zip(spec.classes, decoded, strict=True)}
    else:
        result["value"] = round(float(decoded), 4)
        result["units"] = spec.units
    result["test_metrics"] = spec.metrics
    return result


def segmentation_input(per_modality: list[dict[int, np.ndarray]], layers: tuple[int, ...]) -> torch.Tensor:
    """(S, M*L*D, h, w) decoder input from each modality's ``{block: (S, h, w, D)}`` patch tokens."""
    parts = [torch.from_numpy(np.asarray(tokens[i])) for tokens in per_modality for i in layers]
    return torch.cat(parts, dim=-1).permute(0, 3, 1, 2)


def segment_slices(
    spec: HeadSpec,
    decoder: SegmentationDecoder,
    features: torch.Tensor,
    plane,
    images: torch.Tensor | None = None,
    batch_size: int = 8,
) -> np.ndarray:
    """Label values (S, X, Y) of the encoded slices: canvas class probabilities are sampled back at every
    voxel of the slice (`PlaneGeometry.from_canvas`), then the most probable class is taken. ``images``: the
    (S, sequences, canvas, canvas) pixels, for a decoder that reads them (`HeadSpec.image_channels`)."""
    values = np.array((0, *spec.label_values), dtype=np.int16)
    out = []
    with torch.no_grad():
        for start in range(0, len(features), batch_size):
            chosen = slice(start, start + batch_size)
            pixels = images[chosen].float() if spec.image_channels else None
            probabilities = torch.softmax(decoder(features[chosen].float(), pixels), dim=1)
            out.append(values[plane.from_canvas(probabilities.cpu().numpy()).argmax(axis=1)])
    return np.concatenate(out)


def segmentation_summary(spec: HeadSpec, labels: np.ndarray, spacing: tuple[float, float, float]) -> dict:
    """Volume of each segment in mL, as ``result.json`` keeps it."""
    voxel_ml = float(np.prod(spacing)) / 1000
    volumes = {
        c: round(float((labels == v).sum()) * voxel_ml, 3) for c, v in zip(spec.classes, spec.label_values, strict=True)
    }
    total = round(sum(volumes.values()), 3)
    return {
        "kind": "seg",
        "target": spec.target,
        "volumes_ml": volumes,
        "label_values": dict(zip(spec.classes, spec.label_values, strict=True)),
        "total_ml": total,
        "test_metrics": spec.metrics,
    }
