"""``report.png``: a montage of axial slices with the maps exactly as they were written.

Slices are drawn in radiological view (anterior up, patient right on the left) with their
physical aspect ratio. The montage is composed as arrays and drawn with Pillow, which keeps it
to a few tens of milliseconds (a matplotlib figure of the same montage takes ~0.7 s).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont

from .predictions import ood_warning, prediction_text
from .preprocess import PreparedVolume

if TYPE_CHECKING:
    from .infer import Analysis

CELL_HEIGHT = 200
LABEL_WIDTH = 130
HEADER_HEIGHT = 64
GAP = 4
LINE_HEIGHT = 22
#: segment colours by label value (BraTS: 1 necrotic core red, 2 oedema green, 3 enhancing yellow).
LABEL_COLOURS = np.array([(0, 0, 0), (230, 50, 50), (60, 200, 80), (250, 220, 40), (80, 140, 255)], dtype=np.uint8)
NOTICE_COLOUR = (255, 200, 120)
WARNING_COLOUR = (255, 85, 85)
MASK_COLOUR = (0, 255, 255)


def _view(plane: np.ndarray) -> np.ndarray:
    """Canonical (X, Y[, C]) slice -> (Y, X[, C]) image in radiological view."""
    return np.swapaxes(plane[::-1, ::-1], 0, 1)


def _lut(name: str) -> np.ndarray:
    return (colormaps[name](np.arange(256))[:, :3] * 255).astype(np.uint8)


def _scaled(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Values -> uint8 indices 0..255 over [low, high]."""
    return (np.clip((values - low) / max(high - low, 1e-6), 0, 1) * 255).astype(np.uint8)


def _blend(base: np.ndarray, colour: np.ndarray, mask: np.ndarray, alpha: float) -> np.ndarray:
    out = base.astype(np.float32)
    out[mask] = (1 - alpha) * out[mask] + alpha * colour[mask]
    return out.astype(np.uint8)


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of a 2D mask that touch a pixel outside it (4-neighbourhood; the image border is not an edge)."""
    padded = np.pad(mask, 1, mode="edge")
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def choose_slices(prepared: PreparedVolume, count: int, must_include: int | None = None) -> list[int]:
    """``count`` encoded slices spread over the brain extent (10th to 90th percentile)."""
    positions = np.round(np.linspace(0.1, 0.9, count) * (len(prepared.slices) - 1)).astype(int)
    picks = list(dict.fromkeys(prepared.slices[positions].tolist()))
    if must_include is not None and must_include not in picks:
        picks[len(picks) // 2] = must_include
    return sorted(picks)


def write_report(
    path: str | Path,
    analysis: Analysis,
    similarity: np.ndarray | None = None,
    query_xyz: tuple[int, int, int] | None = None,
    columns: int = 6,
) -> Path:
    """Render the montage of a run: MRI, attention (outlined where it holds 60 % of a slice's mass), PCA colours,
    similarity to the query patch (``similarity``, canonical (X, Y, Z), with ``query_xyz`` its canonical voxel) and
    the first segmentation, on ``columns`` axial slices; the heads' predictions are listed under it, and an
    out-of-distribution verdict shown in red under the title."""
    segmentation = next(iter(analysis.segmentations.values()), None)
    focus = query_xyz[2] if query_xyz else None
    if focus is None and segmentation is not None and segmentation.any():  # show the largest segmented slice
        focus = int(np.argmax((segmentation > 0).sum(axis=(0, 1))))
    picks = choose_slices(analysis.prepared, columns, focus)
    size_x, size_y = analysis.volume.data.shape[:2]
    spacing = analysis.volume.spacing
    cell_width = round(CELL_HEIGHT * size_x * spacing[0] / (size_y * spacing[1]))
    rows = ["MRI", "attention\n(cyan: 60 % of\nits mass)", "PCA of features"] + (
        ["similarity"] if similarity is not None else []
    )
    if segmentation is not None:
        rows.append("segmentation\n(red core, green\noedema, yellow\nenhancing)")
    predictions = [prediction_text(name, p) for name, p in analysis.predictions.items()]
    montage_height = HEADER_HEIGHT + len(rows) * (CELL_HEIGHT + GAP)
    panel_height = 12 + LINE_HEIGHT * (len(predictions) + 1) if predictions else 0
    canvas = Image.new("RGB", (LABEL_WIDTH + len(picks) * (cell_width + GAP), montage_height + panel_height))
    draw = ImageDraw.Draw(canvas)
    font, small = ImageFont.load_default(size=15), ImageFont.load_default(size=12)
    paint = _painter(analysis, similarity, segmentation)
    for c, z in enumerate(picks):
        left = LABEL_WIDTH + c * (cell_width + GAP)
        draw.text(
            (left + cell_width // 2, HEADER_HEIGHT - 4), f"axial slice {z}", fill="white", font=small, anchor="md"
        )
        for r, cell in enumerate(paint(z)):
            top = HEADER_HEIGHT + r * (CELL_HEIGHT + GAP)
            shown = np.asarray(Image.fromarray(cell).resize((cell_width, CELL_HEIGHT), Image.BILINEAR)).copy()
            if r == 1:  # outline the attention mask at display resolution, so the line stays crisp
                kept = _view(analysis.attention[:, :, z] >= analysis.attention_threshold[z])
                mask = Image.fromarray(kept).resize((cell_width, CELL_HEIGHT), Image.NEAREST)
                shown[_outline(np.asarray(mask))] = MASK_COLOUR
            canvas.paste(Image.fromarray(shown), (left, top))
            if r == 3 and query_xyz and z == query_xyz[2]:
                qx = left + (size_x - 1 - query_xyz[0] + 0.5) * cell_width / size_x
                qy = top + (size_y - 1 - query_xyz[1] + 0.5) * CELL_HEIGHT / size_y
                draw.line([(qx - 8, qy), (qx + 8, qy)], fill=(0, 255, 0), width=2)
                draw.line([(qx, qy - 8), (qx, qy + 8)], fill=(0, 255, 0), width=2)
    for r, name in enumerate(rows):
        y = HEADER_HEIGHT + r * (CELL_HEIGHT + GAP) + CELL_HEIGHT // 2
        draw.multiline_text((8, y), name, fill="white", font=font, anchor="lm")
    draw.text((LABEL_WIDTH + 4, HEADER_HEIGHT + 2), "R", fill="yellow", font=small)
    draw.text((LABEL_WIDTH + cell_width - 4, HEADER_HEIGHT + 2), "L", fill="yellow", font=small, anchor="ra")
    _draw_header(draw, analysis, font, small)
    if predictions:
        draw.text((8, montage_height + 6), "Predictions (task heads of the bundle)", fill="white", font=font)
        for i, line in enumerate(predictions):
            draw.text((24, montage_height + 6 + LINE_HEIGHT * (i + 1)), line, fill=(200, 230, 255), font=font)
    canvas.save(path, optimize=False, compress_level=3)
    return Path(path)


def _painter(analysis: Analysis, similarity: np.ndarray | None, segmentation: np.ndarray | None):
    """``paint(z)``: the cells of canonical slice ``z`` (MRI, attention, PCA[, similarity][, segmentation]) as
    (Y, X, 3) uint8 images in radiological view, coloured on the run's common scales."""
    volume, foreground = analysis.volume, analysis.prepared.foreground
    grey_range = np.percentile(volume.data[foreground], [0.5, 99.5])  # background (below the brain) clips to black
    attention_range = np.percentile(analysis.attention[foreground], [1, 99.5])
    inferno, coolwarm = _lut("inferno"), _lut("coolwarm")

    def paint(z: int) -> list[np.ndarray]:
        grey = np.repeat(_scaled(_view(volume.data[:, :, z]), *grey_range)[..., None], 3, axis=2)
        brain = _view(foreground[:, :, z])
        cells = [
            grey,
            _blend(grey, inferno[_scaled(_view(analysis.attention[:, :, z]), *attention_range)], brain, 0.65),
            _view(analysis.pca[:, :, z]),
        ]
        if similarity is not None:
            cells.append(_blend(grey, coolwarm[_scaled(_view(similarity[:, :, z]), -1, 1)], brain, 0.7))
        if segmentation is not None:
            labels = _view(segmentation[:, :, z])
            colours = LABEL_COLOURS[np.clip(labels, 0, len(LABEL_COLOURS) - 1)]
            cells.append(_blend(grey, colours, labels > 0, 0.6))
        return cells

    return paint


def _draw_header(draw: ImageDraw.ImageDraw, analysis: Analysis, font, small) -> None:
    """Title line, then the notice: the out-of-distribution verdict, a random encoder, or the intended use."""
    card = analysis.card
    title = f"BrainDINO  |  {Path(analysis.volume.path).name}  |  model: {card.name}"
    draw.text((8, 6), title, fill="white", font=font)
    alert = ood_warning(card.name, analysis.ood) if analysis.ood and analysis.ood["out_of_distribution"] else None
    if alert:
        notice = alert
    elif card.random_init:
        notice = "RANDOMLY INITIALISED ENCODER: these maps test the pipeline; they show no learned anatomy"
    else:
        notice = f"intended use: {card.intended_use}"
    draw.text((8, 26), notice, fill=WARNING_COLOUR if alert or card.random_init else NOTICE_COLOUR, font=small)


def side_by_side(images: list[str | Path], path: str | Path, gap: int = 16) -> Path:
    """Reports placed left to right on one black canvas (tops aligned)."""
    opened = [Image.open(p).convert("RGB") for p in images]
    width = sum(i.width for i in opened) + gap * (len(opened) - 1)
    canvas = Image.new("RGB", (width, max(i.height for i in opened)))
    left = 0
    for image in opened:
        canvas.paste(image, (left, 0))
        left += image.width + gap
    canvas.save(path)
    return Path(path)
