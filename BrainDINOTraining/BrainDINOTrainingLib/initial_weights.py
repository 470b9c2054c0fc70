"""Weights a pretraining run starts from (``--init``) and a Gram teacher is made of (``gram.teacher``): a model
bundle (by name or folder, e.g. an earlier run's ``bundle/`` or an imported DINOv3) or a checkpoint file the
importer reads (Meta's or timm's DINOv3 layout, a ``{"teacher": ...}`` training checkpoint).

Continuing from public weights is the cheapest way to a good encoder: the paper's code continues DINOv3's
natural-image weights on brain slices rather than starting from random ones.
"""

from __future__ import annotations

from pathlib import Path

from BrainDINOLib.bundle import DEFAULT_MODELS_DIR, find_bundle, load_bundle, read_card
from BrainDINOLib.encoder import BrainEncoder
from BrainDINOLib.errors import BrainDINOError
from BrainDINOLib.importers import backbone_state_dict, detect_encoder, encoder_from_checkpoint, read_checkpoint


def _is_checkpoint(source: str) -> bool:
    return Path(source).is_file()


def initial_architecture(source: str, models_dir: Path = DEFAULT_MODELS_DIR) -> str:
    """The encoder name of the weights (read from the card or the tensor shapes, nothing built).

    Raises:
        BrainDINOError: no such bundle or file, or an architecture that cannot be told.
    """
    if _is_checkpoint(source):
        try:
            state, _ = backbone_state_dict(read_checkpoint(source))
            return detect_encoder(state).name
        except BrainDINOError as error:
            raise BrainDINOError(f"{source}: {error}") from error
    return read_card(find_bundle(source, models_dir)).encoder.name


def load_initial_encoder(source: str, models_dir: Path = DEFAULT_MODELS_DIR) -> BrainEncoder:
    """The encoder of a bundle or checkpoint, with its weights (CPU).

    Raises:
        BrainDINOError: unreadable or unverifiable weights.
    """
    if _is_checkpoint(source):
        return encoder_from_checkpoint(source)[0]
    return load_bundle(find_bundle(source, models_dir)).load_encoder()
