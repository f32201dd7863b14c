"""Perturbation consistency of processed cell embeddings, via :func:`curation.phenoprint.perturbation_consistency`.

For each perturbation: the mean pairwise cosine similarity of its cells against a null of equally sized
random cell sets (drawn from a uniform reservoir of all cells, controls included); the metric is the share
of scored perturbations (≥ 2 cells, a p-value) with p < ``p_threshold`` (0.01).
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
import pandas as pd

from curation.phenoprint import perturbation_consistency

P_THRESHOLD = 0.01
N_NULL_SETS = 1000
RESERVOIR = 20000


def consistency_scores(chunks: Iterable[tuple[int, int, np.ndarray]], labels: np.ndarray, n_null: int = N_NULL_SETS,
                       seed: int = 0, reservoir: int = RESERVOIR) -> pd.DataFrame:
    """Per-perturbation table (perturbation, n_cells, consistency, null_mean, p_value), sorted by label.

    chunks: ``(start, stop, embeddings (stop−start, d))`` over all cells in order; labels (n_cells,) object,
    None for cells that are not scored (controls, unlabelled) but still join the null pool.
    """
    if n_null < 1000:
        raise ValueError(f"n_null must be >= 1000 for p-values down to 0.001, got {n_null}")

    def labelled() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start, stop, emb in chunks:
            yield emb, labels[start:stop]

    return perturbation_consistency(labelled(), n_null=n_null, seed=seed, reservoir=reservoir)


def consistency_summary(scores: pd.DataFrame, p_threshold: float = P_THRESHOLD) -> dict[str, float]:
    """``consistency_fraction`` (share of perturbations with a p-value that have p < p_threshold),
    ``consistency_n_scored`` and ``consistency_median`` (median of consistency − null mean)."""
    scored = scores[scores["p_value"].notna()]
    n = len(scored)
    excess = (scored["consistency"] - scored["null_mean"]).to_numpy()
    return {"consistency_fraction": float((scored["p_value"] < p_threshold).mean()) if n else float("nan"),
            "consistency_n_scored": n,
            "consistency_median_excess": float(np.median(excess)) if n else float("nan")}
