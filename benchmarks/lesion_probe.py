"""Do an encoder's patch tokens show lesions, per sequence? One JSON object per sequence.

    python benchmarks/lesion_probe.py --manifest cohort/ --sequences flair t1ce [--bundle NAME] [--cache DIR]

A segmentation head can only mark what the frozen tokens hold. This measures that before any head is
fitted: each scan is prepared and encoded as ``infer`` does it (through the bundle's brain-mask head),
every patch of the analysed slices is labelled by the share of its canvas pixels inside the lesion mask
(the manifest's ``seg`` column; ``--labels 3``: the enhancing tumour only), and a logistic regression on
the tokens of the segmentation blocks (all concatenated, then each alone) separates lesion patches
(share above 0.25) from lesion-free ones. It is fitted on the first ``--fit-share`` of the subjects with
a mask and scored by ROC AUC on the others. 0.5 means the tokens do not show the lesion; a good encoder
reaches well above 0.9.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from BrainDINOLib.bundle import find_bundle, load_bundle
from BrainDINOLib.errors import BrainDINOError
from BrainDINOLib.manifest import load_manifest
from BrainDINOTrainingLib.features import FeatureCache
from BrainDINOTrainingLib.fit_segmentation import SegOptions, collect_segmentation, default_layers

LESION_SHARE = 0.25  # a patch counts as lesion above this share of its pixels; lesion-free patches have none


def patch_rows(volumes, patch: int, classes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(N, C) tokens and (N,) lesion labels of the patches that are clearly lesion (``classes``) or clearly not."""
    tokens, labels = [], []
    for volume in volumes:
        lesion = torch.isin(volume.targets.long(), torch.tensor(classes))
        share = torch.nn.functional.avg_pool2d(lesion.float()[:, None], patch)[:, 0]
        tokens.append(volume.features.float().permute(0, 2, 3, 1).reshape(-1, volume.features.shape[1]).numpy())
        labels.append(share.reshape(-1).numpy())
    tokens, share = np.concatenate(tokens), np.concatenate(labels)
    kept = (share == 0) | (share > LESION_SHARE)
    return tokens[kept], share[kept] > 0


def probe_auc(fit: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], columns: slice) -> float:
    model = LogisticRegression(C=0.1, max_iter=3000, class_weight="balanced")
    model.fit(fit[0][:, columns], fit[1])
    return round(float(roc_auc_score(test[1], model.predict_proba(test[0][:, columns])[:, 1])), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True, help="cohort folder or CSV with a 'seg' lesion-mask column")
    parser.add_argument("--sequences", nargs="+", default=["t1", "t1ce", "t2", "flair"])
    parser.add_argument("--labels", nargs="+", type=int, default=[1, 2, 3], choices=SegOptions.label_values,
                        help="mask values that count as lesion (BraTS: 1 core, 2 oedema, 3 enhancing)")  # fmt: skip
    parser.add_argument("--bundle", help="bundle name or folder (default: the shipped default)")
    parser.add_argument("--cache", help="feature cache folder (default ~/.braindino/cache/features)")
    parser.add_argument("--fit-share", type=float, default=0.7, help="share of subjects the probe is fitted on")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    try:
        probe(args)
    except BrainDINOError as error:
        parser.error(str(error))


def probe(args: argparse.Namespace) -> None:
    bundle = load_bundle(find_bundle(args.bundle))
    encoder = bundle.card.encoder
    layers = default_layers(encoder.depth)
    cache = FeatureCache(bundle, args.cache, layers, args.device)
    manifest = load_manifest(args.manifest)
    subjects = sorted({e.subject_id for e in manifest.entries if "seg" in e.images})
    fitted = round(args.fit_share * len(subjects))
    if not 0 < fitted < len(subjects):
        raise BrainDINOError(f"{manifest.source}: {len(subjects)} subjects with a 'seg' mask cannot be split "
                             f"{args.fit_share:g} to fit and the rest to test")  # fmt: skip
    classes = [SegOptions.label_values.index(v) + 1 for v in args.labels]  # the canvas targets' class indices
    width = encoder.embed_dim
    splits = {s: "train" if i < fitted else "test" for i, s in enumerate(subjects)}
    manifest = dataclasses.replace(manifest, splits=splits)
    for sequence in args.sequences:
        volumes = collect_segmentation(manifest, SegOptions(modalities=(sequence,)), cache, splits=("train", "test"))
        fit, test = (patch_rows(volumes[name], encoder.patch_size, classes) for name in ("train", "test"))
        row = {
            "bundle": bundle.card.name,
            "sequence": sequence,
            "labels": args.labels,
            "subjects": {"fit": fitted, "test": len(subjects) - fitted},
            "lesion_patches": {"fit": int(fit[1].sum()), "test": int(test[1].sum())},
            "auc": probe_auc(fit, test, slice(None)),
            "auc_per_block": {
                str(block): probe_auc(fit, test, slice(i * width, (i + 1) * width)) for i, block in enumerate(layers)
            },
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
