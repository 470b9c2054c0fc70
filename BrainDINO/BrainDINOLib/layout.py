"""Where encoded slices lie: the canvas placement of an axial slice and the slices a run encoded.

Numpy only (no torch): the Slicer process maps saved patch tokens back to voxels with it, without
the encoder. `preprocess` does the way onto the canvas (torch); this module the way back.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class PlaneGeometry:
    """Maps a canonical axial slice (X, Y) onto the square canvas and canvas maps back.

    On the canvas, row 0 is the most anterior row and column 0 the patient's right (radiological
    view). The slice occupies ``rows x cols`` pixels starting at ``(row0, col0)``.
    """

    slice_shape: tuple[int, int]
    rows: int
    cols: int
    row0: int
    col0: int
    canvas: int

    @classmethod
    def fit(cls, slice_shape: tuple[int, int], spacing_xy: tuple[float, float], canvas: int) -> PlaneGeometry:
        """Largest placement of the slice on the canvas that keeps its physical aspect ratio."""
        width_mm = slice_shape[0] * spacing_xy[0]
        height_mm = slice_shape[1] * spacing_xy[1]
        pixel_mm = max(width_mm, height_mm) / canvas
        cols = min(canvas, max(1, round(width_mm / pixel_mm)))
        rows = min(canvas, max(1, round(height_mm / pixel_mm)))
        return cls(tuple(slice_shape), rows, cols, (canvas - rows) // 2, (canvas - cols) // 2, canvas)

    def from_canvas(self, maps: np.ndarray) -> np.ndarray:
        """(B, C, h, w) maps covering the whole canvas (any resolution) -> (B, C, X, Y) float32 per slice.

        Each slice pixel samples the map bilinearly (border values outside) at its own centre's
        canvas position, so the way back is exact for any patch grid. The placement is axis-aligned,
        so sampling is separable: two small interpolation matrices instead of a per-pixel grid.
        The result is a transposed view of a contiguous (B, C, Y, X) array.
        """
        size_x, size_y = self.slice_shape
        row, col = self.canvas_position(np.arange(size_x, dtype=np.float32), np.arange(size_y, dtype=np.float32))
        along_y = _linear_weights(row * maps.shape[-2] / self.canvas, maps.shape[-2])  # (Y, h)
        along_x = _linear_weights(col * maps.shape[-1] / self.canvas, maps.shape[-1])  # (X, w)
        return (along_y @ np.asarray(maps, np.float32) @ along_x.T).swapaxes(-2, -1)

    def canvas_position(self, x, y):
        """Canvas (row, col) of the centre of canonical slice pixel (x, y); works elementwise on arrays."""
        size_x, size_y = self.slice_shape
        row = self.row0 + (size_y - 1 - y + 0.5) * (self.rows / size_y)
        col = self.col0 + (size_x - 1 - x + 0.5) * (self.cols / size_x)
        return row, col

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> PlaneGeometry:
        values = json.loads(text)
        return cls(**{**values, "slice_shape": tuple(values["slice_shape"])})


def _linear_weights(position: np.ndarray, size: int) -> np.ndarray:
    """(N, size) float32 weights of 1-D linear interpolation at ``position`` (in cells, cell i centred at i + 0.5).

    Positions beyond the first/last cell centre take that cell's value (border padding).
    """
    u = np.clip(position - 0.5, 0, size - 1)
    low = np.minimum(np.floor(u), max(size - 2, 0)).astype(np.int64)
    fraction = (u - low).astype(np.float32)
    weights = np.zeros((len(position), size), np.float32)
    rows = np.arange(len(position))
    weights[rows, low] = 1 - fraction
    weights[rows, np.minimum(low + 1, size - 1)] += fraction
    return weights


@dataclass(frozen=True)
class SliceLayout:
    """The encoded slices of a canonical volume.

    Attributes:
        shape: the canonical (X, Y, Z) shape.
        slices: (S,) canonical z index of each encoded slice, ascending.
        plane: their common canvas placement.
    """

    shape: tuple[int, int, int]
    slices: np.ndarray
    plane: PlaneGeometry
