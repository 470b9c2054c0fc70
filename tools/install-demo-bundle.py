"""Install a phantom-trained bundle as BrainDINO's shipped default, with a held-out demo phantom.

    python tools/install-demo-bundle.py BUNDLE [--work build/demo]

- BUNDLE is copied to ``BrainDINO/BrainDINOLib/models/braindino-tiny-phantom`` with a card that says
  what it is (a demonstration trained on synthetic phantoms, not a clinical model) and records the
  pretraining run and head cohorts; it must stay within 25 MB;
- the catalogue's default becomes that bundle (the random bundle stays listed);
- one phantom with an enhancing glioma, axial 2D slices and a small volume (`suits_the_demo`), generated with a
  seed no training cohort used (300), is written to
  ``BrainDINO/BrainDINOLib/samples/demo-phantom`` (four sequences, lesion and brain masks, ``labels.json``) for
  ``braindino demo`` and Slicer's Sample Data module (with ``thumbnail.png``, its FLAIR through the lesion):
  neither the encoder nor any head saw it.

Run by ``tools/make-demo-bundle.sh``; the shipped files are then committed (CMakeLists.txt lists them).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from BrainDINOLib.bundle import CARD_FILE, CATALOG_DIR, load_bundle
from BrainDINOLib.sample_data import DEMO_PHANTOM_DIR
from BrainDINOTrainingLib.phantoms import SEQUENCES, SubjectPlan, Template, first_subject, write_subject

NAME = "braindino-tiny-phantom"
DEMO_SEED = 300
SIZE_LIMIT = 25 * 1024 * 1024


def install_bundle(source: Path, work: Path) -> Path:
    bundle = load_bundle(source)
    pretrain = json.loads((work / "pretrain" / "config.json").read_text())
    heads = ", ".join(f"{s.name} ({s.kind})" for s in bundle.card.heads)
    card = dataclasses.replace(
        bundle.card,
        name=NAME,
        description=(
            f"DEMONSTRATION: tiny DINO ViT/16 pretrained for {bundle.card.training['steps']} steps of "
            f"{pretrain['batch_size']} axial slices of 48 synthetic whole-head phantoms derived from the MNI "
            "template (four sequences and two randomised contrasts each, a quarter skull-stripped), with heads fitted "
            f"on 80 other phantoms: {heads}. Phantom-trained: not for clinical use."
        ),
        intended_use="demonstration on synthetic phantoms only; not a medical device; its heads learned the "
        "phantom generator's rules, not real disease",
        training={
            **bundle.card.training,
            "data": "48 phantoms, braindino cohort make 48 --seed 100 --skull-stripped 0.25 "
            "--random-contrasts 2 (1 mm)",
            "heads_data": "80 other phantoms, braindino cohort make 80 --seed 200 --skull-stripped 0.25 "
            "--random-contrasts 1 (1 mm), split 60/20/20 by subject; the out-of-distribution reference on all 80",
            "built_by": "bash tools/make-demo-bundle.sh",
            "config": pretrain,
        },
    )
    target = CATALOG_DIR / NAME
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)
    (target / CARD_FILE).write_text(json.dumps(card.to_dict(), indent=2) + "\n")
    size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    if size > SIZE_LIMIT:
        raise SystemExit(f"{target}: {size / 2**20:.1f} MB exceeds the 25 MB limit for shipped bundles")
    load_bundle(target)  # verifies every hash
    catalog_path = CATALOG_DIR / "catalog.json"
    catalog = json.loads(catalog_path.read_text())
    catalog["default"] = NAME
    entry = {"name": NAME, "path": NAME, "description": card.description}
    names = [m["name"] for m in catalog["models"]]
    if NAME in names:  # a reinstalled bundle keeps its place in the catalogue
        catalog["models"][names.index(NAME)] = entry
    else:
        catalog["models"].append(entry)
    catalog_path.write_text(json.dumps(catalog, indent=2) + "\n")
    print(f"installed {target} ({size / 2**20:.1f} MB) as the default bundle")
    return target


def suits_the_demo(plan: SubjectPlan) -> bool:
    """A small, typical clinical demo: an enhancing glioma in a whole head, scanned in axial 2D slices, at most
    1.5 M voxels (so the four sequences stay small in the package)."""
    acquisition = plan.acquisition
    voxels = np.prod(np.diff(np.array(acquisition.fov_mm), axis=1).ravel() / acquisition.spacing_mm)
    return plan.lesion == "glioma" and plan.enhancing and acquisition.plane == "axial" and voxels <= 1.5e6


def install_demo_phantom() -> Path:
    """The first subject of seed ``DEMO_SEED`` that `suits_the_demo`, renamed ``heldout-phantom``."""
    template = Template.load(1.0)
    index = first_subject(template, DEMO_SEED, suits_the_demo)
    with tempfile.TemporaryDirectory() as scratch:
        row = write_subject(template, Path(scratch), DEMO_SEED, index)
        if DEMO_PHANTOM_DIR.exists():
            shutil.rmtree(DEMO_PHANTOM_DIR)
        DEMO_PHANTOM_DIR.mkdir(parents=True)
        subject = row["subject_id"]
        for path in sorted((Path(scratch) / subject).glob("*.nii.gz")):
            shutil.copy(path, DEMO_PHANTOM_DIR / path.name.replace(subject, "heldout-phantom"))
    labels = {"subject_id": "heldout-phantom", "generated": f"phantom seed {DEMO_SEED}, subject {index}"}
    labels.update({k: v for k, v in row.items() if k not in ("subject_id", *SEQUENCES, "seg", "brain_mask")})
    (DEMO_PHANTOM_DIR / "labels.json").write_text(json.dumps(labels, indent=2) + "\n")
    write_thumbnail(DEMO_PHANTOM_DIR)
    print(f"demo phantom (seed {DEMO_SEED}, subject {index}) in {DEMO_PHANTOM_DIR}")
    return DEMO_PHANTOM_DIR


def write_thumbnail(folder: Path, size: int = 128) -> Path:
    """``thumbnail.png``: the FLAIR's axial slice with the most lesion, as a radiologist views it (Sample Data)."""
    import nibabel as nib
    from PIL import Image

    flair = nib.as_closest_canonical(nib.load(folder / "heldout-phantom_flair.nii.gz"))
    lesion = np.asarray(nib.as_closest_canonical(nib.load(folder / "heldout-phantom_seg.nii.gz")).dataobj) > 0
    section = np.asarray(flair.dataobj, np.float32)[:, :, lesion.sum(axis=(0, 1)).argmax()]
    grey = np.clip(section / np.percentile(section, 99.5), 0, 1) * 255
    picture = Image.fromarray(grey.T[::-1, ::-1].astype(np.uint8))  # anterior up, patient's right on the left
    picture.thumbnail((size, size))
    canvas = Image.new("L", (size, size))
    canvas.paste(picture, ((size - picture.width) // 2, (size - picture.height) // 2))
    canvas.save(folder / "thumbnail.png")
    return folder / "thumbnail.png"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--work", type=Path, default=Path("build/demo"))
    args = parser.parse_args()
    install_bundle(args.bundle, args.work)
    install_demo_phantom()


if __name__ == "__main__":
    main()
