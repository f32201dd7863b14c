"""Every manifest source, read from a tiny fixture in its REAL file layout through the manifest's own curation entry.

tests/fixtures/<source>/ mirrors <raw_dir>/<source>/ of the real build (files written by
tests/fixtures/make_fixtures.py, whose docstrings cite the public evidence of each layout). The curation config is
built exactly as workflow/rules/common.smk builds it (curation.sources.curation_entry -> curation.config.load_config);
only the QC thresholds are lowered, because a fixture has a dozen genes, and nothing else is overridden: reader
options, columns, metadata tables, sample filters and control labels are the real ones.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from curation.config import dataset_spec, load_config
from curation.curate import curate_dataset
from curation.genes import GeneTable
from curation.sources import curation_entry, load_manifest

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TINY_QC = {"min_cells_per_gene": 1, "min_genes_per_cell": 1, "min_library_size": 0}
MANIFEST = load_manifest()


def _fixture_module():
    spec = importlib.util.spec_from_file_location("make_fixtures", FIXTURES / "make_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gene_table() -> GeneTable:
    return GeneTable.load()


def curate_fixture(name: str, work: Path, gene_table: GeneTable, **overrides) -> tuple[dict, dict]:
    """(report, samples.parquet as a dict of columns) of source ``name`` curated from its fixture."""
    entry = curation_entry(name, MANIFEST["sources"][name])
    qc = TINY_QC if entry["qc"].get("min_genes_per_cell") else entry["qc"]  # K562 keeps its real 0/0/0
    config = load_config({"raw_dir": str(FIXTURES), "work_dir": str(work), "datasets": {name: entry}},
                         overrides={"datasets": {name: {"qc": qc, **overrides}}})
    spec = dataset_spec(config, name)
    report = curate_dataset(name, spec, work, gene_table=gene_table, chunk_size=4, progress=False)
    return report, pq.read_table(work / "curated" / name / "samples.parquet").to_pydict()


def test_every_manifest_source_has_a_fixture():
    assert sorted(MANIFEST["sources"]) == sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())


def test_replogle_dense_h5ad_phenoprint_only_qc(tmp_path, gene_table):
    assert MANIFEST["sources"]["replogle_k562_gwps"]["qc"] == {"min_cells_per_gene": 0, "min_genes_per_cell": 0,
                                                               "min_library_size": 0}
    report, rows = curate_fixture("replogle_k562_gwps", tmp_path, gene_table)
    assert report["n_samples"] == 6 and report["n_genes_panel"] == 12 and report["mapping"]["n_unmapped"] == 0
    assert report["n_control"] == 2 and report["n_batches"] == 2
    assert rows["perturbation"][:2] == ["non-targeting", "non-targeting"]


def test_gbmap_raw_counts_and_the_optional_assay_filter(tmp_path, gene_table):
    report, rows = curate_fixture("gbmap", tmp_path / "all", gene_table)
    assert report["n_samples"] == 5  # default: every assay, Smart-seq2 included (see the manifest comment)
    assert all(float(v).is_integer() for v in rows["library_size"])  # raw.X counts, not the normalised X
    filtered, _ = curate_fixture("gbmap", tmp_path / "umi", gene_table,
                                 sample_filter={"drop": {"assay": ["Smart-seq2"]}})
    assert filtered["n_samples"] == 4 and filtered["dropped"]["excluded"] == 1


@pytest.mark.parametrize("name", ["gastric_metaplasia", "tme_atlas"])
def test_cellxgene_sources_read_the_counts(tmp_path, gene_table, name):
    report, rows = curate_fixture(name, tmp_path, gene_table)
    assert report["n_samples"] == 4 and report["n_genes_panel"] == 12
    assert all(float(v).is_integer() for v in rows["library_size"])
    assert set(rows["batch"]) == {"D0", "D1", "D2"} and rows["tissue"][0] == "brain"


def test_mixseq_treatment_controls_and_doublets(tmp_path, gene_table):
    report, rows = curate_fixture("mixseq", tmp_path, gene_table)
    assert report["n_input"] == 10 and report["dropped"]["excluded"] == 4  # 2 doublets + 2 low-quality cells
    assert report["n_samples"] == 6 and report["n_control"] == 3  # the DMSO cells
    assert sorted(set(rows["perturbation"])) == ["DMSO", "Idasanutlin"]
    assert set(rows["batch"]) == {"DMSO_24hr_expt1", "Idasanutlin_24hr_expt1"}


def test_sciplex_genes_are_not_shifted(tmp_path, gene_table):
    report, rows = curate_fixture("sciplex3", tmp_path, gene_table)
    assert report["n_samples"] == 6 and report["mapping"]["n_unmapped"] == 0 and report["n_genes_panel"] == 12
    assert report["n_control"] == 3 and "AG-490 (Tyrphostin B42)" in rows["perturbation"]
    fx = _fixture_module()
    counts, genes = fx._counts(6, 20), fx._genes()
    ref = gene_table.genes["gene_id"].to_numpy()
    first = int(np.flatnonzero(ref == genes.gene_id[0])[0])
    for i in range(6):  # gene 0 of the file is gene 0 of the annotations: the header line is not a gene
        idx, values = rows["gene_idx"][i], rows["counts"][i]
        assert values[idx.index(first)] == counts[i, 0]


def test_wu_brca_symbol_only_features_and_r_metadata(tmp_path, gene_table):
    report, rows = curate_fixture("wu_brca", tmp_path, gene_table)
    assert report["n_samples"] == 5 and report["mapping"]["n_unmapped"] == 0
    assert set(rows["batch"]) == {"CID3586", "CID3921"} and rows["cell_type"][1] == "Cancer Basal SC"
    assert report["metadata"]["n_samples_matched"] == 5


def test_tcga_star_counts_with_sample_sheet(tmp_path, gene_table):
    report, rows = curate_fixture("tcga", tmp_path, gene_table)
    assert report["n_samples"] == 3 and report["n_genes_panel"] == 12
    assert rows["source_accession"] == ["TCGA-AB-0000-01A", "TCGA-AB-0001-01A", "TCGA-AB-0002-01A"]
    assert set(rows["batch"]) == {"TCGA-BRCA", "TCGA-LUAD"}


def test_gtex_gct_with_sample_attributes(tmp_path, gene_table):
    report, rows = curate_fixture("gtex", tmp_path, gene_table)
    assert report["n_samples"] == 4 and report["mapping"]["n_unmapped"] == 0
    assert rows["tissue"][:2] == ["Adipose - Subcutaneous", "Muscle - Skeletal"]
    assert set(rows["batch"]) == {"LCSET-1", "LCSET-2"}
