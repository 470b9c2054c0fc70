"""What ``fit-head`` writes beside the bundle: ``metrics.csv``, ``metrics.md`` (mean ± std over seeds per label
fraction and model), ``metrics.png`` and, for survival, ``kaplan_meier.png``."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from .fit_heads import FitResult
from .metrics import PRIMARY, kaplan_meier


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
