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


def prediction_columns(name: str, prediction: dict) -> dict[str, object]:
    """A prediction as summary columns whose titles carry the units: ``age [years]``, ``tumor [mL]``, ``diagnosis``
    with ``diagnosis [probability]``."""
    kind = prediction["kind"]
    if "probabilities" in prediction:
        chosen = prediction["prediction"]
        return {name: chosen, f"{name} [probability]": round(prediction["probabilities"][chosen], 4)}
    if kind == "seg":
        return {f"{name} [mL]": prediction["total_ml"]}
    return {f"{name} [{prediction['units']}]": round(prediction["value"], 4)}


def summary_table(rows: list[dict]) -> dict[str, list[str]]:
    """A cohort summary's rows (``summary.json``) as text columns: ``summary.csv`` and the Slicer table node."""
    flat = []
    for row in rows:
        values = {k: v for k, v in row.items() if k not in ("predictions", "timings_s", "warnings")}
        for name, prediction in row["predictions"].items():
            values.update(prediction_columns(name, prediction))
        values["warnings"] = " | ".join(row["warnings"])
        flat.append(values)
    titles = list(dict.fromkeys(key for values in flat for key in values))
    return {title: ["" if v.get(title) is None else str(v[title]) for v in flat] for title in titles}
