"""Tiny simulated DiverseRNA corpora for tests and benchmarks.

:func:`write_synthetic_corpus` writes a directory in the exact corpus layout of :mod:`curation.schema`
(``genes.parquet``, ``datasets.parquet``, hive-partitioned zstd shards, ``manifest.json``, ``DATACARD.md``),
so every reader of real corpora (``txfm.data``, ``curation.corpus.validate_corpus``, polars, pyarrow) can read it.

Simulation model (all deterministic for a seed):

* ``n_genes`` vocabulary genes with log-normal baseline abundances ``b_g``.
* With ``with_modules`` the non-housekeeping genes are grouped into co-expressed *modules*; every sample
  belongs to one of a few cell types, each with its own module-activity profile, plus per-sample noise. A
  model can therefore learn gene–gene structure (knowing some genes of a module predicts the others).
* Each dataset measures its own *panel* (a random subset of ``panel_fraction`` of the vocabulary; the union
  of the panels is the whole vocabulary) and has a few batches with a small per-gene batch effect; whole
  batches go to the ``val`` split (``val_fraction`` of the batches), as in curation.
* Some samples carry a knock-down perturbation of one gene (its mean drops to
  :data:`simulation.biology.TARGET_KNOCKDOWN`); the rest are ``control``.
* Counts are negative binomial (:func:`simulation.biology.nb_counts`) around ``library_size · softmax(log-mean)``; only the
  non-zero counts of panel genes are stored (zeros and unmeasured genes are implicit, as in real shards).

Generation streams row group by row group, so memory is bounded by one ``[row_group_rows, n_genes]`` block.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from curation import schema
from curation.io import atomic_path, file_digest
from simulation.biology import NB_THETA, TARGET_KNOCKDOWN, nb_counts, synthetic_gene_ids, synthetic_gene_symbols

#: Label of unperturbed samples.
CONTROL_LABEL = "control"
#: Batches per simulated dataset (whole batches are assigned to a split).
BATCHES_PER_DATASET = 4
#: Number of simulated cell types (each with its own module-activity profile).
N_CELL_TYPES = 5
#: Share of samples with a single-gene knock-down perturbation.
PERTURBED_FRACTION = 0.2
#: Bulk libraries are this much deeper than single-cell ones.
BULK_DEPTH_FACTOR = 20.0


@dataclass(frozen=True)
class _GeneModel:
    """Per-gene simulation parameters shared by all datasets.

    ``log_base`` [G] baseline log-abundance; ``module`` [G] module id or -1 (housekeeping);
    ``type_activity`` [n_cell_types, n_modules] module activity of each cell type (log scale).
    """

    log_base: np.ndarray
    module: np.ndarray
    type_activity: np.ndarray


@dataclass(frozen=True)
class _DatasetPlan:
    """One simulated dataset: its panel and its samples' metadata (arrays of length n_samples)."""

    name: str
    modality: str
    panel: np.ndarray  # sorted gene_idx, int32
    batch: np.ndarray  # int, 0..BATCHES_PER_DATASET-1
    split: np.ndarray  # str, "train" | "val"
    cell_type: np.ndarray  # int
    perturbed_gene: np.ndarray  # int gene_idx, -1 = control
    batch_effect: np.ndarray  # [BATCHES_PER_DATASET, G] log-scale
    sample_number: np.ndarray  # global sample number (used in sample ids)


def write_synthetic_corpus(path: str | os.PathLike, n_samples: int = 512, n_genes: int = 300,
                           n_datasets: int = 3, seed: int = 0, val_fraction: float = 0.25,
                           panel_fraction: tuple[float, float] = (0.6, 1.0), with_modules: bool = True, *,
                           mean_library_size: float = 3000.0, row_group_rows: int = schema.ROW_GROUP_ROWS,
                           shard_rows: int = schema.SHARD_ROWS, progress: bool = False) -> Path:
    """Simulate a corpus and write it to ``path`` (a new or empty directory); return ``path``.

    ``panel_fraction = (lo, hi)``: dataset panels measure between ``lo`` and ``hi`` of the vocabulary
    (evenly spread over datasets, the first one ``hi``). ``mean_library_size`` is the mean single-cell depth
    in counts (bulk is ``BULK_DEPTH_FACTOR``× deeper) and sets the sparsity. ``row_group_rows`` /
    ``shard_rows`` default to the corpus constants; tests lower them to get many row groups from few rows.
    The directory appears atomically: it is written under a temporary sibling name and renamed at the end.
    """
    _check_arguments(n_samples, n_genes, n_datasets, val_fraction, panel_fraction, mean_library_size,
                     row_group_rows, shard_rows)
    final = Path(path)
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        raise ValueError(f"{final}: exists and is not an empty directory")
    rng = np.random.default_rng([seed, 0x5E7])
    genes = _simulate_gene_model(rng, n_genes, with_modules)
    plans = _plan_datasets(rng, n_samples, n_genes, n_datasets, val_fraction, panel_fraction)
    with atomic_path(final) as tmp:
        tmp.mkdir()
        _write_genes(tmp, n_genes)
        _write_datasets(tmp, plans, seed)
        shards = []
        bar = tqdm(total=n_samples, desc="simulate corpus", unit="sample", disable=not progress)
        for d, plan in enumerate(plans):
            for split in schema.SPLITS:
                rows = np.flatnonzero(plan.split == split)
                if rows.size:
                    shards += _write_partition(tmp, plan, rows, genes, split, mean_library_size,
                                               np.random.default_rng([seed, d, schema.SPLITS.index(split)]),
                                               row_group_rows, shard_rows, bar)
        bar.close()
        _write_manifest(tmp, plans, shards, dict(
            generator="simulation.corpus", n_samples=n_samples, n_genes=n_genes, n_datasets=n_datasets,
            seed=seed, val_fraction=val_fraction, panel_fraction=list(panel_fraction),
            with_modules=with_modules, mean_library_size=mean_library_size, row_group_rows=row_group_rows,
            shard_rows=shard_rows))
        _write_datacard(tmp, plans)
    return final


def corpus_gene_modules(n_genes: int, seed: int = 0, with_modules: bool = True) -> np.ndarray:
    """(n_genes,) int co-expression module of each gene of ``write_synthetic_corpus(n_genes=…, seed=…)`` (−1:
    housekeeping): the structure a screen must share for a model trained on that corpus to transfer to it."""
    return _simulate_gene_model(np.random.default_rng([seed, 0x5E7]), n_genes, with_modules).module


def _check_arguments(n_samples: int, n_genes: int, n_datasets: int, val_fraction: float,
                     panel_fraction: tuple[float, float], mean_library_size: float, row_group_rows: int,
                     shard_rows: int) -> None:
    """Raise a one-line ValueError for impossible simulation settings."""
    if n_datasets < 1 or n_samples < n_datasets:
        raise ValueError(f"need n_datasets >= 1 and n_samples >= n_datasets, got {n_samples=}, {n_datasets=}")
    if n_genes < 2:
        raise ValueError(f"need n_genes >= 2, got {n_genes}")
    lo, hi = panel_fraction
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"panel_fraction must satisfy 0 < lo <= hi <= 1, got {panel_fraction}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if mean_library_size <= 0 or row_group_rows < 1 or shard_rows < row_group_rows:
        raise ValueError("need mean_library_size > 0 and 1 <= row_group_rows <= shard_rows")


def _simulate_gene_model(rng: np.random.Generator, n_genes: int, with_modules: bool) -> _GeneModel:
    """Draw baseline abundances and (optionally) co-expression modules for ``n_genes`` genes."""
    log_base = rng.normal(0.0, 1.5, n_genes)
    n_modules = max(2, min(50, n_genes // 20))
    # A third of the genes are housekeeping (module -1): expressed at baseline in every cell type.
    module = np.where(rng.random(n_genes) < 1 / 3, -1, rng.integers(0, n_modules, n_genes))
    if with_modules:
        type_activity = rng.normal(0.0, 1.5, (N_CELL_TYPES, n_modules))
    else:
        module = np.full(n_genes, -1)
        type_activity = np.zeros((N_CELL_TYPES, n_modules))
    return _GeneModel(log_base, module, type_activity)


def _plan_datasets(rng: np.random.Generator, n_samples: int, n_genes: int, n_datasets: int,
                   val_fraction: float, panel_fraction: tuple[float, float]) -> list[_DatasetPlan]:
    """Assign samples to datasets, batches, splits, cell types and perturbations; draw panels."""
    fractions = np.linspace(panel_fraction[1], panel_fraction[0], n_datasets)
    panels = [np.sort(rng.choice(n_genes, max(1, round(f * n_genes)), replace=False)) for f in fractions]
    uncovered = np.setdiff1d(np.arange(n_genes), np.concatenate(panels))
    panels[0] = np.union1d(panels[0], uncovered)  # the vocabulary is the union of the panels
    # Every dataset gets at least one sample; the rest are spread at random.
    dataset_of = np.concatenate([np.arange(n_datasets), rng.integers(0, n_datasets, n_samples - n_datasets)])
    n_val_batches = 0 if val_fraction == 0 else min(BATCHES_PER_DATASET - 1,
                                                    max(1, round(val_fraction * BATCHES_PER_DATASET)))
    plans = []
    for d in range(n_datasets):
        numbers = np.flatnonzero(dataset_of == d)
        n = numbers.size
        batch = rng.integers(0, BATCHES_PER_DATASET, n)
        val_batches = rng.choice(BATCHES_PER_DATASET, n_val_batches, replace=False)
        perturbed = rng.random(n) < PERTURBED_FRACTION
        plans.append(_DatasetPlan(
            name=f"synthetic_{d:02d}",
            modality=schema.MODALITIES[d % 2],
            panel=panels[d].astype(np.int32),
            batch=batch,
            split=np.where(np.isin(batch, val_batches), "val", "train"),
            cell_type=rng.integers(0, N_CELL_TYPES, n),
            perturbed_gene=np.where(perturbed, rng.choice(panels[d], n), -1),
            batch_effect=rng.normal(0.0, 0.1, (BATCHES_PER_DATASET, n_genes)),
            sample_number=numbers,
        ))
    return plans


def _simulate_counts(rng: np.random.Generator, plan: _DatasetPlan, rows: np.ndarray, genes: _GeneModel,
                     mean_library_size: float) -> np.ndarray:
    """Raw counts of samples ``rows`` of one dataset over the whole vocabulary. → float32 [len(rows), G]"""
    n, n_genes = rows.size, genes.log_base.size
    activity = genes.type_activity[plan.cell_type[rows]] + rng.normal(0.0, 0.3, (n, genes.type_activity.shape[1]))
    in_module = genes.module >= 0
    log_mean = np.broadcast_to(genes.log_base, (n, n_genes)) + plan.batch_effect[plan.batch[rows]]
    log_mean[:, in_module] += activity[:, genes.module[in_module]]
    target = plan.perturbed_gene[rows]
    hit = np.flatnonzero(target >= 0)
    log_mean[hit, target[hit]] += np.log(TARGET_KNOCKDOWN)
    depth = mean_library_size * (BULK_DEPTH_FACTOR if plan.modality == "bulk" else 1.0)
    library = depth * rng.lognormal(-0.125, 0.5, n)  # mean of the log-normal factor is 1
    return nb_counts(rng, log_mean, library, theta=NB_THETA[plan.modality]).astype(np.float32)


def _to_sparse_rows(dense: np.ndarray, panel: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep the non-zero panel entries of ``dense`` [n, G]. → (offsets int32 [n+1], gene_idx int32, counts f32)

    A sample without any panel count gets one count on its first panel gene, because real corpora never
    contain empty profiles (QC drops them).
    """
    measured = dense[:, panel]
    empty = np.flatnonzero(measured.sum(axis=1) == 0)
    measured[empty, 0] = 1.0
    row, col = np.nonzero(measured)  # row-major, so gene_idx comes out sorted within a sample
    offsets = np.zeros(dense.shape[0] + 1, dtype=np.int32)
    np.cumsum(np.bincount(row, minlength=dense.shape[0]), out=offsets[1:])
    return offsets, panel[col].astype(np.int32), measured[row, col].astype(np.float32)


def _write_partition(root: Path, plan: _DatasetPlan, rows: np.ndarray, genes: _GeneModel, split: str,
                     mean_library_size: float, rng: np.random.Generator, row_group_rows: int,
                     shard_rows: int, bar: tqdm) -> list[dict]:
    """Write the samples ``rows`` of one (split, dataset) partition as shards; return their manifest entries."""
    entries = []
    for part, shard_start in enumerate(range(0, rows.size, shard_rows)):
        shard = schema.shard_path(root, split, plan.name, part)
        shard.parent.mkdir(parents=True, exist_ok=True)
        shard_rows_here = rows[shard_start:shard_start + shard_rows]
        with contextlib.ExitStack() as stack:
            writer = None
            for start in range(0, shard_rows_here.size, row_group_rows):
                chunk = shard_rows_here[start:start + row_group_rows]
                table = _sample_table(plan, chunk, split, _simulate_counts(rng, plan, chunk, genes,
                                                                           mean_library_size))
                if writer is None:
                    tmp = stack.enter_context(atomic_path(shard))
                    writer = stack.enter_context(pq.ParquetWriter(tmp, schema.SAMPLE_SCHEMA,
                                                                  **schema.PARQUET_WRITE_OPTIONS))
                writer.write_table(table, row_group_size=row_group_rows)
                bar.update(chunk.size)
        entries.append(dict(path=shard.relative_to(root).as_posix(), split=split, dataset=plan.name,
                            rows=int(shard_rows_here.size), bytes=shard.stat().st_size,
                            sha256=file_digest(shard)))
    return entries


def _sample_table(plan: _DatasetPlan, rows: np.ndarray, split: str, counts: np.ndarray) -> pa.Table:
    """SAMPLE_SCHEMA table of samples ``rows`` of one dataset from their dense counts [len(rows), G]."""
    from curation.schema import content_hash

    offsets, gene_idx, values = _to_sparse_rows(counts, plan.panel)
    n = rows.size
    library_size = np.bincount(np.repeat(np.arange(n), np.diff(offsets)), weights=values, minlength=n)
    numbers = plan.sample_number[rows]
    symbols = np.char.add("SYN", plan.perturbed_gene[rows].astype(str))
    columns = {
        "sample_id": [f"{plan.name}:cell{k:07d}" for k in numbers],
        "dataset": [plan.name] * n,
        "batch": [f"batch{b}" for b in plan.batch[rows]],
        "split": [split] * n,
        "modality": [plan.modality] * n,
        "perturbation": np.where(plan.perturbed_gene[rows] >= 0, symbols, CONTROL_LABEL).tolist(),
        "cell_type": [f"type{c}" for c in plan.cell_type[rows]],
        "tissue": ["synthetic"] * n,
        "source_accession": [f"SYN{k:07d}" for k in numbers],
        "gene_idx": pa.ListArray.from_arrays(pa.array(offsets), pa.array(gene_idx)),
        "counts": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)),
        "library_size": library_size,
        "n_genes_detected": np.diff(offsets).astype(np.int32),
        # Per-sample hash is a loop over samples (not genes), as in curation.
        "content_hash": [content_hash(gene_idx[a:b], values[a:b]) for a, b in zip(offsets[:-1], offsets[1:])],
    }
    return schema.check_table(pa.table(columns), schema.SAMPLE_SCHEMA, f"synthetic {plan.name}/{split}")


def _write_genes(root: Path, n_genes: int) -> None:
    """genes.parquet: synthetic Ensembl-like IDs and ``SYN<g>`` symbols."""
    table = pa.table({"gene_idx": np.arange(n_genes, dtype=np.int32), "gene_id": synthetic_gene_ids(n_genes),
                      "symbol": synthetic_gene_symbols(n_genes), "biotype": ["protein_coding"] * n_genes})
    with atomic_path(root / schema.GENES_FILE) as tmp:
        pq.write_table(schema.check_table(table, schema.GENES_SCHEMA, "synthetic genes"), tmp)


def _write_datasets(root: Path, plans: list[_DatasetPlan], seed: int) -> None:
    """datasets.parquet: one row per simulated dataset with its panel."""
    table = pa.table({
        "dataset": [p.name for p in plans],
        "modality": [p.modality for p in plans],
        "n_samples": [p.batch.size for p in plans],
        "n_genes": [p.panel.size for p in plans],
        "measured_gene_idx": [p.panel for p in plans],
        "source": [f"simulated by simulation.corpus (seed={seed})" for _ in plans],
        "licence": ["CC0-1.0" for _ in plans],
    })
    with atomic_path(root / schema.DATASETS_FILE) as tmp:
        pq.write_table(schema.check_table(table, schema.DATASETS_SCHEMA, "synthetic datasets"), tmp)


def _write_manifest(root: Path, plans: list[_DatasetPlan], shards: list[dict], config: dict) -> None:
    """manifest.json in curation.corpus's layout: format version, generator config, digests of genes/datasets
    files, per-dataset sample counts, and every shard's path, rows, bytes and sha256."""
    datasets = {p.name: {"modality": p.modality, "n_samples": int(p.batch.size), "n_genes": int(p.panel.size),
                         "n_train": int((p.split == "train").sum()), "n_val": int((p.split == "val").sum())}
                for p in plans}
    manifest = {"format_version": schema.FORMAT_VERSION, "config": config, "n_genes": config["n_genes"],
                "n_samples": sum(s["rows"] for s in shards), "datasets": datasets,
                "files": {name: file_digest(root / name) for name in (schema.GENES_FILE, schema.DATASETS_FILE)},
                "shards": sorted(shards, key=lambda s: s["path"])}
    with atomic_path(root / schema.MANIFEST_FILE) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _write_datacard(root: Path, plans: list[_DatasetPlan]) -> None:
    """DATACARD.md: a short Table-1-style summary of the simulated datasets."""
    lines = ["# Synthetic DiverseRNA corpus", "", "Simulated by `simulation.corpus`; not real data.", "",
             "| dataset | modality | samples | train | val | panel genes |", "|---|---|---|---|---|---|"]
    for p in plans:
        n_val = int((p.split == "val").sum())
        lines.append(f"| {p.name} | {p.modality} | {p.batch.size} | {p.batch.size - n_val} | {n_val} "
                     f"| {p.panel.size} |")
    with atomic_path(root / schema.DATACARD_FILE) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
