"""``report.png``: a montage of axial slices with the maps exactly as they were written.

Slices are drawn in radiological view (anterior up, patient right on the left) with their
physical aspect ratio. Uses matplotlib's object API (no pyplot state), so it is safe in threads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .bundle import ModelCard
from .preprocess import PreparedVolume
from .volume import Volume


def _view(plane: np.ndarray) -> np.ndarray:
    """Canonical (X, Y[, C]) slice -> (Y, X[, C]) image in radiological view."""
    return np.swapaxes(plane[::-1, ::-1], 0, 1)


def choose_slices(prepared: PreparedVolume, count: int, must_include: int | None = None) -> list[int]:
    """``count`` encoded slices spread over the brain extent (10th to 90th percentile)."""
    positions = np.round(np.linspace(0.1, 0.9, count) * (len(prepared.slices) - 1)).astype(int)
    picks = list(dict.fromkeys(prepared.slices[positions].tolist()))
    if must_include is not None and must_include not in picks:
        picks[len(picks) // 2] = must_include
    return sorted(picks)


def write_report(
    path: str | Path,
    volume: Volume,
    prepared: PreparedVolume,
    card: ModelCard,
    attention: np.ndarray,
    pca: np.ndarray,
    similarity: np.ndarray | None = None,
    query_xyz: tuple[int, int, int] | None = None,
    columns: int = 6,
) -> Path:
    """Render the montage.

    Args:
        attention: (X, Y, Z) canonical mean attention (1 = uniform).
        pca: (X, Y, Z, 3) canonical uint8 PCA colours.
        similarity: (X, Y, Z) canonical cosine similarity to the query patch, if any.
        query_xyz: canonical voxel of the similarity query.
    """
    picks = choose_slices(prepared, columns, query_xyz[2] if query_xyz else None)
    rows = [("MRI", None), ("attention", attention), ("PCA of patch features", pca)]
    if similarity is not None:
        rows.append(("similarity to query", similarity))
    spacing = volume.spacing
    aspect = spacing[1] / spacing[0]
    figure = Figure(figsize=(2.1 * len(picks), 2.3 * len(rows) + 1.0), dpi=100, facecolor="black")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(rows), len(picks), squeeze=False)
    low, high = np.percentile(volume.data[prepared.foreground], [0.5, 99.5])
    attention_range = np.percentile(attention[prepared.foreground], [1, 99.5])
    for c, z in enumerate(picks):
        anatomy = _view(volume.data[:, :, z])
        brain = _view(prepared.foreground[:, :, z])
        for r, (title, values) in enumerate(rows):
            ax = axes[r, c]
            ax.set_axis_off()
            if title == "PCA of patch features":
                ax.imshow(_view(values[:, :, z]), aspect=aspect, interpolation="nearest")
            else:
                ax.imshow(anatomy, cmap="gray", vmin=min(low, 0), vmax=high, aspect=aspect, interpolation="nearest")
            if title == "attention":
                overlay = np.ma.masked_where(~brain, _view(values[:, :, z]))
                ax.imshow(
                    overlay, cmap="inferno", vmin=attention_range[0], vmax=attention_range[1], alpha=0.65, aspect=aspect
                )
            elif title == "similarity to query":
                overlay = np.ma.masked_where(~brain, _view(values[:, :, z]))
                ax.imshow(overlay, cmap="coolwarm", vmin=-1, vmax=1, alpha=0.7, aspect=aspect)
                if query_xyz and z == query_xyz[2]:
                    size_x, size_y = values.shape[:2]
                    ax.plot(
                        size_x - 1 - query_xyz[0], size_y - 1 - query_xyz[1], "+", color="lime", markersize=14, mew=2
                    )
            if r == 0:
                ax.set_title(f"axial slice {z}", color="white", fontsize=9)
            if c == 0:
                ax.text(
                    -0.08,
                    0.5,
                    title,
                    color="white",
                    fontsize=9,
                    rotation=90,
                    ha="right",
                    va="center",
                    transform=ax.transAxes,
                )
    axes[0, 0].text(0.02, 0.98, "R", color="yellow", fontsize=9, ha="left", va="top", transform=axes[0, 0].transAxes)
    axes[0, 0].text(0.98, 0.98, "L", color="yellow", fontsize=9, ha="right", va="top", transform=axes[0, 0].transAxes)
    figure.suptitle(f"BrainDINO  |  {Path(volume.path).name}  |  model: {card.name}", color="white", fontsize=11)
    if card.random_init:
        figure.text(
            0.5,
            0.935,
            "RANDOMLY INITIALISED ENCODER: these maps test the pipeline; they show no learned anatomy",
            color="#ff5555",
            fontsize=9,
            ha="center",
        )
    figure.subplots_adjust(left=0.04, right=0.99, bottom=0.01, top=0.9, wspace=0.03, hspace=0.08)
    figure.savefig(path, facecolor="black")
    return Path(path)
