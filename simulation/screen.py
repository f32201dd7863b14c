"""Simulated CRISPR screens with planted gene modules, for tests and the memory benchmark.

Model (deterministic for a seed; counts generated chunk by chunk, each chunk seeded by its first row):

* ``n_genes`` synthetic genes (:func:`simulation.biology.synthetic_gene_symbols` / ``synthetic_gene_ids``, the
  :mod:`simulation.corpus` scheme, so a checkpoint trained on a synthetic corpus maps them) with log-normal
  baseline abundances;
* ``n_modules × genes_per_module`` perturbed genes in planted modules: knocking down any gene of module m
  shifts the log-mean of the same ~5 % of genes by ``strength · effect_m`` (strength 0.6–1.4 per
  perturbation) — or, with ``gene_modules`` (a corpus's co-expression modules,
  :func:`simulation.corpus.corpus_gene_modules`), lowers every gene of the target's own corpus module by
  ``strength · effect_size`` (log scale), the structure a model trained on that corpus can transfer — and knocks
  its own target down to
  :data:`simulation.biology.TARGET_KNOCKDOWN`; ``n_inert`` further perturbations only knock their target down;
* controls (``non-targeting``, ``control_fraction`` of the cells), ``n_batches`` batches (gem groups) with a
  per-gene log shift, two random low-rank cell-state factors, log-normal library sizes;
* counts ~ Poisson(library · softmax(log-mean)) (:func:`simulation.biology.nb_counts` with ``theta=None``).

The "database" of true relationships, :attr:`ScreenPlan.relationships`, lists every pair of genes in the
same module (``entity1,entity2``, the format of ``resources/gene_relationships``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import scipy.sparse as sp

from curation.io import atomic_path
from simulation.biology import TARGET_KNOCKDOWN, nb_counts, synthetic_gene_ids, synthetic_gene_symbols
from simulation.h5ad import write_streamed_h5ad

CONTROL_LABEL = "non-targeting"
PERTURBATION_COLUMN, BATCH_COLUMN, MODULE_COLUMN = "gene", "gem_group", "module"
EFFECT_GENE_FRACTION = 0.05


@dataclass(frozen=True)
class ScreenPlan:
    """Everything but the counts: ``obs`` (n_cells rows: gene, gem_group, module), ``var`` (n_genes rows),
    the per-gene model and the per-perturbation effects."""

    obs: pd.DataFrame
    var: pd.DataFrame
    log_base: np.ndarray  # [G]
    batch_shift: np.ndarray  # [n_batches, G]
    module_effect: np.ndarray  # [n_modules, G]
    state_loadings: np.ndarray  # [2, G]
    pert_module: np.ndarray  # [P] module of each perturbation, -1 = inert
    pert_strength: np.ndarray  # [P]
    pert_target: np.ndarray  # [P] gene index
    cell_pert: np.ndarray  # [n_cells] perturbation index, -1 = control
    cell_batch: np.ndarray  # [n_cells]
    library: np.ndarray  # [n_cells]
    seed: int
    modules: list[list[str]]

    @property
    def n_cells(self) -> int:
        return len(self.obs)

    @property
    def n_genes(self) -> int:
        return len(self.var)

    @property
    def relationships(self) -> pd.DataFrame:
        """All same-module gene pairs, columns entity1, entity2."""
        pairs = [pair for module in self.modules for pair in combinations(module, 2)]
        return pd.DataFrame(pairs, columns=["entity1", "entity2"])


def plan_screen(n_cells: int = 2000, n_genes: int = 500, n_modules: int = 12, genes_per_module: int = 6,
                n_inert: int = 12, n_batches: int = 4, control_fraction: float = 0.15, effect_size: float = 1.0,
                mean_library: float = 4000.0, seed: int = 0, gene_modules: np.ndarray | None = None,
                cell_state_sd: float = 0.3) -> ScreenPlan:
    """Draw the screen's design and parameters (no counts). ``gene_modules`` (n_genes,) int: module of each gene
    (−1 none), e.g. a synthetic corpus's; ``cell_state_sd``: loadings of the two cell-state factors (noise)."""
    n_perturbed = n_modules * genes_per_module + n_inert
    if n_perturbed > n_genes:
        raise ValueError(f"{n_perturbed} perturbed genes do not fit in {n_genes} genes")
    if not 0 < control_fraction < 1 or n_cells < 2 * n_batches:
        raise ValueError("control_fraction must be in (0, 1) and n_cells >= 2 · n_batches")
    rng = np.random.default_rng([seed, 0x5C2EE])
    names = synthetic_gene_symbols(n_genes)
    var = pd.DataFrame({"gene_id": synthetic_gene_ids(n_genes)}, index=pd.Index(names, name="symbol"))
    pert_module = np.concatenate([np.repeat(np.arange(n_modules), genes_per_module), np.full(n_inert, -1)])
    module_effect = np.zeros((n_modules, n_genes))
    if gene_modules is None:
        targets = rng.choice(n_genes, size=n_perturbed, replace=False)
        n_effect = max(2, int(EFFECT_GENE_FRACTION * n_genes))
        for m in range(n_modules):  # one small vector per module, not per gene
            genes = rng.choice(n_genes, size=n_effect, replace=False)
            module_effect[m, genes] = rng.normal(0.0, effect_size, size=n_effect)
    else:
        gene_modules = np.asarray(gene_modules)
        if gene_modules.shape != (n_genes,):
            raise ValueError(f"gene_modules has shape {gene_modules.shape}, expected ({n_genes},)")
        sizes = np.bincount(gene_modules[gene_modules >= 0])
        eligible = np.flatnonzero(sizes >= genes_per_module)
        if eligible.size < n_modules:
            raise ValueError(f"{eligible.size} modules have >= {genes_per_module} genes; {n_modules} requested")
        chosen = rng.choice(eligible, size=n_modules, replace=False)
        picked = [rng.choice(np.flatnonzero(gene_modules == c), size=genes_per_module, replace=False) for c in chosen]
        outside = np.setdiff1d(np.arange(n_genes), np.concatenate(picked))
        targets = np.concatenate(picked + [rng.choice(outside, size=n_inert, replace=False)])
        for m, c in enumerate(chosen):
            module_effect[m, gene_modules == c] = -effect_size
    cell_pert = rng.integers(0, n_perturbed, size=n_cells)
    cell_pert[rng.random(n_cells) < control_fraction] = -1
    cell_batch = rng.integers(0, n_batches, size=n_cells)
    labels = np.where(cell_pert >= 0, names[targets[np.maximum(cell_pert, 0)]], CONTROL_LABEL)
    module_label = np.where(cell_pert < 0, "control",
                            np.where(pert_module[np.maximum(cell_pert, 0)] >= 0,
                                     np.char.add("module", pert_module[np.maximum(cell_pert, 0)].astype(str)), "inert"))
    obs = pd.DataFrame({PERTURBATION_COLUMN: pd.Categorical(labels),
                        BATCH_COLUMN: pd.Categorical([f"gem{b}" for b in cell_batch]),
                        MODULE_COLUMN: pd.Categorical(module_label)},
                       index=pd.Index([f"cell{i}" for i in range(n_cells)]))
    modules = [[str(names[t]) for t in targets[pert_module == m]] for m in range(n_modules)]
    return ScreenPlan(obs=obs, var=var, log_base=rng.normal(0.0, 1.2, size=n_genes),
                      batch_shift=rng.normal(0.0, 0.2, size=(n_batches, n_genes)), module_effect=module_effect,
                      state_loadings=rng.normal(0.0, cell_state_sd, size=(2, n_genes)), pert_module=pert_module,
                      pert_strength=rng.uniform(0.6, 1.4, size=n_perturbed), pert_target=targets,
                      cell_pert=cell_pert, cell_batch=cell_batch,
                      library=rng.lognormal(np.log(mean_library), 0.3, size=n_cells), seed=seed, modules=modules)


def simulate_counts(plan: ScreenPlan, start: int, stop: int) -> sp.csr_matrix:
    """Counts of cells [start, stop): csr (stop − start, n_genes) float32, seeded by (seed, start)."""
    rng = np.random.default_rng([plan.seed, 0xC0FFEE, start])
    pert, batch = plan.cell_pert[start:stop], plan.cell_batch[start:stop]
    log_mean = plan.log_base + plan.batch_shift[batch]
    log_mean += rng.normal(size=(stop - start, 2)) @ plan.state_loadings
    perturbed = np.flatnonzero(pert >= 0)
    modular = perturbed[plan.pert_module[pert[perturbed]] >= 0]
    p = pert[modular]
    log_mean[modular] += plan.pert_strength[p, None] * plan.module_effect[plan.pert_module[p]]
    log_mean[perturbed, plan.pert_target[pert[perturbed]]] += np.log(TARGET_KNOCKDOWN)
    return sp.csr_matrix(nb_counts(rng, log_mean, plan.library[start:stop], theta=None).astype(np.float32))


def count_chunks(plan: ScreenPlan, chunk_rows: int = 2048) -> Iterator[sp.csr_matrix]:
    """Counts of every cell, ``chunk_rows`` at a time."""
    for start in range(0, plan.n_cells, chunk_rows):
        yield simulate_counts(plan, start, min(start + chunk_rows, plan.n_cells))


def screen_anndata(plan: ScreenPlan):
    """The whole screen as an in-memory AnnData (small screens only)."""
    import anndata as ad

    return ad.AnnData(X=sp.vstack(list(count_chunks(plan))).tocsr(), obs=plan.obs.copy(), var=plan.var.copy())


def write_screen_h5ad(path: str | os.PathLike, plan: ScreenPlan, chunk_rows: int = 2048, progress: bool = False) -> Path:
    """Write the screen as an h5ad with CSR X, streamed chunk by chunk (memory: one chunk), atomically."""
    return write_streamed_h5ad(path, plan.obs, plan.var, count_chunks(plan, chunk_rows), progress=progress,
                               desc="write screen")


def write_relationships(path: str | os.PathLike, pairs: pd.DataFrame) -> Path:
    """A relationship database CSV (entity1,entity2), atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        pairs.to_csv(tmp, index=False)
    return path
