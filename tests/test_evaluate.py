"""txfm.evaluate: recall and consistency against explicit computations, the planted-module screen (true ≫
random, random ≈ null rate), EFAAR post-processing, every embedder, gene-weight recall, reconstruction, and
the ``txfm evaluate`` CLI on a tiny checkpoint."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from curation.io import CurationError
from curation.phenoprint import null_draw_indices
from txfm.checkpoint import load_model, save_model
from txfm.cli import main as txfm_main
from txfm.embed import embed_anndata
from txfm.evaluate import EvaluationConfig, run_evaluation
from txfm.evaluate.consistency import consistency_scores, consistency_summary
from txfm.evaluate.embedders import (CorpusPCAEmbedder, HVGPCAEmbedder, LibLogEmbedder, RandomEmbedder, TxFMEmbedder,
                                     seurat_hvg)
from txfm.evaluate.gene_weights import GENE_WEIGHT_COMPONENTS, gene_weight_recall, reduce_gene_vectors
from txfm.evaluate.postprocess import BATCH_STD_FLOOR, GLOBAL_STD_FLOOR, Z_CLIP, EmbeddingSource, efaar
from txfm.evaluate.recall import load_relationships, null_pairs, relationship_recall
from txfm.evaluate.reconstruction import per_sample_pearson, poisson_deviance, reconstruction_metrics
from curation.phenoprint import log_normalise
from txfm.evaluate.screen import open_screen
from simulation.screen import (BATCH_COLUMN, CONTROL_LABEL, MODULE_COLUMN, PERTURBATION_COLUMN, plan_screen,
                                    screen_anndata, write_relationships, write_screen_h5ad)
from txfm.model import TxFM, TxFMConfig
from simulation.corpus import write_synthetic_corpus

N_GENES = 300


# ------------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def plan():
    return plan_screen(n_cells=1500, n_genes=N_GENES, n_modules=10, genes_per_module=6, n_inert=10, n_batches=4,
                       seed=3)


@pytest.fixture(scope="module")
def screen_path(tmp_path_factory, plan) -> Path:
    return write_screen_h5ad(tmp_path_factory.mktemp("screen") / "screen.h5ad", plan, chunk_rows=400)


@pytest.fixture(scope="module")
def small_screen_path(tmp_path_factory) -> Path:
    """400 cells: for the model-embedding tests, which run a transformer over every cell."""
    small = plan_screen(n_cells=400, n_genes=N_GENES, n_modules=10, genes_per_module=6, n_inert=10, n_batches=4,
                        seed=3)
    return write_screen_h5ad(tmp_path_factory.mktemp("small") / "screen.h5ad", small, chunk_rows=150)


@pytest.fixture(scope="module")
def planted_db(tmp_path_factory, plan) -> Path:
    directory = tmp_path_factory.mktemp("db")
    write_relationships(directory / "PLANTED.txt", plan.relationships)
    return directory


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_synthetic_corpus(tmp_path_factory.mktemp("corpus") / "corpus", n_samples=256, n_genes=N_GENES,
                                  n_datasets=2, seed=0, row_group_rows=64)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, corpus) -> Path:
    """A random tiny TxFM over the corpus vocabulary (SYN<g> symbols), K = 48 input genes."""
    torch.manual_seed(0)
    genes = pd.read_parquet(corpus / "genes.parquet")
    cfg = TxFMConfig.preset("tiny", len(genes), layerscale_init=0.5)
    model = TxFM(cfg)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    directory = tmp_path_factory.mktemp("ckpt") / "model"
    save_model(directory, model, cfg, genes, extra={"n_input_genes": 48})
    return directory


def open_planted(path, **kw):
    return open_screen(path, PERTURBATION_COLUMN, [CONTROL_LABEL], BATCH_COLUMN, **kw)


# ------------------------------------------------------------------------------------------------ recall

def gram(x: np.ndarray) -> np.ndarray:
    """Cosine similarity matrix of the rows of x."""
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    return unit @ unit.T


def module_vectors(n_modules: int, per_module: int, dim: int, noise: float, seed: int):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_modules, dim))
    vectors = np.repeat(centres, per_module, axis=0) + noise * rng.normal(size=(n_modules * per_module, dim))
    names = [f"G{i}" for i in range(n_modules * per_module)]
    pairs = [(names[m * per_module + i], names[m * per_module + j])
             for m in range(n_modules) for i, j in itertools.combinations(range(per_module), 2)]
    return vectors, names, pd.DataFrame(pairs, columns=["gene_a", "gene_b"])


def test_recall_of_planted_modules_far_above_random_and_random_at_the_null_rate():
    vectors, names, pairs = module_vectors(n_modules=40, per_module=10, dim=32, noise=0.8, seed=0)
    true = relationship_recall(vectors, names, {"PLANTED": pairs}).summary()
    random_rates = {"5_95": [], "10_90": []}
    for seed in range(3):
        noise = np.random.default_rng(100 + seed).normal(size=vectors.shape)
        summary = relationship_recall(noise, names, {"PLANTED": pairs}, seed=seed).summary()
        for tag in random_rates:
            random_rates[tag].append(summary[f"recall_PLANTED_{tag}"])
    assert true["recall_PLANTED_5_95"] > 0.8
    # 1,800 pairs, averaged over 3 draws: a wrong null or wrong percentiles (2.5/97.5 → 5 %, 10/90 → 20 %) fails
    assert abs(np.mean(random_rates["5_95"]) - 0.10) < 0.025
    assert abs(np.mean(random_rates["10_90"]) - 0.20) < 0.03


def test_recall_equals_an_explicit_loop_computation(tmp_path):
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(25, 6))
    vectors[3] += 4 * vectors[4]  # one strongly similar pair and one strongly opposite pair
    vectors[7] = -vectors[8] + 0.05 * rng.normal(size=6)
    names = [f"g{i}" for i in range(25)]
    names[10] = "MixedCase"
    db_file = tmp_path / "DB.txt"
    pd.DataFrame({"entity1": ["G3", "g8", "G4", "g5", "G5", "mixedcase", "unknown", "g1", "g2"],
                  "entity2": ["G4", "g7", "g3", "g5", "G6", "g11", "g1", "g2", "g1"]}).to_csv(db_file, index=False)
    relations = load_relationships(db_file)
    # undirected, de-duplicated, no self pair, upper case
    assert sorted(map(tuple, relations.to_numpy())) == sorted(
        [("G3", "G4"), ("G7", "G8"), ("G5", "G6"), ("G11", "MIXEDCASE"), ("G1", "UNKNOWN"), ("G1", "G2")])
    result = relationship_recall(vectors, names, {"DB": relations}, n_null=400, seed=7)

    pairs = null_pairs(25, 400, seed=7)
    assert np.all(pairs[:, 0] != pairs[:, 1])

    def cosine(a, b):
        dot = sum(a[i] * b[i] for i in range(len(a)))
        return dot / (sum(x * x for x in a) ** 0.5 * sum(x * x for x in b) ** 0.5)

    null = [cosine(vectors[i], vectors[j]) for i, j in pairs]
    lookup = {name.upper(): i for i, name in enumerate(names)}
    present = [(lookup[a], lookup[b]) for a, b in relations.to_numpy() if a in lookup and b in lookup]
    assert len(present) == 5
    for lower, upper in [(5, 95), (10, 90)]:
        low, high = np.percentile(null, lower), np.percentile(null, upper)
        called = sum(1 for i, j in present if not low <= cosine(vectors[i], vectors[j]) <= high)
        row = result.table[(result.table["lower"] == lower) & (result.table["upper"] == upper)].iloc[0]
        assert row["n_pairs"] == 5 and row["n_called"] == called
        assert row["recall"] == pytest.approx(called / 5)
    assert result.summary()["recall_DB_5_95"] >= 0.4  # the two planted pairs are called


# ------------------------------------------------------------------------------------------------ consistency

def test_consistency_equals_an_explicit_loop_computation():
    rng = np.random.default_rng(2)
    n_cells, dim = 70, 5
    embeddings = rng.normal(size=(n_cells, dim))
    labels = np.array([None] * 20 + ["A"] * 12 + ["B"] * 12 + ["C"] * 6 + ["D"] * 19 + ["E"], dtype=object)
    embeddings[20:32] += 3.0 * np.eye(dim)[0]  # A is consistent, the others are noise
    chunks = [(s, min(s + 16, n_cells), embeddings[s:s + 16]) for s in range(0, n_cells, 16)]
    scores = consistency_scores(iter(chunks), labels, n_null=1000, seed=5, reservoir=1000)

    def mean_pairwise_cosine(rows):
        sims = [np.dot(rows[i], rows[j]) / np.linalg.norm(rows[i]) / np.linalg.norm(rows[j])
                for i in range(len(rows)) for j in range(len(rows)) if i != j]
        return sum(sims) / len(sims)

    expected = {}
    for label in ["A", "B", "C", "D"]:
        members = embeddings[labels == label]
        observed = mean_pairwise_cosine(members)
        draws = null_draw_indices(n_cells, len(members), 1000, seed=5)  # pool = every cell, in order
        null = np.array([mean_pairwise_cosine(embeddings[idx]) for idx in draws])
        expected[label] = (observed, (1 + np.sum(null >= observed - 1e-12)) / 1001)
    table = scores.set_index("perturbation")
    for label, (observed, p_value) in expected.items():
        assert table.loc[label, "consistency"] == pytest.approx(observed, abs=1e-10)
        assert table.loc[label, "p_value"] == pytest.approx(p_value)
    assert np.isnan(table.loc["E", "p_value"])  # a single cell is not scored
    summary = consistency_summary(scores, 0.01)
    assert summary["consistency_n_scored"] == 4
    assert summary["consistency_fraction"] == pytest.approx(sum(p < 0.01 for _, p in expected.values()) / 4)
    assert table.loc["A", "p_value"] < 0.01


# ------------------------------------------------------------------------------------------------ screen + EFAAR

def test_efaar_equals_a_dense_computation_and_ignores_chunking(plan, tmp_path):
    adata = screen_anndata(plan)
    screen = open_planted(adata)
    embedder = RandomEmbedder(dim=6, seed=4)
    dense = np.concatenate([embedder.transform(None, s, min(s + screen.chunk_rows, screen.n_cells))
                            for s in range(0, screen.n_cells, screen.chunk_rows)])
    # dense reference: per-batch control z-scores with the documented floors, whitened full-rank PCA of controls
    control = screen.is_control
    pooled_std = dense[control].std(axis=0)
    pooled_std = np.maximum(pooled_std, GLOBAL_STD_FLOOR * pooled_std.mean())
    z = np.empty_like(dense)
    for b in range(len(screen.batches)):
        rows, ctrl = screen.batch == b, (screen.batch == b) & control
        std = np.maximum(dense[ctrl].std(axis=0), BATCH_STD_FLOOR * pooled_std)
        z[rows] = np.clip((dense[rows] - dense[ctrl].mean(axis=0)) / std, -Z_CLIP, Z_CLIP)
    centred = z - z[control].mean(axis=0)
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov(z[control], rowvar=False))
    white = centred @ eigenvectors / np.sqrt(eigenvalues)
    labels = screen.perturbation_labels
    names = sorted(set(labels[labels != None]))  # noqa: E711
    reference = np.stack([white[labels == name].mean(axis=0) for name in names])

    results = []
    for chunk_rows in (97, 1500):
        screen.chunk_rows = chunk_rows
        source = EmbeddingSource(screen, embedder.fit(screen), tmp_path, progress=False)
        processed = efaar(source, tmp_path, n_components=64)
        assert processed.n_components == 6 and list(processed.perturbations) == names
        # a rotation does not change cosine similarities: compare them, not coordinates
        np.testing.assert_allclose(gram(processed.aggregates), gram(reference), atol=1e-6)
        cells = np.concatenate([block for _, _, block in processed.cells.chunks()])
        assert cells.shape == (screen.n_cells, 6)
        np.testing.assert_allclose(np.cov(cells[control], rowvar=False), np.eye(6), atol=1e-3)  # whitened controls
        results.append(processed.aggregates)
        processed.cells.remove()
        source.remove()
    np.testing.assert_allclose(results[0], results[1], atol=1e-8)


def test_screen_input_errors_are_one_line(tmp_path, plan, screen_path):
    with pytest.raises(CurationError, match="no perturbation column 'nope'"):
        open_screen(screen_path, "nope", [CONTROL_LABEL], BATCH_COLUMN)
    with pytest.raises(CurationError, match="no control cells"):
        open_screen(screen_path, PERTURBATION_COLUMN, ["scrambled"], BATCH_COLUMN)
    with pytest.raises(CurationError, match="does not exist"):
        open_screen(tmp_path / "missing.h5ad", PERTURBATION_COLUMN, [CONTROL_LABEL], BATCH_COLUMN)
    adata = screen_anndata(plan)
    adata.X = adata.X * 0.5
    screen = open_planted(adata)
    with pytest.raises(CurationError, match="non-integer values"):
        next(screen.chunks(progress=False))
    with pytest.raises(ValueError, match="needs --checkpoint"):
        EvaluationConfig(input=screen_path, perturbation_column="gene", control_labels=[CONTROL_LABEL],
                         batch_column=BATCH_COLUMN, out=tmp_path, embedders=["txfm"]).resolved_embedders()


def test_planted_screen_end_to_end(tmp_path, screen_path, planted_db):
    """EFAAR protocol: Lib+Log recovers the planted modules; the random embedding stays at the null rate."""
    cfg = EvaluationConfig(input=screen_path, perturbation_column=PERTURBATION_COLUMN, control_labels=[CONTROL_LABEL],
                           batch_column=BATCH_COLUMN, out=tmp_path / "eval", embedders=["liblog", "hvg_pca", "random"],
                           label_column=MODULE_COLUMN, relationships=str(planted_db), hvg_genes=150,
                           hvg_components=20, n_components=32, probe_folds=2, progress=False, protocol="efaar")
    results = run_evaluation(cfg).set_index("embedder")
    for name in ("liblog", "hvg_pca"):
        assert results.loc[name, "recall_PLANTED_5_95"] > max(0.5, 4 * results.loc["random", "recall_PLANTED_5_95"])
        assert results.loc[name, "consistency_fraction"] > 0.5
        assert results.loc[name, "knn_accuracy"] > 2 * results.loc["random", "knn_accuracy"]
    assert 0.0 <= results.loc["random", "recall_PLANTED_5_95"] < 0.25
    assert results.loc["random", "consistency_fraction"] < 0.1
    out = tmp_path / "eval"
    for name in ("results.csv", "results.md", "recall.csv", "consistency.csv", "recall_by_database.png",
                 "consistency.png", "report.json"):
        assert (out / name).stat().st_size > 0, name
    assert not list(out.glob(".evaluate-scratch-*"))  # scratch removed
    assert "| liblog |" in (out / "results.md").read_text()
    report = json.loads((out / "report.json").read_text())
    assert report["screen"]["n_cells"] == 1500 and report["embedders"]["hvg_pca"]["embedder"]["n_hvg"] == 150


# ------------------------------------------------------------------------------------------------ embedders

def test_txfm_embedder_equals_embed_anndata_across_chunks(checkpoint, small_screen_path):
    expected, _ = embed_anndata(checkpoint, small_screen_path, batch_size=64, progress=False, device="cpu")
    with open_planted(small_screen_path) as screen:
        screen.chunk_rows = 113  # chunk and batch boundaries that do not line up
        embedder = TxFMEmbedder(checkpoint, batch_size=50, device="cpu").fit(screen, progress=False)
        assert embedder.k == 48 and embedder.info()["n_genes_used"] == N_GENES
        got = np.concatenate([embedder.transform(counts, s, e) for s, e, counts in screen.chunks(progress=False)])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_txfm_embedder_honours_the_checkpoint_frequency_sampling(checkpoint, small_screen_path, tmp_path):
    # A checkpoint trained with frequency sampling: the evaluation embeds with the same input genes as txfm embed
    # (and therefore differently from uniform sampling).
    model, cfg, genes = load_model(checkpoint)
    frequency = np.random.default_rng(0).uniform(0.01, 1.0, len(genes))
    freq_ckpt = tmp_path / "freq"
    save_model(freq_ckpt, model, cfg, genes.assign(detection_frequency=frequency),
               extra={"n_input_genes": 48, "train_config": {"sampling": "frequency", "temperature": 0.5}})
    expected, _ = embed_anndata(freq_ckpt, small_screen_path, batch_size=64, progress=False, device="cpu")
    uniform, _ = embed_anndata(checkpoint, small_screen_path, batch_size=64, progress=False, device="cpu")
    with open_planted(small_screen_path) as screen:
        embedder = TxFMEmbedder(freq_ckpt, batch_size=50, device="cpu").fit(screen, progress=False)
        got = np.concatenate([embedder.transform(counts, s, e) for s, e, counts in screen.chunks(progress=False)])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(got, uniform, atol=1e-4)


def test_liblog_is_library_normalised_log1p(plan):
    adata = screen_anndata(plan)
    screen = open_planted(adata)
    counts = adata.X[:10].toarray().astype(np.float64)
    expected = np.log1p(counts / counts.sum(axis=1, keepdims=True) * 1e4)
    np.testing.assert_allclose(LibLogEmbedder().fit(screen).transform(adata.X[:10], 0, 10), expected)
    assert np.allclose(log_normalise(adata.X[:0]).toarray(), np.zeros((0, N_GENES)))


def test_seurat_hvg_matches_an_explicit_binning():
    rng = np.random.default_rng(3)
    mean = rng.lognormal(0, 1.5, size=400)
    variance = mean * rng.lognormal(0.5, 0.7, size=400)
    variance[:5] = 0.0  # constant genes are never selected
    chosen = seurat_hvg(mean, variance, n_top=50, n_bins=20)
    # explicit version
    log_mean = np.log1p(mean)
    edges = np.linspace(log_mean.min(), log_mean.max(), 21)
    bins = np.clip(np.searchsorted(edges, log_mean, side="left") - 1, 0, 19)
    with np.errstate(divide="ignore"):
        dispersion = np.log(variance / mean)
    normalised = np.full(400, np.nan)
    for b in range(20):
        members = [g for g in range(400) if bins[g] == b and np.isfinite(dispersion[g])]
        if len(members) == 1:
            normalised[members[0]] = 1.0
        elif members:
            values = dispersion[members]
            for g in members:
                normalised[g] = (dispersion[g] - values.mean()) / values.std(ddof=1)
    finite = np.flatnonzero(np.isfinite(normalised))
    expected = np.sort(finite[np.argsort(-normalised[finite], kind="stable")[:50]])
    assert len(chosen) == 50 and not set(chosen) & set(range(5))
    assert len(set(chosen) ^ set(expected)) <= 2  # pd.cut widens the outer edge by 0.1 %: allow a tie at the edge


def test_hvg_pca_and_corpus_pca_embedders(plan, corpus):
    adata = screen_anndata(plan)
    screen = open_planted(adata)
    hvg = HVGPCAEmbedder(n_top_genes=80, n_components=10).fit(screen, progress=False)
    assert hvg.dim == 10 and hvg.genes.size == 80 and 0 < hvg.info()["explained_variance_ratio"] <= 1
    corpus_pca = CorpusPCAEmbedder(corpus, n_components=8, max_samples=10_000).fit(screen, progress=False)
    info = corpus_pca.info()
    assert info["n_shared_genes"] == N_GENES and info["n_corpus_samples"] > 100 and corpus_pca.dim == 8
    emb = corpus_pca.transform(adata.X[:20], 0, 20)
    assert emb.shape == (20, 8) and np.isfinite(emb).all()
    # the first component agrees with a dense PCA of the same corpus samples
    from sklearn.decomposition import PCA

    from txfm.evaluate.embedders import _row_group_matrix, _row_groups

    column_of = np.arange(N_GENES)
    matrix = np.concatenate([log_normalise(_row_group_matrix(p, rg, column_of, N_GENES)).toarray()
                             for p, rg, _ in _row_groups(corpus, "train")])
    dense_first = PCA(n_components=1).fit(matrix[matrix.sum(axis=1) > 0]).components_[0]
    assert abs(float(dense_first @ corpus_pca.pca.pca.components_[0])) > 0.99


# ------------------------------------------------------------------------------------------------ gene weights

def test_gene_weight_recall_on_exported_weights(tmp_path, checkpoint):
    genes = pd.read_parquet(checkpoint / "genes.parquet")
    pairs = pd.DataFrame({"gene_a": genes["symbol"].str.upper().iloc[:40:2].to_numpy(),
                          "gene_b": genes["symbol"].str.upper().iloc[1:40:2].to_numpy()})
    results = gene_weight_recall(checkpoint, tmp_path / "weights.parquet", {"DB": pairs}, n_null=2000)
    assert (tmp_path / "weights.parquet").is_file() and set(results) == set(GENE_WEIGHT_COMPONENTS)
    for result in results.values():
        assert set(result.table["n_pairs"]) == {20}
        assert 0.0 <= result.summary()["recall_DB_5_95"] <= 1.0
    reduced = reduce_gene_vectors(np.random.default_rng(0).normal(size=(100, 63)) * np.arange(1, 64), 32)
    assert reduced.shape == (100, 32)
    assert reduce_gene_vectors(np.random.default_rng(0).normal(size=(100, 64)), 256).shape == (100, 64)  # capped


# ------------------------------------------------------------------------------------------------ reconstruction

def test_deviance_and_pearson_helpers_match_references():
    rng = np.random.default_rng(4)
    pred, target = torch.tensor(rng.random((3, 7))), torch.tensor(rng.random((3, 7)) * 2)
    mask = torch.tensor(rng.random((3, 7)) > 0.3)
    mask[2] = False
    mask[2, :3] = True
    y, x_hat = target.exp(), pred
    nll = F.poisson_nll_loss(x_hat, y, log_input=True, reduction="none")
    saturated = F.poisson_nll_loss(target, y, log_input=True, reduction="none")
    torch.testing.assert_close(poisson_deviance(pred, target), 2 * (nll - saturated))
    r = per_sample_pearson(pred, target, mask)
    for row in range(3):
        m = mask[row].numpy()
        assert float(r[row]) == pytest.approx(np.corrcoef(pred[row].numpy()[m], target[row].numpy()[m])[0, 1])


def test_reconstruction_metrics_on_validation_split(checkpoint, corpus):
    metrics = reconstruction_metrics(checkpoint, corpus, micro_batch=16, baseline_batches=4, device="cpu",
                                     progress=False)
    assert metrics["n_samples"] > 0 and metrics["n_input_genes"] == 48
    for side in ("model", "mean_expression"):
        assert metrics[side]["poisson_deviance"] >= 0 and -1 <= metrics[side]["pearson"] <= 1
    # the per-gene mean already predicts which genes are high: far better than an untrained model
    assert metrics["mean_expression"]["pearson"] > 0.5
    assert metrics["mean_expression"]["poisson_deviance"] < metrics["model"]["poisson_deviance"]


# ------------------------------------------------------------------------------------------------ CLI

def test_cli_evaluate_with_a_checkpoint_writes_table_and_plots(tmp_path, checkpoint, corpus, small_screen_path,
                                                               planted_db, capsys):
    screen_path = small_screen_path
    out = tmp_path / "eval"
    status = txfm_main(["evaluate", "--input", str(screen_path), "--perturbation-column", PERTURBATION_COLUMN,
                        "--control-label", CONTROL_LABEL, "--batch-column", BATCH_COLUMN, "--checkpoint",
                        str(checkpoint), "--corpus", str(corpus), "--relationships", str(planted_db),
                        "--embedders", "txfm,liblog,pca_corpus", "--n-components", "16", "--corpus-components", "10",
                        "--n-seeds", "1", "--inv-genes", "50",
                        "--reconstruction-max-batches", "2", "--device", "cpu", "--no-progress", "--out", str(out)])
    assert status == 0
    results = pd.read_csv(out / "results.csv").set_index("embedder")
    assert list(results.index) == ["txfm", "liblog", "pca_corpus", "txfm_codebook", "txfm_decoder", "mean_expression"]
    assert results.loc["txfm", "dim"] == 64
    for task in ("ilisi", "lin", "knn", "pcst", "bmdb", "inv", "avg"):  # the paper protocol is the default
        assert np.isfinite(results.loc["txfm", task]), task
    assert np.isfinite(results.loc["txfm", "reconstruction_poisson_deviance"])
    assert np.isfinite(results.loc["mean_expression", "reconstruction_pearson"])
    assert np.isfinite(results.loc["txfm_decoder", "recall_avg_5_95"])
    assert results.loc["txfm_decoder", "bmdb"] == results.loc["txfm_decoder", "recall_avg_5_95"]
    for name in ("results.md", "recall_by_database.png", "consistency.png", "report.json", "gene_weights.parquet"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "recall_by_database.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    capsys.readouterr()
    status = txfm_main(["evaluate", "--input", str(screen_path), "--perturbation-column", "missing", "--control-label",
                        CONTROL_LABEL, "--batch-column", BATCH_COLUMN, "--out", str(tmp_path / "bad")])
    error = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and len(error) == 1 and "no perturbation column 'missing'" in error[0]


def test_cli_help_explains_metrics_and_outputs(capsys):
    with pytest.raises(SystemExit) as exit_info:
        txfm_main(["evaluate", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for phrase in ("--perturbation-column", "--control-label", "--embedders", "recall", "consistency",
                   "cross-validated by batch", "results.csv", "recall_by_database.png", "--protocol",
                   "B.1.1", "protocol.csv", "ilisi"):
        assert phrase in text, phrase
