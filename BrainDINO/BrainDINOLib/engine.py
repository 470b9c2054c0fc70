"""Batched slice-by-slice encoding of a prepared volume, with progress and cancellation.

Memory stays bounded for large scans: model input is built one batch at a time from the
normalised volume, and tokens are kept on the CPU in float16 (ViT-B, 400 slices of 196 patches:
~120 MB for the last layer). On a GPU the next batch is prepared while the current one runs.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .encoder import BrainEncoder, EncoderOutput
from .errors import BrainDINOError
from .preprocess import PreparedVolume

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]
"""Called as ``progress(slices_done, slices_total)`` after every batch."""


class Cancelled(Exception):
    """Raised by `encode_volume` when its ``cancel`` callable returns True."""


@dataclass(frozen=True)
class EncodedVolume:
    """Encoder features of the selected axial slices of one volume.

    Attributes:
        slices: (S,) canonical z index of each encoded slice.
        cls: (S, D) float32 CLS embeddings.
        patch_tokens: (S, h, w, D) float16 final-normed patch tokens.
        attention: (S, heads, h, w) float32 last-block CLS -> patch attention.
        layers: block index -> (S, h, w, D) float16 intermediate patch tokens.
    """

    slices: np.ndarray
    cls: np.ndarray
    patch_tokens: np.ndarray
    attention: np.ndarray
    layers: dict[int, np.ndarray]

    def slice_embeddings(self, pooling: str = "cls") -> np.ndarray:
        """(S, D) float32 per-slice embedding as the encoder was pretrained to pool: the CLS token, or
        the mean patch token (``mean``: MAE's encoder never trains its CLS output)."""
        return self.cls if pooling == "cls" else self.patch_tokens.astype(np.float32).mean(axis=(1, 2))

    @property
    def grid(self) -> tuple[int, int]:
        return self.patch_tokens.shape[1:3]


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; otherwise the named device, checked to exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise BrainDINOError(f"unknown device '{name}' (use auto, cpu, cuda, cuda:N or mps)") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BrainDINOError("device 'cuda' requested but no CUDA GPU is available to PyTorch")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise BrainDINOError(f"device '{name}' does not exist: PyTorch sees {torch.cuda.device_count()} GPU(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise BrainDINOError("device 'mps' requested but Apple MPS is not available to PyTorch")
    return device


#: Numeric precisions of a run: ``auto`` chooses per device (`autocast_dtype`).
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device`` (None: plain fp32).

    ``auto`` is bf16 on GPUs that compute it natively (compute capability 8.0, Ampere, and later: older ones
    only emulate it, slowly), fp16 on older GPUs and on Apple MPS, and fp32 on the CPU (bf16 autocast is
    slower than fp32 on most CPUs).

    Raises:
        BrainDINOError: an unknown precision, or bf16 on a GPU that only emulates it.
    """
    if precision not in PRECISIONS:
        raise BrainDINOError(f"precision must be one of {', '.join(PRECISIONS)}, not '{precision}'")
    native_bf16 = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)
    if precision == "bf16" and device.type == "cuda" and not native_bf16:
        name = torch.cuda.get_device_name(device)
        raise BrainDINOError(f"{name} has no native bf16 (it needs compute capability 8.0); use fp16 or fp32")
    if precision != "auto":
        return _DTYPES[precision]
    if device.type == "cuda":
        return torch.bfloat16 if native_bf16 else torch.float16
    return torch.float16 if device.type == "mps" else None


def precision_name(dtype: torch.dtype | None) -> str:
    """``fp32``, ``bf16`` or ``fp16``: what a run used, as records name it."""
    return next(name for name, value in _DTYPES.items() if value == dtype)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``. The copy is asynchronous only from pinned host memory to a CUDA GPU (``tensor`` is
    pinned here for CUDA): the one case where that is both safe and useful. MPS may read the source after Python
    has freed it (pytorch/pytorch#189690), and from pageable memory CUDA copies synchronously anyway."""
    if device.type != "cuda":
        return tensor.to(device)
    return (tensor if tensor.is_pinned() else tensor.pin_memory()).to(device, non_blocking=True)


def default_batch_size(device: torch.device) -> int:
    return 32 if device.type == "cpu" else 128


def encode_volume(
    prepared: PreparedVolume,
    encoder: BrainEncoder,
    *,
    device: torch.device | str = "auto",
    batch_size: int | None = None,
    layers: Sequence[int] = (),
    precision: str = "auto",
    progress: ProgressCallback | None = None,
    cancel: Callable[[], bool] | None = None,
) -> EncodedVolume:
    """Run the encoder over ``prepared.slices`` in batches.

    Args:
        prepared: normalised volume with its slice selection.
        encoder: the frozen encoder (moved to ``device``, set to eval).
        device: torch device or ``auto``.
        batch_size: slices per forward pass (default 32 on CPU, 128 on GPU).
        layers: intermediate blocks to keep.
        precision: see `autocast_dtype`.
        progress: see `ProgressCallback`.
        cancel: polled before each batch; returning True stops within one batch.

    Raises:
        Cancelled: when ``cancel()`` returned True.
    """
    device = resolve_device(device) if isinstance(device, str) else device
    batch_size = default_batch_size(device) if batch_size is None else batch_size
    if batch_size < 1:
        raise BrainDINOError(f"batch size must be at least 1, got {batch_size}")
    encoder = encoder.eval().to(device)
    dtype = autocast_dtype(device, precision)
    slices = prepared.slices
    total = len(slices)
    grid = encoder.config.patch_grid(prepared.spec.image_size)
    dim, heads = encoder.config.embed_dim, encoder.config.num_heads
    cls = np.empty((total, dim), dtype=np.float32)
    tokens = np.empty((total, *grid, dim), dtype=np.float16)
    attention = np.empty((total, heads, *grid), dtype=np.float32)
    kept = {i: np.empty((total, *grid, dim), dtype=np.float16) for i in layers}

    def store(start: int, output: EncoderOutput) -> None:
        stop = start + output.cls.shape[0]
        cls[start:stop] = output.cls.float().cpu().numpy()
        tokens[start:stop] = output.patch_tokens.to(torch.float16).cpu().numpy()
        attention[start:stop] = output.attention.float().cpu().numpy()
        for i, values in output.layers.items():
            kept[i][start:stop] = values.to(torch.float16).cpu().numpy()
        if progress is not None:
            progress(stop, total)

    def batch(start: int) -> torch.Tensor:
        return to_device(prepared.model_input(slices[start : start + batch_size]), device)

    current = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()  # no context on GPU 0
    with current, torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        ready = batch(0) if total else None
        for start in range(0, total, batch_size):
            if cancel is not None and cancel():
                raise Cancelled(f"cancelled after {start} of {total} slices")
            output = encoder(ready, layers)  # queued on the GPU; the host goes on at once
            if start + batch_size < total:  # the next batch is prepared on the host while this one computes
                ready = batch(start + batch_size)
            store(start, output)  # waits for this batch's results
    return EncodedVolume(slices=slices.copy(), cls=cls, patch_tokens=tokens, attention=attention, layers=kept)
