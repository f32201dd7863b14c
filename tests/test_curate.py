"""curate_dataset end to end on small h5ad files, checked against an independent dense computation."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp

import curation.readers as readers
from curation import schema
from curation.curate import curate_dataset
from curation.genes import GeneTable
from curation.io import CurationError

N_CELLS, N_GENES = 80, 14
QC = {"min_genes_per_cell": 6, "min_cells_per_gene": 12, "min_library_size": 0}


@pytest.fixture(scope="module")
def gene_table() -> GeneTable:
    return GeneTable.load()


@dataclass
class Source:
    """A small h5ad dataset plus everything needed to compute its curation independently."""

    spec: dict
    dense: np.ndarray  # (N_CELLS, n_features) as written
    feature_ref: np.ndarray  # (n_features,) reference index per feature, -1 unmapped (computed without genes.py)
    obs: pd.DataFrame
    cell_type: dict[str, str]


@pytest.fixture(scope="module")
def source(tmp_path_factory, gene_table) -> Source:
    directory = tmp_path_factory.mktemp("raw")
    genes = gene_table.genes
    coding = genes.index[genes["biotype"].eq("protein_coding").to_numpy()][:N_GENES].to_numpy()
    ids = genes["gene_id"].to_numpy()[coding]
    # Features: versioned Ensembl IDs, then the symbol of gene 0 again (summed into it), then an unmappable name.
    var_names = [f"{gid}.{k + 1}" for k, gid in enumerate(ids)] + [genes["symbol"].iloc[coding[0]], "LOC999999999"]
    feature_ref = np.concatenate([np.searchsorted(genes["gene_id"].to_numpy(), ids), [coding[0], -1]])

    rng = np.random.default_rng(7)
    dense = rng.poisson(2.0, size=(N_CELLS, len(var_names))).astype(np.float32)
    dense[rng.random(dense.shape) < 0.3] = 0
    dense[:, 3] = 0
    dense[[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 20, 21], 3] = 4  # gene 3: 11 passing + 2 dropped cells, see below
    dense[10, :] = 0
    dense[10, 0] = 9  # one detected gene: low_genes
    dense[20, 6] = -3  # negative: dropped
    dense[21, -1] = -1  # negative in the unmapped feature: still dropped
    dense[30] = dense[31]  # identical profiles keep identical hashes
    obs = pd.DataFrame({
        "gem_group": rng.integers(1, 4, N_CELLS).astype(float),  # float column: labels must read "1", not "1.0"
        "gene": rng.choice(["non-targeting", "TP53", "MYC"], N_CELLS),
    }, index=[f"cell{i:03d}" for i in range(N_CELLS)])
    adata = anndata.AnnData(X=sp.csr_matrix(dense), obs=obs, var=pd.DataFrame(index=var_names))
    matrix = directory / "screen.h5ad"
    adata.write_h5ad(matrix)
    cell_type = {f"cell{i:03d}": ("K562" if i % 2 else "RPE1") for i in range(0, N_CELLS, 3)}
    meta = directory / "meta.csv"
    pd.DataFrame({"barcode": list(cell_type), "cell_type": list(cell_type.values())}).to_csv(meta, index=False)
    spec = {
        "modality": "single_cell", "format": "h5ad", "files": {"matrix": str(matrix)}, "reader": {"matrix": "X"},
        "metadata": {"file": str(meta), "key": "barcode"},
        "columns": {"batch": "gem_group", "perturbation": "gene", "cell_type": "cell_type", "tissue": None,
                    "source_accession": None},
        "control_label": "non-targeting", "qc": dict(QC), "allow_normalised": False,
    }
    return Source(spec, dense, feature_ref, obs, cell_type)


def expected_curation(src: Source, qc: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, int]]:
    """Dense reference: (passing row numbers, panel reference indices, passing×panel counts, dropped by reason)."""
    mapped_refs = np.unique(src.feature_ref[src.feature_ref >= 0])
    summed = np.zeros((len(src.dense), len(mapped_refs)), dtype=np.float32)
    for j, r in enumerate(src.feature_ref):
        if r >= 0:
            summed[:, np.searchsorted(mapped_refs, r)] += src.dense[:, j]
    dropped = {"excluded": 0, "non_finite": 0, "negative": 0, "low_genes": 0, "low_library": 0}
    passing = []
    for i in range(len(src.dense)):
        if not np.isfinite(src.dense[i]).all():
            dropped["non_finite"] += 1
        elif (src.dense[i] < 0).any():
            dropped["negative"] += 1
        elif np.count_nonzero(summed[i]) < qc["min_genes_per_cell"]:
            dropped["low_genes"] += 1
        elif summed[i].sum() < qc["min_library_size"]:
            dropped["low_library"] += 1
        else:
            passing.append(i)
    passing = np.array(passing, dtype=np.int64)
    keep = (summed[passing] > 0).sum(axis=0) >= qc["min_cells_per_gene"]
    return passing, mapped_refs[keep], summed[np.ix_(passing, keep)], dropped


def read_samples(work: Path, name: str):
    return pq.read_table(work / "curated" / name / "samples.parquet")


def test_curate_matches_dense_reference(source, gene_table, tmp_path):
    report = curate_dataset("screen", source.spec, tmp_path, gene_table=gene_table, chunk_size=9, progress=False)
    passing, panel, counts, dropped = expected_curation(source, QC)
    assert dropped["negative"] == 2 and dropped["low_genes"] >= 1
    # Gene 3 misses min_cells_per_gene only because detection counts passing cells, not dropped ones.
    assert (source.dense[passing, 3] > 0).sum() == QC["min_cells_per_gene"] - 1
    assert (source.dense[:, 3] > 0).sum() >= QC["min_cells_per_gene"]

    table = read_samples(tmp_path, "screen")
    assert table.schema.equals(schema.SAMPLE_SCHEMA)
    schema.check_table(table, schema.SAMPLE_SCHEMA, "samples.parquet")
    rows = table.to_pylist()
    assert len(rows) == len(passing)
    for row, i, profile in zip(rows, passing, counts):
        nz = np.flatnonzero(profile)
        barcode = f"cell{i:03d}"
        assert row["sample_id"] == f"screen:{barcode}" and row["dataset"] == "screen" and row["split"] == ""
        assert row["gene_idx"] == panel[nz].tolist()
        assert row["counts"] == profile[nz].tolist()
        assert row["library_size"] == pytest.approx(float(profile.sum()))
        assert row["n_genes_detected"] == len(nz)
        assert row["content_hash"] == schema.content_hash(panel[nz], profile[nz])
        assert row["batch"] == str(int(source.obs["gem_group"].iloc[i]))
        assert row["perturbation"] == source.obs["gene"].iloc[i]
        assert row["cell_type"] == source.cell_type.get(barcode)
        assert row["tissue"] is None
        assert row["source_accession"] == row["sample_id"]
        assert row["modality"] == "single_cell"
    assert rows[passing.tolist().index(30)]["content_hash"] == rows[passing.tolist().index(31)]["content_hash"]

    on_disk = json.loads((tmp_path / "curated" / "screen" / "report.json").read_text())
    assert on_disk == report
    assert report["panel"] == panel.tolist()
    assert report["n_input"] == N_CELLS and report["n_samples"] == len(passing)
    assert report["dropped"] == dropped
    assert report["n_genes_mapped"] == N_GENES and report["n_genes_panel"] == len(panel) == N_GENES - 1
    assert report["mapping"]["n_unmapped"] == 1 and report["mapping"]["unmapped_examples"] == ["LOC999999999"]
    assert report["mapping"]["n_summed_duplicates"] == 1
    assert report["n_control"] == int((source.obs["gene"].iloc[passing] == "non-targeting").sum())
    assert report["metadata"]["n_samples_matched"] == len(source.cell_type)
    assert report["chunk_size"] == 9 and report["qc"] == QC
    assert report["source_files"][0]["sha256"] and report["source_files"][0]["role"] == "matrix"


def test_output_is_byte_identical_across_runs_and_chunk_sizes(source, gene_table, tmp_path, monkeypatch):
    monkeypatch.setattr(schema, "ROW_GROUP_ROWS", 16)
    outputs = []
    for run, chunk_size in enumerate([7, 7, 1000]):
        work = tmp_path / f"run{run}"
        curate_dataset("screen", source.spec, work, gene_table=gene_table, chunk_size=chunk_size, progress=False)
        outputs.append(work / "curated" / "screen")
    samples = [(d / "samples.parquet").read_bytes() for d in outputs]
    assert samples[0] == samples[1] == samples[2]
    assert (outputs[0] / "report.json").read_bytes() == (outputs[1] / "report.json").read_bytes()
    meta = pq.ParquetFile(outputs[0] / "samples.parquet").metadata
    sizes = [meta.row_group(k).num_rows for k in range(meta.num_row_groups)]
    assert sizes[:-1] == [16] * (len(sizes) - 1) and 0 < sizes[-1] <= 16 and sum(sizes) == meta.num_rows


def test_rerun_replaces_outputs_and_bulk_defaults(source, gene_table, tmp_path):
    bulk = {**source.spec, "modality": "bulk", "metadata": None, "control_label": None,
            "columns": {"batch": None}, "qc": {"min_library_size": 18}}
    report = curate_dataset("bulkish", bulk, tmp_path, gene_table=gene_table, progress=False)
    qc = {"min_genes_per_cell": 0, "min_cells_per_gene": 0, "min_library_size": 18}
    passing, panel, _, dropped = expected_curation(source, qc)
    assert report["qc"] == qc and report["dropped"] == dropped and dropped["low_library"] > 0
    assert report["panel"] == panel.tolist() and len(panel) == N_GENES  # every mapped gene is measured
    table = read_samples(tmp_path, "bulkish")
    assert table.num_rows == len(passing)
    assert set(table.column("batch").to_pylist()) == {"all"}
    assert table.column("perturbation").null_count == table.num_rows


def test_bad_inputs_raise_one_line_errors(source, gene_table, tmp_path):
    spec = {**source.spec, "columns": {**source.spec["columns"], "batch": "plate"}}
    with pytest.raises(CurationError, match=r"screen.h5ad: columns.batch: no sample column 'plate'") as err:
        curate_dataset("screen", spec, tmp_path, gene_table=gene_table, progress=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "curated" / "screen" / "report.json").exists()

    with pytest.raises(CurationError, match="unknown QC setting"):
        curate_dataset("screen", {**source.spec, "qc": {"min_umis": 5}}, tmp_path, gene_table=gene_table,
                       progress=False)
    meta = tmp_path / "other_meta.csv"
    pd.DataFrame({"barcode": ["x", "y"], "cell_type": ["a", "b"]}).to_csv(meta, index=False)
    with pytest.raises(CurationError, match=r"other_meta.csv: no 'barcode' value matches a sample ID"):
        curate_dataset("screen", {**source.spec, "metadata": {"file": str(meta), "key": "barcode"}}, tmp_path,
                       gene_table=gene_table, progress=False)


def test_normalised_h5ad_refused_unless_allowed(gene_table, tmp_path):
    genes = gene_table.genes
    var = pd.DataFrame(index=genes["gene_id"].iloc[:5].tolist())
    path = tmp_path / "norm.h5ad"
    anndata.AnnData(X=sp.csr_matrix(np.full((4, 5), 0.5, dtype=np.float32)), var=var,
                    obs=pd.DataFrame(index=[f"c{i}" for i in range(4)])).write_h5ad(path)
    spec = {"modality": "bulk", "format": "h5ad", "files": {"matrix": str(path)}, "reader": {"matrix": "X"}}
    with pytest.raises(CurationError, match=r"norm.h5ad: .*non-integer.*allow_normalised: true"):
        curate_dataset("norm", spec, tmp_path, gene_table=gene_table, progress=False)
    report = curate_dataset("norm", {**spec, "allow_normalised": True}, tmp_path, gene_table=gene_table,
                            progress=False)
    assert report["n_samples"] == 4


class FakeReader:
    """Implements the reader protocol over in-memory chunks (for inputs a real file format cannot hold)."""

    def __init__(self, feature_ids: list[str], chunks: list[tuple[np.ndarray, list[str]]]):
        self.features = pd.DataFrame({"feature_id": feature_ids})
        self.n_samples = sum(len(ids) for _, ids in chunks)
        self._chunks = chunks

    def chunks(self, chunk_size: int = 10_000):
        for dense, ids in self._chunks:
            yield readers.Chunk(counts=sp.csr_matrix(dense.astype(np.float32)), obs=pd.DataFrame({"source_id": ids}))


def test_duplicate_source_id_across_chunks_and_unmappable_features(gene_table, tmp_path, monkeypatch):
    feature_ids = gene_table.genes["gene_id"].iloc[:3].tolist()
    ones = np.ones((2, 3))
    fake = FakeReader(feature_ids, [(ones, ["a", "b"]), (ones, ["c", "a"])])
    monkeypatch.setattr(readers, "open_reader", lambda fmt, files, **options: fake)
    spec = {"modality": "bulk", "format": "gct", "files": {"matrix": "/data/x.gct"}}
    with pytest.raises(CurationError, match=r"^/data/x.gct: duplicate sample ID 'a'$"):
        curate_dataset("dup", spec, tmp_path, gene_table=gene_table, progress=False)

    fake = FakeReader(["ENSMUSG00000000001", "Gm42418"], [(np.ones((2, 2)), ["a", "b"])])
    monkeypatch.setattr(readers, "open_reader", lambda fmt, files, **options: fake)
    with pytest.raises(CurationError, match="none of the 2 features maps"):
        curate_dataset("mouse", spec, tmp_path, gene_table=gene_table, progress=False)


def test_nan_samples_dropped_and_counted(gene_table, tmp_path, monkeypatch):
    feature_ids = gene_table.genes["gene_id"].iloc[:4].tolist()
    dense = np.array([[1, 2, 0, 1], [np.nan, 1, 1, 1], [3, 0, 0, np.inf], [0, 0, 0, 0]])
    monkeypatch.setattr(readers, "open_reader",
                        lambda fmt, files, **options: FakeReader(feature_ids, [(dense, ["s1", "s2", "s3", "s4"])]))
    spec = {"modality": "bulk", "format": "geo_table", "files": {"matrix": "/data/t.csv"}}
    report = curate_dataset("nan", spec, tmp_path, gene_table=gene_table, progress=False)
    assert report["dropped"] == {"excluded": 0, "non_finite": 2, "negative": 0, "low_genes": 0, "low_library": 0}
    table = read_samples(tmp_path, "nan")
    assert table.column("sample_id").to_pylist() == ["nan:s1", "nan:s4"]
    assert table.column("gene_idx").to_pylist() == [[0, 1, 3], []]
    assert table.column("library_size").to_pylist() == [4.0, 0.0]


def test_sample_filter_keeps_and_drops_by_obs_values(source, gene_table, tmp_path):
    """sample_filter removes samples by label before QC (MIX-seq doublets, one GBmap assay family)."""
    spec = {**source.spec, "sample_filter": {"keep": {"gene": ["TP53", "non-targeting"]},
                                             "drop": {"gem_group": [1]}}}
    report = curate_dataset("filtered", spec, tmp_path, gene_table=gene_table, progress=False)
    obs = source.obs
    excluded = ~obs["gene"].isin(["TP53", "non-targeting"]).to_numpy() | (obs["gem_group"] == 1).to_numpy()
    assert report["dropped"]["excluded"] == int(excluded.sum()) > 0
    kept = set(read_samples(tmp_path, "filtered").column("sample_id").to_pylist())
    assert not kept & {f"filtered:{i}" for i in obs.index[excluded]}
    assert report["sample_filter"] == {"keep": {"gene": ["TP53", "non-targeting"]}, "drop": {"gem_group": ["1"]}}
    with pytest.raises(CurationError, match=r"screen.h5ad: sample_filter.drop: no sample column 'assay'"):
        curate_dataset("bad", {**source.spec, "sample_filter": {"drop": {"assay": ["Smart-seq2"]}}}, tmp_path,
                       gene_table=gene_table, progress=False)
