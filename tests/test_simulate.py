"""Simulated sources: deterministic, the planted structure is really there, the truth is exact and consistent with
curation.genes / curation.qc, every file opens with its reader and round-trips, the large h5ad streams correctly."""

from __future__ import annotations

import json
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import yaml

from simulation import sources as simulate
from curation.config import load_config
from curation.genes import GeneTable
from curation.qc import GeneDetectionCounter, QCConfig, cell_pass_mask
from curation.schema import content_hash


@pytest.fixture(scope="module")
def sim() -> simulate.Simulation:
    return simulate.generate(seed=0, scale=1.0)


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("sources")
    return out, simulate.simulate_sources(out, seed=0, scale=1.0)


@pytest.fixture(scope="module")
def gene_table() -> GeneTable:
    return GeneTable.load()


def _curated_profiles(ds: simulate.SimulatedDataset, gene_table: GeneTable) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """source_id -> (reference indices, counts) after QC, as curation stores them (panel = kept genes)."""
    reasons, genes, kept = simulate.qc_outcome(ds)
    ref_of_gene = pd.Series(np.arange(len(gene_table.genes)), index=gene_table.genes["gene_id"])
    gene_of_feature = ds.features["gene_id"].to_numpy(str)
    columns = np.flatnonzero(np.isin(gene_of_feature, genes[kept]))
    ref = ref_of_gene.loc[gene_of_feature[columns]].to_numpy()
    order = np.argsort(ref)
    matrix = sp.csr_matrix(ds.counts[:, columns[order]])
    matrix.sort_indices()
    profiles = {}
    for row in np.flatnonzero(reasons == ""):
        values = matrix[row]
        profiles[ds.source_ids[row]] = (ref[order][values.indices].astype(np.int32), values.data.astype(np.float32))
    return profiles


def _split_id(sample_id: str) -> tuple[str, str]:
    dataset, source_id = sample_id.split(":", 1)
    return dataset, source_id


# --------------------------------------------------------------------------------------------------- determinism
def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path):
    first = simulate.simulate_sources(tmp_path / "a", seed=3, scale=0.3)
    simulate.simulate_sources(tmp_path / "b", seed=3, scale=0.3)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) > 20 and not any(p.name.startswith(".") for p in files)  # no temp files left behind
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    assert json.loads((tmp_path / "a" / "truth.json").read_text()) == first

    again, other = simulate.generate(seed=3, scale=0.3), simulate.generate(seed=4, scale=0.3)
    for name, ds in simulate.generate(seed=3, scale=0.3).datasets.items():
        np.testing.assert_array_equal(ds.counts.toarray(), again.datasets[name].counts.toarray())
        np.testing.assert_array_equal(ds.source_ids, again.datasets[name].source_ids)
        assert not np.array_equal(ds.source_ids, other.datasets[name].source_ids), name


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="scale"):
        simulate.generate(seed=0, scale=0.0)
    with pytest.raises(ValueError, match="seed"):
        simulate.generate(seed=-1)
    with pytest.raises(ValueError, match="n_cells"):
        simulate.write_large_h5ad(Path("unused.h5ad"), n_cells=0)


# --------------------------------------------------------------------------------------------------- config + sizes
def test_datasets_yaml_is_a_valid_config_with_relative_paths(written):
    out, truth = written
    entries = yaml.safe_load((out / "datasets.yaml").read_text())["datasets"]
    assert list(entries) == list(truth["datasets"])
    config = load_config({"raw_dir": str(out), "datasets": entries})
    for name, spec in config["datasets"].items():
        for role, path in spec["files"].items():
            assert not Path(entries[name]["files"][role]).is_absolute()
            assert Path(path).exists(), (name, role)
        if spec["metadata"]:
            assert Path(spec["metadata"]["file"]).is_file()
        assert spec["licence"] == "CC0 (simulated)" and spec["val_fraction"] == 0.25
        assert spec["phenoprint"]["enabled"] == (name == "sim_screen")
    assert config["datasets"]["sim_screen"]["phenoprint"]["p_threshold"] == 0.1
    assert config["datasets"]["sim_atlas_mtx"]["priority"] < config["datasets"]["sim_atlas_redistributed"]["priority"]
    for name, info in truth["datasets"].items():
        expected_range = (50, 200) if name == "sim_tcga" else (100, 1600)
        assert expected_range[0] <= info["n_samples"] <= expected_range[1], name


def test_library_sizes_are_realistic(sim):
    for ds in sim.datasets.values():
        reasons, _, _ = simulate.qc_outcome(ds)
        library = np.asarray(np.nan_to_num(ds.counts[reasons == ""].toarray()).sum(axis=1)).ravel()
        if ds.modality == "single_cell":
            assert 1000 <= np.median(library) <= 3000, ds.name
        else:
            assert 5e5 <= np.median(library) <= 1.2e7, ds.name


# --------------------------------------------------------------------------------------------------- biology
def test_real_perturbations_knock_down_their_module_and_null_ones_do_nothing(sim):
    screen, truth = sim.datasets["sim_screen"], sim.truth
    passing = simulate.qc_outcome(screen)[0] == ""
    dense = screen.counts.toarray()
    fraction = dense / dense.sum(axis=1, keepdims=True)  # library-size normalised
    gene_col = {g: i for i, g in enumerate(screen.features["gene_id"])}
    labels = screen.obs["gene"].to_numpy(str)
    control = (labels == truth["control_label"]) & passing
    assert 0.10 <= (labels == truth["control_label"]).mean() <= 0.20
    assert screen.obs["gem_group"].nunique() >= 4

    def module_shift(label: str, module: int) -> float:
        """Mean module share of the perturbation's cells over that of the control cells."""
        cells = (labels == label) & passing
        cols = [gene_col[g] for g in truth["modules"][module]["gene_ids"]]
        return fraction[np.ix_(cells, cols)].sum(axis=1).mean() / fraction[np.ix_(control, cols)].sum(axis=1).mean()

    assert len(truth["real_perturbations"]) == 25 and len(truth["null_perturbations"]) == 25
    assert all((labels == p).sum() >= 12 for p in truth["null_perturbations"])
    real = np.array([module_shift(e["perturbation"], e["module"]) for e in truth["real_perturbations"]])
    null = np.array([[module_shift(p, m) for m in range(len(truth["modules"]))] for p in truth["null_perturbations"]])
    assert all((labels == e["perturbation"]).sum() >= 12 for e in truth["real_perturbations"])
    assert real.max() < 0.35  # knock-down to MODULE_KNOCKDOWN = 0.2, blurred by counting noise
    assert 0.5 < null.min() and null.max() < 2.0
    assert np.median(np.abs(np.log(null))) < 0.1
    assert real.max() < null.min()


def test_real_perturbations_are_consistent_in_a_control_pca_embedding(sim):
    """Phenoprint's premise holds: real perturbations move their cells consistently, null ones do not."""
    from curation.phenoprint import perturbation_consistency

    screen, truth = sim.datasets["sim_screen"], sim.truth
    passing = simulate.qc_outcome(screen)[0] == ""
    dense = screen.counts[passing].toarray()
    labels = screen.obs["gene"].to_numpy(str)[passing]
    logged = np.log1p(dense / dense.sum(axis=1, keepdims=True) * 1e4)
    control = labels == truth["control_label"]
    z = (logged - logged[control].mean(axis=0)) / np.maximum(logged[control].std(axis=0), 1e-2)
    _, _, components = np.linalg.svd(z[control] - z[control].mean(axis=0), full_matrices=False)
    embedding = z @ components[:20].T
    table = perturbation_consistency([(embedding, labels)], n_null=500, seed=0).set_index("perturbation")
    real = [e["perturbation"] for e in truth["real_perturbations"]]
    assert (table.loc[real, "p_value"] < 0.1).all()
    assert (table.loc[truth["null_perturbations"], "p_value"] >= 0.1).mean() >= 0.7
    assert table.loc[real, "consistency"].min() > table.loc[truth["null_perturbations"], "consistency"].median()


def test_modules_are_coexpressed(sim):
    atlas, truth = sim.datasets["sim_atlas_mtx"], sim.truth
    dense = atlas.counts.toarray()
    logged = np.log1p(dense / dense.sum(axis=1, keepdims=True) * 1e4)
    logged[:, logged.std(axis=0) == 0] += np.random.default_rng(1).normal(0, 1e-6, logged.shape[0])[:, None]
    corr = np.corrcoef(logged.T)
    col = {g: i for i, g in enumerate(atlas.features["gene_id"])}
    within = [corr[col[a], col[b]] for module in truth["modules"] for i, a in enumerate(module["gene_ids"])
              for b in module["gene_ids"][i + 1:]]
    rng = np.random.default_rng(0)
    pairs = rng.integers(0, dense.shape[1], (2000, 2))
    random_pairs = [corr[a, b] for a, b in pairs if a != b]
    assert np.nanmean(within) > np.nanmean(random_pairs) + 0.1


# --------------------------------------------------------------------------------------------------- truth
def test_feature_mapping_truth_agrees_with_gene_table(sim, gene_table):
    truth = sim.truth
    for ds in sim.datasets.values():
        symbols = None if ds.features["symbol"].isna().all() else ds.features["symbol"].fillna("").tolist()
        mapping = gene_table.map_features(ds.features["feature_id"].tolist(), symbols)
        mapped_ids = np.where(mapping.ref_idx >= 0, gene_table.genes["gene_id"].to_numpy()[mapping.ref_idx], "")
        np.testing.assert_array_equal(mapped_ids, ds.features["gene_id"].to_numpy(str), err_msg=ds.name)
        np.testing.assert_array_equal(mapping.how, ds.features["how"].to_numpy(str), err_msg=ds.name)
    junk = truth["unmappable_ids"]["sim_geo_table"]
    assert 0.02 <= len(junk) / truth["datasets"]["sim_geo_table"]["n_features"] <= 0.04
    renamed = {name: {e["how"] for e in entries} for name, entries in truth["renamed_features"].items()}
    assert renamed == {"sim_atlas_redistributed": {"alias", "previous"}, "sim_geo_table": {"alias", "previous"}}
    versioned = sim.datasets["sim_atlas_mtx"].features["feature_id"]
    assert versioned.str.fullmatch(r"ENSG\d{11}\.\d+").all()


def test_expected_qc_matches_curation_qc(sim, gene_table):
    """The truth's independent QC equals curation.qc applied to the harmonised matrices."""
    for name, ds in sim.datasets.items():
        expected = sim.truth["expected_removed_by_qc"][name]
        symbols = None if ds.features["symbol"].isna().all() else ds.features["symbol"].fillna("").tolist()
        mapping = gene_table.map_features(ds.features["feature_id"].tolist(), symbols)
        harmonised, ref_idx = mapping.harmonise(ds.counts)
        qc = QCConfig.for_modality(ds.modality, ds.spec["qc"])
        mask, reasons = cell_pass_mask(harmonised, qc, raw=ds.counts)
        for reason, sample_ids in expected["dropped"].items():
            assert sorted(ds.sample_ids(ds.source_ids[reasons == reason])) == sample_ids, (name, reason)
        counter = GeneDetectionCounter(len(ref_idx))
        counter.update(harmonised, mask)
        removed = gene_table.genes["gene_id"].to_numpy()[ref_idx[~counter.kept(qc.min_cells_per_gene)]]
        assert sorted(removed.tolist()) == expected["genes_removed"], name
        assert expected["n_passed"] == int(mask.sum())


def test_planted_quality_artefacts_are_removed_by_qc(sim):
    truth = sim.truth
    rare = set(truth["universe"]["rare_genes"])
    for name, expected in truth["expected_removed_by_qc"].items():
        dropped = {sid for ids in expected["dropped"].values() for sid in ids}
        assert truth["low_quality"][name] and set(truth["low_quality"][name]) <= dropped, name
        if sim.datasets[name].modality == "single_cell":
            assert rare & set(expected["genes_removed"]), name  # rare genes fall below min_cells_per_gene
        else:
            assert set(truth["low_quality"][name]) == set(expected["dropped"]["low_library"]), name
    geo = truth["expected_removed_by_qc"]["sim_geo_table"]["dropped"]
    assert geo["non_finite"] == truth["invalid_values"]["non_finite"] and len(geo["non_finite"]) == 2
    assert geo["negative"] == truth["invalid_values"]["negative"] and len(geo["negative"]) == 1


def test_exact_duplicates_hash_equal_after_curation(sim, gene_table):
    profiles = {name: _curated_profiles(ds, gene_table) for name, ds in sim.datasets.items()}
    groups = sim.truth["exact_duplicates"]
    assert len(groups) >= 5
    assert any(len({_split_id(s)[0] for s in group}) == 2 for group in groups)  # across datasets too
    for group in groups:
        hashes = {content_hash(*profiles[_split_id(s)[0]][_split_id(s)[1]]) for s in group}
        assert len(hashes) == 1, group
    # No accidental duplicates: every other curated profile is unique.
    planted = {s for group in groups for s in group}
    seen: dict[str, str] = {}
    for name, by_source in profiles.items():
        for source_id, (idx, counts) in by_source.items():
            sample_id = f"{name}:{source_id}"
            digest = content_hash(idx, counts)
            if digest in seen:
                assert sample_id in planted and seen[digest] in planted, (sample_id, seen[digest])
            seen[digest] = sample_id


def test_redistributed_cells_match_on_shared_genes_only(sim, gene_table):
    copies = _curated_profiles(sim.datasets["sim_atlas_redistributed"], gene_table)
    originals = _curated_profiles(sim.datasets["sim_atlas_mtx"], gene_table)
    pairs = sim.truth["redistributed"]
    assert len(pairs) == 60
    redis_panel = np.unique(np.concatenate([idx for idx, _ in copies.values()]))
    mtx_panel = np.unique(np.concatenate([idx for idx, _ in originals.values()]))
    shared = np.intersect1d(redis_panel, mtx_panel)
    assert len(shared) < min(len(redis_panel), len(mtx_panel))  # the panels really differ
    for pair in pairs:
        copy_idx, copy_counts = copies[_split_id(pair["sample_id"])[1]]
        orig_idx, orig_counts = originals[_split_id(pair["duplicate_of"])[1]]
        on_copy, on_orig = np.isin(copy_idx, shared), np.isin(orig_idx, shared)
        np.testing.assert_array_equal(copy_idx[on_copy], orig_idx[on_orig])
        np.testing.assert_array_equal(copy_counts[on_copy], orig_counts[on_orig])
        assert on_copy.sum() >= 50
        assert content_hash(copy_idx, copy_counts) != content_hash(orig_idx, orig_counts)
    removed = {e["sample_id"]: e for e in sim.truth["expected_removed_by_dedup"]}
    assert all(removed[p["sample_id"]]["reason"] == "redistributed" for p in pairs)


def test_duplicate_accession_pair(sim):
    tcga = sim.datasets["sim_tcga"]
    (entry,) = sim.truth["duplicate_accession"]
    rows = [tcga.row_of(_split_id(s)[1]) for s in entry["sample_ids"]]
    assert len(set(rows)) == 2
    assert set(tcga.obs["aliquot"].iloc[rows]) == {entry["accession"]}
    assert (tcga.obs["aliquot"] == entry["accession"]).sum() == 2
    assert (tcga.counts[rows[0]] != tcga.counts[rows[1]]).nnz > 0  # a re-run, not a byte copy
    assert all(s not in sum(sim.truth["expected_removed_by_qc"]["sim_tcga"]["dropped"].values(), [])
               for s in entry["sample_ids"])


# --------------------------------------------------------------------------------------------------- readers
def _normalise_feature(feature_id: str) -> str:
    """Readers may strip Ensembl versions (STAR); compare IDs without them."""
    return feature_id.split(".", 1)[0] if feature_id.startswith("ENSG") else feature_id


def test_every_source_round_trips_through_its_reader(written, sim):
    """Each simulated source opens with curation.readers.open_reader and gives back exactly the counts."""
    from curation import readers  # the contract under test; this test must fail while readers.py is missing

    out, _ = written
    config = load_config({"raw_dir": str(out), "datasets": yaml.safe_load((out / "datasets.yaml").read_text())["datasets"]})
    for name, spec in config["datasets"].items():
        ds = sim.datasets[name]
        options = {key: value for key, value in spec["reader"].items()}
        reader = readers.open_reader(spec["format"], spec["files"], **options)
        chunks = list(reader.chunks(chunk_size=97))
        assert all(chunk.counts.shape[0] <= 97 for chunk in chunks)
        counts = sp.vstack([chunk.counts for chunk in chunks]).tocsr()
        source_ids = np.concatenate([chunk.obs["source_id"].astype(str).to_numpy() for chunk in chunks])
        assert sorted(source_ids) == sorted(ds.source_ids), name
        features = [_normalise_feature(f) for f in reader.features["feature_id"].astype(str)]
        assert features == [_normalise_feature(f) for f in ds.features["feature_id"]], name
        rows = pd.Index(source_ids).get_indexer(ds.source_ids)
        got, want = counts[rows].toarray(), ds.counts.toarray()
        np.testing.assert_array_equal(got, want, err_msg=name)  # NaN == NaN here


# --------------------------------------------------------------------------------------------------- large h5ad
def test_write_large_h5ad_streams_an_anndata_readable_file(tmp_path):
    path = tmp_path / "large.h5ad"
    simulate.write_large_h5ad(path, n_cells=2345, n_genes=600, seed=1, chunk_cells=500)
    adata = anndata.read_h5ad(path, backed="r")
    try:
        assert adata.shape == (2345, 600)
        assert adata.obs_names.is_unique and adata.var_names.str.fullmatch(r"ENSG\d{11}").all()
        assert {"gene", "gem_group"} <= set(adata.obs.columns) and "gene_name" in adata.var
        assert adata.obs["gem_group"].nunique() == 8
        assert 0.10 < (adata.obs["gene"] == "non-targeting").mean() < 0.20
        block = adata.X[1000:1600]
        assert sp.issparse(block) and block.shape == (600, 600) and block.dtype == np.float32
        assert np.array_equal(block.data, np.round(block.data)) and (block.data > 0).all()
        library = np.asarray(block.sum(axis=1)).ravel()
        assert 1000 < np.median(library) < 3000
    finally:
        adata.file.close()
    memory = anndata.read_h5ad(path)
    indptr = memory.X.indptr
    assert indptr[0] == 0 and np.all(np.diff(indptr) >= 0) and indptr[-1] == memory.X.nnz
    assert not list(tmp_path.glob(".*"))  # atomic: no temp file left
