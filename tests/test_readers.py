"""Round-trip and bad-input tests for curation.readers.

Every format is written by a small writer in this file (not by the reader module), read back through
``open_reader`` with several chunk sizes, and compared exactly with the matrix that was written.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import textwrap
import warnings
import zipfile
from pathlib import Path

import anndata
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from curation.io import CurationError
from curation.readers import FORMATS, Chunk, Reader, load_metadata_table, open_reader

CHUNK_SIZES = (1, 7, 10_000)
ALL_ZERO_SAMPLES = (0, 5, 11)


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------
def random_counts(n_samples: int, n_features: int, seed: int = 0) -> np.ndarray:
    """(n_samples, n_features) int64 counts, ~70 % zeros, with a few all-zero samples."""
    rng = np.random.default_rng(seed)
    counts = rng.negative_binomial(2, 0.3, size=(n_samples, n_features))
    counts[rng.random(counts.shape) < 0.7] = 0
    counts[[s for s in ALL_ZERO_SAMPLES if s < n_samples]] = 0
    return counts


def read_all(reader: Reader, chunk_size: int) -> tuple[np.ndarray, pd.DataFrame]:
    """Concatenate every chunk (checking each one's contract) into a dense matrix and one obs table."""
    dense, obs = [], []
    for chunk in reader.chunks(chunk_size):
        assert isinstance(chunk, Chunk)
        assert isinstance(chunk.counts, sp.csr_matrix) and chunk.counts.dtype == np.float32
        n = chunk.counts.shape[0]
        assert 1 <= n <= chunk_size and chunk.counts.shape[1] == len(reader.features)
        assert len(chunk.obs) == n and isinstance(chunk.obs.index, pd.RangeIndex) and chunk.obs.index[0] == 0
        assert chunk.obs.columns[0] == "source_id"
        assert all(isinstance(s, str) for s in chunk.obs["source_id"])
        dense.append(chunk.counts.toarray())
        obs.append(chunk.obs)
    sizes = [len(o) for o in obs]
    assert all(size == chunk_size for size in sizes[:-1]), sizes  # only the last chunk may be short
    return np.vstack(dense), pd.concat(obs, ignore_index=True)


def assert_round_trip(reader: Reader, expected: np.ndarray, source_ids: list[str]) -> pd.DataFrame:
    """The reader returns ``expected`` exactly, with these ids, for every chunk size; returns obs."""
    assert reader.n_samples in (None, expected.shape[0])
    obs = None
    for chunk_size in CHUNK_SIZES:
        counts, obs = read_all(reader, chunk_size)
        np.testing.assert_array_equal(counts, expected.astype(np.float32))
        assert obs["source_id"].tolist() == source_ids
    return obs


def assert_one_line_error(exc_info: pytest.ExceptionInfo, file_name: str, *fragments: str) -> None:
    message = str(exc_info.value)
    assert "\n" not in message
    assert file_name in message, message
    for fragment in fragments:
        assert fragment in message, message


def drain(reader: Reader, chunk_size: int = 10_000) -> None:
    for _ in reader.chunks(chunk_size):
        pass


def gene_ids(n: int) -> list[str]:
    return [f"ENSG{i:011d}" for i in range(1, n + 1)]


def write_text(path: Path, text: str, compress: bool = False) -> Path:
    data = text.encode()
    path.write_bytes(gzip.compress(data, mtime=0) if compress else data)
    return path


def mtx_text(matrix: np.ndarray, seed: int = 0, field: str = "integer") -> str:
    """MatrixMarket coordinate text of ``matrix`` with its entries in a random order."""
    rows, cols = np.nonzero(matrix)
    order = np.random.default_rng(seed).permutation(len(rows))
    body = "".join(f"{r + 1} {c + 1} {matrix[r, c]}\n" for r, c in zip(rows[order], cols[order]))
    return (f"%%MatrixMarket matrix coordinate {field} general\n%metadata_json: {{}}\n"
            f"{matrix.shape[0]} {matrix.shape[1]} {len(rows)}\n{body}")


def write_10x_mtx(directory: Path, counts: np.ndarray, compress: bool = True) -> dict[str, Path]:
    """10x v3 layout: matrix genes × cells, features with id/name/type, barcodes."""
    directory.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if compress else ""
    n_cells, n_genes = counts.shape
    features = "".join(f"{g}\tSYM{i}\tGene Expression\n" for i, g in enumerate(gene_ids(n_genes)))
    barcodes = "".join(f"AAAC{i:06d}-1\n" for i in range(n_cells))
    return {"matrix": write_text(directory / f"matrix.mtx{suffix}", mtx_text(counts.T), compress),
            "features": write_text(directory / f"features.tsv{suffix}", features, compress),
            "barcodes": write_text(directory / f"barcodes.tsv{suffix}", barcodes, compress)}


# ----------------------------------------------------------------------------------------------------
# round trips, one per format
# ----------------------------------------------------------------------------------------------------
def test_formats_constant_lists_every_format():
    assert set(FORMATS) == {"h5ad", "10x_mtx", "10x_h5", "gct", "star_counts", "geo_table",
                            "sciplex_triplets", "mixseq_zip"}


@pytest.mark.parametrize("storage", ["csr", "csc", "dense"])
def test_h5ad_round_trip(tmp_path, storage):
    counts = random_counts(23, 9, seed=1)
    matrix = {"csr": sp.csr_matrix, "csc": sp.csc_matrix, "dense": np.asarray}[storage](counts.astype(np.float32))
    obs = pd.DataFrame({"gene": pd.Categorical(["non-targeting", "TP53", "MYC"] * 7 + ["TP53", None]),
                        "gem_group": np.arange(23) % 3,
                        "umi": pd.array([1, None] + list(range(21)), dtype="Int64")},
                       index=[f"cell{i}" for i in range(23)])
    var = pd.DataFrame({"gene_name": [f"SYM{i}" for i in range(9)]}, index=gene_ids(9))
    anndata.AnnData(X=matrix, obs=obs, var=var).write_h5ad(tmp_path / "a.h5ad")

    reader = open_reader("h5ad", {"matrix": tmp_path / "a.h5ad"}, symbol_column="gene_name", progress=False)
    out_obs = assert_round_trip(reader, counts, obs.index.tolist())
    assert reader.features["feature_id"].tolist() == gene_ids(9)
    assert reader.features["symbol"].tolist() == var["gene_name"].tolist()
    assert out_obs["gene"].astype(object).where(out_obs["gene"].notna(), None).tolist() == \
        obs["gene"].astype(object).where(obs["gene"].notna(), None).tolist()
    assert out_obs["gem_group"].tolist() == obs["gem_group"].tolist()
    assert out_obs["umi"].isna().tolist() == obs["umi"].isna().tolist()
    reader.close()


def test_h5ad_raw_and_layers_and_gene_id_column(tmp_path):
    counts = random_counts(15, 6, seed=2)
    layer = random_counts(15, 6, seed=3)
    adata = anndata.AnnData(X=sp.csr_matrix(np.log1p(counts).astype(np.float32)),
                            var=pd.DataFrame({"ensembl": gene_ids(6)}, index=[f"SYM{i}" for i in range(6)]))
    adata.layers["counts"] = sp.csr_matrix(layer.astype(np.float32))
    adata.raw = anndata.AnnData(X=sp.csr_matrix(counts.astype(np.float32)), var=adata.var)
    adata.write_h5ad(tmp_path / "b.h5ad")
    files = {"matrix": tmp_path / "b.h5ad"}
    ids = adata.obs_names.tolist()

    raw = open_reader("h5ad", files, matrix="raw", gene_id_column="ensembl", progress=False)
    assert_round_trip(raw, counts, ids)
    assert raw.features["feature_id"].tolist() == gene_ids(6)
    assert_round_trip(open_reader("h5ad", files, matrix="layers/counts", progress=False), layer, ids)
    with pytest.raises(CurationError) as err:
        open_reader("h5ad", files, matrix="layers/missing")
    assert_one_line_error(err, "b.h5ad", "layers/missing", "counts")


def test_h5ad_non_integer_counts_rejected_unless_allowed(tmp_path):
    counts = random_counts(10, 5, seed=4).astype(np.float32)
    counts[7, 2] = 1.5
    anndata.AnnData(X=sp.csr_matrix(counts)).write_h5ad(tmp_path / "norm.h5ad")
    files = {"matrix": tmp_path / "norm.h5ad"}
    with pytest.raises(CurationError) as err:
        drain(open_reader("h5ad", files, progress=False), chunk_size=4)
    assert_one_line_error(err, "norm.h5ad", "matrix X holds non-integer values", "allow_normalised")
    got, _ = read_all(open_reader("h5ad", files, allow_non_integer=True, progress=False), 4)
    np.testing.assert_array_equal(got, counts)


def test_h5ad_passes_nan_and_negative_values_through(tmp_path):
    counts = random_counts(6, 4, seed=5).astype(np.float32)
    counts[1, 1], counts[2, 3], counts[3, 0] = np.nan, -2, np.inf
    anndata.AnnData(X=sp.csr_matrix(counts)).write_h5ad(tmp_path / "odd.h5ad")
    got, _ = read_all(open_reader("h5ad", {"matrix": tmp_path / "odd.h5ad"}, progress=False), 10)
    np.testing.assert_array_equal(got, counts)  # assert_array_equal treats NaN == NaN


def test_10x_mtx_round_trip_gz_and_plain(tmp_path):
    counts = random_counts(31, 12, seed=6)
    barcodes = [f"AAAC{i:06d}-1" for i in range(31)]
    for compress in (True, False):
        files = write_10x_mtx(tmp_path / str(compress), counts, compress=compress)
        reader = open_reader("10x_mtx", files, progress=False)
        assert_round_trip(reader, counts, barcodes)
        assert reader.features["feature_id"].tolist() == gene_ids(12)
        assert reader.features["symbol"].tolist() == [f"SYM{i}" for i in range(12)]
        reader.close()


def test_10x_mtx_cells_x_genes_orientation(tmp_path):
    counts = random_counts(17, 8, seed=7)
    files = write_10x_mtx(tmp_path, counts)
    files["matrix"] = write_text(tmp_path / "cxg.mtx", mtx_text(counts, field="real"))
    reader = open_reader("10x_mtx", files, orientation="cells_x_genes", progress=False)
    assert_round_trip(reader, counts, [f"AAAC{i:06d}-1" for i in range(17)])


@pytest.mark.parametrize("version", ["v3", "v2"])
def test_10x_h5_round_trip(tmp_path, version):
    counts = random_counts(19, 7, seed=8)
    csc = sp.csc_matrix(counts.T.astype(np.int32))  # genes × cells, one compressed column per cell
    barcodes = [f"CELL{i}-1" for i in range(19)]
    symbols = [f"SYM{i}" for i in range(7)]
    with h5py.File(tmp_path / "filtered_feature_bc_matrix.h5", "w") as f:
        g = f.create_group("matrix" if version == "v3" else "GRCh38")
        g["data"], g["indices"], g["indptr"] = csc.data, csc.indices.astype(np.int64), csc.indptr.astype(np.int64)
        g["shape"] = np.array(csc.shape, dtype=np.int32)
        g["barcodes"] = np.array(barcodes, dtype="S")
        if version == "v3":
            feats = g.create_group("features")
            feats["id"] = np.array(gene_ids(7), dtype="S")
            feats["name"] = np.array(symbols, dtype="S")
            feats["feature_type"] = np.array(["Gene Expression"] * 7, dtype="S")
        else:
            g["genes"], g["gene_names"] = np.array(gene_ids(7), dtype="S"), np.array(symbols, dtype="S")
    reader = open_reader("10x_h5", {"matrix": tmp_path / "filtered_feature_bc_matrix.h5"}, progress=False)
    assert_round_trip(reader, counts, barcodes)
    assert reader.features["feature_id"].tolist() == gene_ids(7)
    assert reader.features["symbol"].tolist() == symbols


def gct_text(counts: np.ndarray, samples: list[str], genes: list[str]) -> str:
    """GCT 1.2 text of a samples × genes matrix (written genes × samples, as GTEx does)."""
    lines = ["#1.2", f"{len(genes)}\t{len(samples)}", "\t".join(["Name", "Description", *samples])]
    lines += ["\t".join([g, f"SYM{i}", *map(str, counts[:, i])]) for i, g in enumerate(genes)]
    return "\n".join(lines) + "\n"


def test_gct_round_trip(tmp_path):
    counts = random_counts(26, 11, seed=9)
    samples = [f"GTEX-{i:04d}-SM-{i}" for i in range(26)]
    path = write_text(tmp_path / "gene_reads.gct.gz", gct_text(counts, samples, gene_ids(11)), compress=True)
    reader = open_reader("gct", {"matrix": path}, block_values=40, progress=False)  # several parse blocks
    assert_round_trip(reader, counts, samples)
    assert reader.features["feature_id"].tolist() == gene_ids(11)
    assert reader.features["symbol"].tolist() == [f"SYM{i}" for i in range(11)]


def star_file(path: Path, genes: list[str], values: np.ndarray) -> None:
    """One GDC STAR-Counts TSV: comment, header, N_* rows, then genes (versioned IDs)."""
    header = ["gene_id", "gene_name", "gene_type", "unstranded", "stranded_first", "stranded_second",
              "tpm_unstranded", "fpkm_unstranded", "fpkm_uq_unstranded"]
    lines = ["# gene-model: GENCODE v36", "\t".join(header)]
    lines += [f"{n}\t\t\t{7 * k}\t{k}\t{k}\t\t\t" for k, n in
              enumerate(["N_unmapped", "N_multimapping", "N_noFeature", "N_ambiguous"], start=1)]
    for gene, value in zip(genes, values):
        lines.append(f"{gene}.{len(gene) % 9 + 1}\tSYM{gene[-3:]}\tprotein_coding\t{value}\t{value // 2}\t"
                     f"{value - value // 2}\t{value * 0.5}\t{value * 0.1}\t{value * 0.2}")
    lines.append(f"{genes[0]}.5_PAR_Y\tSYMPAR\tprotein_coding\t3\t1\t2\t1.0\t1.0\t1.0")
    path.write_text("\n".join(lines) + "\n")


def test_star_counts_round_trip_with_sample_sheet(tmp_path):
    counts = random_counts(9, 13, seed=10)
    genes = gene_ids(13)
    star_dir = tmp_path / "star"
    rows = []
    for i in range(9):  # GDC layout: <file uuid>/<file name>
        sub = star_dir / f"uuid-{i}"
        sub.mkdir(parents=True)
        name = f"sample{i}.rna_seq.augmented_star_gene_counts.tsv"
        star_file(sub / name, genes, counts[i])
        rows.append({"File Name": name, "Sample ID": f"TCGA-AA-{i:04d}-01A", "Project ID": f"TCGA-P{i % 2}"})
    pd.DataFrame(rows[::-1]).to_csv(tmp_path / "gdc_sample_sheet.tsv", sep="\t", index=False)

    reader = open_reader("star_counts", {"dir": star_dir}, column="unstranded",
                         sample_sheet=tmp_path / "gdc_sample_sheet.tsv", progress=False)
    obs = assert_round_trip(reader, counts[::-1], [r["Sample ID"] for r in rows[::-1]])
    assert obs["project_id"].tolist() == [r["Project ID"] for r in rows[::-1]]
    assert reader.features["feature_id"].tolist() == genes  # versions stripped, _PAR_Y dropped

    no_sheet = open_reader("star_counts", {"dir": star_dir}, column="stranded_first", progress=False)
    ids = [f"sample{i}.rna_seq.augmented_star_gene_counts" for i in range(9)]
    assert_round_trip(no_sheet, counts // 2, ids)


def test_star_counts_gene_list_mismatch(tmp_path):
    star_file(tmp_path / "a.tsv", gene_ids(5), np.arange(5))
    star_file(tmp_path / "b.tsv", gene_ids(6), np.arange(6))
    with pytest.raises(CurationError) as err:
        drain(open_reader("star_counts", {"dir": tmp_path}, progress=False))
    assert_one_line_error(err, "b.tsv", "gene list differs")


def test_geo_table_both_orientations_and_separators(tmp_path):
    counts = random_counts(14, 10, seed=11)
    samples = [f"GSM{100 + i}" for i in range(14)]
    genes = gene_ids(10)
    by_gene = pd.DataFrame(counts.T, index=pd.Index(genes, name="gene"), columns=samples)
    by_gene.to_csv(tmp_path / "gxs.csv.gz")  # comma-separated, gzip, labelled header
    reader = open_reader("geo_table", {"matrix": tmp_path / "gxs.csv.gz"}, block_values=30, progress=False)
    assert_round_trip(reader, counts, samples)
    assert reader.features["feature_id"].tolist() == genes

    # R write.table style: tab-separated, the header has no name for the row-label column.
    text = "\t".join(samples) + "\n" + "".join(
        "\t".join([g, *map(str, counts[:, i])]) + "\n" for i, g in enumerate(genes))
    write_text(tmp_path / "r_style.txt", text)
    assert_round_trip(open_reader("geo_table", {"matrix": tmp_path / "r_style.txt"}, progress=False), counts, samples)

    # label columns chosen by name, with a symbol column before them
    named = by_gene.reset_index()
    named.insert(0, "symbol", [f"SYM{i}" for i in range(10)])
    named.to_csv(tmp_path / "named.tsv", sep="\t", index=False)
    reader = open_reader("geo_table", {"matrix": tmp_path / "named.tsv"}, gene_column="gene",
                         symbol_column="symbol", progress=False)
    assert_round_trip(reader, counts, samples)
    assert reader.features["symbol"].tolist() == [f"SYM{i}" for i in range(10)]

    by_gene.T.rename_axis("sample").to_csv(tmp_path / "sxg.tsv", sep="\t")
    reader = open_reader("geo_table", {"matrix": tmp_path / "sxg.tsv"}, orientation="samples_x_genes", sep="\t",
                         progress=False)
    assert_round_trip(reader, counts, samples)
    assert reader.features["feature_id"].tolist() == genes


def test_sciplex_triplets_round_trip(tmp_path):
    counts = random_counts(29, 10, seed=12)
    cells, rows = np.nonzero(counts)
    order = np.random.default_rng(3).permutation(len(cells))  # not sorted by cell
    triplets = "".join(f"{g + 1}\t{c + 1}\t{counts[c, g]}\n" for c, g in zip(cells[order], rows[order]))
    names = [f"A01_E09_RT_BC_{i}_Lig_BC_1" for i in range(29)]
    files = {"matrix": write_text(tmp_path / "x_UMI.count.matrix.gz", triplets, compress=True),
             # GEO layout: space-separated with a header line (see tests/fixtures/sciplex3/README.md)
             "genes": write_text(tmp_path / "x_gene.annotations.txt.gz", "id gene_short_name\n" +
                                 "".join(f"{g} SYM{i}\n" for i, g in enumerate(gene_ids(10))), compress=True),
             "cells": write_text(tmp_path / "x_cell.annotations.txt.gz",
                                 "".join(f"{n}\tplate{i % 3}\n" for i, n in enumerate(names)), compress=True)}
    reader = open_reader("sciplex_triplets", files, progress=False)
    obs = assert_round_trip(reader, counts, names)
    assert obs["sample"].tolist() == [f"plate{i % 3}" for i in range(29)]
    assert reader.features["symbol"].tolist() == [f"SYM{i}" for i in range(10)]
    # A header-less, tab-separated gene table needs the options; read as GEO's layout it is refused, not shifted.
    headerless = write_text(tmp_path / "y_gene.annotations.txt",
                            "".join(f"{g}\tSYM{i}\n" for i, g in enumerate(gene_ids(10))))
    with pytest.raises(CurationError) as err:
        open_reader("sciplex_triplets", {**files, "genes": headerless}, progress=False)
    assert_one_line_error(err, "y_gene.annotations.txt", "genes_sep")
    spaced = write_text(tmp_path / "z_gene.annotations.txt", "".join(f"{g} SYM{i}\n" for i, g in enumerate(gene_ids(10))))
    with pytest.raises(CurationError) as err:
        open_reader("sciplex_triplets", {**files, "genes": spaced}, progress=False)
    assert_one_line_error(err, "z_gene.annotations.txt", "not a header", "genes_header: false")
    plain = open_reader("sciplex_triplets", {**files, "genes": headerless}, genes_sep="\t", genes_header=False,
                        progress=False)
    assert plain.features["feature_id"].tolist() == gene_ids(10)


def write_mixseq_zip(path: Path, counts: np.ndarray, barcodes: list[str], extra_members: dict[str, str] = ()) -> None:
    folder = path.stem
    classes = pd.DataFrame({"barcode": barcodes[::-1], "singlet_ID": [f"CL{i % 4}" for i in range(len(barcodes))],
                            "singlet_margin": np.linspace(0, 1, len(barcodes))})
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{folder}/matrix.mtx", mtx_text(counts.T))
        zf.writestr(f"{folder}/genes.tsv", "".join(f"{g}\tSYM{i}\n" for i, g in enumerate(gene_ids(counts.shape[1]))))
        zf.writestr(f"{folder}/barcodes.tsv", "".join(b + "\n" for b in barcodes))
        zf.writestr(f"{folder}/classifications.csv", classes.to_csv(index=False))
        for name, text in dict(extra_members).items():
            zf.writestr(name, text)


def test_mixseq_zip_round_trip(tmp_path):
    first, second = random_counts(13, 8, seed=13), random_counts(9, 8, seed=14)
    bc1, bc2 = [f"AC{i:04d}-1" for i in range(13)], [f"AC{i:04d}-1" for i in range(9)]
    write_mixseq_zip(tmp_path / "expt1_DMSO_24hr.zip", first, bc1)
    write_mixseq_zip(tmp_path / "expt2_trametinib.zip", second, bc2)
    reader = open_reader("mixseq_zip", {"archives": tmp_path}, progress=False)
    ids = [f"expt1_DMSO_24hr:{b}" for b in bc1] + [f"expt2_trametinib:{b}" for b in bc2]
    obs = assert_round_trip(reader, np.vstack([first, second]), ids)
    assert obs["experiment"].tolist() == ["expt1_DMSO_24hr"] * 13 + ["expt2_trametinib"] * 9
    # classifications are joined by barcode, not by position (they are written in reverse order)
    assert obs["singlet_ID"].tolist()[:2] == ["CL0", "CL3"]
    assert obs["barcode"].tolist() == bc1 + bc2
    assert obs["treatment"].tolist() == ["expt1_DMSO_24hr"] * 13 + ["expt2_trametinib"] * 9  # not <x>_expt<n>
    as_list = open_reader("mixseq_zip", {"archives": [tmp_path / "expt2_trametinib.zip"]}, progress=False)
    assert_round_trip(as_list, second, [f"expt2_trametinib:{b}" for b in bc2])


@pytest.mark.parametrize("stem,parsed", [("Idasanutlin_24hr_expt1", ("Idasanutlin", "24hr", "expt1")),
                                         ("sgGPX4_1_expt2", ("sgGPX4_1", None, "expt2")),
                                         ("DMSO_expt10", ("DMSO", None, "expt10")),
                                         ("trametinib_tc_expt5", ("trametinib_tc", None, "expt5"))])
def test_mixseq_stem_gives_treatment_time_and_batch(stem, parsed):
    from curation.readers.mtx import _parse_mixseq_stem  # names from broadinstitute/mix_seq_ms expt_meta_data.R
    assert _parse_mixseq_stem(stem) == parsed


def test_load_metadata_table(tmp_path):
    path = write_text(tmp_path / "meta.tsv", "cell_barcode\tdonor\tn\n007\td1\t3\n008\td2\t4\n")
    table = load_metadata_table(path, "cell_barcode")
    assert table.index.tolist() == ["007", "008"] and table.loc["008", "donor"] == "d2"
    assert table.index.name == "cell_barcode"
    write_text(tmp_path / "dup.csv", "id,x\na,1\na,2\n")
    with pytest.raises(CurationError) as err:
        load_metadata_table(tmp_path / "dup.csv", "id")
    assert_one_line_error(err, "dup.csv", "duplicate", "'a'")
    with pytest.raises(CurationError) as err:
        load_metadata_table(path, "barcode")
    assert_one_line_error(err, "meta.tsv", "no key column")


# ----------------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------------
def test_truncated_gzip(tmp_path):
    files = write_10x_mtx(tmp_path, random_counts(400, 50, seed=15))
    data = files["matrix"].read_bytes()
    files["matrix"].write_bytes(data[: len(data) // 2])
    with pytest.raises(CurationError) as err:
        drain(open_reader("10x_mtx", files, progress=False))
    assert_one_line_error(err, "matrix.mtx.gz", "truncated or corrupt gzip")


def test_mtx_wrong_header(tmp_path):
    files = write_10x_mtx(tmp_path, random_counts(5, 4), compress=False)
    text = files["matrix"].read_text().replace("coordinate integer general", "array integer general")
    files["matrix"].write_text(text)
    with pytest.raises(CurationError) as err:
        open_reader("10x_mtx", files)
    assert_one_line_error(err, "matrix.mtx", "header", "%%MatrixMarket matrix coordinate")


def test_mtx_out_of_range_index(tmp_path):
    files = write_10x_mtx(tmp_path, random_counts(5, 4), compress=False)
    lines = files["matrix"].read_text().splitlines()
    lines[5] = "9 2 3"  # entry 3 (after banner, comment, size line): gene row 9 of 4
    files["matrix"].write_text("\n".join(lines) + "\n")
    with pytest.raises(CurationError) as err:
        drain(open_reader("10x_mtx", files, progress=False))
    assert_one_line_error(err, "matrix.mtx", "entry 3 has row index 9 > 4 rows")


def test_mtx_entry_count_differs_from_size_line(tmp_path):
    files = write_10x_mtx(tmp_path, random_counts(5, 4), compress=False)
    lines = files["matrix"].read_text().splitlines()
    files["matrix"].write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(CurationError) as err:
        drain(open_reader("10x_mtx", files, progress=False))
    assert_one_line_error(err, "matrix.mtx", "declares", "entries")


def test_gct_column_count_differs_from_header(tmp_path):
    counts = random_counts(4, 3)
    text = gct_text(counts, ["s1", "s2", "s3", "s4"], gene_ids(3)).splitlines()
    text[5] += "\t9"  # the second gene row (file line 6) gets an extra column
    path = write_text(tmp_path / "bad.gct", "\n".join(text) + "\n")
    with pytest.raises(CurationError) as err:
        drain(open_reader("gct", {"matrix": path}, progress=False))
    assert_one_line_error(err, "bad.gct", "line 6", "7 columns", "header has 6")

    text = gct_text(counts, ["s1", "s2", "s3", "s4"], gene_ids(3)).replace("3\t4\n", "3\t5\n", 1)
    path = write_text(tmp_path / "bad_ncols.gct", text)
    with pytest.raises(CurationError) as err:
        open_reader("gct", {"matrix": path})
    assert_one_line_error(err, "bad_ncols.gct", "line 3 names 4 samples but line 2 declares 5")


def test_star_file_without_expected_columns(tmp_path):
    (tmp_path / "htseq.tsv").write_text("ENSG00000000003.15\t12\nENSG00000000005.6\t0\n")
    with pytest.raises(CurationError) as err:
        open_reader("star_counts", {"dir": tmp_path})
    assert_one_line_error(err, "htseq.tsv", "missing STAR-Counts column")


@pytest.mark.parametrize("fmt", ["10x_mtx", "gct", "h5ad", "star_counts"])
def test_duplicate_sample_ids(tmp_path, fmt):
    counts = random_counts(4, 3)
    if fmt == "10x_mtx":
        files = write_10x_mtx(tmp_path, counts)
        files["barcodes"] = write_text(tmp_path / "barcodes.tsv", "A-1\nB-1\nA-1\nC-1\n")
        name = "barcodes.tsv"
    elif fmt == "gct":
        files = {"matrix": write_text(tmp_path / "dup.gct", gct_text(counts, ["s1", "s2", "s1", "s4"], gene_ids(3)))}
        name = "dup.gct"
    elif fmt == "h5ad":
        with warnings.catch_warnings():  # anndata warns about the non-unique names we want on disk
            warnings.simplefilter("ignore", UserWarning)
            adata = anndata.AnnData(X=sp.csr_matrix(counts.astype(np.float32)))
            adata.obs_names = ["c1", "c2", "c1", "c3"]
            adata.write_h5ad(tmp_path / "dup.h5ad")
        files, name = {"matrix": tmp_path / "dup.h5ad"}, "dup.h5ad"
    else:
        for i in range(2):
            star_file(tmp_path / f"f{i}.tsv", gene_ids(3), counts[i])
        pd.DataFrame({"file_name": ["f0.tsv", "f1.tsv"], "sample_id": ["S1", "S1"]}).to_csv(
            tmp_path / "sheet.txt", sep="\t", index=False)
        files, name = {"dir": tmp_path, "sample_sheet": tmp_path / "sheet.txt"}, "sheet.txt"
    with pytest.raises(CurationError) as err:
        drain(open_reader(fmt, files, progress=False))
    assert_one_line_error(err, name, "duplicate")


def test_duplicate_sample_ids_found_while_streaming(tmp_path):
    path = write_text(tmp_path / "sxg.csv", "sample,G1,G2\nS1,1,2\nS2,0,1\nS1,3,3\n")
    with pytest.raises(CurationError) as err:
        drain(open_reader("geo_table", {"matrix": path}, orientation="samples_x_genes"), chunk_size=1)
    assert_one_line_error(err, "sxg.csv", "duplicate sample ID 'S1'")


def test_zip_with_parent_directory_member_is_refused(tmp_path):
    write_mixseq_zip(tmp_path / "evil.zip", random_counts(3, 4), ["A", "B", "C"], {"../evil": "x"})
    with pytest.raises(CurationError) as err:
        open_reader("mixseq_zip", {"archives": [tmp_path / "evil.zip"]})
    assert_one_line_error(err, "evil.zip", "'../evil'")
    assert not (tmp_path.parent / "evil").exists()


def test_missing_files_roles_and_options(tmp_path):
    with pytest.raises(CurationError) as err:
        open_reader("h5ad", {"matrix": tmp_path / "absent.h5ad"})
    assert_one_line_error(err, "absent.h5ad", "not found")
    with pytest.raises(CurationError, match="missing file role"):
        open_reader("10x_mtx", {"matrix": tmp_path})
    with pytest.raises(CurationError, match="unknown reader option"):
        open_reader("gct", {"matrix": tmp_path}, orientation="x")
    with pytest.raises(CurationError, match="unknown reader format"):
        open_reader("loom", {"matrix": tmp_path})


def test_non_integer_check_can_be_enabled_for_text_formats(tmp_path):
    path = write_text(tmp_path / "tpm.tsv", "gene\tS1\tS2\nG1\t1.5\t2\nG2\t0\t3\n")
    got, _ = read_all(open_reader("geo_table", {"matrix": path}, progress=False), 5)
    np.testing.assert_array_equal(got, [[1.5, 0], [2, 3]])
    with pytest.raises(CurationError) as err:
        drain(open_reader("geo_table", {"matrix": path}, allow_non_integer=False, progress=False))
    assert_one_line_error(err, "tpm.tsv", "non-integer")


# ----------------------------------------------------------------------------------------------------
# bounded memory
# ----------------------------------------------------------------------------------------------------
def test_mtx_of_40k_cells_is_streamed_in_bounded_memory(tmp_path):
    n_cells, n_genes, per_cell = 40_000, 400, 60
    rng = np.random.default_rng(16)
    cells = np.repeat(np.arange(n_cells), per_cell)
    genes = rng.integers(0, n_genes, size=cells.size)
    matrix = sp.csr_matrix((np.ones(cells.size, np.float32), (cells, genes)), shape=(n_cells, n_genes))
    matrix.sum_duplicates()
    coo = matrix.tocoo()
    order = rng.permutation(coo.nnz)  # arbitrary entry order: the reader must transpose
    files = write_10x_mtx(tmp_path, np.zeros((n_cells, n_genes), dtype=np.int64), compress=False)
    with open(files["matrix"], "w") as fh:
        fh.write(f"%%MatrixMarket matrix coordinate integer general\n{n_genes} {n_cells} {coo.nnz}\n")
        pd.DataFrame({"gene": coo.col[order] + 1, "cell": coo.row[order] + 1,
                      "count": coo.data[order].astype(np.int64)}).to_csv(fh, sep=" ", header=False, index=False)
    full_bytes = coo.nnz * 12  # what holding every entry as (int32, int32, float32) would take

    # Measure in a fresh interpreter: inside a long pytest run the peak can be dominated by unrelated
    # one-off allocations (e.g. a resize of the interned-string table) that depend on earlier tests.
    str_files = {role: str(path) for role, path in files.items()}
    script = textwrap.dedent(f"""
        import json, tracemalloc
        from curation.readers import open_reader
        reader = open_reader("10x_mtx", {str_files!r}, block_values=5_000,
                             tmp_dir={str(tmp_path / "measure")!r}, progress=False)
        tracemalloc.start()
        n_rows, total, peak, biggest = 0, 0.0, 0, 0
        for chunk in reader.chunks(500):
            biggest = max(biggest, chunk.counts.shape[0])
            n_rows += chunk.counts.shape[0]
            total += float(chunk.counts.sum())
            peak = max(peak, tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        print(json.dumps(dict(n_rows=n_rows, total=total, peak=peak, biggest=biggest)))
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    measured = json.loads(run.stdout.strip().splitlines()[-1])
    assert measured["n_rows"] == n_cells and measured["total"] == float(matrix.sum())
    assert measured["biggest"] <= 500
    # Parsing, bucketing and chunking together never held a third of the entries (the reader's own share is
    # ~1/9; a one-off ~4 MB resize of the interpreter's interned-string table can land in the window too).
    assert measured["peak"] < full_bytes / 3, (measured["peak"], full_bytes)
    print(f"peak traced memory {measured['peak'] / full_bytes:.2f} of all entries")

    reader = open_reader("10x_mtx", files, block_values=5_000, tmp_dir=tmp_path / "tmp", progress=False)
    for _ in reader.chunks(500):
        pass
    assert reader._store is not None and reader._store.n_buckets == n_cells // 500
    assert reader._store.entries.max() < coo.nnz / 10
    # a second pass (curation makes two) reuses the 500-row buckets, regrouped into other chunk sizes
    store_dir = reader._store.directory
    sizes, start = [], 0
    for chunk in reader.chunks(777):
        n = chunk.counts.shape[0]
        assert (chunk.counts != matrix[start:start + n]).nnz == 0
        assert chunk.obs["source_id"].iloc[0] == f"AAAC{start:06d}-1"
        sizes.append(n)
        start += n
    assert sizes == [777] * (n_cells // 777) + [n_cells % 777]
    assert reader._store.directory == store_dir
    reader.close()
    assert not store_dir.exists()
