"""The evaluation harness: every embedder through the same post-processing and metrics, then the report."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from curation.io import atomic_path
from curation.phenoprint import log_normalise
from txfm.evaluate import consistency as consistency_module
from txfm.evaluate import probes as probes_module
from txfm.evaluate import protocol as protocol_module
from txfm.evaluate import recall as recall_module
from txfm.evaluate.embedders import (EMBEDDER_NAMES, TARGET_SUM, CorpusPCAEmbedder, Embedder, HVGPCAEmbedder,
                                     LibLogEmbedder, RandomEmbedder, ScreenPCAEmbedder, TxFMEmbedder)
from txfm.evaluate.postprocess import EmbeddingSource, efaar
from txfm.evaluate.report import plot_consistency, plot_recall, write_frame, write_results
from txfm.evaluate.screen import Screen, open_screen

log = logging.getLogger(__name__)

RESULTS_STEM = "results"
RECALL_FILE, CONSISTENCY_FILE, REPORT_FILE = "recall.csv", "consistency.csv", "report.json"
RECALL_PLOT, CONSISTENCY_PLOT = "recall_by_database.png", "consistency.png"
GENE_WEIGHTS_FILE = "gene_weights.parquet"
PROTOCOL_FILE, PROTOCOL_SUMMARY_FILE = "protocol.csv", "protocol_summary.csv"
#: ``paper``: appendix B.1 of the TxFM paper (txfm.evaluate.protocol), the default; ``efaar``: the streamed
#: EFAAR pipeline (one post-processing, recall at 5/95 and 10/90, random-set consistency, cross-validated probes).
PROTOCOLS = ("paper", "efaar")


@dataclass
class EvaluationConfig:
    """Everything ``txfm evaluate`` needs; the CLI flags map one to one onto these fields."""

    input: Any  # h5ad path or AnnData of raw counts
    perturbation_column: str
    control_labels: list[str]
    batch_column: str
    out: str | Path
    checkpoint: str | None = None
    corpus: str | None = None
    embedders: list[str] | None = None  # None: liblog, hvg_pca, pca_screen (+ txfm, + pca_corpus with a corpus)
    label_column: str | None = None  # paper: cell-type clustering labels; efaar: the probes' label
    protocol: str = "paper"
    n_seeds: int = protocol_module.N_SEEDS
    n_null_cells: int = protocol_module.N_NULL_CELLS
    max_cells: int = protocol_module.MAX_CELLS  # paper protocol: cells the metrics run on (uniform subsample)
    inv_genes: int = protocol_module.INV_GENES
    screen_components: int = 50
    gene_column: str | None = None
    allow_normalised: bool = False
    n_components: int = 128  # post-processing PCA (capped by the embedding width and controls − 1)
    hvg_genes: int = 2000
    hvg_components: int = 50
    corpus_components: int = 50
    corpus_max_samples: int = 20000
    random_dim: int = 32
    relationships: str | None = None  # directory of <database>.txt; None = resources/gene_relationships
    databases: list[str] | None = None
    n_null_pairs: int = recall_module.N_NULL_PAIRS
    n_null_sets: int = consistency_module.N_NULL_SETS
    p_threshold: float = consistency_module.P_THRESHOLD
    reservoir: int = consistency_module.RESERVOIR
    probe_max_cells: int = probes_module.MAX_CELLS
    probe_min_cells: int = probes_module.MIN_CELLS_PER_LABEL
    probe_folds: int = probes_module.N_FOLDS
    knn_k: int = probes_module.KNN_K
    gene_weights: bool = True
    reconstruction: bool = True
    reconstruction_max_batches: int | None = None
    batch_size: int = 256
    n_input_genes: int | None = None
    device: str | None = None
    seed: int = 0
    progress: bool = True
    scratch_dir: str | None = None  # where processed embeddings are spilled; default a hidden folder in out

    def resolved_embedders(self) -> list[str]:
        """The embedder names to run, checked against the available inputs."""
        names = self.embedders
        if names is None:
            names = ((["txfm"] if self.checkpoint else []) + ["liblog", "hvg_pca", "pca_screen"]
                     + (["pca_corpus"] if self.corpus else []))
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {self.protocol!r}; expected one of {', '.join(PROTOCOLS)}")
        unknown = [n for n in names if n not in EMBEDDER_NAMES]
        if unknown:
            raise ValueError(f"unknown embedder(s) {', '.join(unknown)}; expected some of {', '.join(EMBEDDER_NAMES)}")
        if "txfm" in names and not self.checkpoint:
            raise ValueError("embedder txfm needs --checkpoint")
        if "pca_corpus" in names and not self.corpus:
            raise ValueError("embedder pca_corpus needs --corpus")
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"embedders must be a non-empty list without repeats, got {names}")
        return list(names)


def build_embedder(name: str, cfg: EvaluationConfig) -> Embedder:
    """An unfitted embedder by name, configured from ``cfg``."""
    if name == "txfm":
        return TxFMEmbedder(cfg.checkpoint, batch_size=cfg.batch_size, n_input_genes=cfg.n_input_genes, seed=cfg.seed,
                            device=cfg.device)
    if name == "liblog":
        return LibLogEmbedder()
    if name == "hvg_pca":
        return HVGPCAEmbedder(n_top_genes=cfg.hvg_genes, n_components=cfg.hvg_components)
    if name == "pca_screen":
        return ScreenPCAEmbedder(n_components=cfg.screen_components)
    if name == "pca_corpus":
        return CorpusPCAEmbedder(cfg.corpus, n_components=cfg.corpus_components, max_samples=cfg.corpus_max_samples)
    if name == "random":
        return RandomEmbedder(dim=cfg.random_dim, seed=cfg.seed)
    raise ValueError(f"unknown embedder {name!r}")


@dataclass
class EmbedderOutcome:
    """Metrics of one embedder: ``row`` (results-table row), long ``recall`` and ``consistency`` tables, ``info``."""

    row: dict[str, Any]
    recall: pd.DataFrame
    consistency: pd.DataFrame
    info: dict[str, Any] = field(default_factory=dict)
    scores: pd.DataFrame | None = None  # paper protocol: (embedder, postprocess, seed, metric, value)


def evaluate_embedder(screen: Screen, embedder: Embedder, cfg: EvaluationConfig, databases: dict[str, pd.DataFrame],
                      scratch: Path) -> EmbedderOutcome:
    """Fit ``embedder`` on the screen, post-process (EFAAR), and compute recall, consistency and probes."""
    started = time.perf_counter()
    embedder.fit(screen, cfg.progress)
    source = EmbeddingSource(screen, embedder, scratch, cfg.progress)
    try:
        processed = efaar(source, scratch, cfg.n_components)
    finally:
        source.remove()
    try:
        recall = recall_module.relationship_recall(processed.aggregates, list(processed.perturbations), databases,
                                                   n_null=cfg.n_null_pairs, seed=cfg.seed)
        scores = consistency_module.consistency_scores(processed.cells.chunks(), screen.perturbation_labels,
                                                       n_null=cfg.n_null_sets, seed=cfg.seed, reservoir=cfg.reservoir)
        row: dict[str, Any] = {"embedder": embedder.name, "level": "cells", "dim": int(embedder.dim),
                               "n_components": int(processed.n_components)}
        row.update(recall.summary())
        row.update(consistency_module.consistency_summary(scores, cfg.p_threshold))
        if screen.label is not None:
            rows = probes_module.probe_subsample(screen.label, cfg.probe_max_cells, cfg.probe_min_cells, cfg.seed)
            probe = probes_module.cell_probes(processed.cells.gather(rows), screen.label[rows], screen.batch[rows],
                                              n_folds=cfg.probe_folds, k=cfg.knn_k, seed=cfg.seed)
            row.update({key: value for key, value in probe.items() if key != "probe_note"})
            if "probe_note" in probe:
                log.warning("%s: probes skipped: %s", embedder.name, probe["probe_note"])
    finally:
        processed.cells.remove()
    info = {"embedder": embedder.info(), "postprocess": processed.info(),
            "recall_cutoffs": {recall_module.threshold_tag(*key): list(value) for key, value in recall.cutoffs.items()},
            "seconds": round(time.perf_counter() - started, 3)}
    return EmbedderOutcome(row=row, recall=recall.table.assign(embedder=embedder.name),
                           consistency=scores.assign(embedder=embedder.name), info=info)


def build_cell_set(screen: Screen, cfg: EvaluationConfig) -> protocol_module.CellSet:
    """The cells the paper protocol scores (all, or a uniform subsample of ``cfg.max_cells``) and their Lib+Log
    expression over the ``cfg.inv_genes`` most variable genes (the invertibility targets); two screen passes."""
    rows = np.arange(screen.n_cells)
    if screen.n_cells > cfg.max_cells:
        rng = np.random.default_rng([int(cfg.seed), 0x5B5E7])
        rows = np.sort(rng.choice(screen.n_cells, size=cfg.max_cells, replace=False))

    def chosen(desc: str):
        for start, stop, counts in screen.chunks(desc, cfg.progress):
            lo, hi = np.searchsorted(rows, [start, stop])
            if hi > lo:
                yield lo, hi, log_normalise(counts[rows[lo:hi] - start], TARGET_SUM)

    total, total_sq = np.zeros(screen.n_features), np.zeros(screen.n_features)
    for _, _, x in chosen("cells: gene variance"):
        total += np.asarray(x.sum(axis=0)).ravel()
        total_sq += np.asarray(x.multiply(x).sum(axis=0)).ravel()
    variance = total_sq / rows.size - (total / rows.size) ** 2
    varying = np.flatnonzero(variance > 0)
    genes = np.sort(varying[np.argsort(-variance[varying], kind="stable")[:cfg.inv_genes]])
    if genes.size == 0:
        raise ValueError(f"{screen.label_for_errors}: no gene varies across the scored cells")
    expression = np.empty((rows.size, genes.size), dtype=np.float32)
    for lo, hi, x in chosen("cells: expression"):
        expression[lo:hi] = x[:, genes].toarray()
    labels = screen.perturbation_labels[rows]
    return protocol_module.CellSet(rows=rows, batch=screen.batch[rows], is_control=screen.is_control[rows],
                                   perturbation=labels, expression=expression,
                                   cell_type=screen.label[rows] if screen.label is not None else None)


def gather_embedding(source: EmbeddingSource, rows: np.ndarray) -> np.ndarray:
    """Raw embedding (len(rows), dim) float32 of the sorted screen rows ``rows``, streaming over the screen."""
    out = np.empty((rows.size, source.embedder.dim), dtype=np.float32)
    for start, stop, emb in source.chunks("embed"):
        lo, hi = np.searchsorted(rows, [start, stop])
        out[lo:hi] = emb[rows[lo:hi] - start]
    return out


def evaluate_embedder_paper(screen: Screen, embedder: Embedder, cfg: EvaluationConfig,
                            databases: dict[str, pd.DataFrame], scratch: Path,
                            cells: protocol_module.CellSet) -> EmbedderOutcome:
    """Fit ``embedder`` and run the paper protocol (every post-processing choice × seed × task) on ``cells``."""
    started = time.perf_counter()
    embedder.fit(screen, cfg.progress)
    source = EmbeddingSource(screen, embedder, scratch, cfg.progress)
    try:
        emb = gather_embedding(source, cells.rows)
    finally:
        source.remove()
    result = protocol_module.run_protocol(emb, cells, databases, n_components=cfg.n_components, n_seeds=cfg.n_seeds,
                                          n_null_cells=cfg.n_null_cells, n_null_pairs=cfg.n_null_pairs,
                                          p_threshold=cfg.p_threshold, seed=cfg.seed)
    best = result.best()
    row: dict[str, Any] = {"embedder": embedder.name, "level": "cells", "dim": int(embedder.dim), **best}
    info = {"embedder": embedder.info(), "protocol": result.info, "seconds": round(time.perf_counter() - started, 3)}
    return EmbedderOutcome(row=row, recall=result.recall.assign(embedder=embedder.name),
                           consistency=result.consistency.assign(embedder=embedder.name), info=info,
                           scores=result.scores.assign(embedder=embedder.name))


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else float(value)
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


def run_evaluation(cfg: EvaluationConfig) -> pd.DataFrame:
    """Run every requested evaluation and write the outputs into ``cfg.out``; returns the results table.

    Files: results.csv / results.md (one row per embedder), recall.csv (per database and threshold),
    consistency.csv (per perturbation), recall_by_database.png, consistency.png, report.json, and
    gene_weights.parquet with a checkpoint.
    """
    names = cfg.resolved_embedders()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    databases = recall_module.load_databases(cfg.relationships, cfg.databases)
    report: dict[str, Any] = {"settings": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "input"},
                              "input": cfg.input if isinstance(cfg.input, (str, Path)) else "<AnnData>",
                              "databases": {name: int(len(pairs)) for name, pairs in databases.items()},
                              "embedders": {}}
    rows, recall_tables, consistency_tables, score_tables = [], [], [], []
    scratch = Path(tempfile.mkdtemp(prefix=".evaluate-scratch-", dir=cfg.scratch_dir or out))
    try:
        with open_screen(cfg.input, cfg.perturbation_column, cfg.control_labels, cfg.batch_column,
                         cfg.label_column, cfg.gene_column, cfg.allow_normalised) as screen:
            report["screen"] = {"n_cells": screen.n_cells, "n_features": screen.n_features,
                                "n_batches": int(len(screen.batches)), "n_control_cells": int(screen.is_control.sum()),
                                "n_perturbations": int(pd.Series(screen.perturbation_labels).nunique())}
            cells = build_cell_set(screen, cfg) if cfg.protocol == "paper" else None
            if cells is not None:
                report["screen"]["n_cells_scored"] = int(cells.rows.size)
                report["screen"]["n_decoded_genes"] = int(cells.expression.shape[1])
            for name in names:
                embedder = build_embedder(name, cfg)
                outcome = (evaluate_embedder_paper(screen, embedder, cfg, databases, scratch, cells)
                           if cells is not None else evaluate_embedder(screen, embedder, cfg, databases, scratch))
                if outcome.scores is not None:
                    score_tables.append(outcome.scores)
                rows.append(outcome.row)
                recall_tables.append(outcome.recall)
                consistency_tables.append(outcome.consistency)
                report["embedders"][name] = outcome.info
                log.info("%s: %s", name, outcome.row)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    if cfg.checkpoint and cfg.gene_weights:
        from txfm.evaluate.gene_weights import gene_weight_recall

        for kind, result in gene_weight_recall(cfg.checkpoint, out / GENE_WEIGHTS_FILE, databases,
                                               n_null=cfg.n_null_pairs, seed=cfg.seed).items():
            embedder = f"txfm_{kind}"
            rows.append({"embedder": embedder, "level": "genes", "bmdb": result.summary()["recall_avg_5_95"],
                         **result.summary()})
            recall_tables.append(result.table.assign(embedder=embedder))
    if cfg.checkpoint and cfg.corpus and cfg.reconstruction:
        from txfm.evaluate.reconstruction import reconstruction_metrics

        metrics = reconstruction_metrics(cfg.checkpoint, cfg.corpus, max_batches=cfg.reconstruction_max_batches,
                                         device=cfg.device, progress=cfg.progress)
        report["reconstruction"] = metrics
        txfm_row = next((row for row in rows if row["embedder"] == "txfm"), None)
        if txfm_row is None:
            txfm_row = {"embedder": "txfm", "level": "reconstruction"}
            rows.append(txfm_row)
        txfm_row.update({f"reconstruction_{k}": v for k, v in metrics["model"].items()})
        rows.append({"embedder": "mean_expression", "level": "reconstruction",
                     **{f"reconstruction_{k}": v for k, v in metrics["mean_expression"].items()}})

    results = pd.DataFrame(rows)
    write_results(results, out, RESULTS_STEM)
    recall_long = pd.concat(recall_tables, ignore_index=True)
    consistency_long = pd.concat(consistency_tables, ignore_index=True)
    if score_tables:  # paper protocol: per-seed scores, their summary, and the plots of each task's best choice
        scores = pd.concat(score_tables, ignore_index=True)[["embedder", "postprocess", "seed", "metric", "value"]]
        write_frame(scores, out / PROTOCOL_FILE)
        summary = scores.groupby(["embedder", "postprocess", "metric"], sort=False)["value"].agg(
            mean="mean", std=lambda v: float(np.std(v, ddof=0))).reset_index()
        write_frame(summary, out / PROTOCOL_SUMMARY_FILE)
        recall_long["postprocess"] = recall_long["postprocess"].fillna("") if "postprocess" in recall_long else ""
        recall_long = recall_long[["embedder", "postprocess", "database", "lower", "upper", "n_pairs", "n_called",
                                   "recall"]]
        consistency_long = consistency_long[["embedder", "postprocess", "perturbation", "n_cells", "consistency",
                                             "null_mean", "p_value"]]
        best = {row["embedder"]: row for row in rows}
        recall_plot = recall_long[[best[e].get("bmdb_postprocess", "") == p or p == ""
                                   for e, p in zip(recall_long["embedder"], recall_long["postprocess"])]]
        consistency_plot = consistency_long[[best[e].get("pcst_postprocess") == p for e, p in
                                             zip(consistency_long["embedder"], consistency_long["postprocess"])]]
    else:
        recall_long = recall_long[["embedder", "database", "lower", "upper", "n_pairs", "n_called", "recall"]]
        consistency_long = consistency_long[["embedder", "perturbation", "n_cells", "consistency", "null_mean",
                                             "p_value"]]
        recall_plot, consistency_plot = recall_long, consistency_long
    write_frame(recall_long, out / RECALL_FILE)
    write_frame(consistency_long, out / CONSISTENCY_FILE)
    plot_recall(recall_plot, out / RECALL_PLOT)
    plot_consistency(consistency_plot, out / CONSISTENCY_PLOT, cfg.p_threshold)
    with atomic_path(out / REPORT_FILE) as tmp:
        tmp.write_text(json.dumps(_json_ready(report), indent=2) + "\n")
    return results
