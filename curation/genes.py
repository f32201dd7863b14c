"""The reference gene vocabulary and feature → gene harmonisation.

The *reference table* is the union of the HGNC complete set (genes that have an Ensembl ID) and every GENCODE v44
gene ID, sorted by unversioned Ensembl gene ID; its row number is the *reference index* used by every curated
intermediate (see docs/ARCHITECTURE.md, "Gene index spaces").

Resolution of one feature, first hit wins:

1. **Ensembl ID** — versioned or not (``ENSG00000141510.17`` → ``ENSG00000141510``). A ``_PAR_Y`` suffix (older
   GENCODE annotations duplicate the pseudo-autosomal genes on chrY) maps to the **X copy**, so the two copies are
   summed by :meth:`GeneMapping.harmonise`: quantifiers split or zero the multi-mapping PAR reads, and their sum is
   the gene's expression.
2. **Current symbol** — the HGNC approved symbol, or for genes without an HGNC entry the GENCODE name (when it is a
   real name, not the ID, and unique); case-sensitive first, then case-insensitive when that is unambiguous.
3. **Previous symbol** — HGNC previous symbols, plus a GENCODE v44 name that differs from the HGNC symbol of the
   same gene (GENCODE lags HGNC renames, e.g. ABCA3P1 → ABCA16P).
4. **Alias** — HGNC alias symbols.

Previous symbols and aliases are used only when they point to exactly one gene (an alias must also not be a
previous symbol of another gene) and do not equal any current HGNC symbol — including the symbols of HGNC genes
without an Ensembl ID, which are not in the reference but would otherwise be silently mis-assigned.

When a feature has both an ID and a symbol (10x ``features.tsv``), the ID is tried first and the symbol only if the
ID does not resolve; a feature ID that does not look like an Ensembl ID is itself tried as a symbol.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from curation.io import CurationError

#: Directory of the shipped identifier snapshots.
DEFAULT_GENE_DIR = Path(__file__).resolve().parent.parent / "resources" / "genes"
HGNC_FILE = "hgnc_human_gene_table.parquet"
GENCODE_FILE = "gencode_v44_gene_id2name.csv.gz"

#: ``how`` labels of a mapping, in resolution order.
MAPPING_KINDS = ("ensembl", "symbol", "previous", "alias", "unmapped")
#: How many unmapped feature IDs a mapping report lists.
N_UNMAPPED_EXAMPLES = 20

# Group 1: unversioned human gene ID; optional ".<version>"; optional "_PAR_Y" (chrY pseudo-autosomal copy).
_ENSEMBL_RE = r"^(ENSG\d{11})(?:\.\d+)?(_PAR_Y)?$"
_HGNC_NUMBER_RE = re.compile(r"(\d+)$")


def _split_symbols(column: pd.Series) -> pd.Series:
    """Explode a "A|B|C" column into one stripped, non-empty symbol per row (index kept)."""
    exploded = column.fillna("").astype(str).str.split("|").explode().str.strip()
    return exploded[exploded != ""]


def _unique_targets(keys: pd.Series, genes: pd.Series) -> pd.Series:
    """``key -> gene`` for keys that name exactly one distinct gene (ambiguous keys dropped)."""
    pairs = pd.DataFrame({"key": keys.to_numpy(), "gene": genes.to_numpy()}).drop_duplicates()
    n_targets = pairs.groupby("key")["gene"].transform("size")
    unique = pairs[n_targets == 1]
    return pd.Series(unique["gene"].to_numpy(), index=unique["key"].to_numpy())


@dataclass(frozen=True)
class _SymbolIndex:
    """Symbol lookup tables, each ``symbol -> reference index`` (int64)."""

    current: dict[str, int]
    current_upper: dict[str, int]
    previous: dict[str, int]
    alias: dict[str, int]


def build_reference_table(directory: Path) -> tuple[pd.DataFrame, _SymbolIndex]:
    """Parse the HGNC and GENCODE snapshots in ``directory``.

    Returns the reference table (columns gene_id, symbol, biotype; sorted by gene_id; row = reference index) and
    the symbol lookup tables. Biotype is HGNC's canonical biotype, null for GENCODE-only genes (the GENCODE
    snapshot carries no biotype).
    """
    hgnc_path, gencode_path = directory / HGNC_FILE, directory / GENCODE_FILE
    for path in (hgnc_path, gencode_path):
        if not path.is_file():
            raise CurationError(path, "reference gene file is missing")
    hgnc = pd.read_parquet(hgnc_path, columns=["ensembl_id", "symbol", "alias_symbols", "prev_symbols",
                                               "canonical_biotype", "source_id"])
    gencode = pd.read_csv(gencode_path, header=None, names=["gene_id", "name"], dtype=str)
    if gencode["gene_id"].isna().any() or not gencode["gene_id"].str.match(_ENSEMBL_RE).all():
        raise CurationError(gencode_path, "column 1 must hold Ensembl gene IDs (ENSG…) on every row")

    # Several HGNC genes can share one Ensembl ID (3 in the 2026 snapshot); the gene keeps the symbol with the
    # lowest HGNC number (the older, primary entry) while every symbol still resolves to it below.
    hgnc["hgnc_number"] = hgnc["source_id"].str.extract(_HGNC_NUMBER_RE, expand=False).astype(float)
    with_id = hgnc.dropna(subset=["ensembl_id"]).sort_values(["ensembl_id", "hgnc_number"], kind="stable")
    primary = with_id.drop_duplicates("ensembl_id")

    gene_ids = np.union1d(primary["ensembl_id"].to_numpy(str), gencode["gene_id"].to_numpy(str))
    genes = pd.DataFrame({"gene_id": gene_ids})
    by_hgnc = primary.set_index("ensembl_id")
    gencode_name = gencode.drop_duplicates("gene_id").set_index("gene_id")["name"]
    gencode_name = gencode_name[gencode_name != gencode_name.index]  # "names" equal to the ID are no names
    genes["symbol"] = genes["gene_id"].map(by_hgnc["symbol"]).fillna(genes["gene_id"].map(gencode_name))
    genes["biotype"] = genes["gene_id"].map(by_hgnc["canonical_biotype"])
    genes = genes.astype({"symbol": object, "biotype": object}).where(genes.notna(), None)

    ref_of_id = pd.Series(np.arange(len(genes), dtype=np.int64), index=genes["gene_id"])
    hgnc_ref = with_id["ensembl_id"].map(ref_of_id)
    hgnc_symbols = set(hgnc["symbol"].dropna())  # includes HGNC genes without an Ensembl ID (collision guard)

    # Current symbols: every HGNC symbol with an ID, plus unique GENCODE names of genes HGNC does not know.
    gencode_only = gencode_name[~gencode_name.index.isin(by_hgnc.index)]
    gencode_only = gencode_only[~gencode_only.isin(hgnc_symbols)]
    # A name that is any gene's current name (even an ambiguous one) must never resolve as another's alias.
    taken_symbols = hgnc_symbols | set(gencode_only)
    current = pd.concat([
        pd.Series(hgnc_ref.to_numpy(), index=with_id["symbol"].to_numpy()),
        _unique_targets(pd.Series(gencode_only.to_numpy()), gencode_only.index.to_series().map(ref_of_id)),
    ])
    current_upper = _unique_targets(pd.Series(current.index.str.upper()), pd.Series(current.to_numpy()))

    # Previous symbols: HGNC previous symbols + outdated GENCODE names of HGNC genes.
    prev = _split_symbols(with_id["prev_symbols"])
    outdated = gencode_name[gencode_name.index.isin(by_hgnc.index)]
    outdated = outdated[outdated.to_numpy() != by_hgnc.loc[outdated.index, "symbol"].to_numpy()]
    prev_keys = pd.concat([pd.Series(prev.to_numpy()), pd.Series(outdated.to_numpy())], ignore_index=True)
    prev_genes = pd.concat([hgnc_ref.loc[prev.index], outdated.index.to_series().map(ref_of_id)],
                           ignore_index=True)
    previous = _unique_targets(prev_keys, prev_genes)
    previous = previous[~previous.index.isin(taken_symbols)]

    alias_sym = _split_symbols(with_id["alias_symbols"])
    alias_keys = pd.concat([pd.Series(alias_sym.to_numpy()), prev_keys], ignore_index=True)
    alias_genes = pd.concat([hgnc_ref.loc[alias_sym.index], prev_genes], ignore_index=True)
    alias = _unique_targets(alias_keys, alias_genes)
    alias = alias[~alias.index.isin(taken_symbols) & alias.index.isin(alias_sym.to_numpy())]

    def as_dict(series: pd.Series) -> dict[str, int]:
        return {str(k): int(v) for k, v in series.items()}

    return genes, _SymbolIndex(as_dict(current), as_dict(current_upper), as_dict(previous), as_dict(alias))


@functools.lru_cache(maxsize=4)
def _load_cached(directory: Path) -> "GeneTable":
    genes, symbols = build_reference_table(directory)
    return GeneTable(genes=genes, _symbols=symbols)


@dataclass(frozen=True, eq=False)
class GeneTable:
    """The reference vocabulary. ``genes``: DataFrame[gene_id, symbol, biotype]; row number = reference index.

    ``load`` returns one shared instance per directory: treat ``genes`` as read-only (copy before editing).
    """

    genes: pd.DataFrame
    _symbols: _SymbolIndex = field(repr=False)

    @classmethod
    def load(cls, directory: Path | None = None) -> "GeneTable":
        """Load (once per process and directory) the reference table from ``directory`` (default resources/genes)."""
        return _load_cached(Path(directory or DEFAULT_GENE_DIR).resolve())

    def __len__(self) -> int:
        return len(self.genes)

    def map_features(self, feature_ids: Sequence[str], symbols: Sequence[str] | None = None) -> "GeneMapping":
        """Resolve ``feature_ids`` (n_features,) — and optional parallel ``symbols`` — to reference indices."""
        ids = pd.Series(list(feature_ids), dtype=object).fillna("").astype(str).str.strip()
        if symbols is not None:
            if len(symbols) != len(ids):
                raise ValueError(f"map_features: {len(ids)} feature IDs but {len(symbols)} symbols")
            sym = pd.Series(list(symbols), dtype=object).fillna("").astype(str).str.strip()
        else:
            sym = pd.Series([""] * len(ids), dtype=object)
        ref_idx = np.full(len(ids), -1, dtype=np.int64)
        how = np.full(len(ids), "unmapped", dtype=object)

        parsed = ids.str.extract(_ENSEMBL_RE)[0]
        is_ensembl = parsed.notna().to_numpy()
        found = pd.Index(self.genes["gene_id"]).get_indexer(parsed.fillna(""))
        hit = is_ensembl & (found >= 0)
        ref_idx[hit], how[hit] = found[hit], "ensembl"

        # Symbol query: the given symbol, else the feature ID itself when it is not an Ensembl ID.
        query = sym.where(sym != "", ids.where(~is_ensembl, ""))
        tables = self._symbols
        stages = ((tables.current, "symbol", False), (tables.current_upper, "symbol", True),
                  (tables.previous, "previous", False), (tables.alias, "alias", False))
        for table, label, upper in stages:
            todo = (ref_idx < 0) & (query != "").to_numpy()
            if not todo.any():
                break
            keys = query[todo].str.upper() if upper else query[todo]
            looked_up = keys.map(table).to_numpy(dtype=float)
            resolved = ~np.isnan(looked_up)
            rows = np.flatnonzero(todo)[resolved]
            ref_idx[rows], how[rows] = looked_up[resolved].astype(np.int64), label
        return GeneMapping(ref_idx=ref_idx, how=how.astype(str))


@dataclass(eq=False)
class GeneMapping:
    """Where each input feature goes. ``ref_idx`` (n_features,) int64, -1 = unmapped; ``how`` (n_features,) str."""

    ref_idx: np.ndarray
    how: np.ndarray

    def __post_init__(self) -> None:
        self.ref_idx = np.asarray(self.ref_idx, dtype=np.int64)
        self.how = np.asarray(self.how, dtype=str)
        if self.ref_idx.shape != self.how.shape or self.ref_idx.ndim != 1:
            raise ValueError("GeneMapping: ref_idx and how must be 1-D arrays of the same length")

    @property
    def n_features(self) -> int:
        return int(self.ref_idx.shape[0])

    @functools.cached_property
    def genes(self) -> np.ndarray:
        """(n_mapped_genes,) int32 sorted unique reference indices: the columns of :meth:`harmonise`'s output."""
        return np.unique(self.ref_idx[self.ref_idx >= 0]).astype(np.int32)

    @functools.cached_property
    def _feature_to_gene(self) -> sp.csr_matrix:
        """(n_features × n_mapped_genes) float32 0/1 matrix; unmapped features have an empty row."""
        mapped = np.flatnonzero(self.ref_idx >= 0)
        columns = np.searchsorted(self.genes, self.ref_idx[mapped])
        return sp.csr_matrix((np.ones(len(mapped), dtype=np.float32), (mapped, columns)),
                             shape=(self.n_features, len(self.genes)))

    def harmonise(self, counts: sp.csr_matrix) -> tuple[sp.csr_matrix, np.ndarray]:
        """Sum features onto reference genes.

        ``counts``: (n_samples × n_features) sparse. Returns the (n_samples × n_mapped_genes) float32 CSR matrix
        (sorted indices, no explicit zeros; features mapping to the same gene summed, unmapped ones dropped) and
        its column labels, the sorted reference indices (n_mapped_genes,) int32.
        """
        if counts.shape[1] != self.n_features:
            raise ValueError(f"harmonise: matrix has {counts.shape[1]} feature columns, mapping has {self.n_features}")
        summed = sp.csr_matrix(sp.csr_matrix(counts, dtype=np.float32) @ self._feature_to_gene, dtype=np.float32)
        summed.eliminate_zeros()
        summed.sort_indices()
        return summed, self.genes

    def report(self, feature_ids: Sequence[str]) -> dict:
        """JSON-ready summary: features per ``how``, unmapped count and examples, duplicates summed into one gene."""
        if len(feature_ids) != self.n_features:
            raise ValueError(f"report: {len(feature_ids)} feature IDs for a mapping of {self.n_features}")
        by_how = Counter(self.how.tolist())
        unmapped_rows = np.flatnonzero(self.ref_idx < 0)[:N_UNMAPPED_EXAMPLES]
        n_mapped = int((self.ref_idx >= 0).sum())
        return {
            "n_features": self.n_features,
            "n_mapped_features": n_mapped,
            "n_genes": int(len(self.genes)),
            "by_how": {kind: int(by_how.get(kind, 0)) for kind in MAPPING_KINDS},
            "n_unmapped": int(by_how.get("unmapped", 0)),
            "unmapped_examples": [str(feature_ids[i]) for i in unmapped_rows],
            "n_summed_duplicates": n_mapped - int(len(self.genes)),
        }
