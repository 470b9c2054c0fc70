"""Checkpoint -> model bundle: DINOv2 and DINOv3 weights (Meta's or timm's key layout) and
BrainDINO-style training checkpoints (``{"teacher": {"backbone.*": ..., "dino_head.*": ...}}``).

Conversion is a chain of pure functions on state dicts: unwrap the container and drop the
training-only heads, detect the architecture from tensor shapes, rename keys with timm's own
checkpoint filters, then load strictly. Checkpoints are read with safetensors or with
``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from timm.models import eva, vision_transformer

from .bundle import Bundle, ModelCard, save_bundle, sha256
from .diagnose import LibraryOutput
from .encoder import ENCODERS, BrainEncoder, EncoderConfig, encoder_config
from .errors import BrainDINOError
from .preprocess import PreprocessSpec

#: Key prefixes of projection heads that exist only for self-supervised training.
TRAINING_HEAD_PREFIXES = ("dino_head.", "ibot_head.", "head.", "projector.", "predictor.")
_WRAPPER_PREFIXES = ("module.", "backbone.", "encoder.")


def read_checkpoint(path: str | Path, mmap: bool = False) -> dict:
    """Tensors of a ``.safetensors`` file, or a ``.pth/.pt/.ckpt`` read without unpickling objects (``mmap``: its
    tensors mapped from the file, for files ``torch.save`` wrote in its zip format)."""
    path = Path(path)
    if not path.is_file():
        raise BrainDINOError(f"{path}: no such file")
    try:
        with LibraryOutput():  # torch warns, with its own source paths, about odd objects in a damaged file
            if path.suffix == ".safetensors":
                return load_file(path)
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        raise BrainDINOError(
            f"{path}: holds Python objects besides tensors; refusing to unpickle it "
            "(export a plain state dict or safetensors)"
        ) from error
    except Exception as error:  # truncated zip, damaged header, not a checkpoint at all
        raise BrainDINOError(f"{path}: not a readable checkpoint, the file is truncated or corrupt") from error


def backbone_state_dict(checkpoint: dict) -> tuple[dict[str, torch.Tensor], str]:
    """Unwrap a checkpoint to backbone tensors with training heads dropped.

    Returns:
        (state_dict, container): container names where the weights were found
        (``teacher``, ``model``, ``state_dict`` or ``plain``).
    """
    if not isinstance(checkpoint, dict):
        raise BrainDINOError(f"holds a {type(checkpoint).__name__}, not a state dict of named tensors")
    container = "plain"
    for key in ("teacher", "model_ema", "model", "state_dict"):
        if isinstance(checkpoint.get(key), dict):
            checkpoint, container = checkpoint[key], key
            break
    state = {}
    for key, value in checkpoint.items():
        if not isinstance(value, torch.Tensor):
            continue
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        if not key.startswith(TRAINING_HEAD_PREFIXES):
            state[key] = value
    if "cls_token" not in state or "patch_embed.proj.weight" not in state:
        raise BrainDINOError(
            f"no ViT backbone found in the checkpoint ({container} holds {len(state)} tensors "
            "without cls_token / patch_embed.proj.weight)"
        )
    return state, container


def describe_state_dict(state: dict[str, torch.Tensor]) -> dict:
    """Architecture facts readable from tensor shapes alone."""
    blocks = [int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))]
    if not blocks:
        raise BrainDINOError("no transformer blocks (blocks.N.*) in the weights")
    depth = 1 + max(blocks)
    registers = next((state[k].shape[1] for k in ("reg_token", "register_tokens", "storage_tokens") if k in state), 0)
    return {
        "family": "dinov2" if "pos_embed" in state else "dinov3",
        "embed_dim": int(state["cls_token"].shape[-1]),
        "depth": depth,
        "patch_size": int(state["patch_embed.proj.weight"].shape[-1]),
        "num_reg_tokens": int(registers),
        "in_chans": int(state["patch_embed.proj.weight"].shape[1]),
    }


def detect_encoder(state: dict[str, torch.Tensor]) -> EncoderConfig:
    """The registry entry whose sizes match the state dict."""
    facts = describe_state_dict(state)
    keys = ("family", "embed_dim", "depth", "patch_size", "num_reg_tokens")
    matches = [c for c in ENCODERS.values() if all(getattr(c, k) == facts[k] for k in keys)]
    if len(matches) != 1:
        found = ", ".join(f"{k}={facts[k]}" for k in keys)
        raise BrainDINOError(
            f"cannot tell the architecture from the weights ({found}); name it with --encoder ({', '.join(ENCODERS)})"
        )
    return matches[0]


def convert_state_dict(state: dict[str, torch.Tensor], encoder: BrainEncoder) -> dict[str, torch.Tensor]:
    """Rename keys to timm's layout with timm's checkpoint filters (also resamples DINOv2 position embeddings)."""
    state = dict(state)
    if encoder.config.family == "dinov2":
        return vision_transformer.checkpoint_filter_fn(state, encoder.model)
    for key in [k for k in state if k.endswith("attn.qkv.bias")]:
        # Meta's distilled DINOv3 S/B/L store all-zero qkv biases; timm's models have none.
        if state[key].any():
            raise BrainDINOError(f"{key} holds non-zero qkv biases, which {encoder.config.name} does not have")
        del state[key]
    return eva.checkpoint_filter_fn(state, encoder.model)


def bundle_name(checkpoint: str | Path, name: str | None = None) -> str:
    """The bundle name for an imported checkpoint: ``name``, else the file name without its suffix.

    Raises:
        BrainDINOError: a name that is not usable as a folder name.
    """
    checkpoint = Path(checkpoint)
    name = name or checkpoint.name.removesuffix(checkpoint.suffix)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise BrainDINOError(
            f"'{name}' is not a usable bundle name (letters, digits, '.', '_', '-'): rename the file or pass --name"
        )
    return name


def encoder_from_checkpoint(
    path: str | Path, *, encoder_name: str | None = None, image_size: int = 224
) -> tuple[BrainEncoder, str, str]:
    """The encoder a checkpoint holds, its weights loaded; with where they were found (``teacher``, ``model``,
    ...) and their key layout (``Meta`` or ``timm``).

    Raises:
        BrainDINOError: unreadable checkpoint, unknown architecture, or weights that do not fit.
    """
    path = Path(path)
    checkpoint = read_checkpoint(path)
    try:
        state, container = backbone_state_dict(checkpoint)
        in_chans = describe_state_dict(state)["in_chans"]
        config = encoder_config(encoder_name) if encoder_name else detect_encoder(state)
    except BrainDINOError as error:
        raise BrainDINOError(f"{path}: {error}") from error
    encoder = BrainEncoder(config, image_size, in_chans)
    encoder.load_weights(convert_state_dict(state, encoder), str(path))
    layout = "Meta" if any(k in state for k in ("storage_tokens", "mask_token", "register_tokens")) else "timm"
    return encoder, container, layout


def import_checkpoint(
    path: str | Path,
    out_dir: str | Path,
    *,
    encoder_name: str | None = None,
    preprocessing: PreprocessSpec | None = None,
    overwrite: bool = False,
    source: dict | None = None,
    license: str | None = None,
) -> Bundle:
    """Convert a checkpoint into a verified bundle at ``out_dir`` (its folder name is the bundle name).

    Args:
        source: where a downloaded file came from (repo, file, revision, commit), kept in the card.
        license: the weights' licence, for the card (default: the card's own default).

    Raises:
        BrainDINOError: unreadable checkpoint, unknown architecture, or weights that do not fit.
    """
    path, out_dir = Path(path), Path(out_dir)
    encoder, container, layout = encoder_from_checkpoint(
        path, encoder_name=encoder_name, image_size=(preprocessing or PreprocessSpec()).image_size
    )
    config = encoder.config
    preprocessing = preprocessing or PreprocessSpec(in_chans=encoder.model.patch_embed.proj.in_channels)
    card = ModelCard(
        name=out_dir.name,
        description=f"{config.description}; imported from {source['repo'] if source else path.name}",
        license=license or ModelCard.license,
        encoder=config,
        preprocessing=preprocessing,
        random_init=False,
        intended_use="research on brain MRI features; not a medical device, not for clinical decisions",
        training={
            "source_checkpoint": path.name,
            "source_sha256": sha256(path),
            "container": container,
            "key_layout": layout,
            **({"source": source} if source else {}),
        },
    )
    return save_bundle(out_dir, encoder, card, overwrite=overwrite)
