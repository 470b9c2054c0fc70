"""Attention, PCA and patch-similarity maps from encoded slices, and their way back to voxels.

Maps are computed on the patch grid of each encoded slice, then `to_volume` samples them at
every voxel of the canonical volume through the recorded canvas placement; `Volume.to_source`
then gives the scan's own voxel order. Numpy only: the Slicer process computes them from saved
tokens without importing torch.

References: [0] Caron et al., "Emerging Properties in Self-Supervised Vision Transformers"
(DINO, attention maps and the 60 % mass threshold). [1] Oquab et al., "DINOv2" (PCA of patch
features, first component separating foreground).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from .errors import BrainDINOError
from .layout import PlaneGeometry, SliceLayout
from .volume import Volume

_CHUNK = 32  # slices resampled at once (bounds memory on large scans)


def mean_attention(attention: np.ndarray) -> np.ndarray:
    """(S, heads, h, w) -> (S, h, w) head-averaged attention scaled so 1.0 means uniform attention."""
    return attention.mean(axis=1) * (attention.shape[-1] * attention.shape[-2])


def attention_mass_threshold(attention: np.ndarray, mass: float = 0.6) -> np.ndarray:
    """Per map, the attention value above which the strongest patches hold ``mass`` of the total (DINO [0]).

    Patches at or above it form the smallest set holding that mass; as one number per slice it
    also outlines the mask on the voxel-resolution map.

    Args:
        attention: (..., h, w) non-negative maps.
        mass: fraction of the total attention kept.

    Returns:
        (...) thresholds.
    """
    if not 0 < mass <= 1:
        raise BrainDINOError(f"attention mass must be in (0, 1], got {mass}")
    flat = np.sort(attention.reshape(*attention.shape[:-2], -1).astype(np.float64), axis=-1)  # ascending
    cumulative = np.cumsum(flat, axis=-1) / np.maximum(flat.sum(axis=-1, keepdims=True), 1e-12)
    first_kept = np.argmax(cumulative > 1 - mass, axis=-1)
    return np.take_along_axis(flat, first_kept[..., None], axis=-1)[..., 0]


def attention_mass_mask(attention: np.ndarray, mass: float = 0.6) -> np.ndarray:
    """(..., h, w) bool: the smallest set of patches holding ``mass`` of each map's attention."""
    return attention >= attention_mass_threshold(attention, mass)[..., None, None]


@dataclass(frozen=True)
class PcaColors:
    """A 3-component PCA of patch tokens fitted once per volume, so colours agree across slices.

    Attributes:
        mean: (D,) token mean over the fitted tokens.
        components: (3, D) principal axes, sign fixed so each axis' largest loading is positive.
        low, high: (3,) 1st and 99th percentiles of the projections, mapped to 0 and 1.
    """

    mean: np.ndarray
    components: np.ndarray
    low: np.ndarray
    high: np.ndarray

    @classmethod
    def fit(cls, tokens: np.ndarray, foreground: np.ndarray, max_tokens: int = 65536) -> PcaColors:
        """Fit on foreground tokens (evenly strided subsample beyond ``max_tokens``; deterministic).

        Args:
            tokens: (S, h, w, D) patch tokens.
            foreground: (S, h, w) bool; all patches are used when none is foreground.
        """
        chosen = tokens[foreground] if foreground.any() else tokens.reshape(-1, tokens.shape[-1])
        chosen = chosen[:: max(1, len(chosen) // max_tokens)].astype(np.float32)
        if len(chosen) < 3:
            raise BrainDINOError("too few foreground patches to fit a PCA colour map")
        mean = chosen.mean(axis=0)
        _, _, axes = np.linalg.svd(chosen - mean, full_matrices=False)
        components = axes[:3]
        signs = np.sign(components[np.arange(len(components)), np.abs(components).argmax(axis=1)])
        components = components * signs[:, None]
        projected = (chosen - mean) @ components.T
        low, high = np.percentile(projected, [1, 99], axis=0)
        return cls(mean, components, low, np.maximum(high, low + 1e-6))

    def rgb(self, tokens: np.ndarray) -> np.ndarray:
        """(..., D) tokens -> (..., 3) colours in [0, 1]."""
        projected = (tokens.astype(np.float32) - self.mean) @ self.components.T
        return np.clip((projected - self.low) / (self.high - self.low), 0, 1)


def similarity_map(tokens: np.ndarray, query: tuple[int, int, int]) -> np.ndarray:
    """Cosine similarity of one patch token to every patch of the volume.

    Args:
        tokens: (S, h, w, D) patch tokens.
        query: (slice position in ``tokens``, row, col) of the query patch.

    Returns:
        (S, h, w) float32 similarities in [-1, 1].
    """
    features = tokens.astype(np.float32)
    features /= np.maximum(np.linalg.norm(features, axis=-1, keepdims=True), 1e-12)
    return features @ features[query]


def query_patch(
    volume: Volume, layout: SliceLayout, grid: tuple[int, int], ijk: tuple[int, int, int]
) -> tuple[int, int, int]:
    """(slice position, row, col) of the patch containing the file's voxel ``ijk``.

    Args:
        grid: (h, w) patch grid of the encoder on the canvas.

    Raises:
        BrainDINOError: if the voxel is outside the volume or on a slice that is not encoded.
    """
    x, y, z = volume.canonical_index(ijk)
    positions = np.flatnonzero(layout.slices == z)
    if positions.size == 0:
        raise BrainDINOError(
            f"{volume.path}: voxel {tuple(ijk)} lies on axial slice {z}, outside the analysed brain slices "
            f"({layout.slices[0]}-{layout.slices[-1]}); pick a voxel inside the brain"
        )
    row, col = layout.plane.canvas_position(x, y)
    rows, cols = grid
    return (
        int(positions[0]),
        min(int(row * rows / layout.plane.canvas), rows - 1),
        min(int(col * cols / layout.plane.canvas), cols - 1),
    )


def to_volume(layout: SliceLayout, maps: np.ndarray, *, rgb_inside: np.ndarray | None = None) -> np.ndarray:
    """Sample per-slice patch-grid maps at every voxel of the canonical volume.

    The result is laid out in memory slice by slice (Fortran order for the (X, Y, Z) view), as
    NIfTI stores voxels, so filling it and writing it need no transposing copy.

    Args:
        layout: the canvas placement and which slices the maps belong to.
        maps: (S, h, w) or (S, h, w, C) values on the patch grid of ``layout.slices``.
        rgb_inside: (X, Y, Z) bool; the maps are (S, h, w, 3) colours in [0, 1]: return uint8 colours,
            black outside it.

    Returns:
        (X, Y, Z) or (X, Y, Z, C) float32 (uint8 for colours); slices that were not encoded are 0.
    """
    channels = maps.shape[3:] if maps.ndim == 4 else ()
    rgb = rgb_inside is not None
    size_x, size_y, size_z = layout.shape
    slab = np.zeros((size_z, size_y, size_x, *channels), dtype=np.uint8 if rgb else np.float32)
    for start in range(0, len(layout.slices), _CHUNK):
        chosen = layout.slices[start : start + _CHUNK]
        chunk = np.asarray(maps[start : start + _CHUNK], np.float32)
        chunk = chunk.transpose(0, 3, 1, 2) if channels else chunk[:, None]
        sampled = layout.plane.from_canvas(chunk).swapaxes(-2, -1)  # contiguous (B, C, Y, X)
        if rgb:
            inside = rgb_inside[:, :, chosen].transpose(2, 1, 0)[:, None]
            sampled = (sampled * 255 + 0.5).astype(np.uint8) * inside
        slab[chosen] = sampled.transpose(0, 2, 3, 1) if channels else sampled[:, 0]
    return slab.transpose(2, 1, 0, 3) if channels else slab.transpose(2, 1, 0)


TOKENS_FILE = "embeddings.safetensors"


@dataclass(frozen=True)
class TokenMaps:
    """What the maps are made from, kept after a run (``embeddings.safetensors``): the encoded slices' patch
    tokens of one or more encoder blocks, the last block's per-head CLS attention, where the slices lie and
    which voxels the maps may cover. Any head's attention and any kept block's PCA and similarity maps come
    from it without the encoder (the Slicer module explores a run this way).

    Attributes:
        layout: where the encoded slices lie.
        cls: (S, D) float32 CLS embeddings.
        blocks: block index -> (S, h, w, D) float16 patch tokens (the last block's after the final norm); all
            kept blocks, or (`load`) the one asked for.
        kept: the blocks whose tokens the file keeps; the last one is the encoder's last block.
        attention: (S, heads, h, w) float32 last-block CLS -> patch attention.
        foreground: (X, Y, Z) bool voxels the maps cover (the brain, with a brain mask).
        foreground_patches: (S, h, w) bool patches at least half foreground (PCA is fitted on them).
        masked: the foreground is a brain mask: attention and similarity are zero outside it too.
        model: the bundle's name.
    """

    layout: SliceLayout
    cls: np.ndarray
    blocks: dict[int, np.ndarray]
    kept: tuple[int, ...]
    attention: np.ndarray
    foreground: np.ndarray
    foreground_patches: np.ndarray
    masked: bool
    model: str

    @property
    def last_block(self) -> int:
        return self.kept[-1]

    @property
    def grid(self) -> tuple[int, int]:
        return self.attention.shape[2:4]

    @property
    def heads(self) -> int:
        return self.attention.shape[1]

    def tokens(self, block: int | None = None) -> np.ndarray:
        """(S, h, w, D) patch tokens of a block held here (None: the last block).

        Raises:
            BrainDINOError: the block is not held.
        """
        block = self.last_block if block is None else block
        if block not in self.blocks:
            raise BrainDINOError(f"block {block} is not at hand (kept: {', '.join(map(str, self.kept))})")
        return self.blocks[block]

    def _attention_grid(self, head: int | None) -> np.ndarray:
        if head is not None and not 0 <= head < self.heads:
            raise BrainDINOError(f"attention head {head} does not exist (the encoder has {self.heads})")
        grid = mean_attention(self.attention if head is None else self.attention[:, head : head + 1])
        return grid * self.foreground_patches if self.masked else grid  # brain patches only

    def attention_map(self, head: int | None = None) -> np.ndarray:
        """(X, Y, Z) float32 CLS attention of one head (None: the mean of all), 1 meaning uniform.

        Raises:
            BrainDINOError: no such head.
        """
        volume = to_volume(self.layout, self._attention_grid(head))
        if self.masked:
            volume *= self.foreground
        return volume

    def attention_levels(self, head: int | None = None) -> np.ndarray:
        """(S,) each slice's attention level bounding the patches that hold 60 % of its attention."""
        return attention_mass_threshold(self._attention_grid(head))

    def pca(self, block: int | None = None) -> np.ndarray:
        """(X, Y, Z, 3) uint8 colours of a block's first three principal components (None: the last block)."""
        tokens = self.tokens(block)
        colors = PcaColors.fit(tokens, self.foreground_patches)
        return to_volume(self.layout, colors.rgb(tokens), rgb_inside=self.foreground)

    def similarity(self, patch: tuple[int, int, int], block: int | None = None) -> np.ndarray:
        """(X, Y, Z) float32 cosine similarity of a patch (`query_patch`) to every patch, in a block's tokens."""
        similarity = to_volume(self.layout, similarity_map(self.tokens(block), patch))
        if self.masked:
            similarity *= self.foreground
        return similarity

    def save(self, path) -> None:
        """Write every block held (the last block's tokens under their long-standing name ``patch_tokens``)."""
        arrays = {
            "cls": np.ascontiguousarray(self.cls, np.float32),
            "attention": np.ascontiguousarray(self.attention, np.float32),
            "slices": self.layout.slices.astype(np.int64),
            "foreground": self.foreground.astype(np.uint8),
            "foreground_patches": self.foreground_patches.astype(np.uint8),
        }
        for block, tokens in self.blocks.items():
            name = "patch_tokens" if block == self.last_block else f"block_{block}"
            arrays[name] = np.ascontiguousarray(tokens, np.float16)
        metadata = {
            "model": self.model,
            "slice_axis": "canonical RAS z",
            "shape": json.dumps(list(self.layout.shape)),
            "plane": self.layout.plane.to_json(),
            "blocks": json.dumps(sorted(self.blocks)),
            "masked": json.dumps(self.masked),
        }
        save_file(arrays, str(path), metadata=metadata)

    @classmethod
    def load(cls, path, block: int | None = None) -> TokenMaps:
        """The file's maps with one block's tokens (None: the last block's); reads nothing else of the others.

        Raises:
            BrainDINOError: the file is unreadable or not a BrainDINO tokens file, or the block was not kept.
        """
        try:
            with safe_open(str(path), "numpy") as handle:
                metadata = handle.metadata() or {}
                if "blocks" not in metadata:
                    raise BrainDINOError(f"{path}: not a tokens file of this BrainDINO version; run the scan again")
                kept = tuple(json.loads(metadata["blocks"]))
                block = kept[-1] if block is None else block
                if block not in kept:
                    raise BrainDINOError(f"{path}: block {block} was not kept (kept: {', '.join(map(str, kept))})")
                name = "patch_tokens" if block == kept[-1] else f"block_{block}"
                wanted = ("cls", "attention", "slices", "foreground", "foreground_patches", name)
                arrays = {key: handle.get_tensor(key) for key in wanted}
        except (OSError, ValueError) as error:
            raise BrainDINOError(f"{path}: cannot read the run's tokens ({error})") from error
        shape = tuple(json.loads(metadata["shape"]))
        return cls(
            layout=SliceLayout(shape, arrays["slices"], PlaneGeometry.from_json(metadata["plane"])),
            cls=arrays["cls"],
            blocks={block: arrays[name]},
            kept=kept,
            attention=arrays["attention"],
            foreground=arrays["foreground"].astype(bool),
            foreground_patches=arrays["foreground_patches"].astype(bool),
            masked=json.loads(metadata["masked"]),
            model=metadata["model"],
        )
