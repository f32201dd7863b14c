"""Gene mapping rules (on a small hand-written reference) and harmonisation (against dense numpy)."""

from __future__ import annotations

import gzip

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from curation.genes import GeneMapping, GeneTable
from curation.io import CurationError

# Hand-written HGNC snapshot: ensembl_id, symbol, alias_symbols, prev_symbols, canonical_biotype, source_id.
HGNC_ROWS = [
    ("ENSG00000000005", "TP53", "P53|SHARED", "OLDTP53", "protein_coding", "HGNC:11998"),
    ("ENSG00000000001", "BRCA1", "RNF53|SHARED|KRAS", "", "protein_coding", "HGNC:1100"),
    ("ENSG00000000003", "KRAS", "KRAS2", "OLDSHARED", "protein_coding", "HGNC:6407"),
    ("ENSG00000000004", "MYC", "OLDSHARED2|C-MYC", "OLDSHARED|OLDSHARED2", "protein_coding", "HGNC:7553"),
    ("ENSG00000000007", "LINC001", "", "", "lncRNA", "HGNC:900"),
    ("ENSG00000000007", "LINC002", "", "", "lncRNA", "HGNC:500"),  # same Ensembl ID as LINC001, older entry
    (None, "NOIDGENE", "", "", "pseudogene", "HGNC:77"),
    ("ENSG00000000008", "EGFR", "NOIDGENE|ERBB", "", "protein_coding", "HGNC:3236"),
]
# GENCODE snapshot: ID, name (GENCODE-only genes, a lagging name, a name equal to the ID, duplicated names).
GENCODE_ROWS = [
    ("ENSG00000000005", "TP53"), ("ENSG00000000001", "BRCA1"), ("ENSG00000000003", "KRAS"),
    ("ENSG00000000004", "MYCOLD"), ("ENSG00000000007", "LINC001"), ("ENSG00000000008", "EGFR"),
    ("ENSG00000000010", "AC000001.1"), ("ENSG00000000011", "ENSG00000000011"),
    ("ENSG00000000012", "Y_RNA"), ("ENSG00000000013", "Y_RNA"), ("ENSG00000000002", "KRAS2"),
]


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> GeneTable:
    directory = tmp_path_factory.mktemp("genes")
    hgnc = pd.DataFrame(HGNC_ROWS, columns=["ensembl_id", "symbol", "alias_symbols", "prev_symbols",
                                            "canonical_biotype", "source_id"])
    hgnc.to_parquet(directory / "hgnc_human_gene_table.parquet")
    with gzip.open(directory / "gencode_v44_gene_id2name.csv.gz", "wt") as fh:
        fh.writelines(f"{gid},{name}\n" for gid, name in GENCODE_ROWS)
    return GeneTable.load(directory)


def ref(table: GeneTable, gene_id: str) -> int:
    return int(np.flatnonzero(table.genes["gene_id"].to_numpy() == gene_id)[0])


def test_reference_table_is_sorted_union(table):
    genes = table.genes
    assert list(genes.columns) == ["gene_id", "symbol", "biotype"]
    assert genes["gene_id"].tolist() == sorted({r[0] for r in HGNC_ROWS if r[0]} | {r[0] for r in GENCODE_ROWS})
    by_id = genes.set_index("gene_id")
    assert by_id.loc["ENSG00000000007", "symbol"] == "LINC002"  # lowest HGNC number wins the shared ID
    assert by_id.loc["ENSG00000000004", "symbol"] == "MYC"  # HGNC symbol over the GENCODE name
    assert by_id.loc["ENSG00000000010", "symbol"] == "AC000001.1"
    assert by_id.loc["ENSG00000000011", "symbol"] is None  # a "name" equal to the ID is no name
    assert by_id.loc["ENSG00000000010", "biotype"] is None  # GENCODE-only: no biotype in the snapshot
    assert by_id.loc["ENSG00000000001", "biotype"] == "protein_coding"


def test_ensembl_ids_versioned_par_y_and_unknown(table):
    mapping = table.map_features(["ENSG00000000005.17", "ENSG00000000005", "ENSG00000000005.3_PAR_Y",
                                  "ENSG00000099999.1", "ENSMUSG00000000001", " ENSG00000000001 "])
    tp53 = ref(table, "ENSG00000000005")
    assert mapping.ref_idx.tolist() == [tp53, tp53, tp53, -1, -1, ref(table, "ENSG00000000001")]
    assert mapping.how.tolist() == ["ensembl"] * 3 + ["unmapped"] * 2 + ["ensembl"]


@pytest.mark.parametrize("query, gene_id, how", [
    ("TP53", "ENSG00000000005", "symbol"),
    ("tp53", "ENSG00000000005", "symbol"),  # case-insensitive fallback
    ("LINC001", "ENSG00000000007", "symbol"),  # second HGNC symbol of a shared Ensembl ID
    ("AC000001.1", "ENSG00000000010", "symbol"),  # GENCODE-only gene
    ("OLDTP53", "ENSG00000000005", "previous"),
    ("MYCOLD", "ENSG00000000004", "previous"),  # GENCODE name lagging behind HGNC
    ("P53", "ENSG00000000005", "alias"),  # unambiguous alias
    ("RNF53", "ENSG00000000001", "alias"),
    ("KRAS", "ENSG00000000003", "symbol"),  # alias of BRCA1 but current symbol of KRAS: the current symbol wins
    ("OLDSHARED2", "ENSG00000000004", "previous"),  # previous of MYC and alias of MYC only: one gene
    ("KRAS2", "ENSG00000000002", "symbol"),  # alias of KRAS, but the current name of a GENCODE-only gene
])
def test_symbol_resolution(table, query, gene_id, how):
    mapping = table.map_features([query])
    assert (mapping.ref_idx[0], mapping.how[0]) == (ref(table, gene_id), how)


@pytest.mark.parametrize("query", [
    "SHARED",  # alias of two genes
    "OLDSHARED",  # previous symbol of two genes
    "NOIDGENE",  # alias of EGFR but the symbol of an HGNC gene without an Ensembl ID
    "Y_RNA",  # GENCODE name of two genes
    "LOC123456", "", "ENSG00000000011x",
])
def test_ambiguous_or_unknown_symbols_stay_unmapped(table, query):
    mapping = table.map_features([query])
    assert mapping.ref_idx.tolist() == [-1] and mapping.how.tolist() == ["unmapped"]


def test_id_tried_before_symbol(table):
    mapping = table.map_features(["ENSG00000000005.2", "ENSG00000099999", "NOTANID", "ENSG00000099998"],
                                 symbols=["BRCA1", "KRAS", None, ""])
    assert mapping.ref_idx.tolist() == [ref(table, "ENSG00000000005"), ref(table, "ENSG00000000003"), -1, -1]
    assert mapping.how.tolist() == ["ensembl", "symbol", "unmapped", "unmapped"]
    with pytest.raises(ValueError, match="symbols"):
        table.map_features(["A", "B"], symbols=["A"])


def test_harmonise_sums_duplicates_like_dense(table):
    features = ["ENSG00000000005.1", "TP53", "ENSG00000000001", "LOC1", "ENSG00000000005_PAR_Y", "ERBB"]
    mapping = table.map_features(features)
    rng = np.random.default_rng(0)
    dense = rng.poisson(1.5, size=(9, len(features))).astype(np.float32)
    dense[3] = 0
    out, columns = mapping.harmonise(sp.csr_matrix(dense))
    expected_genes = sorted({ref(table, g) for g in ("ENSG00000000005", "ENSG00000000001", "ENSG00000000008")})
    assert columns.dtype == np.int32 and columns.tolist() == expected_genes
    expected = np.zeros((9, len(expected_genes)), dtype=np.float32)
    for j, gene in enumerate(mapping.ref_idx):
        if gene >= 0:
            expected[:, expected_genes.index(gene)] += dense[:, j]
    assert out.dtype == np.float32 and out.has_sorted_indices
    assert (out.data != 0).all()
    np.testing.assert_array_equal(out.toarray(), expected)
    with pytest.raises(ValueError, match="feature columns"):
        mapping.harmonise(sp.csr_matrix(dense[:, :3]))

    report = mapping.report(features)
    assert report["by_how"] == {"ensembl": 3, "symbol": 1, "previous": 0, "alias": 1, "unmapped": 1}
    assert report["n_unmapped"] == 1 and report["unmapped_examples"] == ["LOC1"]
    assert report["n_summed_duplicates"] == 2 and report["n_genes"] == 3


def test_mapping_validates_shapes():
    with pytest.raises(ValueError):
        GeneMapping(ref_idx=np.array([0, 1]), how=np.array(["ensembl"]))


def test_missing_reference_file_is_one_line_error(tmp_path):
    with pytest.raises(CurationError, match="hgnc_human_gene_table.parquet: reference gene file is missing"):
        GeneTable.load(tmp_path)


def test_shipped_reference_facts():
    table = GeneTable.load()
    assert table is GeneTable.load()  # parsed once per process
    genes = table.genes
    assert genes["gene_id"].is_unique and genes["gene_id"].is_monotonic_increasing
    assert len(genes) > 60_000
    mapping = table.map_features(["ENSG00000141510.17", "TP53", "NCRNA00181", "ACF64", "2F1", "AMN"])
    symbols = [genes["symbol"].iloc[i] if i >= 0 else None for i in mapping.ref_idx]
    assert symbols == ["TP53", "TP53", "A1BG-AS1", "A1CF", None, "AMN"]  # 2F1: alias of KLRG1 and SLC25A5
    assert mapping.how.tolist() == ["ensembl", "symbol", "previous", "alias", "unmapped", "symbol"]
