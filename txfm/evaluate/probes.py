"""Cell-level probes: how well a label (perturbation, cell type) can be read off processed cell embeddings.

kNN (cosine, majority of ``k`` neighbours) and a linear probe (standardised features → multinomial logistic
regression), both cross-validated by batch with ``GroupKFold`` so that a cell is never classified by cells
of its own batch. At most ``max_cells`` cells (uniform without replacement) and only labels with at least
``min_cells_per_label`` of them are used; the mean accuracy over folds is reported.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pandas as pd
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

MAX_CELLS = 20000
MIN_CELLS_PER_LABEL = 5
N_FOLDS = 5
KNN_K = 10


def probe_subsample(labels: np.ndarray, max_cells: int = MAX_CELLS, min_cells_per_label: int = MIN_CELLS_PER_LABEL,
                    seed: int = 0) -> np.ndarray:
    """Sorted row indices (m,) of at most ``max_cells`` labelled cells whose label keeps ≥ min_cells_per_label."""
    labelled = np.flatnonzero(pd.notna(labels))
    rng = np.random.default_rng([int(seed), 0x9B0BE])
    if labelled.size > max_cells:
        labelled = np.sort(rng.choice(labelled, size=max_cells, replace=False))
    counts = pd.Series(labels[labelled]).value_counts()
    keep = pd.Series(labels[labelled]).map(counts).to_numpy() >= min_cells_per_label
    return labelled[keep]


def cell_probes(embeddings: np.ndarray, labels: np.ndarray, groups: np.ndarray, n_folds: int = N_FOLDS,
                k: int = KNN_K, seed: int = 0) -> dict[str, Any]:
    """kNN and linear-probe accuracy, GroupKFold over ``groups`` (batches).

    embeddings (m, d), labels (m,), groups (m,). Returns ``knn_accuracy``, ``linear_probe_accuracy``,
    ``probe_n_cells``, ``probe_n_labels``, ``probe_n_folds``; NaN accuracies (with ``probe_note``) when there
    are fewer than 2 batches or 2 labels.
    """
    labels = np.asarray(labels, dtype=str)
    n_groups, n_labels = len(np.unique(groups)), len(np.unique(labels))
    result: dict[str, Any] = {"probe_n_cells": int(len(labels)), "probe_n_labels": int(n_labels),
                              "probe_n_folds": 0, "knn_accuracy": float("nan"), "linear_probe_accuracy": float("nan")}
    if n_groups < 2 or n_labels < 2:
        result["probe_note"] = f"needs >= 2 batches and >= 2 labels, got {n_groups} and {n_labels}"
        return result
    folds = GroupKFold(n_splits=min(n_folds, n_groups))
    knn_scores, linear_scores = [], []
    for train, test in folds.split(embeddings, labels, groups):
        knn = KNeighborsClassifier(n_neighbors=min(k, len(train)), metric="cosine", algorithm="brute")
        knn_scores.append(knn.fit(embeddings[train], labels[train]).score(embeddings[test], labels[test]))
        if len(np.unique(labels[train])) < 2:  # a one-class training fold has no linear probe
            continue
        linear = make_pipeline(StandardScaler(), LogisticRegression(max_iter=100, random_state=seed))
        with warnings.catch_warnings():  # a probe that has not fully converged is still a fair probe
            warnings.simplefilter("ignore", ConvergenceWarning)
            linear_scores.append(linear.fit(embeddings[train], labels[train]).score(embeddings[test], labels[test]))
    result.update(probe_n_folds=folds.get_n_splits(), knn_accuracy=float(np.mean(knn_scores)),
                  linear_probe_accuracy=float(np.mean(linear_scores)) if linear_scores else float("nan"))
    return result
