"""Label efficiency: frozen encoders pretrained by different objectives, under label scarcity.

For every encoder, task and label fraction (share of the training subjects whose labels the head
may see), a head is fitted on the frozen encoder's features and scored on the same held-out test
subjects; each seed draws the labelled subset anew and re-initialises the head. Encoders:

- ``dino``, ``moco``, ``mae``: pretrained by ``tools/make-demo-bundle.sh`` with the same budget
  (same phantom slice index, tiny-cpu config, 1,200 steps of 16 slices);
- ``random``: the same architecture and preprocessing, randomly initialised (seed 0).

Tasks on a labelled phantom cohort (default: the demo's 120-subject cohort, split 60/20/20 by
subject): tumour segmentation (FLAIR, Dice), diagnosis-like class (T1, AUC), molecular-status-like
marker (T1ce, AUC), age (T1, MAE in years), survival (T1ce, C-index), MRI sequence type (accuracy).
Rows also hold the linear probe on the same features, and the "knows nothing" reference
(majority class / training mean / constant risk).

Writes ``label_efficiency.json``, ``.md`` and ``.png`` to ``--out`` and prints the JSON. Each
(encoder, task) run is kept in the feature cache folder, so an interrupted benchmark resumes.

    python benchmarks/label_efficiency.py                         # after bash tools/make-demo-bundle.sh
    python benchmarks/label_efficiency.py --tasks age sequence --seeds 0
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

DEMO = Path("build/demo")
TASKS = {  # name: (kind, target, sequences)
    "tumor": ("seg", "seg", ("flair",)),
    "diagnosis": ("cls", "diagnosis", ("t1",)),
    "marker": ("cls", "marker", ("t1ce",)),
    "age": ("reg", "age", ("t1",)),
    "survival": ("surv", "survival_days", ("t1ce",)),
    "sequence": ("seq", "modality", ()),
}
REFERENCE = {"cls": "majority", "seq": "majority", "reg": "mean", "surv": "mean"}


def _encoder_bundles(pairs: list[str], folder: Path) -> dict[str, Path]:
    """NAME=BUNDLE pairs; ``random`` names the random-init twin of the first bundle."""
    from BrainDINOLib.bundle import create_random_bundle, load_bundle

    bundles = {}
    for pair in pairs:
        name, _, path = pair.partition("=")
        bundles[name] = Path(path) if path else None
    first = next(p for p in bundles.values() if p is not None)
    for name, path in bundles.items():
        if path is None:
            card = load_bundle(first).card
            random = folder / f"{name}-bundle"
            if not random.exists():
                create_random_bundle(random, card.encoder.name, preprocessing=card.preprocessing)
            bundles[name] = random
    return bundles


def _run_task(task: str, manifest, bundle, cache_dir: Path, fractions, seeds, seg_steps: int) -> list[dict]:
    from BrainDINOTrainingLib.features import FeatureCache
    from BrainDINOTrainingLib.fit_heads import FitOptions, fit_and_evaluate
    from BrainDINOTrainingLib.fit_segmentation import SegOptions, default_layers, fit_and_evaluate_segmentation

    kind, target, sequences = TASKS[task]
    if kind == "seg":
        layers = default_layers(bundle.card.encoder.depth)
        options = SegOptions(modalities=sequences, label_fractions=fractions, seeds=seeds, steps=seg_steps)
        return fit_and_evaluate_segmentation(manifest, FeatureCache(bundle, cache_dir, layers), options, task).rows
    options = FitOptions(task=kind, target=target if kind != "seq" else "", modalities=sequences or ("t1",),
                         label_fractions=fractions, seeds=seeds)  # fmt: skip
    return fit_and_evaluate(manifest, FeatureCache(bundle, cache_dir), options, task).rows


def summarise(rows: list[dict], task: str, encoder: str) -> list[dict]:
    """Mean, spread and values of the primary metric per fraction and model (head, linear probe, reference)."""
    from BrainDINOTrainingLib.metrics import PRIMARY

    kind = TASKS[task][0]
    metric = PRIMARY[kind]
    result = []
    for model in ("head", "linear", REFERENCE.get(kind)):
        for fraction in sorted({r["label_fraction"] for r in rows}):
            chosen = [r for r in rows if r["model"] == model and r["label_fraction"] == fraction]
            if not chosen:
                continue
            values = [float(r[metric]) for r in chosen]
            result.append({
                "task": task, "kind": kind, "metric": metric, "encoder": encoder if model != REFERENCE.get(kind)
                else "none", "model": model, "label_fraction": fraction,
                "train_subjects": chosen[0]["train_samples"], "mean": float(np.nanmean(values)),
                "std": float(np.nanstd(values)), "values": values,
            })  # fmt: skip
    return result


def markdown(results: list[dict], encoders: list[str]) -> str:
    """Head's primary metric per task and fraction (rows) and encoder (columns); best mean in bold."""
    lines = [
        "| task (metric) | labels | " + " | ".join(encoders) + " | reference |",
        "|" + " --- |" * (3 + len(encoders)),
    ]
    for task in dict.fromkeys(r["task"] for r in results):
        for fraction in sorted({r["label_fraction"] for r in results if r["task"] == task}):
            cells = {r["encoder"]: r for r in results if r["task"] == task and r["label_fraction"] == fraction
                     and r["model"] == "head"}  # fmt: skip
            if not cells:
                continue
            first = next(iter(cells.values()))
            means = {e: round(r["mean"], 3) for e, r in cells.items() if np.isfinite(r["mean"])}
            top = (min if first["metric"] == "mae" else max)(means.values(), default=None)
            winners = [e for e, m in means.items() if m == top]
            best = winners[0] if len(winners) == 1 else None  # ties are not bold
            row = [f"{task} ({first['metric']})", f"{fraction:g} ({first['train_subjects']})"]
            for encoder in encoders:
                r = cells.get(encoder)
                text = "–" if not r else f"{r['mean']:.3f}" + (f" ± {r['std']:.3f}" if len(r["values"]) > 1 else "")
                row.append(f"**{text}**" if r and encoder == best else text)
            reference = [r for r in results if r["task"] == task and r["label_fraction"] == fraction
                         and r["encoder"] == "none"]  # fmt: skip
            row.append(f"{reference[0]['mean']:.3f}" if reference else "–")
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], encoders: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in results))
    columns = min(3, len(tasks))
    rows = -(-len(tasks) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.3 * rows), dpi=110, squeeze=False)
    for ax, task in zip(axes.flat, tasks, strict=False):
        for encoder in encoders:
            chosen = [r for r in results if r["task"] == task and r["encoder"] == encoder and r["model"] == "head"]
            if chosen:
                ax.errorbar([r["label_fraction"] for r in chosen], [r["mean"] for r in chosen],
                            yerr=[r["std"] for r in chosen], marker="o", capsize=3, label=encoder)  # fmt: skip
        reference = [r for r in results if r["task"] == task and r["encoder"] == "none"]
        if reference:
            ax.plot([r["label_fraction"] for r in reference], [r["mean"] for r in reference], "k--", lw=1,
                    label=reference[0]["model"])  # fmt: skip
        fractions = sorted({r["label_fraction"] for r in results if r["task"] == task})
        metric = next(r["metric"] for r in results if r["task"] == task)
        ax.set_xscale("log")
        ax.set_xticks(fractions, [f"{f:g}" for f in fractions])
        ax.minorticks_off()
        ax.set(title=f"{task} ({TASKS[task][0]})", xlabel="label fraction", ylabel=metric)
    for ax in list(axes.flat)[len(tasks) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    figure.suptitle("Frozen tiny encoders on held-out phantoms: head metric vs labelled share (mean ± std over seeds)")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cohort", type=Path, default=DEMO / "heads-cohort", help="labelled manifest or folder")
    parser.add_argument(
        "--encoder", nargs="+", metavar="NAME[=BUNDLE]", default=[
            f"dino={DEMO / 'pretrain' / 'bundle'}", f"moco={DEMO / 'pretrain-moco' / 'bundle'}",
            f"mae={DEMO / 'pretrain-mae' / 'bundle'}", "random"],
        help="encoders to compare; a NAME without a bundle is the first bundle's random-init twin",
    )  # fmt: skip
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.01, 0.1, 1.0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--seg-seeds", nargs="+", type=int, default=[0], help="segmentation costs most on CPU")
    parser.add_argument("--seg-steps", type=int, default=150, help="decoder steps of 16 slices per fit")
    parser.add_argument("--cache", type=Path, default=DEMO / "cache", help="feature cache (shared with the demo heads)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    import torch
    from tqdm import tqdm

    from BrainDINOLib import __version__
    from BrainDINOLib.bundle import ENCODER_FILE, load_bundle
    from BrainDINOLib.manifest import load_manifest

    torch.manual_seed(0)
    bundles = _encoder_bundles(args.encoder, DEMO)
    manifest = load_manifest(args.cohort)
    results, timings = [], {}
    runs = [(encoder, task) for encoder in bundles for task in args.tasks]
    for encoder, task in tqdm(runs, desc="fits", file=sys.stderr):
        bundle, begin = load_bundle(bundles[encoder]), time.perf_counter()
        seeds = tuple(args.seg_seeds if TASKS[task][0] == "seg" else args.seeds)
        table = Path(manifest.source)
        identity = [bundle.card.files[ENCODER_FILE], bundle.card.pooling, task, args.fractions, seeds,
                    args.seg_steps if TASKS[task][0] == "seg" else 0, str(table.resolve()), table.stat().st_mtime_ns,
                    __version__]  # fmt: skip
        done = (
            args.cache / "label-efficiency" / f"{hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:24]}.json"
        )
        if done.is_file():  # a finished run of an interrupted benchmark
            rows, seconds = json.loads(done.read_text())
        else:
            rows = _run_task(task, manifest, bundle, args.cache, tuple(args.fractions), seeds, args.seg_steps)
            seconds = round(time.perf_counter() - begin, 1)
            done.parent.mkdir(parents=True, exist_ok=True)
            done.write_text(json.dumps([rows, seconds]))
        results += [r for r in summarise(rows, task, encoder) if r["encoder"] != "none" or encoder == runs[0][0]]
        timings[f"{encoder}/{task}"] = seconds
    cards = {name: load_bundle(path).card for name, path in bundles.items()}
    report = {
        "benchmark": "label_efficiency",
        "cohort": str(args.cohort),
        "subjects": {
            s: sum(1 for v in manifest.split().splits.values() if v == s) for s in ("train", "val", "test")
        },  # fmt: skip
        "encoders": {
            name: {
                "bundle": str(bundles[name]),
                "random_init": card.random_init,
                "objective": card.training.get("objective", "") if card.training else "",
                "steps": card.training.get("steps") if card.training else 0,
            }
            for name, card in cards.items()
        },  # fmt: skip
        "fractions": args.fractions,
        "seeds": args.seeds,
        "seg_seeds": args.seg_seeds,
        "seg_steps": args.seg_steps,
        "machine": {
            "cpu_count": __import__("os").cpu_count(),
            "torch": torch.__version__,
            "platform": platform.platform(),
        },  # fmt: skip
        "seconds": {"fits_total": round(sum(timings.values()), 1), **timings},  # including feature extraction
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "label_efficiency.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "label_efficiency.md").write_text(markdown(results, list(bundles)))
    plot(results, list(bundles), args.out / "label_efficiency.png")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
