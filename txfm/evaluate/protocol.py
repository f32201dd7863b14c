"""The paper's zero-shot perturbation benchmark (TxFM paper, appendix B.1.1, after Bendidi et al. 2024).

Per embedder, on the (raw) cell embeddings of the screen:

1. **Post-processing choices** (B.1.1: "centering on negative controls, standardization, and TVN"), each
   applied per batch on that batch's control cells:

   * ``center``      — subtract the batch's control mean;
   * ``standardize`` — subtract the batch's control mean, divide by its control std (z-scores; the std floors
     and ±10 clip of :mod:`txfm.evaluate.postprocess`);
   * ``tvn``         — typical variation normalisation (Ando et al. 2017): ``standardize``, then a PCA fitted
     on the control cells, applied with whitening (controls get identity covariance).

2. **Tasks** (one score in [0, 1] each; the paper prints ×100 except iLISI), every one computed for every
   choice and each of ``N_SEEDS`` = 5 seeds, then reported as mean ± std over seeds:

   * ``ilisi`` — batch mixing: per cell, the inverse Simpson index of the batch labels of its ``ILISI_K``
     nearest neighbours (Euclidean, uniform weights), rescaled to [0, 1] as ``(LISI − 1) / (B − 1)``;
     averaged per batch, then across batches (B.1.1 "averaged across all batches");
   * ``lin``   — a multinomial logistic regression (standardised features) of the perturbation label trained
     on some batches and tested on unseen batches: mean of top-1 and top-5 accuracy;
   * ``knn``   — retrieval across disjoint batches: a test cell's nearest neighbours (cosine) among the training
     batches' cells; hit@1 and hit@5 (a neighbour with the same perturbation), averaged;
   * ``pcst``  — perturbation consistency (B.1.1): after a PCA fitted on the control cells and per-batch
     standardisation, the null is the cosine similarity of ``N_NULL_CELLS`` = 10,000 random cells (all cells
     when fewer) to the mean embedding of each perturbation, dropping the pairs where the random cell belongs
     to that perturbation; a perturbation's score is the mean leave-one-out cosine of its cells to the mean of
     its other cells; p = (1 + #{null ≥ score}) / (1 + #null) against that perturbation's null column; the
     task score is the share of perturbations (≥ 2 cells) with p < 0.01;
   * ``bmdb``  — known-relationship recall of the perturbation means (cosine beyond the 5th/95th percentile of
     random pairs, :mod:`txfm.evaluate.recall`), averaged across databases;
   * ``inv``   — invertibility: a ridge regression decodes the embedding into Lib+Log expression of the
     ``INV_GENES`` most variable genes (fit on the training batches, scored on the test batches); the mean
     of (a) the Spearman correlation, per test cell across genes, of decoded vs actual control-centred
     expression and (b) structural integrity ``1 − SD / SD_max`` with
     ``SD = mean_b ‖Ỹ_pred⁽ᵇ⁾ − Ỹ_actual⁽ᵇ⁾‖_F / n_b`` (Ỹ centred on the batch's control mean of the
     predicted / actual matrix) and ``SD_max`` the same distance for a prediction of no change (Ỹ_pred = 0);
     clipped to [0, 1];
   * with a cell-type label column (B.2.1): ``nmi`` / ``ari`` of k-means clusterings (10 cluster counts
     around the number of labels, the one with the best NMI kept) and ``asw`` = (silhouette + 1) / 2.

3. **Aggregation** (B.1.1): seeds are averaged; for each task and embedder the post-processing choice with
   the best mean is kept; ``avg`` is the mean of the six task scores.

Where the paper is silent we chose: test batches = 25 % of the batches (at least one) drawn per seed, shared
by lin / knn / inv; control cells are neither probe labels nor scored perturbations; test cells whose
perturbation never occurs in the training batches are dropped from the probes; the consistency PCA keeps
``n_components`` components without whitening and the per-batch standardisation uses all of the batch's
cells; the null is per perturbation (its column of the random-cell × perturbation matrix); uniform-kernel
iLISI (the paper does not give LISI's perplexity); k-means instead of Louvain (no graph library here).
Metrics run on at most ``max_cells`` cells (uniform subsample, all cells on small screens), held in memory.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import rankdata
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score
from sklearn.neighbors import NearestNeighbors
from sklearn.preprocessing import StandardScaler

from txfm.evaluate.postprocess import Z_CLIP, control_statistics_dense
from txfm.evaluate.recall import relationship_recall, unit_rows

POSTPROCESS_CHOICES = ("center", "standardize", "tvn")
TASKS = ("ilisi", "lin", "knn", "pcst", "bmdb", "inv")
CLUSTER_METRICS = ("nmi", "ari", "asw")
#: The components each task score averages (reported beside it, from the task's chosen post-processing).
PARTS = {"lin": ("lin_top1", "lin_top5"), "knn": ("knn_top1", "knn_top5"),
         "inv": ("inv_spearman", "inv_structural_integrity")}
N_SEEDS = 5
N_NULL_CELLS = 10_000
P_THRESHOLD = 0.01
ILISI_K = 30
TOP_K = (1, 5)
TEST_BATCH_FRACTION = 0.25
INV_GENES = 1000
RIDGE_ALPHA = 1.0
MAX_CELLS = 20_000
N_CLUSTER_COUNTS = 10


# ------------------------------------------------------------------------------------------------ post-processing

def postprocess(emb: np.ndarray, batch: np.ndarray, is_control: np.ndarray, choice: str,
                n_components: int = 128) -> np.ndarray:
    """One post-processing choice (module docstring) of an embedding (n, d) → (n, d) or (n, k) for ``tvn``."""
    if choice not in POSTPROCESS_CHOICES:
        raise ValueError(f"unknown post-processing {choice!r}; expected one of {', '.join(POSTPROCESS_CHOICES)}")
    emb = np.asarray(emb, dtype=np.float64)
    stats = control_statistics_dense(emb, batch, is_control, int(batch.max()) + 1)
    if choice == "center":
        return emb - stats.mean[batch]
    z = stats.standardise(emb, batch)
    if choice == "standardize":
        return z
    return tvn(z, is_control, n_components)


def _control_pca(x: np.ndarray, is_control: np.ndarray, n_components: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PCA of the control rows of ``x`` (n, d): (control mean (d,), components (k, d), control variances (k,)),
    k = min(n_components, d, n_controls − 1)."""
    controls = x[is_control]
    mean = controls.mean(axis=0)
    _, singular, components = np.linalg.svd(controls - mean, full_matrices=False)
    k = min(int(n_components), x.shape[1], len(controls) - 1)
    return mean, components[:k], singular[:k] ** 2 / (len(controls) - 1)


def tvn(z: np.ndarray, is_control: np.ndarray, n_components: int = 128) -> np.ndarray:
    """PCA fitted on the control rows of ``z`` (n, d), applied to all rows with whitening → (n, k).

    k = min(n_components, d, n_controls − 1); components with ~zero control variance are set to 0.
    """
    mean, components, variance = _control_pca(z, is_control, n_components)
    usable = variance > 1e-12 * max(float(variance.max(initial=0.0)), np.finfo(np.float64).tiny)
    scale = np.divide(1.0, np.sqrt(variance), out=np.zeros_like(variance), where=usable)
    return ((z - mean) @ components.T) * scale


def consistency_alignment(emb: np.ndarray, batch: np.ndarray, is_control: np.ndarray,
                          n_components: int = 128) -> np.ndarray:
    """B.1.1's alignment before consistency: PCA fitted on the controls (no whitening), then per batch
    z-scores over all of the batch's cells (std floored at 1e-12). (n, d) → (n, k)."""
    mean, components, _ = _control_pca(emb, is_control, n_components)
    scores = (emb - mean) @ components.T
    out = np.empty_like(scores)
    for b in np.unique(batch):
        rows = batch == b
        std = scores[rows].std(axis=0)
        out[rows] = (scores[rows] - scores[rows].mean(axis=0)) / np.maximum(std, 1e-12)
    return out


# ------------------------------------------------------------------------------------------------ tasks

def consistency_paper(emb: np.ndarray, labels: np.ndarray, n_null: int = N_NULL_CELLS, seed: int = 0
                      ) -> pd.DataFrame:
    """Per-perturbation consistency table (perturbation, n_cells, consistency, null_mean, p_value), by label.

    emb (n, d); labels (n,) object, None for controls / unlabelled (never scored, but drawn as null cells).
    Module docstring, ``pcst``. Perturbations with one cell get NaN.
    """
    labels = np.asarray(labels, dtype=object)
    labelled = np.flatnonzero(pd.notna(labels))
    names = np.array(sorted(set(labels[labelled])), dtype=object)
    code = np.full(len(labels), -1, dtype=np.int64)
    code[labelled] = np.searchsorted(names, labels[labelled].astype(str).astype(object))
    units = unit_rows(emb)
    sums = np.zeros((len(names), emb.shape[1]))
    np.add.at(sums, code[labelled], np.asarray(emb, dtype=np.float64)[labelled])
    counts = np.bincount(code[labelled], minlength=len(names))
    means = sums / np.maximum(counts, 1)[:, None]
    # leave-one-out: cell i against the mean of its perturbation's other cells, ∝ (sum − x_i)
    loo = np.full(len(labels), np.nan)
    multi = labelled[counts[code[labelled]] >= 2]
    rest = sums[code[multi]] - np.asarray(emb, dtype=np.float64)[multi]
    loo[multi] = np.einsum("ij,ij->i", units[multi], unit_rows(rest))
    rng = np.random.default_rng([int(seed), 0xC0DE5])
    draws = rng.choice(len(labels), size=min(int(n_null), len(labels)), replace=False)
    null = units[draws] @ unit_rows(means).T  # (N, P)
    own = code[draws][:, None] == np.arange(len(names))[None, :]
    rows = []
    for p, name in enumerate(names):
        if counts[p] < 2:
            rows.append((name, int(counts[p]), np.nan, np.nan, np.nan))
            continue
        observed = float(np.mean(loo[code == p]))
        column = null[~own[:, p], p]
        rows.append((name, int(counts[p]), observed, float(column.mean()),
                     (1.0 + float(np.sum(column >= observed))) / (1.0 + column.size)))
    return pd.DataFrame(rows, columns=["perturbation", "n_cells", "consistency", "null_mean", "p_value"])


def consistency_fraction(table: pd.DataFrame, p_threshold: float = P_THRESHOLD) -> float:
    """Share of scored perturbations (a p-value) with p < ``p_threshold``."""
    scored = table["p_value"].dropna()
    return float((scored < p_threshold).mean()) if len(scored) else float("nan")


def ilisi(emb: np.ndarray, batch: np.ndarray, k: int = ILISI_K) -> float:
    """Rescaled iLISI in [0, 1] (module docstring): per cell 1 / Σ_b p_b² over its k nearest neighbours
    (self excluded), (LISI − 1) / (B − 1); mean per batch, then mean over batches. NaN for one batch."""
    batches, codes = np.unique(batch, return_inverse=True)
    if len(batches) < 2:
        return float("nan")
    k = min(int(k), len(emb) - 1)
    _, neighbours = NearestNeighbors(n_neighbors=k + 1).fit(emb).kneighbors(emb)
    neighbours = neighbours[:, 1:]  # the first neighbour is the cell itself
    fractions = np.stack([(codes[neighbours] == b).mean(axis=1) for b in range(len(batches))], axis=1)
    lisi = 1.0 / np.square(fractions).sum(axis=1)
    scaled = (lisi - 1.0) / (len(batches) - 1)
    return float(np.mean([scaled[codes == b].mean() for b in range(len(batches))]))


def held_out_batches(batch: np.ndarray, seed: int, fraction: float = TEST_BATCH_FRACTION) -> np.ndarray:
    """Sorted batch codes held out for testing: round(fraction · B) ≥ 1 of the B ≥ 2 batches, seeded."""
    batches = np.unique(batch)
    if len(batches) < 2:
        raise ValueError(f"probes on unseen batches need at least 2 batches, got {len(batches)}")
    n_test = min(max(1, int(round(fraction * len(batches)))), len(batches) - 1)
    return np.sort(np.random.default_rng([int(seed), 0x7E57]).choice(batches, size=n_test, replace=False))


def _top_k_hits(ranked_labels: np.ndarray, truth: np.ndarray, k: int) -> float:
    return float(np.mean((ranked_labels[:, :k] == truth[:, None]).any(axis=1)))


def probes(emb: np.ndarray, labels: np.ndarray, train: np.ndarray, test: np.ndarray, seed: int = 0,
           top_k: tuple[int, ...] = TOP_K) -> dict[str, float]:
    """Linear probe and kNN retrieval of ``labels`` trained on rows ``train`` and scored on rows ``test``.

    emb (n, d), labels (n,) str; train/test: boolean masks (n,) of labelled rows in disjoint batches. Test
    rows whose label is absent from training are dropped. Returns ``lin_top<k>``, ``knn_top<k>`` for each k,
    and the task scores ``lin`` / ``knn`` (mean over k).
    """
    labels = np.asarray(labels, dtype=object).astype(str)
    seen = np.unique(labels[train])
    test = test & np.isin(labels, seen)
    out: dict[str, float] = {}
    if len(seen) < 2 or not test.any():
        return {**{f"{task}_top{k}": float("nan") for task in ("lin", "knn") for k in top_k},
                "lin": float("nan"), "knn": float("nan")}
    scaler = StandardScaler().fit(emb[train])
    model = LogisticRegression(max_iter=100, random_state=seed)
    with warnings.catch_warnings():  # a probe that has not fully converged is still a fair probe
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(scaler.transform(emb[train]), labels[train])
    probability = model.predict_proba(scaler.transform(emb[test]))
    ranked = model.classes_[np.argsort(-probability, axis=1, kind="stable")]
    truth = labels[test]
    for k in top_k:
        out[f"lin_top{k}"] = _top_k_hits(ranked, truth, k)
    n_neighbours = min(max(top_k), int(train.sum()))
    finder = NearestNeighbors(n_neighbors=n_neighbours, metric="cosine", algorithm="brute").fit(emb[train])
    _, neighbours = finder.kneighbors(emb[test])
    neighbour_labels = labels[train][neighbours]
    for k in top_k:
        out[f"knn_top{k}"] = _top_k_hits(neighbour_labels, truth, k)
    out["lin"] = float(np.mean([out[f"lin_top{k}"] for k in top_k]))
    out["knn"] = float(np.mean([out[f"knn_top{k}"] for k in top_k]))
    return out


def _row_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of each row pair of a, b (n, g) → (n,) (NaN where a row is constant)."""
    ra, rb = rankdata(a, axis=1), rankdata(b, axis=1)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    denominator = np.sqrt((ra * ra).sum(axis=1) * (rb * rb).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (ra * rb).sum(axis=1) / denominator, np.nan)


def _control_centred(y: np.ndarray, batch: np.ndarray, is_control: np.ndarray) -> np.ndarray:
    """Rows of y minus their batch's control mean (the pooled control mean for a batch without controls)."""
    out = np.empty_like(y)
    pooled = y[is_control].mean(axis=0)
    for b in np.unique(batch):
        rows = batch == b
        controls = rows & is_control
        out[rows] = y[rows] - (y[controls].mean(axis=0) if controls.any() else pooled)
    return out


def invertibility(emb: np.ndarray, expression: np.ndarray, batch: np.ndarray, is_control: np.ndarray,
                  train: np.ndarray, test: np.ndarray, alpha: float = RIDGE_ALPHA) -> dict[str, float]:
    """``inv_spearman``, ``inv_structural_integrity`` and their mean ``inv`` (module docstring).

    emb (n, d); expression (n, g) Lib+Log of the decoded genes; train/test boolean masks (n,) over disjoint
    batches (every cell of them, controls included).
    """
    decoder = Ridge(alpha=alpha).fit(emb[train], expression[train])
    predicted = decoder.predict(emb[test])
    actual_c = _control_centred(expression[test], batch[test], is_control[test])
    predicted_c = _control_centred(predicted, batch[test], is_control[test])
    spearman = float(np.nanmean(_row_spearman(predicted_c, actual_c)))
    distance, distance_max = [], []
    for b in np.unique(batch[test]):
        rows = batch[test] == b
        distance.append(np.linalg.norm(predicted_c[rows] - actual_c[rows]) / rows.sum())
        distance_max.append(np.linalg.norm(actual_c[rows]) / rows.sum())
    integrity = float(np.clip(1.0 - np.mean(distance) / max(np.mean(distance_max), 1e-300), 0.0, 1.0))
    return {"inv_spearman": spearman, "inv_structural_integrity": integrity, "inv": (spearman + integrity) / 2}


def clustering(emb: np.ndarray, labels: np.ndarray, seed: int = 0,
               n_counts: int = N_CLUSTER_COUNTS) -> dict[str, float]:
    """``nmi``, ``ari`` (k-means, the best-NMI of ``n_counts`` cluster counts from ½× to 2× the number of
    labels) and ``asw`` = (silhouette of the labels + 1) / 2, over labelled rows."""
    keep = pd.notna(labels)
    emb, labels = emb[keep], np.asarray(labels[keep], dtype=str)
    n_labels = len(np.unique(labels))
    if n_labels < 2:
        return {"nmi": float("nan"), "ari": float("nan"), "asw": float("nan")}
    candidates = np.unique(np.clip(np.round(n_labels * np.geomspace(0.5, 2.0, n_counts)), 2, len(labels) - 1))
    best = (-1.0, float("nan"))
    for n_clusters in candidates.astype(int):
        assigned = KMeans(n_clusters=n_clusters, n_init=1, random_state=seed).fit_predict(emb)
        nmi = normalized_mutual_info_score(labels, assigned)
        if nmi > best[0]:
            best = (nmi, adjusted_rand_score(labels, assigned))
    return {"nmi": float(best[0]), "ari": float(best[1]), "asw": float((silhouette_score(emb, labels) + 1) / 2)}


# ------------------------------------------------------------------------------------------------ the protocol

@dataclass
class CellSet:
    """The cells the metrics run on, shared by every embedder.

    ``batch`` (n,) int codes; ``is_control`` (n,) bool; ``perturbation`` (n,) object (None for controls);
    ``cell_type`` (n,) object or None; ``expression`` (n, g) float32 Lib+Log of the decoded genes;
    ``rows`` (n,) the screen rows they are.
    """

    rows: np.ndarray
    batch: np.ndarray
    is_control: np.ndarray
    perturbation: np.ndarray
    expression: np.ndarray
    cell_type: np.ndarray | None = None


@dataclass
class ProtocolResult:
    """``scores``: long table (postprocess, seed, metric, value); ``consistency`` / ``recall``: per-choice
    tables of seed 0; ``summary()``: mean/std per (postprocess, metric); ``best()``: the paper's row."""

    scores: pd.DataFrame
    consistency: pd.DataFrame
    recall: pd.DataFrame
    info: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> pd.DataFrame:
        grouped = self.scores.groupby(["postprocess", "metric"], sort=False)["value"]
        return grouped.agg(mean="mean", std=lambda v: float(np.std(v, ddof=0))).reset_index()

    def best(self) -> dict[str, Any]:
        """Per task the choice with the best mean over seeds: ``<task>``, ``<task>_std``, ``<task>_postprocess``;
        cluster metrics likewise; ``avg`` = mean of the six tasks (NaN tasks skipped)."""
        summary = self.summary()
        row: dict[str, Any] = {}
        for task in TASKS + CLUSTER_METRICS:
            rows = summary[(summary["metric"] == task) & summary["mean"].notna()]
            if rows.empty:
                continue
            top = rows.loc[rows["mean"].idxmax()]
            row.update({task: float(top["mean"]), f"{task}_std": float(top["std"]),
                        f"{task}_postprocess": top["postprocess"]})
            for part in PARTS.get(task, ()):  # the task's components, from the same choice
                match = summary[(summary["metric"] == part) & (summary["postprocess"] == top["postprocess"])]
                if len(match):
                    row[part] = float(match["mean"].iloc[0])
        values = [row[t] for t in TASKS if t in row]
        row["avg"] = float(np.mean(values)) if values else float("nan")
        return row


def run_protocol(emb: np.ndarray, cells: CellSet, databases: dict[str, pd.DataFrame], n_components: int = 128,
                 n_seeds: int = N_SEEDS, n_null_cells: int = N_NULL_CELLS, n_null_pairs: int = 5000,
                 p_threshold: float = P_THRESHOLD, seed: int = 0,
                 choices: tuple[str, ...] = POSTPROCESS_CHOICES) -> ProtocolResult:
    """Every post-processing choice × seed × task of one embedding (n, d) of ``cells``."""
    records, consistency_tables, recall_tables = [], [], []
    perturbed = pd.notna(cells.perturbation)
    names = np.array(sorted(set(cells.perturbation[perturbed])), dtype=object)
    for choice in choices:
        processed = postprocess(emb, cells.batch, cells.is_control, choice, n_components)
        aligned = consistency_alignment(processed, cells.batch, cells.is_control, n_components)
        sums = np.zeros((len(names), processed.shape[1]))
        codes = np.searchsorted(names, cells.perturbation[perturbed].astype(str).astype(object))
        np.add.at(sums, codes, processed[perturbed])
        aggregates = sums / np.bincount(codes, minlength=len(names))[:, None]
        batch_mixing = ilisi(processed, cells.batch)  # deterministic: the same for every seed
        for s in range(n_seeds):
            run_seed = seed + s
            metrics: dict[str, float] = {"ilisi": batch_mixing}
            held_out = np.isin(cells.batch, held_out_batches(cells.batch, run_seed))
            metrics.update(probes(processed, cells.perturbation, perturbed & ~held_out, perturbed & held_out,
                                  seed=run_seed))
            table = consistency_paper(aligned, cells.perturbation, n_null_cells, run_seed)
            metrics["pcst"] = consistency_fraction(table, p_threshold)
            recall = relationship_recall(aggregates, list(names), databases, n_null=n_null_pairs, seed=run_seed)
            metrics["bmdb"] = recall.summary()["recall_avg_5_95"]
            metrics.update(invertibility(processed, cells.expression, cells.batch, cells.is_control, ~held_out,
                                         held_out))
            if cells.cell_type is not None:
                metrics.update(clustering(processed, cells.cell_type, seed=run_seed))
            records += [(choice, run_seed, name, float(value)) for name, value in metrics.items()]
            if s == 0:
                consistency_tables.append(table.assign(postprocess=choice))
                recall_tables.append(recall.table.assign(postprocess=choice))
    return ProtocolResult(scores=pd.DataFrame(records, columns=["postprocess", "seed", "metric", "value"]),
                          consistency=pd.concat(consistency_tables, ignore_index=True),
                          recall=pd.concat(recall_tables, ignore_index=True),
                          info={"n_cells": int(len(emb)), "dim": int(emb.shape[1]), "n_perturbations": int(len(names))})
