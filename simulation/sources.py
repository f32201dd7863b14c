"""Seeded synthetic RNA-seq sources in every real input format, with the truth of what was planted.

``simulate_sources(out_dir)`` writes eight small datasets (a few hundred samples each at ``scale=1``), one per
reader format, plus ``datasets.yaml`` (ready-to-use dataset-config entries, paths relative to ``out_dir``) and
``truth.json`` (what curation, dedup and phenoprint must find). ``write_large_h5ad`` streams a large screen to
disk in bounded memory for the memory benchmarks.

Biology (:mod:`simulation.biology`; one ``numpy.random.Generator`` per dataset, derived from the seed):

* a *universe* of 1,500 real protein-coding genes from ``resources/genes`` (HGNC), with a log-normal baseline
  expression profile, 20 planted *modules* of 10 co-regulated genes and a few *rare* genes (detected in only a
  handful of cells, so the ``min_cells_per_gene`` filter removes them);
* per sample, log expression = baseline + cell-type/tissue program + per-batch multiplicative effect + per-module
  activity (shared by the module's genes: co-expression) + perturbation effect. In the screen, cells also vary
  along a few broad cell-state programs, and knocking down a module gene represses its module and shifts two
  of those programs (perturbations of one module share a phenotype; null perturbations have none);
* counts are negative binomial (gamma-Poisson) around ``library_size × softmax(log expression)``; library sizes
  are log-normal (single cell, ~1–3k UMIs) or log-uniform (bulk, 1e6–1e7 reads).

Planted artefacts, all listed in ``truth.json`` as corpus sample IDs ``"<dataset>:<source_id>"``: exact
duplicates within and across datasets, an atlas re-distributing cells of another one under another gene panel
and ID scheme, one TCGA aliquot listed twice, low-quality samples, samples holding NaN / negative values, rare
genes, unmappable feature IDs, features named by previous symbols / aliases. ``expected_removed_by_qc`` is
computed from the generated matrices with the QC rule of ``curation.qc`` (independently re-implemented here).
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import re
import uuid
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import h5py
import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse as sp
import yaml
from tqdm.auto import tqdm

from curation.io import CurationError, atomic_path
from simulation.biology import (MODULE_SIZE, N_MODULES, N_UNIVERSE_GENES, NB_THETA, TARGET_KNOCKDOWN, GenePool,
                                ScreenStates, Universe,
                                bulk_library, load_gene_pool, log_expression, make_universe, nb_counts, programs,
                                sc_library)
from simulation.h5ad import write_streamed_h5ad

SINGLE_CELL_QC = {"min_cells_per_gene": 10, "min_genes_per_cell": 150, "min_library_size": 0}
BULK_QC = {"min_cells_per_gene": 0, "min_genes_per_cell": 0, "min_library_size": 100_000}
DROP_REASONS = ("non_finite", "negative", "low_genes", "low_library")

CONTROL_LABEL_SCREEN = "non-targeting"
CONTROL_LABEL_SCIPLEX = "vehicle"
LICENCE = "CC0 (simulated)"
SOURCE = "simulated"
VAL_FRACTION = 0.25
#: Lower wins in dedup; the original atlas (sim_atlas_mtx) beats the atlas re-distributing its cells.
PRIORITY = {"sim_atlas_mtx": 1, "sim_screen": 2, "sim_gtex": 3, "sim_tcga": 4, "sim_geo_table": 5,
            "sim_sciplex": 6, "sim_mixseq": 7, "sim_atlas_redistributed": 10}

_BASES = np.array(list("ACGT"))
_ALNUM = np.array(list("0123456789ABCDEFGHJKLMNPRSTUVWXYZ"))


# ----------------------------------------------------------------------------------------------------------------
# Identifiers
# ----------------------------------------------------------------------------------------------------------------
def _codes(rng: np.random.Generator, n: int, length: int, alphabet: np.ndarray,
           exclude: set[str] | None = None) -> np.ndarray:
    """(n,) unique random strings of ``length`` letters of ``alphabet`` (none in ``exclude``)."""
    exclude = exclude or set()
    found: list[str] = []
    seen: set[str] = set(exclude)
    while len(found) < n:
        letters = alphabet[rng.integers(0, len(alphabet), (2 * (n - len(found)) + 8, length))]
        for code in np.ascontiguousarray(letters).view(f"<U{length}").ravel().tolist():
            if code not in seen:
                seen.add(code)
                found.append(code)
                if len(found) == n:
                    break
    return np.asarray(found, dtype=str)


def barcodes(rng: np.random.Generator, n: int, suffix: str = "-1", exclude: set[str] | None = None) -> np.ndarray:
    """(n,) unique 10x-style cell barcodes ``<16 bp><suffix>``."""
    return np.char.add(_codes(rng, n, 16, _BASES, exclude), suffix)


def unmappable_names(rng: np.random.Generator, n: int, pool: GenePool) -> np.ndarray:
    """(n,) feature names that no reference table knows: ``LOC1…`` IDs and old clone-based names."""
    names: list[str] = []
    while len(names) < n:
        if rng.random() < 0.7:
            name = f"LOC{rng.integers(100_000_000, 999_999_999)}"
        else:
            name = f"RP11-{rng.integers(1, 999)}{'ABCDEFGHIJKLMNOP'[rng.integers(16)]}{rng.integers(1, 25)}.{rng.integers(1, 4)}"
        if name.upper() not in pool.taken_names and name not in names:
            names.append(name)
    return np.asarray(names, dtype=str)


# ----------------------------------------------------------------------------------------------------------------
# Simulated datasets
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class SimulatedDataset:
    """One dataset exactly as written to disk.

    ``counts``: (n_samples × n_features) CSR float32, the values in the file (NaN / negative where planted).
    ``source_ids``: (n_samples,) str, the reader's ``source_id``. ``obs``: n_samples rows (RangeIndex) of
    per-sample metadata as written (inside the file or in its metadata table). ``features``: n_features rows,
    columns feature_id (as in the file), symbol (or None), gene_id (the unversioned Ensembl ID the feature
    denotes, "" when unmappable) and how (expected mapping kind: ensembl | symbol | previous | alias | unmapped).
    ``spec``: the datasets.yaml entry. ``planted``: lists of planted artefacts (source IDs / gene IDs).
    """

    name: str
    fmt: str
    modality: str
    counts: sp.csr_matrix
    source_ids: np.ndarray
    obs: pd.DataFrame
    features: pd.DataFrame
    spec: dict
    planted: dict[str, list] = field(default_factory=dict)

    @property
    def n_samples(self) -> int:
        return int(self.counts.shape[0])

    def sample_ids(self, source_ids: Any) -> list[str]:
        """Corpus sample IDs ``"<dataset>:<source_id>"`` of ``source_ids``."""
        return [f"{self.name}:{sid}" for sid in np.atleast_1d(source_ids)]

    def row_of(self, source_id: str) -> int:
        rows = np.flatnonzero(self.source_ids == source_id)
        if len(rows) != 1:
            raise KeyError(f"{self.name}: source id {source_id!r} occurs {len(rows)} times")
        return int(rows[0])

    def permute(self, order: np.ndarray) -> None:
        """Reorder the samples (rows) by ``order`` (n_samples,) int."""
        self.counts = sp.csr_matrix(self.counts[order])
        self.source_ids = self.source_ids[order]
        self.obs = self.obs.iloc[order].reset_index(drop=True)


def _features(universe: Universe, panel: np.ndarray, ids: np.ndarray, symbols: np.ndarray | None,
              how: str | np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"feature_id": ids, "symbol": symbols if symbols is not None else None,
                         "gene_id": universe.gene_id[panel], "how": how})


def _panel(rng: np.random.Generator, universe: Universe, drop_fraction: float) -> np.ndarray:
    """Sorted universe indices of a dataset's gene panel: all but a random ``drop_fraction`` of plain genes."""
    protected = np.union1d(universe.module_genes, universe.rare)
    droppable = np.setdiff1d(np.arange(universe.n_genes), protected)
    dropped = rng.choice(droppable, size=int(round(drop_fraction * universe.n_genes)), replace=False)
    return np.setdiff1d(np.arange(universe.n_genes), dropped)


def _low_quality(rng: np.random.Generator, library: np.ndarray, fraction: float = 0.03) -> np.ndarray:
    """Turn a random ``fraction`` (at least 1) of cells into low-quality ones (~60–150 UMIs); returns their rows."""
    n = len(library)
    rows = np.sort(rng.choice(n, size=max(1, int(round(fraction * n))), replace=False))
    library[rows] = np.exp(rng.uniform(np.log(60), np.log(150), len(rows)))
    return rows


def _symbol_features(rng: np.random.Generator, universe: Universe, pool: GenePool, panel: np.ndarray,
                     n_previous: int, n_alias: int) -> tuple[np.ndarray, np.ndarray]:
    """Feature names for ``panel`` as current symbols, with ``n_previous`` previous symbols and ``n_alias``
    aliases substituted on non-module genes. Returns names (n_panel,) and expected mapping kinds (n_panel,)."""
    names = universe.symbol[panel].astype(object)
    how = np.full(len(panel), "symbol", dtype=object)
    plain = ~np.isin(panel, universe.module_genes)
    for table, kind, count in ((pool.previous, "previous", n_previous), (pool.alias, "alias", n_alias)):
        candidates = np.flatnonzero(plain & (how == "symbol")
                                    & np.isin(universe.gene_id[panel], list(table)))
        for pos in np.sort(rng.choice(candidates, size=min(count, len(candidates)), replace=False)):
            names[pos], how[pos] = table[universe.gene_id[panel[pos]]], kind
    return names.astype(str), how.astype(str)


def _spec(fmt: str, modality: str, files: dict[str, str], columns: dict[str, str | None],
          reader: dict | None = None, metadata: dict | None = None, control_label: str | None = None,
          phenoprint: bool = False, name: str = "") -> dict:
    """A datasets.yaml entry with the shape of docs/ARCHITECTURE.md."""
    full_columns = {key: columns.get(key) for key in ("batch", "perturbation", "cell_type", "tissue",
                                                       "source_accession")}
    return {
        "modality": modality,
        "format": fmt,
        "files": files,
        "reader": reader or {},
        "metadata": metadata,
        "columns": full_columns,
        "control_label": control_label,
        "qc": dict(SINGLE_CELL_QC if modality == "single_cell" else BULK_QC),
        "allow_normalised": False,
        "phenoprint": ({"enabled": True, "p_threshold": 0.1, "n_null": 1000, "n_components": 20}
                       if phenoprint else {"enabled": False}),
        "val_fraction": VAL_FRACTION,
        "priority": PRIORITY[name],
        "source": SOURCE,
        "licence": LICENCE,
    }


@dataclass
class _Context:
    """What every dataset builder needs: the gene pool, the universe, the seed and the size scale."""

    pool: GenePool
    universe: Universe
    seed: int
    scale: float

    def rng(self, stream: int) -> np.random.Generator:
        """An independent generator per dataset, so datasets do not depend on each other's draws."""
        return np.random.default_rng([self.seed, stream])

    def size(self, base: int, minimum: int) -> int:
        return max(minimum, int(round(base * self.scale)))


def _pick_rows(rng: np.random.Generator, eligible: np.ndarray, n: int) -> np.ndarray:
    """(n,) sorted distinct rows drawn from ``eligible`` (e.g. the originals of planted verbatim copies)."""
    return np.sort(rng.choice(eligible, size=n, replace=False))


def _rich_rows(counts: np.ndarray, exclude: np.ndarray, min_detected: int) -> np.ndarray:
    """Rows of ``counts`` (n × genes) with ≥ ``min_detected`` non-zero genes, not in ``exclude``."""
    detected = (counts > 0).sum(axis=1)
    return np.setdiff1d(np.flatnonzero(detected >= min_detected), exclude)


def build_screen(ctx: _Context) -> SimulatedDataset:
    """``sim_screen``: a CRISPRi screen (h5ad) with real perturbations knocking down a module and null ones."""
    rng, u = ctx.rng(1), ctx.universe
    name = "sim_screen"
    n_real = min(ctx.size(25, 4), N_MODULES * MODULE_SIZE)
    n_null = ctx.size(25, 4)
    # Real targets go round the modules, so several modules have two perturbed genes with similar effects.
    used = np.zeros((N_MODULES, MODULE_SIZE), dtype=bool)
    real_targets, real_modules = [], []
    for k in range(n_real):
        m = k % N_MODULES
        slot = rng.choice(np.flatnonzero(~used[m]))
        used[m, slot] = True
        real_targets.append(int(u.modules[m, slot]))
        real_modules.append(m)
    plain = np.setdiff1d(np.arange(u.n_genes), np.union1d(u.module_genes, u.rare))
    null_targets = rng.choice(plain, size=n_null, replace=False)
    panel = np.union1d(_panel(rng, u, 0.03), null_targets)  # every target is measured

    targets = np.concatenate([real_targets, null_targets]).astype(int)
    cells_per = rng.integers(12, 21, size=len(targets))
    n_perturbed = int(cells_per.sum())
    n_control = int(round(0.15 / 0.85 * n_perturbed))
    pert_of_cell = np.concatenate([np.repeat(np.arange(len(targets)), cells_per), np.full(n_control, -1)])
    n = len(pert_of_cell)
    n_gem = 4
    gem = rng.integers(0, n_gem, n)
    log_rate = log_expression(rng, u, programs(rng, u, 1), np.zeros(n, dtype=int), gem, n_gem)
    states = ScreenStates.draw(rng, u)
    effect = states.perturbation_effects(u, np.asarray(real_targets))
    label = np.where(pert_of_cell >= 0, pert_of_cell + 1, 0)  # 0 = control; null perturbations have no row
    label[label > len(real_targets)] = 0
    log_rate += effect[label]
    states.add_activity(rng, log_rate)
    library = sc_library(rng, n)
    low = _low_quality(rng, library)
    full = nb_counts(rng, log_rate, library, theta=NB_THETA["single_cell"])[:, panel]

    copies = _pick_rows(rng, _rich_rows(full, low, 300), 2)
    full = np.vstack([full, full[copies]])
    pert_of_cell = np.concatenate([pert_of_cell, pert_of_cell[copies]])
    gem = np.concatenate([gem, gem[copies]])
    ids = barcodes(rng, len(full), suffix="")
    ids = np.char.add(np.char.add(ids, "-"), (gem + 1).astype(str))
    labels = np.where(pert_of_cell >= 0, u.symbol[targets[np.maximum(pert_of_cell, 0)]], CONTROL_LABEL_SCREEN)
    label_ids = np.where(pert_of_cell >= 0, u.gene_id[targets[np.maximum(pert_of_cell, 0)]], CONTROL_LABEL_SCREEN)
    obs = pd.DataFrame({"gene": labels, "gene_id": label_ids, "gem_group": (gem + 1).astype(np.int64)})
    spec = _spec("h5ad", "single_cell", {"matrix": f"{name}/{name}_raw_singlecell.h5ad"},
                 {"batch": "gem_group", "perturbation": "gene"}, reader={"matrix": "X"},
                 control_label=CONTROL_LABEL_SCREEN, phenoprint=True, name=name)
    ds = SimulatedDataset(name, "h5ad", "single_cell", sp.csr_matrix(full.astype(np.float32)), ids, obs,
                          _features(u, panel, u.gene_id[panel], u.symbol[panel], "ensembl"), spec)
    ds.planted = {
        "low_quality": ids[low].tolist(),
        "exact_copies": [[ids[r], ids[len(pert_of_cell) - len(copies) + k]] for k, r in enumerate(copies)],
        "real_perturbations": [{"perturbation": str(u.symbol[t]), "gene_id": str(u.gene_id[t]), "module": int(m)}
                               for t, m in zip(real_targets, real_modules)],
        "null_perturbations": [str(s) for s in u.symbol[null_targets]],
        "state_programs": states.describe(u),
    }
    return ds


ATLAS_CELL_TYPES = ("T cell", "B cell", "NK cell", "classical monocyte", "dendritic cell", "plasma cell")


def build_atlases(ctx: _Context) -> tuple[SimulatedDataset, SimulatedDataset]:
    """``sim_atlas_mtx`` (10x mtx, versioned Ensembl IDs) and ``sim_atlas_redistributed`` (10x h5, symbols),
    which re-distributes some of the first atlas's cells (same counts on shared genes) next to its own cells."""
    rng, u, pool = ctx.rng(2), ctx.universe, ctx.pool
    lfc = programs(rng, u, len(ATLAS_CELL_TYPES))

    # --- the original atlas --------------------------------------------------------------------------------------
    name = "sim_atlas_mtx"
    n = ctx.size(800, 120)
    n_donors = 5
    cell_type, donor = rng.integers(0, len(ATLAS_CELL_TYPES), n), rng.integers(0, n_donors, n)
    library = sc_library(rng, n)
    low = _low_quality(rng, library)
    universe_counts = nb_counts(rng, log_expression(rng, u, lfc, cell_type, donor, n_donors), library, theta=NB_THETA["single_cell"])
    panel = _panel(rng, u, 0.07)
    counts = universe_counts[:, panel]
    copies = _pick_rows(rng, _rich_rows(counts, low, 300), 3)
    n_original = n
    counts = np.vstack([counts, counts[copies]])
    cell_type, donor = np.concatenate([cell_type, cell_type[copies]]), np.concatenate([donor, donor[copies]])
    ids = barcodes(rng, len(counts))
    obs = pd.DataFrame({"donor": np.char.add("D", (donor + 1).astype(str)),
                        "cell_type": np.asarray(ATLAS_CELL_TYPES)[cell_type]})
    base = f"{name}/filtered_feature_bc_matrix"
    spec = _spec("10x_mtx", "single_cell", {"matrix": f"{base}/matrix.mtx.gz", "features": f"{base}/features.tsv.gz",
                                            "barcodes": f"{base}/barcodes.tsv.gz"},
                 {"batch": "donor", "cell_type": "cell_type"}, reader={"orientation": "genes_x_cells"},
                 metadata={"file": f"{name}/cell_metadata.csv", "key": "barcode"}, name=name)
    atlas = SimulatedDataset(name, "10x_mtx", "single_cell", sp.csr_matrix(counts.astype(np.float32)), ids, obs,
                             _features(u, panel, u.versioned_id(panel), u.symbol[panel], "ensembl"), spec)
    atlas.planted = {"low_quality": ids[low].tolist(),
                     "exact_copies": [[ids[r], ids[n_original + k]] for k, r in enumerate(copies)]}

    # --- the re-distributing atlas -------------------------------------------------------------------------------
    name = "sim_atlas_redistributed"
    panel_r = _panel(rng, u, 0.07)
    n_shared = ctx.size(60, 10)
    # Re-distributed cells: rich (well above QC), not planted as anything else.
    originals = np.sort(rng.choice(_rich_rows(counts[:n_original], np.union1d(low, copies), 400),
                                   size=n_shared, replace=False))
    n_own = ctx.size(400, 60)
    own_type, own_donor = rng.integers(0, len(ATLAS_CELL_TYPES), n_own), rng.integers(0, 3, n_own)
    own_library = sc_library(rng, n_own)
    own_low = _low_quality(rng, own_library)
    own_counts = nb_counts(rng, log_expression(rng, u, lfc, own_type, own_donor, 3), own_library, theta=NB_THETA["single_cell"])
    counts_r = np.vstack([universe_counts[originals], own_counts])[:, panel_r]
    ids_r = barcodes(rng, len(counts_r), exclude=set(ids.tolist()))
    ids_r = np.char.add("atlasB_", ids_r)
    donor_r = np.concatenate([np.char.add("study1_D", (donor[originals] + 1).astype(str)),
                              np.char.add("atlasB_D", (own_donor + 1).astype(str))])
    type_r = np.asarray(ATLAS_CELL_TYPES)[np.concatenate([cell_type[originals], own_type])]
    names, how = _symbol_features(rng, u, pool, panel_r, n_previous=5, n_alias=5)
    order = np.argsort(names, kind="stable")  # symbol-keyed atlases list genes alphabetically
    panel_r, names, how, counts_r = panel_r[order], names[order], how[order], counts_r[:, order]
    spec_r = _spec("10x_h5", "single_cell", {"matrix": f"{name}/filtered_feature_bc_matrix.h5"},
                   {"batch": "donor", "cell_type": "cell_type"},
                   metadata={"file": f"{name}/cell_metadata.csv", "key": "barcode"}, name=name)
    redistributed = SimulatedDataset(name, "10x_h5", "single_cell", sp.csr_matrix(counts_r.astype(np.float32)),
                                     ids_r, pd.DataFrame({"donor": donor_r, "cell_type": type_r}),
                                     _features(u, panel_r, names, names, how), spec_r)
    redistributed.planted = {"low_quality": ids_r[n_shared + own_low].tolist(),
                             "redistributed": [[ids_r[k], ids[r]] for k, r in enumerate(originals)]}
    return atlas, redistributed


GTEX_TISSUES = (("Blood", "Whole Blood"), ("Brain", "Brain - Cortex"), ("Liver", "Liver"), ("Lung", "Lung"),
                ("Muscle", "Muscle - Skeletal"), ("Skin", "Skin - Sun Exposed (Lower leg)"),
                ("Heart", "Heart - Left Ventricle"), ("Thyroid", "Thyroid"))


def build_gtex(ctx: _Context) -> SimulatedDataset:
    """``sim_gtex``: GTEx-like bulk gene reads (GCT) with tissue / donor in a SampleAttributes table."""
    rng, u = ctx.rng(3), ctx.universe
    name = "sim_gtex"
    n = ctx.size(150, 20)
    n_donors = max(3, min(30, n // 4))
    tissue, donor = rng.integers(0, len(GTEX_TISSUES), n), rng.integers(0, n_donors, n)
    library = bulk_library(rng, n)
    low = np.sort(rng.choice(n, size=max(1, int(round(0.02 * n))), replace=False))
    library[low] = rng.uniform(2e4, 6e4, len(low))
    log_rate = log_expression(rng, u, programs(rng, u, len(GTEX_TISSUES), 0.15, 1.5), tissue, donor, n_donors,
                              batch_sd=0.1, module_sd=0.2)
    counts = nb_counts(rng, log_rate, library, theta=NB_THETA["bulk"])
    donor_codes = np.char.add("GTEX-", _codes(rng, n_donors, 5, _ALNUM))
    sampid = np.char.add(np.char.add(donor_codes[donor], "-"),
                         np.char.add(np.char.zfill(rng.integers(1, 3000, n).astype(str), 4),
                                     np.char.add("-SM-", _codes(rng, n, 5, _ALNUM))))
    obs = pd.DataFrame({"SAMPID": sampid, "SMTS": [GTEX_TISSUES[t][0] for t in tissue],
                        "SMTSD": [GTEX_TISSUES[t][1] for t in tissue], "SUBJID": donor_codes[donor],
                        "SMRIN": np.round(rng.uniform(5.5, 9.5, n), 1)})
    panel = np.arange(u.n_genes)
    spec = _spec("gct", "bulk", {"matrix": f"{name}/GTEx_gene_reads.gct.gz"}, {"batch": "SUBJID", "tissue": "SMTSD"},
                 metadata={"file": f"{name}/GTEx_SampleAttributesDS.txt", "key": "SAMPID", "sep": "\t"}, name=name)
    ds = SimulatedDataset(name, "gct", "bulk", sp.csr_matrix(counts.astype(np.float32)), sampid, obs,
                          _features(u, panel, u.versioned_id(panel), u.symbol[panel], "ensembl"), spec)
    ds.planted = {"low_quality": sampid[low].tolist()}
    return ds


TCGA_PROJECTS = (("TCGA-BRCA", "Breast"), ("TCGA-LUAD", "Lung"), ("TCGA-COAD", "Colon"), ("TCGA-KIRC", "Kidney"))


def build_tcga(ctx: _Context) -> SimulatedDataset:
    """``sim_tcga``: GDC STAR-Counts, one TSV per file, with one aliquot sequenced into two files."""
    rng, u = ctx.rng(4), ctx.universe
    name = "sim_tcga"
    n = ctx.size(80, 10)
    project = rng.integers(0, len(TCGA_PROJECTS), n)
    library = bulk_library(rng, n)
    low = np.sort(rng.choice(n - 1, size=max(1, int(round(0.02 * n))), replace=False))
    library[low] = rng.uniform(2e4, 6e4, len(low))
    log_rate = log_expression(rng, u, programs(rng, u, len(TCGA_PROJECTS), 0.15, 1.5), project, project,
                              len(TCGA_PROJECTS), batch_sd=0.1, module_sd=0.3)
    # The last file re-quantifies the aliquot of a deep sample: same expression, a new NB draw, same accession.
    first = int(rng.choice(np.setdiff1d(np.arange(n - 1), low)))
    log_rate[-1], library[-1], project[-1] = log_rate[first], library[first], project[first]
    counts = nb_counts(rng, log_rate, library, theta=NB_THETA["bulk"])
    file_id = np.asarray([str(uuid.UUID(bytes=rng.bytes(16), version=4)) for _ in range(n)])
    tss = _codes(rng, n, 2, _ALNUM)
    participant = _codes(rng, n, 4, _ALNUM)
    aliquot = np.char.add(np.char.add(np.char.add("TCGA-", tss), np.char.add("-", participant)),
                          np.char.add("-01A-11R-", np.char.add(_codes(rng, n, 4, _ALNUM), "-07")))
    aliquot[-1] = aliquot[first]
    obs = pd.DataFrame({"file_id": file_id,
                        "file_name": np.char.add(file_id, ".rna_seq.augmented_star_gene_counts.tsv"),
                        "sample_id": file_id, "aliquot": aliquot,
                        "project": [TCGA_PROJECTS[p][0] for p in project],
                        "tissue": [TCGA_PROJECTS[p][1] for p in project], "sample_type": "Primary Tumor"})
    panel = np.arange(u.n_genes)
    spec = _spec("star_counts", "bulk", {"dir": f"{name}/star_counts"},
                 {"batch": "project", "tissue": "tissue", "source_accession": "aliquot"},
                 reader={"column": "unstranded", "sample_sheet": f"{name}/gdc_sample_sheet.tsv"}, name=name)
    ds = SimulatedDataset(name, "star_counts", "bulk", sp.csr_matrix(counts.astype(np.float32)), file_id, obs,
                          _features(u, panel, u.versioned_id(panel), u.symbol[panel], "ensembl"), spec)
    ds.planted = {"low_quality": file_id[low].tolist(),
                  "duplicate_accession": [{"accession": str(aliquot[first]),
                                           "source_ids": [str(file_id[first]), str(file_id[-1])]}]}
    return ds


GEO_CELL_TYPES = ("neuron", "astrocyte", "oligodendrocyte", "microglia")


def build_geo_table(ctx: _Context) -> SimulatedDataset:
    """``sim_geo_table``: a GEO supplementary genes × samples CSV keyed by symbols, aliases and junk IDs, with
    a few samples holding NaN or negative values."""
    rng, u, pool = ctx.rng(5), ctx.universe, ctx.pool
    name = "sim_geo_table"
    n = ctx.size(200, 30)
    n_plates = 3
    cell_type, plate = rng.integers(0, len(GEO_CELL_TYPES), n), rng.integers(0, n_plates, n)
    library = sc_library(rng, n)
    low = _low_quality(rng, library)
    log_rate = log_expression(rng, u, programs(rng, u, len(GEO_CELL_TYPES)), cell_type, plate, n_plates)
    panel = _panel(rng, u, 0.05)
    counts = nb_counts(rng, log_rate, library, theta=NB_THETA["single_cell"])[:, panel].astype(np.float64)
    names, how = _symbol_features(rng, u, pool, panel, n_previous=5, n_alias=10)
    # ~3 % unmappable rows (genes outside the reference), expressed like ordinary genes.
    n_junk = int(round(0.03 * len(panel)))
    junk = unmappable_names(rng, n_junk, pool)
    junk_counts = rng.poisson(library[:, None] * np.exp(rng.normal(np.log(1 / N_UNIVERSE_GENES), 1.0, n_junk)))
    counts = np.hstack([counts, junk_counts])
    features = pd.concat([_features(u, panel, names, None, how),
                          pd.DataFrame({"feature_id": junk, "symbol": None, "gene_id": "", "how": "unmapped"})],
                         ignore_index=True)
    order = rng.permutation(len(features))  # junk rows interleaved, as in real tables
    features, counts = features.iloc[order].reset_index(drop=True), counts[:, order]
    # Samples holding a NaN (non-finite) or a negative value: QC must drop them, never repair them.
    healthy = np.setdiff1d(np.arange(n), low)
    bad = rng.choice(healthy, size=3, replace=False)
    mapped_cols = np.flatnonzero(features["gene_id"].to_numpy() != "")
    counts[bad[0], rng.choice(mapped_cols)] = np.nan
    counts[bad[1], rng.choice(np.flatnonzero(features["gene_id"].to_numpy() == ""))] = np.nan
    counts[bad[2], rng.choice(mapped_cols)] = -3.0
    ids = np.char.add("GSM", (rng.integers(4_000_000, 6_000_000) + np.arange(n)).astype(str))
    obs = pd.DataFrame({"sample": ids, "plate": np.char.add("plate", (plate + 1).astype(str)),
                        "cell_type": np.asarray(GEO_CELL_TYPES)[cell_type]})
    spec = _spec("geo_table", "single_cell", {"matrix": f"{name}/GSE000001_counts.csv.gz"},
                 {"batch": "plate", "cell_type": "cell_type"}, reader={"orientation": "genes_x_samples", "sep": ","},
                 metadata={"file": f"{name}/sample_metadata.csv", "key": "sample"}, name=name)
    ds = SimulatedDataset(name, "geo_table", "single_cell", sp.csr_matrix(counts.astype(np.float32)), ids, obs,
                          features, spec)
    ds.planted = {"low_quality": ids[low].tolist(), "non_finite": sorted(ids[bad[:2]].tolist()),
                  "negative": [str(ids[bad[2]])]}
    return ds


SCIPLEX_LINES = ("A549", "K562", "MCF7")
SCIPLEX_COMPOUNDS = ("Dexamethasone", "Nutlin-3a", "BMS-345541", "SAHA", "Trametinib", "Givinostat",
                     "Inactive-compound")


def build_sciplex(ctx: _Context) -> SimulatedDataset:
    """``sim_sciplex``: sci-Plex-like compound screen as unsorted UMI triplets; compounds act on modules."""
    rng, u = ctx.rng(6), ctx.universe
    name = "sim_sciplex"
    n = ctx.size(600, 60)
    n_plates = 3
    line, plate = rng.integers(0, len(SCIPLEX_LINES), n), rng.integers(0, n_plates, n)
    compound = rng.integers(-1, len(SCIPLEX_COMPOUNDS), n)  # -1 = vehicle
    dose = np.where(compound >= 0, rng.choice([10, 100, 1000, 10000], n), 0)
    log_rate = log_expression(rng, u, programs(rng, u, len(SCIPLEX_LINES)), line, plate, n_plates)
    effects: dict[str, list[dict]] = {}
    for c, compound_name in enumerate(SCIPLEX_COMPOUNDS[:-1]):  # the last one has no effect
        cells = compound == c
        effects[compound_name] = []
        for m in rng.choice(N_MODULES, size=2, replace=False):
            direction = float(rng.choice([-1.0, 1.0]))
            log_rate[np.ix_(cells, u.modules[m])] += direction * np.log(4.0)
            effects[compound_name].append({"module": int(m), "log2_fold_change": 2.0 * direction})
    library = sc_library(rng, n)
    low = _low_quality(rng, library)
    panel = _panel(rng, u, 0.05)
    counts = nb_counts(rng, log_rate, library, theta=NB_THETA["single_cell"])[:, panel]
    wells = np.asarray([f"{r}{c:02d}" for r in "ABCDEFGH" for c in range(1, 13)])
    cell_names = np.char.add(np.char.add(np.char.add("P", (plate + 1).astype(str)), "_"),
                             np.char.add(np.char.add(wells[rng.integers(0, 96, n)], "_"), _codes(rng, n, 16, _BASES)))
    compound_label = np.where(compound >= 0, np.asarray(SCIPLEX_COMPOUNDS)[np.maximum(compound, 0)],
                              CONTROL_LABEL_SCIPLEX)
    sample = [f"sciPlex_P{p + 1}_{c}_{d}nM_{SCIPLEX_LINES[ln]}"
              for p, c, d, ln in zip(plate, compound_label, dose, line)]
    obs = pd.DataFrame({"cell": cell_names, "sample": sample, "compound": compound_label, "dose_nM": dose,
                        "plate": np.char.add("plate", (plate + 1).astype(str)),
                        "cell_line": np.asarray(SCIPLEX_LINES)[line]})
    prefix = f"{name}/GSM0000002_sciPlex"
    spec = _spec("sciplex_triplets", "single_cell",
                 {"matrix": f"{prefix}_UMI.count.matrix.gz", "genes": f"{prefix}_gene.annotations.txt.gz",
                  "cells": f"{prefix}_cell.annotations.txt.gz"},
                 {"batch": "plate", "perturbation": "compound", "cell_type": "cell_line"},
                 metadata={"file": f"{name}/cell_metadata.csv", "key": "cell"},
                 control_label=CONTROL_LABEL_SCIPLEX, name=name)
    ds = SimulatedDataset(name, "sciplex_triplets", "single_cell", sp.csr_matrix(counts.astype(np.float32)),
                          cell_names, obs, _features(u, panel, u.versioned_id(panel), u.symbol[panel], "ensembl"),
                          spec)
    ds.planted = {"low_quality": cell_names[low].tolist(), "compound_effects": effects}
    return ds


MIXSEQ_LINES = ("A549_LUNG", "SKMEL28_SKIN", "MCF7_BREAST", "HCT116_LARGE_INTESTINE", "PC3_PROSTATE",
                "K562_HAEMATOPOIETIC_AND_LYMPHOID_TISSUE", "NCIH460_LUNG", "U2OS_BONE")
MIXSEQ_EXPERIMENTS = ("expt1", "expt2")


def build_mixseq(ctx: _Context) -> SimulatedDataset:
    """``sim_mixseq``: two MIX-seq experiments (zips of mtx + classifications) of pooled cell lines."""
    rng, u = ctx.rng(7), ctx.universe
    name = "sim_mixseq"
    per_experiment = ctx.size(300, 30)
    n = per_experiment * len(MIXSEQ_EXPERIMENTS)
    line, experiment = rng.integers(0, len(MIXSEQ_LINES), n), np.repeat(np.arange(len(MIXSEQ_EXPERIMENTS)),
                                                                        per_experiment)
    library = sc_library(rng, n)
    low = _low_quality(rng, library)
    log_rate = log_expression(rng, u, programs(rng, u, len(MIXSEQ_LINES)), line, experiment,
                              len(MIXSEQ_EXPERIMENTS))
    panel = _panel(rng, u, 0.05)
    counts = nb_counts(rng, log_rate, library, theta=NB_THETA["single_cell"])[:, panel]
    codes = barcodes(rng, n)
    codes[per_experiment] = codes[0]  # 10x barcodes repeat across runs; the zip stem keeps sample IDs unique
    stems = np.asarray(MIXSEQ_EXPERIMENTS)[experiment]
    ids = np.char.add(np.char.add(stems, ":"), codes)
    margin = np.round(rng.uniform(0.5, 3.0, n), 3)
    obs = pd.DataFrame({"experiment": stems, "barcode": codes, "singlet_ID": np.asarray(MIXSEQ_LINES)[line],
                        "singlet_margin": margin, "cell_quality": np.where(np.isin(np.arange(n), low),
                                                                           "low_quality", "normal"),
                        "tot_numis": counts.sum(axis=1)})
    spec = _spec("mixseq_zip", "single_cell", {"archives": name},
                 {"batch": "experiment", "cell_type": "singlet_ID"}, name=name)
    ds = SimulatedDataset(name, "mixseq_zip", "single_cell", sp.csr_matrix(counts.astype(np.float32)), ids, obs,
                          _features(u, panel, u.gene_id[panel], u.symbol[panel], "ensembl"), spec)
    ds.planted = {"low_quality": ids[low].tolist()}
    return ds


# ----------------------------------------------------------------------------------------------------------------
# QC truth (independent of curation.qc, same rule)
# ----------------------------------------------------------------------------------------------------------------
def qc_outcome(ds: SimulatedDataset, qc: dict | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What curation QC must do to ``ds``.

    A sample fails (first reason wins) for a non-finite value anywhere in its raw row, a negative value, fewer
    than ``min_genes_per_cell`` detected genes over the mapped genes, or a library (sum over mapped genes)
    below ``min_library_size``; genes are kept when detected in ≥ ``min_cells_per_gene`` passing samples.
    Returns ``reasons`` (n_samples,) str ("" = passes), ``genes`` (n_mapped,) sorted unversioned gene IDs of
    the mapped genes, and ``kept`` (n_mapped,) bool.
    """
    qc = qc or ds.spec["qc"]
    counts = sp.csr_matrix(ds.counts, dtype=np.float64)
    row = np.repeat(np.arange(counts.shape[0]), np.diff(counts.indptr))
    non_finite = np.zeros(counts.shape[0], dtype=bool)
    negative = np.zeros(counts.shape[0], dtype=bool)
    non_finite[row[~np.isfinite(counts.data)]] = True
    negative[row[counts.data < 0]] = True

    gene_of_feature = ds.features["gene_id"].to_numpy(str)
    genes, column = np.unique(gene_of_feature[gene_of_feature != ""], return_inverse=True)
    mapped = np.flatnonzero(gene_of_feature != "")
    summing = sp.csr_matrix((np.ones(len(mapped)), (mapped, column)), shape=(counts.shape[1], len(genes)))
    harmonised = sp.csr_matrix(counts @ summing)
    detected = np.asarray((harmonised > 0).sum(axis=1)).ravel()
    library = np.asarray(harmonised.sum(axis=1)).ravel()

    reasons = np.full(counts.shape[0], "", dtype=object)
    for mask, reason in ((library < qc["min_library_size"], "low_library"),
                         (detected < qc["min_genes_per_cell"], "low_genes"),
                         (negative, "negative"), (non_finite, "non_finite")):
        reasons[mask] = reason  # reverse order: the first failing reason sticks
    passing = reasons == ""
    detected_in = np.asarray((harmonised[passing] > 0).sum(axis=0)).ravel()
    return reasons.astype(str), genes, detected_in >= qc["min_cells_per_gene"]


def expected_qc(ds: SimulatedDataset) -> dict:
    """JSON-ready QC truth of ``ds``: sample IDs dropped per reason and genes removed by min_cells_per_gene."""
    reasons, genes, kept = qc_outcome(ds)
    return {
        "n_input": ds.n_samples,
        "n_passed": int((reasons == "").sum()),
        "dropped": {reason: sorted(ds.sample_ids(ds.source_ids[reasons == reason])) for reason in DROP_REASONS},
        "n_genes_mapped": int(len(genes)),
        "n_genes_kept": int(kept.sum()),
        "genes_removed": genes[~kept].tolist(),
    }


# ----------------------------------------------------------------------------------------------------------------
# Cross-dataset exact duplicates
# ----------------------------------------------------------------------------------------------------------------
def _plant_cross_duplicates(source: SimulatedDataset, target: SimulatedDataset, rng: np.random.Generator,
                            n: int, obs_values: dict[str, Any],
                            datasets_with_redistribution: tuple[SimulatedDataset, ...] = ()) -> list[list[str]]:
    """Copy ``n`` rich passing cells of ``source`` into ``target`` (as extra rows with ``obs_values``) and make
    both copies identical after curation: the profile is restricted to genes kept by QC in both datasets
    (restricting only lowers detection of genes already removed, so it cannot change what QC keeps)."""
    planted = {sid for pair in source.planted.get("exact_copies", []) for sid in pair}
    for ds in datasets_with_redistribution:
        planted |= {pair[1] for pair in ds.planted.get("redistributed", [])}
    reasons, _, _ = qc_outcome(source)
    detected = np.diff(source.counts.indptr)
    eligible = [r for r in np.flatnonzero((reasons == "") & (detected >= 400))
                if source.source_ids[r] not in planted]
    rows = np.sort(rng.choice(eligible, size=n, replace=False))
    # Carry each copied count to the target feature of the same gene (genes outside the target panel are lost).
    position = {g: i for i, g in enumerate(target.features["gene_id"].to_numpy(str)) if g}
    target_col = np.array([position.get(g, -1) for g in source.features["gene_id"].to_numpy(str)])
    carried = target_col >= 0
    new_ids = barcodes(rng, n, suffix=f"-{obs_values.get('gem_group', 1)}",
                       exclude=set(target.source_ids.tolist()))
    extra = np.zeros((n, target.counts.shape[1]), dtype=np.float32)
    extra[:, target_col[carried]] = source.counts[rows].toarray()[:, carried]
    target.counts = sp.csr_matrix(sp.vstack([target.counts, sp.csr_matrix(extra)]))
    target.source_ids = np.concatenate([target.source_ids, new_ids])
    target.obs = pd.concat([target.obs, pd.DataFrame({key: [value] * n for key, value in obs_values.items()})],
                           ignore_index=True)
    target_rows = np.arange(target.n_samples - n, target.n_samples)

    for _ in range(3):  # restriction is idempotent after one round; the loop only guards the invariant
        _, s_genes, s_kept = qc_outcome(source)
        _, t_genes, t_kept = qc_outcome(target)
        shared = np.intersect1d(s_genes[s_kept], t_genes[t_kept])
        changed = _restrict_rows(source, rows, shared) | _restrict_rows(target, target_rows, shared)
        if not changed:
            break
    for ds, ds_rows in ((source, rows), (target, target_rows)):
        reasons, _, _ = qc_outcome(ds)
        if (reasons[ds_rows] != "").any():
            raise RuntimeError(f"{ds.name}: a planted exact duplicate fails QC")
    return [sorted([f"{source.name}:{source.source_ids[r]}", f"{target.name}:{new_ids[k]}"])
            for k, r in enumerate(rows)]


def _restrict_rows(ds: SimulatedDataset, rows: np.ndarray, genes: np.ndarray) -> bool:
    """Zero the entries of ``rows`` on features whose gene is not in ``genes``; True when anything changed."""
    outside = ~np.isin(ds.features["gene_id"].to_numpy(str), genes)
    counts = sp.csr_matrix(ds.counts, copy=True)
    row_of_entry = np.repeat(np.arange(counts.shape[0]), np.diff(counts.indptr))
    drop = np.isin(row_of_entry, rows) & outside[counts.indices]
    if drop.any():
        counts.data[drop] = 0
        counts.eliminate_zeros()
        ds.counts = counts
    return bool(drop.any())


# ----------------------------------------------------------------------------------------------------------------
# Whole simulation
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Simulation:
    """The in-memory simulation: ``datasets`` (name -> SimulatedDataset, datasets.yaml order) and ``truth``."""

    datasets: dict[str, SimulatedDataset]
    truth: dict
    universe: Universe


def generate(seed: int = 0, scale: float = 1.0, gene_dir: Path | None = None, progress: bool = False) -> Simulation:
    """Simulate every dataset in memory (nothing written). Same ``seed`` and ``scale`` → identical result."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"simulate: seed must be an integer ≥ 0, got {seed!r}")
    if not np.isfinite(scale) or scale <= 0:
        raise ValueError(f"simulate: scale must be a positive number, got {scale!r}")
    pool = load_gene_pool(gene_dir)
    universe = make_universe(pool, np.random.default_rng([int(seed), 0]))
    ctx = _Context(pool=pool, universe=universe, seed=int(seed), scale=float(scale))

    builders: list[Callable[[_Context], Any]] = [build_screen, build_atlases, build_gtex, build_tcga,
                                                 build_geo_table, build_sciplex, build_mixseq]
    built: list[SimulatedDataset] = []
    for builder in tqdm(builders, desc="simulate datasets", disable=not progress):
        result = builder(ctx)
        built.extend(result if isinstance(result, tuple) else [result])
    datasets = {ds.name: ds for ds in built}
    cross = _plant_cross_duplicates(datasets["sim_atlas_mtx"], datasets["sim_screen"], ctx.rng(8), 2,
                                    {"gene": CONTROL_LABEL_SCREEN, "gene_id": CONTROL_LABEL_SCREEN,
                                     "gem_group": 1}, (datasets["sim_atlas_redistributed"],))
    shuffle = ctx.rng(9)
    for ds in datasets.values():  # planted copies must not sit next to their originals
        ds.permute(shuffle.permutation(ds.n_samples))
    return Simulation(datasets=datasets, truth=_truth(datasets, universe, ctx, cross), universe=universe)


def _truth(datasets: dict[str, SimulatedDataset], universe: Universe, ctx: _Context,
           cross_duplicates: list[list[str]]) -> dict:
    screen, tcga = datasets["sim_screen"], datasets["sim_tcga"]
    redistributed = datasets["sim_atlas_redistributed"]
    exact = [sorted(ds.sample_ids(pair)) for ds in datasets.values() for pair in ds.planted.get("exact_copies", [])]
    exact = sorted(exact + cross_duplicates)
    redistributed_pairs = [{"sample_id": f"{redistributed.name}:{copy}", "duplicate_of": f"sim_atlas_mtx:{orig}"}
                           for copy, orig in redistributed.planted["redistributed"]]
    accession = [{"accession": entry["accession"], "sample_ids": sorted(tcga.sample_ids(entry["source_ids"]))}
                 for entry in tcga.planted["duplicate_accession"]]
    qc = {name: expected_qc(ds) for name, ds in datasets.items()}
    return {
        "seed": ctx.seed,
        "scale": ctx.scale,
        "datasets": {name: {"format": ds.fmt, "modality": ds.modality, "n_samples": ds.n_samples,
                            "n_features": int(ds.counts.shape[1])} for name, ds in datasets.items()},
        "universe": {"n_genes": universe.n_genes, "rare_genes": universe.gene_id[universe.rare].tolist()},
        "modules": [{"module": m, "gene_ids": universe.gene_id[genes].tolist(),
                     "symbols": universe.symbol[genes].tolist()} for m, genes in enumerate(universe.modules)],
        "control_label": CONTROL_LABEL_SCREEN,
        "real_perturbations": screen.planted["real_perturbations"],
        "null_perturbations": sorted(screen.planted["null_perturbations"]),
        "compound_effects": datasets["sim_sciplex"].planted["compound_effects"],
        "exact_duplicates": exact,
        "redistributed": sorted(redistributed_pairs, key=lambda e: e["sample_id"]),
        "duplicate_accession": accession,
        "expected_removed_by_dedup": _expected_dedup(exact, redistributed_pairs, accession, datasets),
        "low_quality": {name: sorted(ds.sample_ids(ds.planted["low_quality"])) for name, ds in datasets.items()},
        "invalid_values": {"non_finite": sorted(datasets["sim_geo_table"].sample_ids(
                               datasets["sim_geo_table"].planted["non_finite"])),
                           "negative": datasets["sim_geo_table"].sample_ids(
                               datasets["sim_geo_table"].planted["negative"])},
        "unmappable_ids": {name: sorted(ds.features.loc[ds.features["how"] == "unmapped", "feature_id"].tolist())
                           for name, ds in datasets.items() if (ds.features["how"] == "unmapped").any()},
        "renamed_features": {name: ds.features.loc[ds.features["how"].isin(["previous", "alias"]),
                                                   ["feature_id", "gene_id", "how"]].sort_values("feature_id")
                             .to_dict(orient="records")
                             for name, ds in datasets.items() if ds.features["how"].isin(["previous", "alias"]).any()},
        "qc_thresholds": {name: ds.spec["qc"] for name, ds in datasets.items()},
        "expected_removed_by_qc": qc,
    }


def _expected_dedup(exact: list[list[str]], redistributed: list[dict], accession: list[dict],
                    datasets: dict[str, SimulatedDataset]) -> list[dict]:
    """Which sample of each planted group dedup removes: keep lowest priority, then dataset name, then sample ID."""
    def keep_key(sample_id: str) -> tuple:
        dataset = sample_id.split(":", 1)[0]
        return (datasets[dataset].spec["priority"], dataset, sample_id)

    removed = []
    for reason, groups in (("exact", exact), ("redistributed", [[e["sample_id"], e["duplicate_of"]]
                                                                for e in redistributed]),
                           ("accession", [e["sample_ids"] for e in accession])):
        for group in groups:
            kept = min(group, key=keep_key)
            removed += [{"sample_id": sid, "reason": reason, "duplicate_of": kept} for sid in group if sid != kept]
    return sorted(removed, key=lambda e: e["sample_id"])


# ----------------------------------------------------------------------------------------------------------------
# Writers (one per format; every file written atomically, gzip headers without name/time so reruns are identical)
# ----------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _gzip_text(path: Path) -> Iterator[io.TextIOWrapper]:
    """A text handle whose content lands gzip-compressed at ``path`` only if the block succeeds."""
    with atomic_path(path) as tmp, open(tmp, "wb") as raw, \
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as packed, \
            io.TextIOWrapper(packed, encoding="utf-8", newline="\n") as text:
        yield text


def _write_text(path: Path, frame: pd.DataFrame, sep: str, **to_csv: Any) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, sep=sep, index=False, lineterminator="\n", **to_csv)


def _mtx_bytes(genes_x_cells: sp.spmatrix) -> bytes:
    """MatrixMarket ``coordinate integer general`` text of a (genes × cells) matrix, entries sorted by cell."""
    coo = sp.coo_matrix(genes_x_cells)
    order = np.lexsort((coo.row, coo.col))  # CellRanger writes cell by cell
    coo = sp.coo_matrix((coo.data[order].astype(np.int64), (coo.row[order], coo.col[order])), shape=coo.shape)
    buffer = io.BytesIO()
    scipy.io.mmwrite(buffer, coo, field="integer")
    return buffer.getvalue()


def _integer_counts(ds: SimulatedDataset) -> sp.csr_matrix:
    if ds.counts.data.size and not (np.isfinite(ds.counts.data).all()
                                    and np.array_equal(ds.counts.data, np.round(ds.counts.data))):
        raise ValueError(f"{ds.name}: format {ds.fmt} stores integer counts only")
    return ds.counts


def write_h5ad_source(ds: SimulatedDataset, out_dir: Path, seed: int) -> None:
    """Replogle-style raw single-cell h5ad: CSR X, var index = Ensembl IDs + gene_name, obs gene / gem_group."""
    import anndata

    var = pd.DataFrame({"gene_name": ds.features["symbol"].to_numpy(str)},
                       index=pd.Index(ds.features["feature_id"].to_numpy(str), name="gene_id"))
    obs = ds.obs.set_axis(pd.Index(ds.source_ids, name="cell_barcode"))
    adata = anndata.AnnData(X=_integer_counts(ds), obs=obs, var=var)
    with atomic_path(out_dir / ds.spec["files"]["matrix"]) as tmp:
        adata.write_h5ad(tmp)


def _write_metadata(ds: SimulatedDataset, out_dir: Path, columns: list[str], extra: pd.DataFrame | None = None) -> None:
    meta = ds.spec["metadata"]
    frame = ds.obs[columns] if meta["key"] in ds.obs else ds.obs.assign(**{meta["key"]: ds.source_ids})[columns]
    if extra is not None:
        frame = pd.concat([frame, extra], ignore_index=True)
    _write_text(out_dir / meta["file"], frame, sep=meta.get("sep", ","))


def write_10x_mtx_source(ds: SimulatedDataset, out_dir: Path, seed: int) -> None:
    """CellRanger ``filtered_feature_bc_matrix/``: matrix.mtx.gz (genes × cells), features.tsv.gz, barcodes.tsv.gz,
    plus a cell metadata CSV (barcode, donor, cell_type)."""
    files = ds.spec["files"]
    with _gzip_text(out_dir / files["matrix"]) as fh:
        fh.write(_mtx_bytes(_integer_counts(ds).T).decode("ascii"))
    features = ds.features[["feature_id", "symbol"]].assign(feature_type="Gene Expression")
    with _gzip_text(out_dir / files["features"]) as fh:
        features.to_csv(fh, sep="\t", header=False, index=False, lineterminator="\n")
    with _gzip_text(out_dir / files["barcodes"]) as fh:
        fh.write("".join(f"{code}\n" for code in ds.source_ids))
    _write_metadata(ds, out_dir, ["barcode", "donor", "cell_type"])


def write_10x_h5_source(ds: SimulatedDataset, out_dir: Path, seed: int) -> None:
    """CellRanger v3 HDF5 (``/matrix``: CSC of genes × cells = CSR rows per cell); features/id hold symbols."""
    counts = sp.csr_matrix(_integer_counts(ds))
    with atomic_path(out_dir / ds.spec["files"]["matrix"]) as tmp, h5py.File(tmp, "w", track_order=True) as h5:
        h5.attrs["filetype"] = "matrix"
        h5.attrs["version"] = 2
        h5.attrs["library_ids"] = np.array([b"sim_atlas_redistributed"])
        h5.attrs["chemistry_description"] = "Single Cell 3' v3"
        group = h5.create_group("matrix")
        group.create_dataset("barcodes", data=np.asarray(ds.source_ids, dtype="S"))
        group.create_dataset("data", data=counts.data.astype(np.int32), compression="gzip")
        group.create_dataset("indices", data=counts.indices.astype(np.int64), compression="gzip")
        group.create_dataset("indptr", data=counts.indptr.astype(np.int64))
        group.create_dataset("shape", data=np.array([counts.shape[1], counts.shape[0]], dtype=np.int32))
        features = group.create_group("features")
        n_features = counts.shape[1]
        features.create_dataset("id", data=ds.features["feature_id"].to_numpy(dtype="S"))
        features.create_dataset("name", data=ds.features["symbol"].to_numpy(dtype="S"))
        features.create_dataset("feature_type", data=np.full(n_features, b"Gene Expression"))
        features.create_dataset("genome", data=np.full(n_features, b"GRCh38"))
        features.create_dataset("_all_tag_keys", data=np.array([b"genome"]))
    _write_metadata(ds, out_dir, ["barcode", "donor", "cell_type"])


def write_gct_source(ds: SimulatedDataset, out_dir: Path, seed: int) -> None:
    """GTEx GCT v1.2 (genes × samples, gzip) and a SampleAttributes-like TSV (with a few extra, unmatched rows)."""
    counts = _integer_counts(ds)
    table = pd.DataFrame(counts.T.toarray().astype(np.int64), columns=ds.source_ids)
    table.insert(0, "Description", ds.features["symbol"].to_numpy(str))
    table.insert(0, "Name", ds.features["feature_id"].to_numpy(str))
    with _gzip_text(out_dir / ds.spec["files"]["matrix"]) as fh:
        fh.write(f"#1.2\n{counts.shape[1]}\t{counts.shape[0]}\n")
        table.to_csv(fh, sep="\t", index=False, lineterminator="\n")
    # GTEx attribute tables also list samples without RNA-seq (e.g. WGS): rows that match no column.
    rng = np.random.default_rng([seed, 101])
    extra = ds.obs.iloc[:3].copy()
    extra["SAMPID"] = np.char.add(extra["SAMPID"].to_numpy(str), "-WGS")
    extra["SMRIN"] = np.nan
    extra = extra.iloc[rng.permutation(len(extra))]
    _write_metadata(ds, out_dir, list(ds.obs.columns), extra=extra)


STAR_HEADER = ["gene_id", "gene_name", "gene_type", "unstranded", "stranded_first", "stranded_second",
               "tpm_unstranded", "fpkm_unstranded", "fpkm_uq_unstranded"]
STAR_SPECIAL_ROWS = ("N_unmapped", "N_multimapping", "N_noFeature", "N_ambiguous")


def write_star_counts_source(ds: SimulatedDataset, out_dir: Path, seed: int) -> None:
    """GDC ``*.rna_seq.augmented_star_gene_counts.tsv`` per sample and a sample sheet TSV."""
    rng = np.random.default_rng([seed, 102])
    counts = _integer_counts(ds).toarray().astype(np.int64)
    n_features = counts.shape[1]
    gene_length_kb = np.exp(rng.normal(np.log(2.5), 0.7, n_features))  # for TPM / FPKM columns
    count_dir = out_dir / ds.spec["files"]["dir"]
    count_dir.mkdir(parents=True, exist_ok=True)
    for row, file_name in enumerate(ds.obs["file_name"]):
        unstranded = counts[row]
        first = rng.binomial(unstranded, 0.03)
        rpk = unstranded / gene_length_kb
        total = max(unstranded.sum(), 1)
        upper_quartile = max(np.quantile(unstranded[unstranded > 0], 0.75) if unstranded.any() else 1.0, 1.0)
        genes = pd.DataFrame({
            "gene_id": ds.features["feature_id"].to_numpy(str), "gene_name": ds.features["symbol"].to_numpy(str),
            "gene_type": "protein_coding", "unstranded": unstranded, "stranded_first": first,
            "stranded_second": unstranded - first, "tpm_unstranded": rpk / max(rpk.sum(), 1e-12) * 1e6,
            "fpkm_unstranded": rpk / total * 1e6, "fpkm_uq_unstranded": rpk / upper_quartile * 1e3})
        special = rng.integers(100_000, 3_000_000, (len(STAR_SPECIAL_ROWS), 3))
        special_rows = pd.DataFrame({"gene_id": STAR_SPECIAL_ROWS, "gene_name": "", "gene_type": "",
                                     "unstranded": special[:, 0], "stranded_first": special[:, 1],
                                     "stranded_second": special[:, 2]})
        with atomic_path(count_dir / file_name) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as fh:
            fh.write("# gene-model: GENCODE v36\n")
            pd.concat([special_rows, genes], ignore_index=True)[STAR_HEADER].to_csv(
                fh, sep="\t", index=False, lineterminator="\n", float_format="%.4f")
    _write_text(out_dir / ds.spec["reader"]["sample_sheet"], ds.obs, sep="\t")


def write_geo_table_source(ds: SimulatedDataset, out_dir: Path, seed: int) -> None:
    """GEO supplementary CSV.gz, genes × samples, first column ``gene``; NaN written as ``NaN``."""
    table = pd.DataFrame(ds.counts.T.toarray().astype(np.float64), columns=ds.source_ids)
    table.insert(0, "gene", ds.features["feature_id"].to_numpy(str))
    with _gzip_text(out_dir / ds.spec["files"]["matrix"]) as fh:
        table.to_csv(fh, sep=",", index=False, lineterminator="\n", float_format="%.10g", na_rep="NaN")
    _write_metadata(ds, out_dir, ["sample", "plate", "cell_type"])


def write_sciplex_source(ds: SimulatedDataset, out_dir: Path, seed: int) -> None:
    """sci-Plex GEO files as published for GSM4150378: unsorted 1-based ``gene_row<TAB>cell_col<TAB>count``
    triplets; the gene annotations SPACE-separated under a header line ``id gene_short_name`` (scPerturb issue
    #7; tests/fixtures/sciplex3/); cell annotations tab-separated without a header; plus a cell metadata CSV."""
    files = ds.spec["files"]
    coo = sp.coo_matrix(_integer_counts(ds))
    order = np.random.default_rng([seed, 103]).permutation(coo.nnz)  # GEO triplets are not sorted by cell
    triplets = np.column_stack([coo.col[order] + 1, coo.row[order] + 1, coo.data[order].astype(np.int64)])
    with _gzip_text(out_dir / files["matrix"]) as fh:
        pd.DataFrame(triplets).to_csv(fh, sep="\t", header=False, index=False, lineterminator="\n")
    with _gzip_text(out_dir / files["genes"]) as fh:
        genes = ds.features[["feature_id", "symbol"]].set_axis(["id", "gene_short_name"], axis=1)
        genes.to_csv(fh, sep=" ", header=True, index=False, lineterminator="\n")
    with _gzip_text(out_dir / files["cells"]) as fh:
        ds.obs[["cell", "sample"]].to_csv(fh, sep="\t", header=False, index=False, lineterminator="\n")
    _write_metadata(ds, out_dir, ["cell", "sample", "compound", "dose_nM", "plate", "cell_line"])


def write_mixseq_source(ds: SimulatedDataset, out_dir: Path, seed: int) -> None:
    """One zip per MIX-seq experiment: ``<stem>/{matrix.mtx, genes.tsv, barcodes.tsv, classifications.csv}``."""
    counts = _integer_counts(ds)
    genes = ds.features[["feature_id", "symbol"]].to_csv(sep="\t", header=False, index=False, lineterminator="\n")
    archive_dir = out_dir / ds.spec["files"]["archives"]
    for stem in MIXSEQ_EXPERIMENTS:
        rows = np.flatnonzero(ds.obs["experiment"].to_numpy(str) == stem)
        members = {
            "matrix.mtx": _mtx_bytes(counts[rows].T),
            "genes.tsv": genes.encode("utf-8"),
            "barcodes.tsv": "".join(f"{code}\n" for code in ds.obs["barcode"].iloc[rows]).encode("ascii"),
            "classifications.csv": ds.obs.iloc[rows].drop(columns=["experiment"]).to_csv(
                index=False, lineterminator="\n").encode("utf-8"),
        }
        with atomic_path(archive_dir / f"{stem}.zip") as tmp, zipfile.ZipFile(tmp, "w") as archive:
            for member, payload in members.items():
                info = zipfile.ZipInfo(f"{stem}/{member}", date_time=(2020, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                archive.writestr(info, payload)


WRITERS: dict[str, Callable[[SimulatedDataset, Path, int], None]] = {
    "h5ad": write_h5ad_source, "10x_mtx": write_10x_mtx_source, "10x_h5": write_10x_h5_source,
    "gct": write_gct_source, "star_counts": write_star_counts_source, "geo_table": write_geo_table_source,
    "sciplex_triplets": write_sciplex_source, "mixseq_zip": write_mixseq_source,
}


def simulate_sources(out_dir: Path, seed: int = 0, scale: float = 1.0, progress: bool = False) -> dict:
    """Write every simulated dataset under ``out_dir/<dataset>/``, ``out_dir/datasets.yaml`` (``{datasets: {name:
    entry}}``, file paths relative to ``out_dir``) and ``out_dir/truth.json``; return the truth dict.

    ``scale`` multiplies sample counts (1.0: a few hundred to ~1,000 samples per dataset); the screen keeps ≥ 12
    cells per perturbation at any scale. Same ``seed`` and ``scale`` → identical files.
    """
    out_dir = Path(out_dir)
    simulation = generate(seed, scale, progress=progress)
    for ds in tqdm(simulation.datasets.values(), desc="write sources", disable=not progress):
        WRITERS[ds.fmt](ds, out_dir, int(seed))
    config = {"datasets": {name: ds.spec for name, ds in simulation.datasets.items()}}
    with atomic_path(out_dir / "datasets.yaml") as tmp:
        tmp.write_text(yaml.safe_dump(config, sort_keys=False, default_flow_style=False, allow_unicode=True),
                       encoding="utf-8")
    write_planted_relationships(simulation.truth, out_dir / "relationships" / "PlantedModules.txt")
    write_evaluation_screen(simulation.universe, out_dir / EVAL_SCREEN_NAME, int(seed), float(scale))
    with atomic_path(out_dir / "truth.json") as tmp:
        tmp.write_text(json.dumps(simulation.truth, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return simulation.truth


def write_planted_relationships(truth: dict, path: Path) -> None:
    """The planted gene modules as a relationship database (``entity1,entity2`` symbol pairs, one per unordered
    pair of genes in the same module) — the format of ``resources/gene_relationships``, so ``txfm evaluate
    --relationships`` can score the simulated screen against the biology that was planted in it."""
    pairs = [(a, b) for module in truth["modules"] for i, a in enumerate(module["symbols"])
             for b in module["symbols"][i + 1:]]
    with atomic_path(path) as tmp:
        pd.DataFrame(pairs, columns=["entity1", "entity2"]).to_csv(tmp, index=False)


# ----------------------------------------------------------------------------------------------------------------
# Held-out evaluation screen (zero-shot, never curated into the corpus)
# ----------------------------------------------------------------------------------------------------------------
EVAL_SCREEN_NAME = "sim_eval_screen"
#: Perturbed genes per module (their same-module pairs are the relationships recall is scored on) and null ones.
EVAL_PERTURBED_PER_MODULE = 3
EVAL_NULL_PERTURBATIONS = 20
#: Weak, noisy phenotypes so that no embedding saturates the benchmark: the rest of the module keeps 70 % of its
#: expression (sim_screen: 20 %), state programs move at 0.35 × sim_screen's response, knock-down
#: efficiency varies per guide (× U(0.5, 1.5) on the log effect), and 8–14 cells carry each perturbation.
EVAL_MODULE_KNOCKDOWN = 0.7
EVAL_RESPONSE_SCALE = 0.35
EVAL_CELLS_PER_PERTURBATION = (8, 15)


def write_evaluation_screen(universe: Universe, out_dir: Path, seed: int = 0, scale: float = 1.0) -> Path:
    """``<out_dir>/sim_eval_screen.h5ad``: a CRISPRi screen of the same biology as the corpus sources (the
    universe's co-expression modules, cell-state programs) that no corpus dataset contains — the paper's
    zero-shot setting. obs: ``gene`` (target symbol or ``non-targeting``), ``gem_group`` (4), ``module``
    (``module<m>`` / ``null`` / ``control``); var: index = Ensembl IDs, ``gene_name`` = symbols. Relationships:
    ``relationships/PlantedModules.txt`` (every same-module pair). Deterministic for (seed, scale)."""
    rng = np.random.default_rng([int(seed), 60])
    per_module = EVAL_PERTURBED_PER_MODULE
    real = np.concatenate([rng.choice(universe.modules[m], size=per_module, replace=False) for m in range(N_MODULES)])
    plain = np.setdiff1d(np.arange(universe.n_genes), np.union1d(universe.module_genes, universe.rare))
    null = rng.choice(plain, size=EVAL_NULL_PERTURBATIONS, replace=False)
    targets = np.concatenate([real, null])
    low, high = EVAL_CELLS_PER_PERTURBATION
    cells_per = np.maximum(2, np.round(rng.integers(low, high, size=len(targets)) * min(scale, 1.0)).astype(int))
    n_perturbed = int(cells_per.sum())
    pert_of_cell = np.concatenate([np.repeat(np.arange(len(targets)), cells_per),
                                   np.full(int(round(0.15 / 0.85 * n_perturbed)), -1)])
    pert_of_cell = pert_of_cell[rng.permutation(len(pert_of_cell))]
    n, n_gem = len(pert_of_cell), 4
    gem = rng.integers(0, n_gem, n)
    log_rate = log_expression(rng, universe, programs(rng, universe, 1), np.zeros(n, dtype=int), gem, n_gem)
    states = ScreenStates.draw(rng, universe)
    effect = states.perturbation_effects(universe, real, EVAL_MODULE_KNOCKDOWN, EVAL_RESPONSE_SCALE)
    efficiency = rng.uniform(0.5, 1.5, size=len(real))
    row = np.where((pert_of_cell >= 0) & (pert_of_cell < len(real)), pert_of_cell + 1, 0)
    log_rate += effect[row] * np.where(row > 0, efficiency[np.maximum(row - 1, 0)], 0.0)[:, None]
    is_null = pert_of_cell >= len(real)
    log_rate[np.flatnonzero(is_null), targets[pert_of_cell[is_null]]] += np.log(TARGET_KNOCKDOWN)
    states.add_activity(rng, log_rate)
    counts = nb_counts(rng, log_rate, sc_library(rng, n), theta=NB_THETA["single_cell"])
    module_of = np.concatenate([np.repeat(np.arange(N_MODULES), per_module), np.full(len(null), -1)])
    module_label = np.where(pert_of_cell < 0, "control",
                            np.where(module_of[np.maximum(pert_of_cell, 0)] >= 0,
                                     np.char.add("module", module_of[np.maximum(pert_of_cell, 0)].astype(str)), "null"))
    obs = pd.DataFrame({"gene": np.where(pert_of_cell >= 0, universe.symbol[targets[np.maximum(pert_of_cell, 0)]],
                                         CONTROL_LABEL_SCREEN),
                        "gem_group": (gem + 1).astype(np.int64), "module": module_label},
                       index=pd.Index([f"eval{i:05d}" for i in range(n)]))
    var = pd.DataFrame({"gene_name": universe.symbol.astype(object)},
                       index=pd.Index(universe.gene_id.astype(object), name="gene_id"))
    out_dir.mkdir(parents=True, exist_ok=True)
    return write_streamed_h5ad(out_dir / f"{EVAL_SCREEN_NAME}.h5ad", obs, var,
                               iter([sp.csr_matrix(counts.astype(np.float32))]))


# ----------------------------------------------------------------------------------------------------------------
# Large streamed h5ad (memory benchmarks)
# ----------------------------------------------------------------------------------------------------------------
#: Entries (cells × genes) generated at once inside a chunk: bounds the dense scratch arrays to ~8 MB each.
_BLOCK_ENTRIES = 1_000_000
LARGE_SCREEN_REAL = 50
LARGE_SCREEN_NULL = 50


def _index_barcodes(index: np.ndarray, seed: int, gem: np.ndarray) -> np.ndarray:
    """Unique barcodes from cell numbers: an odd multiplier is a bijection mod 2**32 = 4**16 barcodes."""
    offset = np.uint64((0x6A09E667 + 0x85EBCA6B * int(seed)) % (1 << 32))
    code = (index.astype(np.uint64) * np.uint64(0x9E3779B1) + offset) % np.uint64(1 << 32)
    digits = (code[:, None] >> (2 * np.arange(16, dtype=np.uint64))[None, ::-1]) & np.uint64(3)
    letters = np.ascontiguousarray(_BASES[digits.astype(np.int64)]).view("<U16").ravel()
    return np.char.add(np.char.add(letters, "-"), (gem + 1).astype(str))


def write_large_h5ad(path: Path, n_cells: int, n_genes: int = 2000, seed: int = 0, chunk_cells: int = 10_000,
                     progress: bool = False) -> None:
    """Stream a simulated CRISPRi screen of ``n_cells`` × ``n_genes`` raw counts to an h5ad at ``path``.

    Same biology as ``sim_screen`` (modules, cell-state programs, 50 real and 50 null perturbations, ~15 %
    ``non-targeting`` controls, 8 contiguous gem groups, ~2k UMIs per cell). X is CSR float32 appended chunk by
    chunk (:func:`simulation.h5ad.write_streamed_h5ad`); obs (index = barcodes, ``gene``, ``gem_group``), var
    (index = Ensembl IDs, ``gene_name``). Peak memory is O(chunk_cells × nnz per cell) plus obs, not
    O(n_cells × nnz); time is ~0.1 µs per matrix entry (≈ 2 min for 500k × 2,000).
    """
    if isinstance(n_cells, bool) or int(n_cells) != n_cells or n_cells < 1:
        raise ValueError(f"write_large_h5ad: n_cells must be a positive integer, got {n_cells!r}")
    if int(chunk_cells) != chunk_cells or chunk_cells < 1:
        raise ValueError(f"write_large_h5ad: chunk_cells must be a positive integer, got {chunk_cells!r}")
    n_cells, chunk_cells = int(n_cells), int(chunk_cells)
    pool = load_gene_pool()
    rng = np.random.default_rng([int(seed), 1000])
    universe = make_universe(pool, rng, int(n_genes))
    base = universe.log_base + programs(rng, universe, 1)[0]
    n_gem = 8
    batch_lfc = rng.normal(0.0, 0.15, (n_gem, universe.n_genes))

    # Perturbation effects: row 0 = control, then real (module knock-down + state response), then null (none).
    states = ScreenStates.draw(rng, universe)
    real = rng.choice(universe.module_genes, size=LARGE_SCREEN_REAL, replace=False)
    plain = np.setdiff1d(np.arange(universe.n_genes), np.union1d(universe.module_genes, universe.rare))
    null = rng.choice(plain, size=LARGE_SCREEN_NULL, replace=False)
    labels = np.concatenate([[CONTROL_LABEL_SCREEN], universe.symbol[real], universe.symbol[null]])
    effect = np.vstack([states.perturbation_effects(universe, real), np.zeros((len(null), universe.n_genes))])

    cell = np.arange(n_cells)
    gem = (cell * n_gem) // n_cells  # gem groups are contiguous runs of cells, as in real screens
    label_rng = np.random.default_rng([int(seed), 1001])
    label = np.where(label_rng.random(n_cells) < 0.15, 0, label_rng.integers(1, len(labels), n_cells))
    obs = pd.DataFrame({"gene": pd.Categorical.from_codes(label, categories=labels.tolist()),
                        "gem_group": (gem + 1).astype(np.int64)},
                       index=pd.Index(_index_barcodes(cell, int(seed), gem).astype(object)))
    var = pd.DataFrame({"gene_name": universe.symbol.astype(object)},
                       index=pd.Index(universe.gene_id.astype(object), name="gene_id"))

    def chunks() -> Iterator[sp.csr_matrix]:
        block = max(1, _BLOCK_ENTRIES // universe.n_genes)
        for chunk_number, start in enumerate(range(0, n_cells, chunk_cells)):
            stop = min(start + chunk_cells, n_cells)
            chunk_rng = np.random.default_rng([int(seed), 1002, chunk_number])
            pieces = []
            for lo in range(start, stop, block):
                rows = slice(lo, min(lo + block, stop))
                log_rate = base[None, :] + batch_lfc[gem[rows]] + effect[label[rows]]
                activity = chunk_rng.normal(0.0, 0.4, (log_rate.shape[0], N_MODULES))
                log_rate[:, universe.module_genes] += np.repeat(activity, MODULE_SIZE, axis=1)
                states.add_activity(chunk_rng, log_rate)
                counts = nb_counts(chunk_rng, log_rate, sc_library(chunk_rng, log_rate.shape[0]),
                                   theta=NB_THETA["single_cell"])
                pieces.append(sp.csr_matrix(counts.astype(np.float32)))
            yield sp.csr_matrix(sp.vstack(pieces))

    write_streamed_h5ad(path, obs, var, chunks(), progress=progress)
