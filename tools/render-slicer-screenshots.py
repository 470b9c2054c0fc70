"""Render the BrainDINO module's outputs on the demo phantom as Slicer's own slice views draw them.

Runs the module's logic (BrainDINOLib.session) on a real MRML scene and captures an offscreen axial
slice view (slicer-core displayable managers, via trame-slicer) for each overlay; writes
Resources/Screenshots/slicer-*.png. Needs the test extras (pip install -e ".[test]").
"""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "Testing" / "helpers"))

from BrainDINOLib import mrml  # noqa: E402
from BrainDINOLib.sample_data import demo_phantom  # noqa: E402
from BrainDINOLib.session import InferenceSession, RunOptions  # noqa: E402
from slicer_scene import add_volume_node, axial_view, render, slicer_app  # noqa: E402


def main() -> None:
    app = slicer_app()
    scans, _ = demo_phantom()
    nodes = {s: add_volume_node(nib.load(scans[s]), f"phantom {s.upper()}") for s in ("flair", "t1", "t1ce")}
    session = InferenceSession()
    run = session.run(
        nodes["flair"], RunOptions(sequence="flair", device="cpu"), others={"t1": nodes["t1"], "t1ce": nodes["t1ce"]}
    )
    view = axial_view(app, size=420)
    truth = np.asarray(nib.load(scans["seg"]).dataobj)
    k = int(np.argmax((truth > 0).sum(axis=(0, 1))))
    tumour_s = float((nib.load(scans["seg"]).affine @ [0, 0, k, 1])[2])
    oedema = np.argwhere(truth[:, :, k] == 2)
    middle = oedema[np.argmin(np.linalg.norm(oedema - oedema.mean(axis=0), axis=1))]
    session.query(tuple((nib.load(scans["seg"]).affine @ [*middle, k, 1])[:3]))

    panels = []
    segmentation = run.segmentations["tumor"]
    for title, overlay, segments in [
        ("FLAIR + segmentation (brain, tumour)", None, True),
        ("attention (heat)", run.attention, False),
        ("PCA of patch tokens (RGB)", run.pca, False),
        ("similarity to a point in the oedema", run.similarity, False),
    ]:
        segmentation.GetDisplayNode().SetVisibility(segments)
        mrml.show_layers(app.scene, run.input, overlay, opacity=1.0 if overlay is run.pca else 0.6)
        picture = Image.fromarray(render(view, tumour_s))
        ImageDraw.Draw(picture).text((8, 8), title, fill=(255, 255, 255))
        panels.append(picture)
    out = ROOT / "Resources" / "Screenshots"
    strip = Image.new("RGB", (sum(p.width for p in panels), panels[0].height))
    for index, panel in enumerate(panels):
        strip.paste(panel, (index * panel.width, 0))
    strip.save(out / "slicer-slice-views.png", optimize=True)
    print(f"wrote {out / 'slicer-slice-views.png'}; predictions:")
    for line in run.prediction_lines:
        print("  " + line)


if __name__ == "__main__":
    main()
