"""Per-volume feature cache shared by every head: encode a scan once, fit and evaluate many heads.

Scans are prepared exactly as ``infer`` prepares them (`BrainDINOLib.brain.prepare_scan`): with a
bundle's brain-mask head, normalised over and cut to the brain it finds; ``masked=False`` gives the
features of whole scans, which a brain-mask head is fitted on.

One file per (scan, encoder weights, preprocessing, brain-mask head): the key hashes the encoder's
sha256 and slice pooling, the preprocessing spec, the brain-mask head's sha256, and the scan's
resolved path, size and modification time, so features of a changed scan, another encoder or other
settings are never reused. A file holds the patch tokens of every block any head asked for, so a
segmentation head's file also serves volume heads (read without its patch tokens), and a head that
needs another block re-encodes the scan once for all of them. Files are safetensors (no pickle),
written atomically.

Stored per volume: ``embeddings`` (S, D) float32 slice embeddings, pooled as the encoder was
pretrained (CLS token, or mean patch token; exactly what ``infer`` gives a head), ``pooled`` (D,)
their mean (the volume embedding), ``patch_means`` (S, D) the slices' mean patch tokens and ``thumbnails``
(S, 256) their 16 x 16 canvases (with the embeddings, what the out-of-distribution check describes a slice
by, and what a volume head with ``HeadSpec.thumbnails`` reads after each embedding), ``slices`` (S,)
canonical slice indices, and, for segmentation heads, ``layer_<i>`` (S, h, w, D) float16 patch tokens of each
kept block and ``canvas`` (S, canvas, canvas) float16, the pixels the encoder read (for decoders that read them
too).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from BrainDINOLib import __version__
from BrainDINOLib.brain import prepare_scan
from BrainDINOLib.bundle import ENCODER_FILE, Bundle
from BrainDINOLib.engine import encode_volume, resolve_device
from BrainDINOLib.files import atomic_write
from BrainDINOLib.preprocess import prepare
from BrainDINOLib.typicality import scan_descriptions
from BrainDINOLib.volume import Volume, load_volume

DEFAULT_CACHE_DIR = Path.home() / ".braindino" / "cache" / "features"


@dataclass(frozen=True)
class VolumeFeatures:
    embeddings: np.ndarray
    pooled: np.ndarray
    patch_means: np.ndarray
    thumbnails: np.ndarray
    slices: np.ndarray
    layers: dict[int, np.ndarray]
    canvas: np.ndarray | None  # with patch tokens only

    def descriptions(self) -> dict[str, np.ndarray]:
        """The slices as the out-of-distribution check describes them (`BrainDINOLib.typicality`)."""
        return {"embedding": self.embeddings, "patch_mean": self.patch_means, "thumbnail": self.thumbnails}


class FeatureCache:
    """Features of scans under one bundle's encoder, computed on first use and kept on disk.

    Args:
        bundle: the encoder (and preprocessing) to use.
        folder: where feature files live (default ``~/.braindino/cache/features``).
        layers: encoder blocks whose patch tokens are kept (segmentation heads need them).
        device, batch_size: passed to `encode_volume`.
        masked: prepare scans through the bundle's brain-mask head, if it has one (as ``infer`` does).
    """

    def __init__(
        self,
        bundle: Bundle,
        folder: str | Path | None = None,
        layers: Sequence[int] = (),
        device: str = "auto",
        batch_size: int | None = None,
        masked: bool = True,
    ):
        self.bundle, self.layers = bundle, tuple(sorted(layers))
        self.brain_head = bundle.brain_head_sha256() if masked else None
        self.folder = Path(folder) if folder else DEFAULT_CACHE_DIR
        self.device, self.batch_size = resolve_device(device), batch_size
        self._encoder = None

    def key(self, scan: str | Path) -> str:
        """Hash of everything the features depend on."""
        path = Path(scan).resolve()
        status = path.stat()
        identity = {
            "format": 7,
            "encoder_sha256": self.bundle.card.files[ENCODER_FILE],
            "brain_head_sha256": self.brain_head,
            "pooling": self.bundle.card.pooling,
            "preprocessing": self.bundle.card.preprocessing.to_dict(),
            "scan": str(path),
            "size": status.st_size,
            "mtime_ns": status.st_mtime_ns,
            "version": __version__,
        }
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]

    def get(self, scan: str | Path) -> VolumeFeatures:
        """The scan's features, from the cache or computed now (and stored)."""
        path = self.folder / f"{self.key(scan)}.safetensors"
        wanted = ["embeddings", "pooled", "patch_means", "thumbnails", "slices", *(f"layer_{i}" for i in self.layers)]
        wanted += ["canvas"] if self.layers else []
        stored = []
        if path.is_file():
            with safe_open(path, "numpy") as handle:
                stored = list(handle.keys())
                arrays = {name: handle.get_tensor(name) for name in wanted if name in stored}
        if not set(wanted) <= set(stored):
            kept = {int(name.removeprefix("layer_")) for name in stored if name.startswith("layer_")}
            arrays = self._compute(scan, sorted(kept | set(self.layers)))
            self.folder.mkdir(parents=True, exist_ok=True)
            with atomic_write(path) as tmp:
                save_file(arrays, tmp)
        return _volume_features(arrays, self.layers)

    def compute(self, volume: Volume) -> VolumeFeatures:
        """The features of a volume held in memory (no patch tokens; not stored)."""
        return _volume_features(self._compute(volume, ()), ())

    def _compute(self, scan: str | Path | Volume, layers: Sequence[int]) -> dict[str, np.ndarray]:
        if self._encoder is None:
            self._encoder = self.bundle.load_encoder()
        volume = scan if isinstance(scan, Volume) else load_volume(scan)
        if self.brain_head:
            prepared, _, _, _ = prepare_scan(
                volume, self.bundle, self._encoder, device=self.device, batch_size=self.batch_size
            )
        else:
            prepared = prepare(volume, self.bundle.card.preprocessing)
        encoded = encode_volume(
            prepared, self._encoder, device=self.device, batch_size=self.batch_size, layers=tuple(layers)
        )
        # float32 embeddings as infer gives a head; unmasked, all three descriptions are what infer's
        # out-of-distribution check reads
        described = scan_descriptions(prepared, encoded, self.bundle.card.pooling)
        arrays = {
            "embeddings": described["embedding"],
            "pooled": described["embedding"].mean(axis=0),
            "patch_means": described["patch_mean"],
            "thumbnails": described["thumbnail"],
            "slices": encoded.slices.astype(np.int32),
        }
        arrays.update({f"layer_{i}": np.ascontiguousarray(encoded.layers[i]) for i in layers})
        if layers:
            arrays["canvas"] = prepared.canvases()[:, 0].numpy().astype(np.float16)
        return arrays


def _volume_features(arrays: dict[str, np.ndarray], layers: Sequence[int]) -> VolumeFeatures:
    return VolumeFeatures(
        embeddings=arrays["embeddings"],
        pooled=arrays["pooled"],
        patch_means=arrays["patch_means"],
        thumbnails=arrays["thumbnails"],
        slices=arrays["slices"],
        layers={i: arrays[f"layer_{i}"] for i in layers},
        canvas=arrays["canvas"] if layers else None,
    )
