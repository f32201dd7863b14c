"""The one simulated biology: genes, co-expression modules, knock-downs and count noise.

Every simulator in this package draws from these pieces, so changing the biology is one edit here:

* :mod:`simulation.sources` — raw files in every real input format (the offline demo, curation tests);
* :mod:`simulation.corpus` — corpora in the shard layout of :mod:`curation.schema` (trainer tests, benchmarks);
* :mod:`simulation.screen` — CRISPR screens with planted modules (evaluation tests, memory benchmarks).

Model. A sample's log expression over genes is a baseline profile plus cell-type/tissue programs, per-batch
multiplicative effects, per-module activity shared by the module's genes (co-expression) and perturbation effects;
counts are negative binomial (gamma-Poisson, inverse dispersion ``theta``) around ``library × softmax(log
expression)`` (:func:`nb_counts`). A CRISPRi knock-down keeps :data:`TARGET_KNOCKDOWN` of the target's expression
and, in a screen, :data:`MODULE_KNOCKDOWN` of the rest of the target's module (:class:`ScreenStates`).

Genes are either real (:func:`load_gene_pool` + :func:`make_universe`: protein-coding HGNC genes with Ensembl IDs
from ``resources/genes``, for sources that curation must harmonise) or synthetic (:func:`synthetic_gene_ids`:
``ENSG9<g:010d>`` / ``SYN<g>``, for corpora and screens that skip curation; a checkpoint trained on a synthetic
corpus maps the genes of a synthetic screen).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from curation.io import CurationError

#: Reference gene snapshots (the same directory curation.genes reads).
DEFAULT_GENE_DIR = Path(__file__).resolve().parent.parent / "resources" / "genes"
HGNC_FILE = "hgnc_human_gene_table.parquet"
GENCODE_FILE = "gencode_v44_gene_id2name.csv.gz"

N_UNIVERSE_GENES = 1500
N_MODULES = 20
MODULE_SIZE = 10
N_RARE_GENES = 8
#: Proportion of a rare gene's expression: ~0.004 UMIs per 2k-UMI cell, detected in a handful of cells.
RARE_GENE_PROPORTION = 2e-6

#: Share of a knocked-down target's expression that remains (CRISPRi: ~90 % knock-down), used by every simulator.
TARGET_KNOCKDOWN = 0.1
#: Share of expression that the other genes of the target's module keep in a screen (the module's phenotype).
MODULE_KNOCKDOWN = 0.2
#: Negative-binomial inverse dispersion theta (variance mu + mu²/theta) of single-cell and bulk counts.
NB_THETA = {"single_cell": 4.0, "bulk": 30.0}
#: Cell-state programs of a screen (cell cycle, stress, differentiation…): broad gene sets whose activity varies
#: among control cells and which each module's knock-down shifts. Effects along control-variance directions are
#: what a control-PCA embedding (phenoprint) can see; a 10-gene module alone is lost among ~1,500 noisy genes.
N_STATE_PROGRAMS = 5
STATE_PROGRAM_SIZE = 80
STATE_ACTIVITY_SD = 0.5
#: Activity shift (log scale, per program loading) of the two programs a module's knock-down moves.
STATE_RESPONSE = 1.2

_SAFE_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9-]+$")
_SYMBOL_RE = re.compile(r"^[A-Z][A-Z0-9-]*$")


def synthetic_gene_ids(n_genes: int) -> np.ndarray:
    """(n_genes,) str Ensembl-shaped IDs ``ENSG9<g:010d>`` of synthetic genes (no real gene starts with ENSG9)."""
    return np.asarray([f"ENSG9{g:010d}" for g in range(n_genes)], dtype=object)


def synthetic_gene_symbols(n_genes: int) -> np.ndarray:
    """(n_genes,) str symbols ``SYN<g>`` of the synthetic genes of :func:`synthetic_gene_ids`."""
    return np.asarray([f"SYN{g}" for g in range(n_genes)], dtype=object)


# ----------------------------------------------------------------------------------------------------------------
# Real reference genes
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GenePool:
    """Protein-coding HGNC genes that a symbol or Ensembl ID resolves to unambiguously.

    ``gene_id`` / ``symbol``: (n_genes,) str, sorted by gene_id. ``alias`` / ``previous``: gene_id -> one alias /
    previous symbol that names exactly that gene and collides (case-insensitively) with no current symbol, GENCODE
    name or other gene's alias. ``taken_names``: every upper-cased name that resolves to some gene.
    """

    gene_id: np.ndarray
    symbol: np.ndarray
    alias: dict[str, str]
    previous: dict[str, str]
    taken_names: frozenset[str]


def _split_names(value: Any) -> list[str]:
    if not isinstance(value, str):
        return []
    return [name.strip() for name in value.split("|") if name.strip()]


def load_gene_pool(gene_dir: Path | None = None) -> GenePool:
    """Read the HGNC / GENCODE snapshots in ``gene_dir`` (default resources/genes) into a :class:`GenePool`."""
    gene_dir = Path(gene_dir or DEFAULT_GENE_DIR)
    hgnc_path, gencode_path = gene_dir / HGNC_FILE, gene_dir / GENCODE_FILE
    for path in (hgnc_path, gencode_path):
        if not path.is_file():
            raise CurationError(path, "reference gene file is missing")
    hgnc = pd.read_parquet(hgnc_path, columns=["ensembl_id", "symbol", "alias_symbols", "prev_symbols",
                                               "canonical_biotype"])
    gencode = pd.read_csv(gencode_path, header=None, names=["gene_id", "name"], dtype=str)

    # Which genes each upper-cased current name belongs to (HGNC symbols and GENCODE names, any gene).
    owners: dict[str, set[str]] = {}
    for name, gene in zip(pd.concat([hgnc["symbol"], gencode["name"]]),
                          pd.concat([hgnc["ensembl_id"], gencode["gene_id"]])):
        if isinstance(name, str):
            owners.setdefault(name.upper(), set()).add(gene if isinstance(gene, str) else "")
    # How many HGNC rows list each upper-cased alias / previous symbol.
    other_names = Counter(name.upper() for aliases, prevs in zip(hgnc["alias_symbols"], hgnc["prev_symbols"])
                          for name in set(_split_names(aliases)) | set(_split_names(prevs)))

    coding = hgnc[(hgnc["canonical_biotype"] == "protein_coding") & hgnc["ensembl_id"].notna()]
    coding = coding[~coding["ensembl_id"].duplicated(keep=False) & coding["symbol"].str.match(_SYMBOL_RE)]
    unique_name = [owners.get(sym.upper()) == {gid} and other_names[sym.upper()] == 0
                   for sym, gid in zip(coding["symbol"], coding["ensembl_id"])]
    coding = coding[np.asarray(unique_name, dtype=bool)].sort_values("ensembl_id")

    def safe(name: str) -> bool:
        key = name.upper()
        return bool(_SAFE_NAME_RE.match(name)) and key not in owners and other_names[key] == 1 \
            and not key.startswith("ENSG")

    alias: dict[str, str] = {}
    previous: dict[str, str] = {}
    for gid, aliases, prevs in zip(coding["ensembl_id"], coding["alias_symbols"], coding["prev_symbols"]):
        prev_names = [name for name in _split_names(prevs) if safe(name)]
        alias_names = [name for name in _split_names(aliases) if safe(name) and name not in prev_names]
        if prev_names:
            previous[gid] = prev_names[0]
        if alias_names:
            alias[gid] = alias_names[0]
    taken = frozenset(owners) | frozenset(other_names)
    return GenePool(gene_id=coding["ensembl_id"].to_numpy(str), symbol=coding["symbol"].to_numpy(str),
                    alias=alias, previous=previous, taken_names=taken)


@dataclass(frozen=True)
class Universe:
    """The genes every simulated dataset draws its panel from, and their shared expression structure.

    All arrays are over the ``n_genes`` universe genes: ``gene_id``, ``symbol`` (str), ``version`` (int, the
    Ensembl version suffix used in versioned IDs), ``log_base`` (float64, natural log of the baseline proportion;
    ``exp`` sums to 1). ``modules``: (N_MODULES, MODULE_SIZE) int universe indices; ``rare``: (N_RARE_GENES,) int.
    """

    gene_id: np.ndarray
    symbol: np.ndarray
    version: np.ndarray
    log_base: np.ndarray
    modules: np.ndarray
    rare: np.ndarray

    @property
    def n_genes(self) -> int:
        return int(self.gene_id.shape[0])

    def versioned_id(self, idx: np.ndarray) -> np.ndarray:
        """``ENSG…​.<version>`` IDs of universe genes ``idx``."""
        return np.char.add(np.char.add(self.gene_id[idx], "."), self.version[idx].astype(str))

    @property
    def module_genes(self) -> np.ndarray:
        return self.modules.ravel()


def make_universe(pool: GenePool, rng: np.random.Generator, n_genes: int = N_UNIVERSE_GENES) -> Universe:
    """Draw ``n_genes`` pool genes, a baseline profile, modules (among well-expressed genes) and rare genes."""
    if not 2 * N_MODULES * MODULE_SIZE <= n_genes <= len(pool.gene_id):
        raise ValueError(f"make_universe: n_genes must be in [{2 * N_MODULES * MODULE_SIZE}, {len(pool.gene_id)}] "
                         f"(modules need well-expressed genes; the reference pool is finite), got {n_genes}")
    chosen = np.sort(rng.choice(len(pool.gene_id), size=n_genes, replace=False))
    log_base = rng.normal(0.0, 1.2, size=n_genes)
    order = np.argsort(log_base)
    rare = np.sort(rng.choice(order[: n_genes // 2], size=N_RARE_GENES, replace=False))
    # Modules among well-expressed genes so that knocking one down is visible in ~2k-UMI cells.
    well_expressed = order[int(0.4 * n_genes):]
    modules = rng.choice(well_expressed, size=(N_MODULES, MODULE_SIZE), replace=False)
    proportions = np.exp(log_base)
    proportions[rare] = 0.0
    proportions *= (1.0 - N_RARE_GENES * RARE_GENE_PROPORTION) / proportions.sum()
    proportions[rare] = RARE_GENE_PROPORTION
    return Universe(gene_id=pool.gene_id[chosen], symbol=pool.symbol[chosen],
                    version=rng.integers(1, 21, size=n_genes), log_base=np.log(proportions),
                    modules=modules, rare=rare)


# ----------------------------------------------------------------------------------------------------------------
# Expression model
# ----------------------------------------------------------------------------------------------------------------
def programs(rng: np.random.Generator, universe: Universe, n_programs: int, fraction: float = 0.08,
             sd: float = 1.2, modules_on: int = 3, module_lfc: float = 1.5) -> np.ndarray:
    """(n_programs × n_genes) natural-log fold changes of cell-type / tissue programs.

    Each program changes a random ``fraction`` of genes by N(0, sd) and switches on ``modules_on`` whole modules
    (+``module_lfc`` on every gene of the module). Rare genes stay rare.
    """
    lfc = np.where(rng.random((n_programs, universe.n_genes)) < fraction,
                   rng.normal(0.0, sd, (n_programs, universe.n_genes)), 0.0)
    for p in range(n_programs):
        for m in rng.choice(N_MODULES, size=min(modules_on, N_MODULES), replace=False):
            lfc[p, universe.modules[m]] += module_lfc
    lfc[:, universe.rare] = 0.0
    return lfc


def log_expression(rng: np.random.Generator, universe: Universe, program_lfc: np.ndarray, program: np.ndarray,
                   batch: np.ndarray, n_batches: int, batch_sd: float = 0.15, module_sd: float = 0.4) -> np.ndarray:
    """(n_samples × n_genes) unnormalised log expression.

    ``program``/``batch``: (n_samples,) int codes into ``program_lfc`` rows and ``n_batches`` per-batch gene
    effects (log-normal multiplicative, sd ``batch_sd``). Every module gets a per-sample N(0, module_sd)
    activity shared by its genes, which makes them co-expressed in every dataset.
    """
    batch_lfc = rng.normal(0.0, batch_sd, (n_batches, universe.n_genes))
    batch_lfc[:, universe.rare] = 0.0
    log_rate = universe.log_base[None, :] + program_lfc[program] + batch_lfc[batch]
    activity = rng.normal(0.0, module_sd, (len(program), N_MODULES))
    log_rate[:, universe.module_genes] += np.repeat(activity, MODULE_SIZE, axis=1)
    return log_rate


def expected_counts(log_rate: np.ndarray, library: np.ndarray) -> np.ndarray:
    """(n_samples × n_genes) float64 mean counts: ``library`` (n_samples,) × softmax of ``log_rate`` over genes."""
    shifted = np.exp(log_rate - log_rate.max(axis=1, keepdims=True))
    return shifted * (library / shifted.sum(axis=1))[:, None]


def nb_counts(rng: np.random.Generator, log_rate: np.ndarray, library: np.ndarray,
              theta: float | None) -> np.ndarray:
    """Negative-binomial counts (n_samples × n_genes) int64 around :func:`expected_counts`.

    Dispersion via a gamma(theta, 1/theta) multiplier per entry (variance mu + mu²/theta); ``theta=None`` draws
    plain Poisson counts (the limit theta → ∞).
    """
    mean = expected_counts(log_rate, library)
    if theta is None:
        return rng.poisson(mean)
    return rng.poisson(mean * rng.standard_gamma(theta, size=mean.shape) / theta)


def sc_library(rng: np.random.Generator, n: int, median: float = 2000.0) -> np.ndarray:
    """(n,) single-cell expected UMIs per cell, log-normal around ``median`` (most in 1–3k)."""
    return np.exp(rng.normal(np.log(median), 0.3, n))


def bulk_library(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n,) bulk expected reads per sample, log-uniform in [1e6, 1e7]."""
    return np.exp(rng.uniform(np.log(1e6), np.log(1e7), n))


# ----------------------------------------------------------------------------------------------------------------
# Screens: knock-downs of module genes and the cell states they shift
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScreenStates:
    """Cell-state programs of a perturbation screen and how each module's knock-down moves them.

    ``genes``: (N_STATE_PROGRAMS, STATE_PROGRAM_SIZE) universe indices (plain genes, disjoint); ``loadings``:
    same shape, signed per-gene weights (|w| in [0.5, 1]); ``response``: (N_MODULES, N_STATE_PROGRAMS) activity
    shift caused by knocking down a module (two programs per module, ±STATE_RESPONSE), so perturbations of the
    same module have the same phenotype.
    """

    genes: np.ndarray
    loadings: np.ndarray
    response: np.ndarray

    @classmethod
    def draw(cls, rng: np.random.Generator, universe: Universe) -> "ScreenStates":
        plain = np.setdiff1d(np.arange(universe.n_genes), np.union1d(universe.module_genes, universe.rare))
        size = min(STATE_PROGRAM_SIZE, len(plain) // N_STATE_PROGRAMS)  # small universes get smaller programs
        genes = rng.choice(plain, size=(N_STATE_PROGRAMS, size), replace=False)
        loadings = rng.choice([-1.0, 1.0], size=genes.shape) * rng.uniform(0.5, 1.0, genes.shape)
        response = np.zeros((N_MODULES, N_STATE_PROGRAMS))
        for m in range(N_MODULES):
            response[m, rng.choice(N_STATE_PROGRAMS, size=2, replace=False)] = rng.choice([-1.0, 1.0], 2) \
                * STATE_RESPONSE
        return cls(genes=genes, loadings=loadings, response=response)

    def perturbation_effects(self, universe: Universe, targets: np.ndarray, module_knockdown: float = MODULE_KNOCKDOWN,
                             response_scale: float = 1.0) -> np.ndarray:
        """(1 + n_targets, n_genes) log effects: row 0 = no effect (controls), row k = knock-down of
        ``targets[k-1]`` (a module gene): target ×TARGET_KNOCKDOWN, rest of its module ×``module_knockdown``,
        and ``response_scale`` × the module's state-program response (weaker screens: a knock-down closer to 1
        and a smaller scale)."""
        module_of_gene = np.full(universe.n_genes, -1)
        module_of_gene[universe.module_genes] = np.repeat(np.arange(N_MODULES), MODULE_SIZE)
        effect = np.zeros((len(targets) + 1, universe.n_genes))
        for k, target in enumerate(targets, start=1):
            module = module_of_gene[target]
            if module < 0:
                raise ValueError(f"perturbation_effects: target {universe.symbol[target]} is in no module")
            effect[k, universe.modules[module]] = np.log(module_knockdown)
            effect[k, target] = np.log(TARGET_KNOCKDOWN)
            for p in np.flatnonzero(self.response[module]):
                effect[k, self.genes[p]] += response_scale * self.response[module, p] * self.loadings[p]
        return effect

    def add_activity(self, rng: np.random.Generator, log_rate: np.ndarray) -> None:
        """Add each cell's N(0, STATE_ACTIVITY_SD) program activities to ``log_rate`` (n_cells × n_genes)."""
        activity = rng.normal(0.0, STATE_ACTIVITY_SD, (log_rate.shape[0], N_STATE_PROGRAMS))
        for p in range(N_STATE_PROGRAMS):
            log_rate[:, self.genes[p]] += activity[:, p:p + 1] * self.loadings[p][None, :]

    def describe(self, universe: Universe) -> list[dict]:
        """JSON-ready programs: gene IDs, loadings and which modules shift them (and how)."""
        return [{"program": p, "gene_ids": universe.gene_id[self.genes[p]].tolist(),
                 "loadings": np.round(self.loadings[p], 6).tolist(),
                 "shifted_by_modules": {str(m): float(self.response[m, p])
                                        for m in np.flatnonzero(self.response[:, p])}}
                for p in range(N_STATE_PROGRAMS)]
