"""Simple models on the same held-out samples as a head, so its metrics have a reference: on the mean-pooled
embedding, logistic regression / ridge / a linear Cox model and kNN; without it, the majority class or the training
mean (the "knows nothing" reference)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.neighbors import KNeighborsClassifier, KNeighborsRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from .metrics import cox_loss

if TYPE_CHECKING:
    from .fit_heads import Samples


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
