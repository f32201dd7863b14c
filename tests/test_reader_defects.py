"""Reader and curation defects found on real files (issue 10), each reproduced on a minimal input.

Each test states the defect it guards: a malformed or unusual input must give ONE line naming the file and
write nothing (no samples.parquet, no report.json), and sums of integer counts must be exact.
"""

from __future__ import annotations

import json
from pathlib import Path

import anndata
import h5py
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp

from curation.curate import curate_dataset
from curation.genes import GeneTable
from curation.io import CurationError
from curation.qc import QCConfig, cell_pass_mask
from curation import qc as qc_module
from curation.readers import open_reader


@pytest.fixture(scope="module")
def gene_table() -> GeneTable:
    return GeneTable.load()


def _ids(gene_table: GeneTable, n: int) -> list[str]:
    return gene_table.genes["gene_id"].iloc[:n].tolist()


def _drain(reader, chunk_size: int = 3) -> list:
    return [c.counts.toarray() for c in reader.chunks(chunk_size)]


def _one_line(err: pytest.ExceptionInfo, name: str, *fragments: str) -> None:
    message = str(err.value)
    assert "\n" not in message and name in message, message
    for fragment in fragments:
        assert fragment in message, message


def _nothing_written(work: Path, name: str) -> None:
    out = work / "curated" / name
    assert not (out / "samples.parquet").exists() and not (out / "report.json").exists()
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())


# ------------------------------------------------------------------------ compressed-matrix bounds checks
def _write_csr_h5ad(path: Path, data, indices, indptr, shape, encoding: str = "csr_matrix",
                    var_names: list[str] | None = None) -> Path:
    """A minimal anndata >= 0.8 h5ad with a hand-made (possibly corrupt) compressed X."""
    n_obs, n_vars = shape
    base = anndata.AnnData(obs=pd.DataFrame(index=[f"c{i}" for i in range(n_obs)]),
                           var=pd.DataFrame(index=var_names or [f"g{j}" for j in range(n_vars)]))
    base.write_h5ad(path)
    with h5py.File(path, "a") as f:
        if "X" in f:
            del f["X"]
        g = f.create_group("X")
        g.attrs["encoding-type"], g.attrs["encoding-version"] = encoding, "0.1.0"
        g.attrs["shape"] = np.array(shape, dtype=np.int64)
        g["data"] = np.asarray(data, dtype=np.float32)
        g["indices"] = np.asarray(indices, dtype=np.int32)
        g["indptr"] = np.asarray(indptr, dtype=np.int64)
    return path


@pytest.mark.parametrize("case,indices,indptr,fragment", [
    ("index_too_big", [0, 5, 1], [0, 2, 3, 3], "column index 5 outside [0, 5)"),
    ("index_negative", [0, -1, 1], [0, 2, 3, 3], "column index -1 outside [0, 5)"),
    ("indptr_beyond_data", [0, 1, 1], [0, 2, 3, 9], "indptr[3] = 9 beyond the 3 stored values"),
    ("indptr_decreasing", [0, 1, 1], [0, 2, 1, 3], "indptr decreases at row 1"),
    ("indptr_not_zero", [0, 1, 1], [1, 2, 3, 3], "indptr[0] = 1, expected 0"),
])
def test_h5ad_csr_corruption_is_one_line(tmp_path, case, indices, indptr, fragment):
    """Defect: an index >= n_vars segfaulted / dropped a count; indptr beyond data raised a traceback."""
    path = _write_csr_h5ad(tmp_path / f"{case}.h5ad", [1, 2, 3], indices, indptr, (3, 5))
    with pytest.raises(CurationError) as err:
        _drain(open_reader("h5ad", {"matrix": path}, progress=False))
    _one_line(err, f"{case}.h5ad", fragment)


def test_h5ad_csc_index_out_of_range_is_one_line(tmp_path):
    # CSC (3 obs x 2 vars): column 1 stores a row index 3 >= n_obs.
    path = _write_csr_h5ad(tmp_path / "csc.h5ad", [1, 2, 3], [0, 2, 3], [0, 2, 3], (3, 2), encoding="csc_matrix")
    with pytest.raises(CurationError) as err:
        _drain(open_reader("h5ad", {"matrix": path}, progress=False))
    _one_line(err, "csc.h5ad", "row index 3 outside [0, 3)")


def _write_10x_h5(path: Path, genomes: dict[str, tuple[sp.csc_matrix, list[str]]], v3: bool) -> Path:
    """CellRanger .h5: v2 = one group per genome; v3 = /matrix with features/genome (barnyard: mixed)."""
    with h5py.File(path, "w") as f:
        if v3:
            mats = [m for m, _ in genomes.values()]
            csc = sp.csc_matrix(sp.vstack(mats))
            g = f.create_group("matrix")
            g["data"], g["indices"], g["indptr"] = csc.data.astype(np.int32), csc.indices.astype(np.int64), csc.indptr
            g["shape"] = np.array(csc.shape, dtype=np.int32)
            g["barcodes"] = np.array([f"B{i}-1" for i in range(csc.shape[1])], dtype="S")
            feats = g.create_group("features")
            ids = [i for _, names in genomes.values() for i in names]
            feats["id"], feats["name"] = np.array(ids, dtype="S"), np.array(ids, dtype="S")
            feats["feature_type"] = np.array(["Gene Expression"] * len(ids), dtype="S")
            feats["genome"] = np.array([gn for gn, (_, names) in genomes.items() for _ in names], dtype="S")
        else:
            for genome, (csc, names) in genomes.items():
                g = f.create_group(genome)
                g["data"], g["indices"], g["indptr"] = csc.data.astype(np.int32), csc.indices, csc.indptr
                g["shape"] = np.array(csc.shape, dtype=np.int32)
                g["barcodes"] = np.array([f"B{i}-1" for i in range(csc.shape[1])], dtype="S")
                g["genes"], g["gene_names"] = np.array(names, dtype="S"), np.array(names, dtype="S")
    return path


def test_10x_h5_index_out_of_range_is_one_line(tmp_path):
    path = tmp_path / "bad.h5"
    with h5py.File(path, "w") as f:
        g = f.create_group("matrix")
        g["data"], g["indices"], g["indptr"] = [1, 2], np.array([0, 4], np.int64), np.array([0, 1, 2], np.int64)
        g["shape"] = np.array([3, 2], dtype=np.int32)
        g["barcodes"] = np.array([b"A-1", b"B-1"])
        feats = g.create_group("features")
        feats["id"], feats["name"] = np.array([b"G1", b"G2", b"G3"]), np.array([b"S1", b"S2", b"S3"])
    with pytest.raises(CurationError) as err:
        _drain(open_reader("10x_h5", {"matrix": path}, progress=False))
    _one_line(err, "bad.h5", "feature index 4 outside [0, 3)")


def test_multi_genome_10x_h5_lists_genomes_and_takes_a_genome_option(tmp_path):
    """Defect: a v2 barnyard .h5 (hg19 + mm10 groups) was 'not a CellRanger matrix HDF5' with no way out."""
    human = sp.csc_matrix(np.array([[1, 0, 2], [0, 3, 0]]))  # 2 genes x 3 cells
    mouse = sp.csc_matrix(np.array([[5, 5, 0]]))
    genomes = {"hg19": (human, ["ENSG1", "ENSG2"]), "mm10": (mouse, ["ENSMUSG1"])}
    v2 = _write_10x_h5(tmp_path / "v2.h5", genomes, v3=False)
    with pytest.raises(CurationError) as err:
        open_reader("10x_h5", {"matrix": v2}, progress=False)
    _one_line(err, "v2.h5", "genome groups hg19, mm10", "genome:")
    reader = open_reader("10x_h5", {"matrix": v2}, genome="mm10", progress=False)
    assert reader.features["feature_id"].tolist() == ["ENSMUSG1"]
    np.testing.assert_array_equal(np.vstack(_drain(reader)), mouse.T.toarray())
    with pytest.raises(CurationError, match=r"v2.h5: .*genome='GRCh38'.*hg19, mm10"):
        open_reader("10x_h5", {"matrix": v2}, genome="GRCh38", progress=False)
    # v3: one /matrix whose features carry a genome column; the option keeps that genome's features.
    v3 = _write_10x_h5(tmp_path / "v3.h5", genomes, v3=True)
    reader = open_reader("10x_h5", {"matrix": v3}, genome="hg19", progress=False)
    assert reader.features["feature_id"].tolist() == ["ENSG1", "ENSG2"]
    np.testing.assert_array_equal(np.vstack(_drain(reader)), human.T.toarray())
    assert open_reader("10x_h5", {"matrix": v3}, progress=False).n_features == 3  # no option: every feature


def test_bounds_error_at_curate_writes_nothing(tmp_path, gene_table):
    path = _write_csr_h5ad(tmp_path / "bad.h5ad", [1, 2, 3], [0, 5, 1], [0, 2, 3, 3], (3, 5),
                           var_names=_ids(gene_table, 5))
    spec = {"modality": "single_cell", "format": "h5ad", "files": {"matrix": str(path)}, "reader": {"matrix": "X"},
            "qc": {"min_genes_per_cell": 0, "min_cells_per_gene": 0, "min_library_size": 0}}
    with pytest.raises(CurationError, match=r"bad.h5ad: .*column index 5"):
        curate_dataset("bad", spec, tmp_path / "work", gene_table=gene_table, progress=False)
    _nothing_written(tmp_path / "work", "bad")


# ----------------------------------------------------------------------------------- exact library sizes
BIG = np.array([16_777_216, 1, 1, 1], dtype=np.float32)  # a float32 running sum loses every +1 after 2**24
EXACT = 16_777_219


def test_row_sums_are_exact_where_float32_accumulation_is_not():
    m = sp.csr_matrix(BIG[None, :])
    assert float(np.asarray(m.sum(axis=1, dtype=np.float64)).ravel()[0]) != EXACT  # the scipy pitfall
    sums = qc_module.row_sums(m)
    assert sums.dtype == np.float64 and sums.tolist() == [EXACT]
    empty = qc_module.row_sums(sp.csr_matrix((3, 4), dtype=np.float32))  # bincount alone would give int64
    assert empty.dtype == np.float64 and empty.tolist() == [0.0, 0.0, 0.0]


def test_qc_library_threshold_uses_the_exact_sum():
    # 2**24 + 1 rounds to 2**24 in float32 (ties to even): the old float32 sum dropped this sample.
    qc = QCConfig.for_modality("bulk", {"min_library_size": 16_777_217})
    mask, reasons = cell_pass_mask(sp.csr_matrix(np.array([[16_777_216, 1]], dtype=np.float32)), qc)
    assert mask.tolist() == [True], reasons


def test_curated_library_size_is_the_exact_integer_sum(tmp_path, gene_table):
    """Defect: a bulk sample of ~17M reads got library_size off by 3 (float32 accumulation)."""
    genes = _ids(gene_table, len(BIG))
    lines = ["#1.2", f"{len(genes)}\t2", "Name\tDescription\tS1\tS2"]
    lines += [f"{g}\tx\t{int(v)}\t{int(v) * 2 if i else 3}" for i, (g, v) in enumerate(zip(genes, BIG))]
    gct = tmp_path / "reads.gct"
    gct.write_text("\n".join(lines) + "\n")
    spec = {"modality": "bulk", "format": "gct", "files": {"matrix": str(gct)},
            "qc": {"min_library_size": EXACT}}
    curate_dataset("big", spec, tmp_path, gene_table=gene_table, progress=False)
    table = pq.read_table(tmp_path / "curated" / "big" / "samples.parquet").to_pydict()
    assert table["library_size"] == [EXACT]  # S2 (sum 9) is below the threshold; S1 passes exactly
    assert sum(table["counts"][0]) == EXACT


# ------------------------------------------------------------------- empty results fail at the curate step
def _h5ad(path: Path, dense: np.ndarray, var_names: list[str]) -> Path:
    anndata.AnnData(X=sp.csr_matrix(dense.astype(np.float32)),
                    obs=pd.DataFrame(index=[f"c{i}" for i in range(dense.shape[0])]),
                    var=pd.DataFrame(index=var_names)).write_h5ad(path)
    return path


def test_zero_kept_samples_is_a_curate_error(tmp_path, gene_table):
    """Defect: QC that keeps no sample exited 0 and only build-corpus complained."""
    path = _h5ad(tmp_path / "few.h5ad", np.ones((4, 3)), _ids(gene_table, 3))
    spec = {"modality": "single_cell", "format": "h5ad", "files": {"matrix": str(path)},
            "qc": {"min_genes_per_cell": 2000, "min_cells_per_gene": 1, "min_library_size": 0}}
    with pytest.raises(CurationError) as err:
        curate_dataset("few", spec, tmp_path / "work", gene_table=gene_table, progress=False)
    _one_line(err, "few.h5ad", "QC kept 0 of 4 samples", "low_genes: 4", "min_genes_per_cell")
    _nothing_written(tmp_path / "work", "few")


def test_empty_panel_is_a_curate_error(tmp_path, gene_table):
    path = _h5ad(tmp_path / "thin.h5ad", np.ones((4, 3)), _ids(gene_table, 3))
    spec = {"modality": "single_cell", "format": "h5ad", "files": {"matrix": str(path)},
            "qc": {"min_genes_per_cell": 1, "min_cells_per_gene": 1000, "min_library_size": 0}}
    with pytest.raises(CurationError) as err:
        curate_dataset("thin", spec, tmp_path / "work", gene_table=gene_table, progress=False)
    _one_line(err, "thin.h5ad", "empty gene panel", "min_cells_per_gene = 1000", "4 passing samples")
    _nothing_written(tmp_path / "work", "thin")


# ---------------------------------------------------------------------------- pre-0.7 h5ad raw layout
def test_pre_0_7_top_level_raw_layout_is_read(tmp_path):
    """Defect: anndata < 0.7 stored .raw as top-level 'raw.X' / 'raw.var'; the reader said "has no matrix 'raw'".

    Layout as written by anndata 0.6 (anndata/_io/h5ad.py `_read_legacy_raw` reads exactly these keys):
    obs/var/raw.var are compound (structured) datasets with an ``index`` field; raw.X is a group with
    h5sparse_format/h5sparse_shape attributes for a sparse matrix.
    """
    path = tmp_path / "old.h5ad"
    raw = sp.csr_matrix(np.array([[1, 0, 4, 0], [0, 2, 0, 3], [5, 0, 0, 0]], dtype=np.float32))
    with h5py.File(path, "w") as f:
        f["X"] = np.log1p(raw.toarray()[:, :2])
        f["obs"] = np.array([(b"c0",), (b"c1",), (b"c2",)], dtype=[("index", "S2")])
        f["var"] = np.array([(b"G1",), (b"G2",)], dtype=[("index", "S2")])
        g = f.create_group("raw.X")
        g.attrs["h5sparse_format"], g.attrs["h5sparse_shape"] = "csr", np.array(raw.shape)
        g["data"], g["indices"], g["indptr"] = raw.data, raw.indices, raw.indptr
        f["raw.var"] = np.array([(b"G1",), (b"G2",), (b"G3",), (b"G4",)], dtype=[("index", "S2")])
    reader = open_reader("h5ad", {"matrix": path}, matrix="raw", progress=False)
    assert reader.features["feature_id"].tolist() == ["G1", "G2", "G3", "G4"]
    np.testing.assert_array_equal(np.vstack(_drain(reader)), raw.toarray())
    assert [c.obs["source_id"].tolist() for c in reader.chunks(10)] == [["c0", "c1", "c2"]]


# --------------------------------------------------------------------------- scaled and near-integer data
def test_scaled_data_is_named_as_such(tmp_path, gene_table):
    """Defect: z-scored X was told 'set allow_normalised: true', which then dropped every cell as negative."""
    z = np.array([[-0.3, 1.2, 0.0], [0.7, -1.1, 0.4]])
    path = _h5ad(tmp_path / "scaled.h5ad", z, _ids(gene_table, 3))
    for allow in (False, True):
        with pytest.raises(CurationError) as err:
            _drain(open_reader("h5ad", {"matrix": path}, allow_non_integer=allow, progress=False))
        _one_line(err, "scaled.h5ad", "negative non-integer values", "scaled", "cannot be used")
        assert "allow_normalised" not in str(err.value)


def test_float_noise_is_rounded_and_reported(tmp_path, gene_table):
    """Dense float32 counts such as 2.9999998 are integers up to float noise: round them and say so."""
    dense = np.array([[3, 0, 1], [2, 5, 0], [1, 1, 1]], dtype=np.float64)
    noisy = dense.copy()
    noisy[0, 0], noisy[1, 1] = 2.9999998, 5.0000005
    path = tmp_path / "dense.h5ad"
    anndata.AnnData(X=noisy.astype(np.float32), obs=pd.DataFrame(index=["a", "b", "c"]),
                    var=pd.DataFrame(index=_ids(gene_table, 3))).write_h5ad(path)
    reader = open_reader("h5ad", {"matrix": path}, progress=False)
    np.testing.assert_array_equal(np.vstack(_drain(reader)), dense)
    assert reader.rounding["n_values_rounded"] == 2 and 0 < reader.rounding["max_abs_change"] < 1e-5
    spec = {"modality": "single_cell", "format": "h5ad", "files": {"matrix": str(path)},
            "qc": {"min_genes_per_cell": 1, "min_cells_per_gene": 1, "min_library_size": 0}}
    report = curate_dataset("dense", spec, tmp_path / "work", gene_table=gene_table, progress=False)
    assert report["integer_rounding"]["n_values_rounded"] == 2
    saved = json.loads((tmp_path / "work" / "curated" / "dense" / "report.json").read_text())
    assert saved["integer_rounding"] == report["integer_rounding"]
    # A real fraction is still refused (not silently rounded).
    noisy[2, 2] = 1.25
    anndata.AnnData(X=noisy.astype(np.float32), var=pd.DataFrame(index=_ids(gene_table, 3))).write_h5ad(path)
    with pytest.raises(CurationError, match="non-integer"):
        _drain(open_reader("h5ad", {"matrix": path}, progress=False))


def test_matrix_auto_follows_the_cellxgene_rule(tmp_path):
    """CELLxGENE schema 5.0.0: raw counts are in raw.X unless no normalised matrix is given, then in X."""
    counts = sp.csr_matrix(np.array([[1, 0, 3], [0, 2, 0]], dtype=np.float32))
    var = pd.DataFrame(index=["G1", "G2", "G3"])
    with_raw = anndata.AnnData(X=sp.csr_matrix(np.log1p(counts.toarray())), var=var)
    with_raw.raw = anndata.AnnData(X=counts, var=var)
    with_raw.write_h5ad(tmp_path / "raw.h5ad")
    anndata.AnnData(X=counts, var=var).write_h5ad(tmp_path / "x.h5ad")
    for name in ("raw.h5ad", "x.h5ad"):
        reader = open_reader("h5ad", {"matrix": tmp_path / name}, matrix="auto", progress=False)
        np.testing.assert_array_equal(np.vstack(_drain(reader)), counts.toarray())
    assert open_reader("h5ad", {"matrix": tmp_path / "raw.h5ad"}, matrix="auto", progress=False).matrix == "raw"
