"""Metrics of heads and baselines on held-out samples, and the survival statistics they share.

- cls: AUC (one-vs-rest macro for more than two classes), balanced accuracy, accuracy;
- seq: accuracy, balanced accuracy;
- reg: MAE and RMSE in the target's units, R²;
- surv: Harrell's C-index; Kaplan-Meier curves (`head_report`); the negative Cox partial log-likelihood is
  the loss of survival heads and of the linear Cox baseline.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

if TYPE_CHECKING:
    from .fit_heads import Samples

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


def cox_loss(risk: torch.Tensor, times: torch.Tensor, events: torch.Tensor) -> torch.Tensor:
    """Negative Cox partial log-likelihood (Breslow for tied times), averaged over events."""
    order = torch.argsort(times, descending=True, stable=True)
    risk, events, times = risk[order], events[order], times[order]
    _, counts = torch.unique_consecutive(times, return_counts=True)
    last_tied = torch.repeat_interleave(torch.cumsum(counts, 0) - 1, counts)  # the risk set includes every tie
    log_risk_set = torch.logcumsumexp(risk, dim=0)[last_tied]  # over everyone still at risk (time >= own time)
    return -((risk - log_risk_set) * events).sum() / events.sum().clamp_min(1)
