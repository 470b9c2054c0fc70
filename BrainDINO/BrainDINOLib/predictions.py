"""How results are put into words and table rows (the report, the Slicer panel and table), without torch."""

from __future__ import annotations


def prediction_text(name: str, prediction: dict) -> str:
    """One line for the report: ``diagnosis: AD (0.62; CN 0.20, MCI 0.18)``, ``age: 54.3 years``."""
    if "probabilities" in prediction:
        chosen, probabilities = prediction["prediction"], prediction["probabilities"]
        others = ", ".join(f"{c} {p:.2f}" for c, p in probabilities.items() if c != chosen)
        return f"{name}: {chosen} ({probabilities[chosen]:.2f}; {others})"
    if prediction["kind"] == "seg":
        parts = ", ".join(f"{c} {v:.1f} mL" for c, v in prediction["volumes_ml"].items())
        return f"{name}: {prediction['total_ml']:.1f} mL segmented ({parts})"
    if prediction["kind"] == "surv":
        return f"{name}: risk score {prediction['value']:+.2f} (log hazard; higher = shorter expected survival)"
    return f"{name}: {prediction['value']:.1f} {prediction['units']}".rstrip()


TASK_NAMES = {
    "seq": "sequence type",
    "cls": "classification",
    "reg": "regression",
    "surv": "survival risk",
    "seg": "segmentation",
}


def prediction_row(name: str, prediction: dict) -> dict[str, str]:
    """One row of the prediction table: head, task, result (class, value or volume), its units and details."""
    kind = prediction["kind"]
    if "probabilities" in prediction:
        result, units = prediction["prediction"], "probability"
        details = ", ".join(f"{c} {p:.2f}" for c, p in prediction["probabilities"].items())
    elif kind == "seg":
        result, units = f"{prediction['total_ml']:.1f}", "mL"
        details = ", ".join(f"{c} {v:.1f}" for c, v in prediction["volumes_ml"].items())
    else:
        result = f"{prediction['value']:+.2f}" if kind == "surv" else f"{prediction['value']:.1f}"
        units = prediction["units"]
        details = "higher = shorter expected survival" if kind == "surv" else ""
    return {"Head": name, "Task": TASK_NAMES[kind], "Result": result, "Units": units, "Details": details}


def ood_warning(model: str, ood: dict) -> str:
    """The one line that says a scan is out of distribution (stderr, report, Slicer)."""
    return (
        f"OUT OF DISTRIBUTION: this scan is unlike the scans model '{model}' was fitted on (atypicality "
        f"{ood['ood_score']:.2f} x the calibrated threshold); its predictions are unreliable"
    )
