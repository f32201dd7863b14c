"""txfm embed (AnnData → .obsm["X_txfm"]) and txfm export-gene-weights, on a tiny random checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
import torch

from curation.io import CurationError
from txfm import embed as embed_module
from txfm import export as export_module
from txfm.checkpoint import load_model, save_model
from txfm.embed import OBSM_KEY, embed_anndata, map_to_vocabulary, model_inputs, write_embedding
from txfm.export import export_gene_weights
from txfm.model import TxFM, TxFMConfig

HGNC = Path(__file__).resolve().parent.parent / "resources" / "genes" / "hgnc_human_gene_table.parquet"
N_VOCAB, N_CELLS, K = 40, 23, 16
JUNK = ["NOT_A_GENE", "mystery-feature", "ERCC-00002"]


@pytest.fixture(scope="module")
def vocabulary() -> pd.DataFrame:
    """40 real protein-coding genes (Ensembl ID + HGNC symbol), sorted by ID like a corpus genes.parquet."""
    hgnc = pd.read_parquet(HGNC, columns=["ensembl_id", "symbol", "canonical_biotype"])
    coding = hgnc[(hgnc["canonical_biotype"] == "protein_coding") & hgnc["ensembl_id"].notna()]
    chosen = coding.drop_duplicates("ensembl_id").drop_duplicates("symbol").sort_values("ensembl_id").iloc[:N_VOCAB]
    return pd.DataFrame({"gene_idx": np.arange(N_VOCAB, dtype=np.int32), "gene_id": chosen["ensembl_id"].to_numpy(),
                         "symbol": chosen["symbol"].to_numpy(), "biotype": "protein_coding"})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, vocabulary) -> Path:
    torch.manual_seed(0)
    cfg = TxFMConfig.preset("tiny", N_VOCAB, layerscale_init=0.5)
    model = TxFM(cfg)
    with torch.no_grad():  # random, non-trivial weights so every input change shows in the embedding
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.2)
    directory = tmp_path_factory.mktemp("ckpt")
    save_model(directory, model, cfg, vocabulary, extra={"train": {"n_input_genes": K}})
    return directory


@pytest.fixture(scope="module")
def counts() -> sp.csr_matrix:
    """Integer counts: 23 cells × (30 vocabulary genes + 3 junk features); cell 5 is all zeros."""
    rng = np.random.default_rng(0)
    dense = rng.negative_binomial(2, 0.3, size=(N_CELLS, 33)).astype(np.float32)
    dense[rng.random(dense.shape) < 0.4] = 0
    dense[5] = 0
    return sp.csr_matrix(dense)


def write_h5ad(path: Path, counts: sp.csr_matrix, var_names: list[str]) -> Path:
    obs = pd.DataFrame({"condition": [f"c{i % 3}" for i in range(N_CELLS)]}, index=[f"cell{i}" for i in range(N_CELLS)])
    ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=var_names)).write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def symbols_h5ad(tmp_path_factory, vocabulary, counts) -> Path:
    names = vocabulary["symbol"].iloc[:30].tolist() + JUNK
    return write_h5ad(tmp_path_factory.mktemp("sym") / "cells_symbols.h5ad", counts, names)


@pytest.fixture(scope="module")
def ensembl_h5ad(tmp_path_factory, vocabulary, counts) -> Path:
    names = [f"{gene_id}.{i % 7 + 1}" for i, gene_id in enumerate(vocabulary["gene_id"].iloc[:30])] + JUNK
    return write_h5ad(tmp_path_factory.mktemp("ens") / "cells_ensembl.h5ad", counts, names)


def test_symbols_and_ensembl_ids_give_identical_embeddings(checkpoint, symbols_h5ad, ensembl_h5ad) -> None:
    by_symbol, report = embed_anndata(checkpoint, symbols_h5ad, progress=False)
    by_id, id_report = embed_anndata(checkpoint, ensembl_h5ad, progress=False)
    assert by_symbol.shape == (N_CELLS, 64) and by_symbol.dtype == np.float32
    np.testing.assert_array_equal(by_symbol, by_id)
    assert report["n_input_genes"] == K  # taken from the checkpoint's extra
    assert report["n_mapped_features"] == 30 and report["n_unmapped_features"] == 3
    assert report["unmapped_examples"] == JUNK
    assert report["n_genes_used"] == 30 and report["n_zero_library_cells"] == 1
    assert report["by_how"].get("symbol") == 30 and id_report["by_how"].get("ensembl") == 30


def test_embedding_matches_the_training_normalisation(checkpoint, symbols_h5ad, counts, vocabulary) -> None:
    embedding, report = embed_anndata(checkpoint, symbols_h5ad, n_input_genes=64, progress=False)
    assert report["padded"]
    model, cfg, _ = load_model(checkpoint)
    dense = counts.toarray()[:, :30].astype(np.float64)  # the 30 vocabulary genes = vocabulary rows 0..29
    library = dense.sum(1, keepdims=True)
    values = np.log1p(np.divide(dense, library, out=np.zeros_like(dense), where=library > 0) * cfg.library_size)
    gene_idx = np.zeros((N_CELLS, 64), dtype=np.int64)
    gene_idx[:, :30] = np.arange(30)
    padded_values = np.zeros((N_CELLS, 64), dtype=np.float32)
    padded_values[:, :30] = values
    pad_mask = np.arange(64)[None, :].repeat(N_CELLS, 0) >= 30
    with torch.no_grad():
        expected = model.embed(torch.from_numpy(gene_idx), torch.from_numpy(padded_values),
                               torch.from_numpy(pad_mask)).numpy()
    np.testing.assert_allclose(embedding, expected, rtol=1e-5, atol=1e-5)


def test_input_gene_sampling_is_per_cell_and_independent_of_batching(checkpoint, symbols_h5ad) -> None:
    whole, _ = embed_anndata(checkpoint, symbols_h5ad, batch_size=256, progress=False)
    batched, _ = embed_anndata(checkpoint, symbols_h5ad, batch_size=4, progress=False)
    np.testing.assert_allclose(batched, whole, rtol=1e-5, atol=1e-6)
    reseeded, _ = embed_anndata(checkpoint, symbols_h5ad, seed=1, progress=False)
    assert not np.allclose(reseeded, whole)
    counts = sp.csr_matrix(np.random.default_rng(0).poisson(2.0, (50, 30)).astype(np.float64))
    genes = np.arange(100, 130)
    tokens = model_inputs(counts, genes, np.arange(50), k=K, library_size=1e4, seed=0)["gene_idx"].numpy()
    assert tokens.shape == (50, K)
    assert all(len(set(row)) == K and set(row) <= set(genes.tolist()) for row in tokens.tolist())
    assert len({tuple(sorted(row)) for row in tokens.tolist()}) > 40  # cells get different subsets
    again = model_inputs(counts[10:20], genes, np.arange(10, 20), k=K, library_size=1e4, seed=0)["gene_idx"]
    np.testing.assert_array_equal(again.numpy(), tokens[10:20])


def test_in_memory_anndata_and_gene_column(checkpoint, symbols_h5ad, vocabulary) -> None:
    from_file, _ = embed_anndata(checkpoint, symbols_h5ad, progress=False)
    adata = ad.read_h5ad(symbols_h5ad)
    adata.var["gene_symbol"] = adata.var_names
    adata.var_names = [f"feature{i}" for i in range(adata.n_vars)]
    in_memory, _ = embed_anndata(checkpoint, adata, gene_column="gene_symbol", progress=False)
    np.testing.assert_array_equal(in_memory, from_file)
    with pytest.raises(CurationError, match="no column 'nope'"):
        embed_anndata(checkpoint, adata, gene_column="nope", progress=False)
    with pytest.raises(CurationError, match="none of the"):
        embed_anndata(checkpoint, adata, progress=False)


def test_non_integer_counts_are_refused_unless_allowed(checkpoint, tmp_path, counts, vocabulary) -> None:
    names = vocabulary["symbol"].iloc[:30].tolist() + JUNK
    path = write_h5ad(tmp_path / "tpm.h5ad", sp.csr_matrix(counts.toarray() * 1.37), names)
    with pytest.raises(CurationError, match="tpm.h5ad: X has non-integer values"):
        embed_anndata(checkpoint, path, progress=False)
    embedding, _ = embed_anndata(checkpoint, path, allow_normalised=True, progress=False)
    assert np.isfinite(embedding).all()
    negative = write_h5ad(tmp_path / "neg.h5ad", sp.csr_matrix(-counts.toarray()), names)
    with pytest.raises(CurationError, match="negative"):
        embed_anndata(checkpoint, negative, allow_normalised=True, progress=False)


def test_mapping_resolves_aliases_versions_and_case(vocabulary) -> None:
    first = vocabulary.iloc[0]
    features = [first["gene_id"] + ".12", first["symbol"].lower(), "NOT_A_GENE", "ENSG00000141510"]
    vocab_idx, how, _ = map_to_vocabulary(features, vocabulary)
    assert vocab_idx.tolist()[:3] == [0, 0, -1]
    assert how[3] == "not_in_vocabulary" and vocab_idx[3] == -1  # TP53: a real gene this model never saw


def parse(args: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="txfm")
    subparsers = parser.add_subparsers(dest="command", required=True)
    embed_module.register(subparsers)
    export_module.register(subparsers)
    return parser.parse_args(args)


def test_cli_writes_obsm_atomically(checkpoint, symbols_h5ad, tmp_path, capsys) -> None:
    out = tmp_path / "out" / "embedded.h5ad"
    args = parse(["embed", "--checkpoint", str(checkpoint), "--input", str(symbols_h5ad), "--output", str(out),
                  "--batch-size", "5", "--no-progress"])
    assert args.func(args) == 0
    assert "3 unmapped features, e.g. NOT_A_GENE" in capsys.readouterr().err
    result = ad.read_h5ad(out)
    expected, _ = embed_anndata(checkpoint, symbols_h5ad, progress=False)
    np.testing.assert_allclose(result.obsm[OBSM_KEY], expected, rtol=1e-5, atol=1e-6)
    source = ad.read_h5ad(symbols_h5ad)
    pd.testing.assert_frame_equal(result.obs, source.obs)
    assert list(result.var_names) == list(source.var_names) and result.X is None
    assert [p.name for p in out.parent.iterdir()] == ["embedded.h5ad"]  # no temp file left behind

    kept = tmp_path / "kept.h5ad"
    write_embedding(symbols_h5ad, kept, expected, keep_x=True)
    with_x = ad.read_h5ad(kept)
    assert (with_x.X != source.X).nnz == 0
    np.testing.assert_array_equal(with_x.obsm[OBSM_KEY], expected)
    with pytest.raises(ValueError, match="embeddings for"):
        write_embedding(symbols_h5ad, tmp_path / "bad.h5ad", expected[:3])


def test_export_gene_weights(checkpoint, tmp_path, vocabulary) -> None:
    out = tmp_path / "gene_weights.parquet"
    args = parse(["export-gene-weights", "--checkpoint", str(checkpoint), "--output", str(out)])
    assert args.func(args) == 0
    table = pq.read_table(out).to_pandas()
    assert list(table.columns) == ["gene_id", "symbol", "codebook", "decoder"] and len(table) == N_VOCAB
    assert table["gene_id"].tolist() == vocabulary["gene_id"].tolist()
    codebook, decoder = np.stack(table["codebook"].to_numpy()), np.stack(table["decoder"].to_numpy())
    assert codebook.shape == (N_VOCAB, 63) and decoder.shape == (N_VOCAB, 64) and codebook.dtype == np.float32
    model, _, _ = load_model(checkpoint)
    np.testing.assert_array_equal(codebook, model.gene_codebook().detach().numpy())
    np.testing.assert_array_equal(decoder, model.decoder_gene_weights().detach().numpy())
    assert export_gene_weights(checkpoint, tmp_path / "again.parquet").read_bytes() == out.read_bytes()
