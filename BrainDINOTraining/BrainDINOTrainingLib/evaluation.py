"""Metrics of volume heads and of simple baselines on the same held-out samples.

- cls: AUC (one-vs-rest macro for more than two classes), balanced accuracy, accuracy;
- seq: accuracy, balanced accuracy;
- reg: MAE and RMSE in the target's units, R²;
- surv: Harrell's C-index, and Kaplan-Meier curves of the groups above and below the median risk.

Baselines on the mean-pooled embedding: logistic regression / ridge / a linear Cox model, kNN,
and the majority class / training mean (the "knows nothing" reference).
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score
from sklearn.neighbors import KNeighborsClassifier, KNeighborsRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from BrainDINOLib.bundle import ENCODER_FILE, Bundle
from BrainDINOLib.errors import BrainDINOError
from BrainDINOLib.heads import HeadSpec, HeadTraining
from BrainDINOLib.manifest import Manifest

from .features import FeatureCache
from .fit_heads import FitOptions, FitResult, Samples, collect, cox_loss, fit_volume_head, label_subset, predict
from .fit_segmentation import SegOptions, collect_segmentation, segmentation_metrics

#: the metric that decides "better" per task (higher is better except for MAE).
PRIMARY = {"cls": "auc", "seq": "accuracy", "reg": "mae", "surv": "c_index", "seg": "dice_whole_tumor"}


def c_index(risk: np.ndarray, times: np.ndarray, events: np.ndarray) -> float:
    """Harrell's concordance: of pairs where the earlier time is an event, the share ranked riskier (ties 1/2)."""
    earlier = (times[:, None] < times[None, :]) & (events[:, None] > 0)
    if not earlier.any():
        return float("nan")
    concordant = (risk[:, None] > risk[None, :]) + 0.5 * (risk[:, None] == risk[None, :])
    return float(concordant[earlier].sum() / earlier.sum())


def kaplan_meier(times: np.ndarray, events: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Step-function survival estimate: (event times, survival just after each)."""
    order = np.lexsort((-events, times))  # at a tied time, events before censorings
    times, events = times[order], events[order]
    at_risk = len(times) - np.arange(len(times))
    survival = np.cumprod(1 - events / at_risk)
    return np.concatenate([[0.0], times]), np.concatenate([[1.0], survival])


def metrics(task: str, predictions: np.ndarray, samples: Samples) -> dict[str, float]:
    """Metrics of (N, K) probabilities or (N,) values/risks against the samples' targets."""
    targets = samples.targets.numpy()
    if task in ("cls", "seq"):
        labels = predictions.argmax(axis=1)
        result = {
            "accuracy": float(accuracy_score(targets, labels)),
            "balanced_accuracy": float(balanced_accuracy_score(targets, labels)),
        }
        if task == "cls":
            present = np.unique(targets)
            # Renormalised over the classes present; a model that gives them all 0 (a kNN vote, a head fitted
            # without them) ranks that sample as a tie rather than making the AUC undefined.
            probabilities = predictions[:, present] + 1e-12
            probabilities /= probabilities.sum(axis=1, keepdims=True)
            if len(present) < 2:
                result["auc"] = float("nan")
            elif len(present) == 2:  # binary, or only two of more classes among the test subjects
                result["auc"] = float(roc_auc_score(targets == present[1], probabilities[:, 1]))
            else:
                result["auc"] = float(roc_auc_score(targets, probabilities, multi_class="ovr", labels=present))
        return result
    if task == "reg":
        error = predictions - targets
        total = ((targets - targets.mean()) ** 2).sum()
        return {
            "mae": float(np.abs(error).mean()),
            "rmse": float(np.sqrt((error**2).mean())),
            "r2": float(1 - (error**2).sum() / total) if total > 0 else float("nan"),
        }
    return {"c_index": c_index(predictions, targets, samples.events.numpy())}


def baseline_predictions(task: str, train: Samples, test: Samples, classes: int, seed: int) -> dict[str, np.ndarray]:
    """Predictions of the baselines on ``test`` after fitting on ``train`` (pooled embeddings)."""
    x_train, x_test, y_train = train.pooled(), test.pooled(), train.targets.numpy()
    neighbours = max(1, min(5, len(train) - 1))
    if task in ("cls", "seq"):
        result = {}
        majority = np.zeros((len(test), classes))
        majority[:, np.bincount(y_train, minlength=classes).argmax()] = 1
        result["majority"] = majority
        if len(np.unique(y_train)) > 1:
            for name, model in (
                ("linear", LogisticRegression(max_iter=2000)),
                ("knn", KNeighborsClassifier(neighbours)),
            ):
                fitted = make_pipeline(StandardScaler(), model).fit(x_train, y_train)
                probabilities = np.zeros((len(test), classes))
                probabilities[:, fitted.classes_] = fitted.predict_proba(x_test)
                result[name] = probabilities
        return result
    if task == "reg":
        models = {"linear": Ridge(alpha=1.0), "knn": KNeighborsRegressor(neighbours)}
        fitted = {k: make_pipeline(StandardScaler(), m).fit(x_train, y_train) for k, m in models.items()}
        return {"mean": np.full(len(test), y_train.mean()), **{k: f.predict(x_test) for k, f in fitted.items()}}
    return {"linear": _linear_cox(train, test, seed), "mean": np.zeros(len(test))}


def _linear_cox(train: Samples, test: Samples, seed: int, epochs: int = 300) -> np.ndarray:
    """A ridge-penalised linear Cox model on standardised pooled embeddings; risks of ``test``."""
    torch.manual_seed(seed)
    x_train = torch.from_numpy(train.pooled())
    mean, std = x_train.mean(0), x_train.std(0, correction=0).clamp_min(1e-6)  # population std: defined for one subject
    model = torch.nn.Linear(x_train.shape[1], 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(epochs):
        loss = cox_loss(model((x_train - mean) / std)[:, 0], train.targets, train.events)
        loss = loss + 1e-2 * model.weight.pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return model((torch.from_numpy(test.pooled()) - mean) / std)[:, 0].numpy()


def fit_and_evaluate(
    manifest: Manifest, cache: FeatureCache, options: FitOptions, name: str, progress=None
) -> FitResult:
    """Fit a head for every label fraction and seed, measure it and the baselines on the test split
    (one row per fraction, seed and model). ``progress(done, total)`` follows the feature extraction."""
    stratify = options.column if options.task == "cls" else None
    if stratify:  # subjects without the label take no part (and cannot be stratified)
        manifest = dataclasses.replace(manifest, entries=tuple(e for e in manifest.entries if stratify in e.labels))
    split = manifest.split(options.split, stratify=stratify, seed=options.split_seed)
    splits, classes = collect(split, options, cache, progress)
    spec = HeadSpec(
        name=name,
        kind=options.task,
        target=options.column,
        modalities=() if options.task == "seq" else options.modalities,
        classes=classes,
        units={"reg": manifest.units.get(options.column, ""), "surv": "relative risk (log hazard)"}.get(
            options.task, ""
        ),
        aggregation=options.aggregation,
        width=splits["train"].tokens.shape[-1],
        encoder_sha256=cache.bundle.card.files[ENCODER_FILE],
    )
    rows, kept = [], None
    for fraction in sorted(options.label_fractions, reverse=True):
        for seed in options.seeds:
            train = label_subset(splits["train"], fraction, seed, options.task in ("cls", "seq"))
            run = spec
            if options.task == "reg":  # targets standardised with the labels this run may see
                targets = train.targets.float()
                std = float(targets.std()) if len(targets) > 1 else 1.0
                run = dataclasses.replace(spec, target_mean=float(targets.mean()), target_std=max(std, 1e-6))
            head, weight_decay = fit_volume_head(run, {**splits, "train": train}, options, seed)
            predictions = {"head": predict(run, head, splits["test"])}
            predictions.update(baseline_predictions(options.task, train, splits["test"], len(classes), seed))
            for model, values in predictions.items():
                row = {"label_fraction": fraction, "seed": seed, "model": model, "train_samples": len(train)}
                row["weight_decay"] = weight_decay if model == "head" else ""
                rows.append({**row, **metrics(options.task, values, splits["test"])})
            if kept is None:
                kept = (head, predictions["head"], run)
    first = [r for r in rows if r["model"] == "head"][0]
    spec = dataclasses.replace(
        kept[2],
        metrics={k: v for k, v in first.items() if k not in ("label_fraction", "seed", "model", "weight_decay")},
        training=HeadTraining(
            data=manifest.source,
            split=options.split,
            split_seed=options.split_seed,
            stratify=stratify,
            event=options.event if options.task == "surv" else None,
            label_fraction=first["label_fraction"],
            seed=first["seed"],
            epochs=options.epochs,
            weight_decay=first["weight_decay"],
            test_subjects=len(set(splits["test"].subjects)),
        ),
    )
    return FitResult(spec, kept[0], rows, splits["test"], kept[1])


def summary_table(rows: list[dict], task: str) -> str:
    """Markdown: mean ± std over seeds of every metric, per label fraction and model."""
    names = [k for k in rows[0] if k not in ("label_fraction", "seed", "model", "train_samples", "weight_decay")]
    lines = ["| label fraction | model | train samples | " + " | ".join(names) + " |"]
    lines.append("|" + " --- |" * (3 + len(names)))
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["label_fraction"], row["model"]), []).append(row)
    for (fraction, model), members in groups.items():
        cells = []
        for metric in names:
            values = np.array([m[metric] for m in members], dtype=float)
            cells.append(f"{values.mean():.3f} ± {values.std():.3f}" if len(values) > 1 else f"{values[0]:.3f}")
        samples = members[0]["train_samples"]
        bold = "**" if model == "head" else ""
        lines.append(f"| {fraction:g} | {bold}{model}{bold} | {samples} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\nPrimary metric: {PRIMARY[task]}.\n"


def write_report(result: FitResult, folder: str | Path) -> list[Path]:
    """``metrics.csv``, ``metrics.md`` and ``metrics.png`` (primary metric vs label fraction, every
    model, mean and spread over seeds); for survival also ``kaplan_meier.png`` of the kept head's
    test subjects split at the median predicted risk."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    task, rows = result.spec.kind, result.rows
    names = list(dict.fromkeys(k for row in rows for k in row))
    with open(folder / "metrics.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=names)
        writer.writeheader()
        writer.writerows(rows)
    title = f"Head '{result.spec.name}' ({task}, target {result.spec.target})"
    (folder / "metrics.md").write_text(f"# {title}\n\n" + summary_table(rows, task))
    metric = PRIMARY[task]
    figure, axes = plt.subplots(figsize=(5, 3.5), dpi=120)
    for model in dict.fromkeys(r["model"] for r in rows):
        fractions = sorted({r["label_fraction"] for r in rows if r["model"] == model})
        values = [[r[metric] for r in rows if r["model"] == model and r["label_fraction"] == f] for f in fractions]
        axes.errorbar(fractions, [np.mean(v) for v in values], yerr=[np.std(v) for v in values], marker="o",
                      capsize=3, label=model, linewidth=2.5 if model == "head" else 1)  # fmt: skip
    axes.set_xscale("log")
    fractions = sorted({r["label_fraction"] for r in rows})
    axes.set_xticks(fractions, [f"{f:g}" for f in fractions])
    axes.minorticks_off()
    axes.set(xlabel="label fraction of the training subjects", ylabel=metric, title=title)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(folder / "metrics.png")
    written = [folder / "metrics.csv", folder / "metrics.md", folder / "metrics.png"]
    if task == "surv":
        figure, axes = plt.subplots(figsize=(5, 3.5), dpi=120)
        times, events = result.test.targets.numpy(), result.test.events.numpy()
        high = result.test_predictions > np.median(result.test_predictions)
        for group, label in ((~high, "lower predicted risk"), (high, "higher predicted risk")):
            if group.any():
                x, y = kaplan_meier(times[group], events[group])
                axes.step(x, y, where="post", label=f"{label} (n={int(group.sum())})")
        axes.set(xlabel=f"time ({result.spec.target})", ylabel="survival", ylim=(0, 1.05), title="Kaplan-Meier, test")
        axes.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(folder / "kaplan_meier.png")
        written.append(folder / "kaplan_meier.png")
    plt.close("all")
    return written


def evaluate_bundle(
    bundle: Bundle,
    manifest: Manifest,
    cache_folder: str | Path | None = None,
    device: str = "auto",
    every_subject: bool = False,
    names: tuple[str, ...] = (),
    progress=None,
) -> list[dict]:
    """Metrics of the bundle's heads (or those named) on a manifest: one row per head and metric.

    Args:
        every_subject: score all subjects (an external dataset); otherwise the test subjects of the
            split each head was fitted with (same fractions and seed).
    """
    specs = [s for s in bundle.card.heads if not names or s.name in names]
    missing = sorted(set(names) - {s.name for s in specs})
    if missing or not specs:
        raise BrainDINOError(f"{bundle.path}: no heads named {missing}" if missing else f"{bundle.path}: has no heads")
    rows = []
    for spec in specs:
        fractions = {"test": 1.0} if every_subject else spec.training.split
        stratify = None if every_subject else spec.training.stratify
        split = manifest.split(fractions, stratify=stratify, seed=spec.training.split_seed)
        head = bundle.load_head(spec)
        if spec.kind == "seg":
            options = SegOptions(spec.modalities, spec.layers, spec.label_values, spec.classes)
            cache = FeatureCache(bundle, cache_folder, spec.layers, device)
            volumes = collect_segmentation(split, options, cache, progress, splits=("test",))["test"]
            values, count = segmentation_metrics(spec, head, volumes), len(volumes)
        else:
            event = spec.training.event or "event"
            options = FitOptions(spec.kind, spec.target, event, modalities=spec.modalities or ("t1",))
            cache = FeatureCache(bundle, cache_folder, device=device)
            test = collect(split, options, cache, progress, classes=spec.classes, splits=("test",))[0]["test"]
            values, count = metrics(spec.kind, predict(spec, head, test), test), len(test)
        rows += [
            {"head": spec.name, "kind": spec.kind, "samples": count, "metric": k, "value": v} for k, v in values.items()
        ]
    return rows
