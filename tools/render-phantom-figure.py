"""Render the README's phantom figure: whole-head phantoms as a scanner would store them.

    python tools/render-phantom-figure.py [-o Resources/Screenshots/phantom-contrasts.png] [--seed 1]

Row 1: one subject with a glioma, one slice in each realistic sequence and two randomised contrasts,
then FLAIR with the BraTS labels and the brain mask's outline. Row 2: other subjects of the same
seed, as acquired (the slice plane of their acquisition, its slice thickness and artefacts):
metastases on T1ce, a sagittal and a coronal scan, a thick-slice axial scan at the level of the
eyes, and a skull-stripped (BraTS-like) image. Subjects are found by their plans, generated at 1 mm.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import matplotlib
import nibabel as nib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from BrainDINOTrainingLib.acquisition import SLICE_AXIS  # noqa: E402
from BrainDINOTrainingLib.phantoms import CohortOptions, Template, first_subject, write_subject  # noqa: E402

LABEL_COLOURS = {1: (0.9, 0.1, 0.1), 2: (0.2, 0.8, 0.2), 3: (1.0, 0.85, 0.1)}


def view(path: Path, plane: str, position: float | None = None, around: np.ndarray | None = None):
    """A slice in the acquisition plane, radiological view, with its pixel aspect; ``around``: the slice holding
    most of this mask (same grid) instead of the relative ``position``."""
    image = nib.as_closest_canonical(nib.load(path))
    data = np.asarray(image.dataobj).astype(np.float32)
    spacing = np.abs(np.diag(image.affine))[:3]
    axis = SLICE_AXIS[plane]
    if around is not None and around.any():
        index = int(np.argmax(around.sum(axis=tuple(a for a in range(3) if a != axis))))
    else:
        index = int(data.shape[axis] * (position if position is not None else 0.5))
    picture = np.take(data, index, axis=axis)
    rows_mm, cols_mm = [spacing[a] for a in range(3) if a != axis][::-1]
    picture = picture.T[::-1]  # superior/anterior up
    if plane != "sagittal":
        picture = picture[:, ::-1]  # patient right on the viewer's left
    return picture, rows_mm / cols_mm


def canonical(path: Path) -> np.ndarray:
    return np.asarray(nib.as_closest_canonical(nib.load(path)).dataobj)


def show(ax, picture, aspect, title, overlay=None, outline=None):
    ax.imshow(picture, cmap="gray", aspect=aspect, vmin=0, vmax=np.percentile(picture, 99.5) or 1)
    if overlay is not None:
        rgba = np.zeros((*overlay.shape, 4))
        for label, colour in LABEL_COLOURS.items():
            rgba[overlay == label] = (*colour, 0.55)
        ax.imshow(rgba, aspect=aspect)
    if outline is not None:
        ax.contour(outline, levels=[0.5], colors=["#33aaff"], linewidths=0.8)
    ax.set_title(title, fontsize=9, color="white")
    ax.axis("off")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--out", type=Path, default=Path("Resources/Screenshots/phantom-contrasts.png"))
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    template = Template.load(1.0)
    seed = args.seed
    glioma = first_subject(
        template, seed, lambda p: p.lesion == "glioma" and p.marker == 0 and p.acquisition.plane == "axial"
    )
    metastases = first_subject(template, seed, lambda p: p.lesion == "metastases" and p.acquisition.plane == "axial")
    sagittal = first_subject(template, seed, lambda p: p.acquisition.plane == "sagittal")
    coronal = first_subject(template, seed, lambda p: p.acquisition.plane == "coronal")
    thick = first_subject(template, seed, lambda p: p.acquisition.plane == "axial" and p.acquisition.thickness_mm >= 5)

    fig, axes = plt.subplots(2, 7, figsize=(21, 7.2), facecolor="black")
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch)

        def subject(index: int, options: CohortOptions | None = None) -> dict:
            options = options or CohortOptions()
            folder = out / f"{index}-{options.skull_stripped:g}"
            row = write_subject(template, folder, seed, index, options)
            return {k: folder / v for k, v in row.items() if str(v).endswith(".gz")}

        files = subject(glioma, CohortOptions(random_contrasts=2))
        seg = canonical(files["seg"])
        for ax, name in zip(axes[0, :6], ("t1", "t1ce", "t2", "flair", "random1", "random2"), strict=True):
            show(ax, *view(files[name], "axial", around=seg == 3), f"{name} (subject {glioma})")
        picture, aspect = view(files["flair"], "axial", around=seg == 3)
        labels, _ = view(files["seg"], "axial", around=seg == 3)
        brain, _ = view(files["brain_mask"], "axial", around=seg == 3)
        show(axes[0, 6], picture, aspect, "FLAIR, BraTS labels, brain mask", labels, brain)

        files = subject(metastases)
        show(axes[1, 0], *view(files["t1ce"], "axial", around=canonical(files["seg"]) == 3), "t1ce: metastases")
        files = subject(sagittal)
        show(axes[1, 1], *view(files["t1"], "sagittal", 0.5), "t1, sagittal acquisition")
        files = subject(coronal)
        show(axes[1, 2], *view(files["flair"], "coronal", 0.55), "flair, coronal acquisition")
        files = subject(thick)
        brain = canonical(files["brain_mask"])
        low = np.flatnonzero(brain.any(axis=(0, 1)))
        level = (low[0] + 0.3 * (low[-1] - low[0])) / brain.shape[2]
        show(axes[1, 3], *view(files["t2"], "axial", level), "t2, thick slices, eye level")
        show(axes[1, 4], *view(files["t1"], "axial", level + 0.25), "t1, same scan, higher")
        files = subject(glioma, CohortOptions(skull_stripped=1.0))
        show(axes[1, 5], *view(files["t1ce"], "axial", around=seg == 3), "t1ce, --skull-stripped")
        show(axes[1, 6], *view(files["t2"], "axial", around=seg == 3), "t2, --skull-stripped")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=70, facecolor="black")
    print(
        f"wrote {args.out} (seed {seed}: glioma {glioma}, metastases {metastases}, sagittal {sagittal}, "
        f"coronal {coronal}, thick {thick})"
    )


if __name__ == "__main__":
    main()
