"""Cell embedders compared by ``txfm evaluate``, behind one interface.

Each embedder is fitted once on the screen (possibly streaming over it) and then maps a chunk of raw
counts ``(n_cells × n_features)`` to embeddings ``(n_cells × dim)``:

* ``txfm``       — TxFM CLS embedding of a checkpoint (exactly what :func:`txfm.embed.embed_anndata` returns,
                   computed chunk by chunk with the same feature mapping, normalisation and input-gene choice).
* ``liblog``     — Lib+Log: ``log1p(count / library · 1e4)`` of every feature (dim = n_features).
* ``hvg_pca``    — Seurat-flavour highly variable genes (mean/dispersion bins, as scanpy
                   ``highly_variable_genes(flavor="seurat")``) of the log-normalised counts, then PCA.
* ``pca_corpus`` — PCA[DiverseRNA]: an incremental PCA fitted on training-corpus samples (streamed from the
                   shards with pyarrow) over the vocabulary genes the screen measures, applied to the screen.
* ``pca_screen`` — PCA fitted on the screen itself (Lib+Log of every feature): the paper's "fit on evaluation
                   data" PCA (Tables 9–11), its strongest baseline.
* ``random``     — i.i.d. Gaussian vectors: the null control of every metric.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from curation import schema
from txfm.evaluate.pca import StreamingPCA
from curation.phenoprint import log_normalise
from txfm.evaluate.screen import Screen

EMBEDDER_NAMES = ("txfm", "liblog", "hvg_pca", "pca_screen", "pca_corpus", "random")
TARGET_SUM = 1e4  # counts per 10k for the baselines' library-size normalisation


class Embedder:
    """Base class: ``fit(screen)`` once, then ``transform(counts, start, stop)`` per chunk.

    ``dim`` is known after fit. ``info()`` returns JSON-ready facts about the fit (genes used, variance…).
    ``row_independent``: a cell's embedding depends only on its own counts (not on its row number), so a
    subset of a chunk's rows may be embedded on its own.
    """

    name = "embedder"
    dim = 0
    row_independent = True

    def fit(self, screen: Screen, progress: bool = True) -> "Embedder":
        return self

    def transform(self, counts: sp.csr_matrix, start: int, stop: int) -> np.ndarray:
        """(n × n_features) raw counts of cells [start, stop) → (n, dim) float."""
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        return {"dim": int(self.dim)}


class LibLogEmbedder(Embedder):
    """log1p(count / library · 1e4) over every feature; dim = n_features."""

    name = "liblog"

    def fit(self, screen: Screen, progress: bool = True) -> "LibLogEmbedder":
        self.dim = screen.n_features
        return self

    def transform(self, counts: sp.csr_matrix, start: int, stop: int) -> np.ndarray:
        return log_normalise(counts, TARGET_SUM).toarray()


def seurat_hvg(mean: np.ndarray, variance: np.ndarray, n_top: int, n_bins: int = 20) -> np.ndarray:
    """Indices (sorted) of the ``n_top`` most variable genes, Seurat flavour.

    mean, variance: (n_genes,) of the *normalised, non-log* expression (CP10k; variance with ddof=1).
    Dispersion = log(var / mean); genes are binned into ``n_bins`` equal-width bins of log1p(mean); the
    dispersion is z-scored within its bin (a bin with one gene gets 1, as scanpy does); the top ``n_top``
    normalised dispersions win. Genes with zero variance are never selected.
    """
    mean = np.where(mean == 0, 1e-12, mean)
    with np.errstate(divide="ignore", invalid="ignore"):
        dispersion = variance / mean
        dispersion[dispersion == 0] = np.nan
        dispersion = np.log(dispersion)
    frame = pd.DataFrame({"dispersion": dispersion, "bin": pd.cut(np.log1p(mean), bins=n_bins)})
    grouped = frame.groupby("bin", observed=False)["dispersion"]
    bin_mean, bin_std = grouped.mean(), grouped.std(ddof=1)
    single = bin_std.isna()
    bin_std[single], bin_mean[single] = bin_mean[single], 0.0  # one-gene bins normalise to exactly 1
    normalised = ((frame["dispersion"] - bin_mean.loc[frame["bin"]].to_numpy())
                  / bin_std.loc[frame["bin"]].to_numpy()).to_numpy(dtype=np.float64)
    candidates = np.flatnonzero(np.isfinite(normalised))
    order = candidates[np.argsort(-normalised[candidates], kind="stable")]
    return np.sort(order[:n_top])


class HVGPCAEmbedder(Embedder):
    """HVG (Seurat flavour) of log1p-CP10k, then PCA with ``n_components`` (fitted on all screen cells)."""

    name = "hvg_pca"

    def __init__(self, n_top_genes: int = 2000, n_components: int = 50, n_bins: int = 20):
        self.n_top_genes, self.n_components, self.n_bins = int(n_top_genes), int(n_components), int(n_bins)
        self.genes: np.ndarray | None = None
        self.pca: StreamingPCA | None = None

    def fit(self, screen: Screen, progress: bool = True) -> "HVGPCAEmbedder":
        total = np.zeros(screen.n_features)
        total_sq = np.zeros(screen.n_features)
        for _, _, counts in screen.chunks("hvg_pca: gene statistics", progress):
            cp10k = log_normalise(counts, TARGET_SUM)
            np.expm1(cp10k.data, out=cp10k.data)  # back to the linear normalised scale, as Seurat's dispersion
            total += np.asarray(cp10k.sum(axis=0)).ravel()
            total_sq += np.asarray(cp10k.multiply(cp10k).sum(axis=0)).ravel()
        n = screen.n_cells
        mean = total / n
        variance = np.maximum(total_sq / n - mean * mean, 0.0) * n / (n - 1)
        self.genes = seurat_hvg(mean, variance, self.n_top_genes, self.n_bins)
        if self.genes.size == 0:
            raise ValueError(f"{screen.label_for_errors}: no variable genes (all features constant)")
        k = min(self.n_components, self.genes.size, n - 1)
        self.pca = StreamingPCA(k)
        for _, _, counts in screen.chunks("hvg_pca: PCA", progress):
            self.pca.add(log_normalise(counts, TARGET_SUM)[:, self.genes].toarray())
        self.pca.finish()
        self.dim = k
        return self

    def transform(self, counts: sp.csr_matrix, start: int, stop: int) -> np.ndarray:
        return self.pca.transform(log_normalise(counts, TARGET_SUM)[:, self.genes].toarray())

    def info(self) -> dict[str, Any]:
        return {"dim": int(self.dim), "n_hvg": int(self.genes.size),
                "explained_variance_ratio": self.pca.explained_variance_ratio}


class ScreenPCAEmbedder(Embedder):
    """PCA of log1p-CP10k over every feature, fitted on all cells of the screen (``n_components`` PCs)."""

    name = "pca_screen"

    def __init__(self, n_components: int = 50):
        self.n_components = int(n_components)
        self.pca: StreamingPCA | None = None

    def fit(self, screen: Screen, progress: bool = True) -> "ScreenPCAEmbedder":
        k = min(self.n_components, screen.n_features, screen.n_cells - 1)
        self.pca = StreamingPCA(k)
        for _, _, counts in screen.chunks("pca_screen: PCA", progress):
            self.pca.add(log_normalise(counts, TARGET_SUM).toarray())
        self.pca.finish()
        self.dim = k
        return self

    def transform(self, counts: sp.csr_matrix, start: int, stop: int) -> np.ndarray:
        return self.pca.transform(log_normalise(counts, TARGET_SUM).toarray())

    def info(self) -> dict[str, Any]:
        return {"dim": int(self.dim), "explained_variance_ratio": self.pca.explained_variance_ratio}


class CorpusPCAEmbedder(Embedder):
    """PCA[DiverseRNA]: incremental PCA of training-corpus samples over the genes shared with the screen.

    Both sides are normalised identically over the shared genes only (log1p CP10k of their sum), so the
    projection sees the same feature space; corpus genes outside a sample's dataset panel count as 0.
    At most ``max_samples`` corpus samples are used, whole row groups evenly spread over the train shards.
    """

    name = "pca_corpus"

    def __init__(self, corpus: str | os.PathLike, n_components: int = 50, max_samples: int = 20000,
                 split: str = "train"):
        self.corpus, self.split = corpus, split
        self.n_components, self.max_samples = int(n_components), int(max_samples)
        self.summing: sp.csr_matrix | None = None
        self.shared: np.ndarray | None = None
        self.pca: StreamingPCA | None = None
        self.n_corpus_samples = 0

    def fit(self, screen: Screen, progress: bool = True) -> "CorpusPCAEmbedder":
        from txfm.data import CorpusInfo
        from txfm.embed import feature_summing_matrix, map_to_vocabulary

        info = CorpusInfo.open(self.corpus)
        vocab_idx, _, _ = map_to_vocabulary(screen.features, info.genes)
        self.summing, self.shared = feature_summing_matrix(vocab_idx)
        if self.shared.size < 2:
            raise ValueError(f"{screen.label_for_errors}: {self.shared.size} features map to the corpus "
                             f"vocabulary of {self.corpus}; PCA[DiverseRNA] needs at least 2")
        column_of = np.full(info.n_genes, -1, dtype=np.int64)
        column_of[self.shared] = np.arange(self.shared.size)
        units = _row_groups(self.corpus, self.split)
        if not units:
            raise ValueError(f"{self.corpus}: no {self.split!r} shards for PCA[DiverseRNA]")
        chosen = _evenly_spread(units, self.max_samples)
        n_rows = sum(rows for _, _, rows in chosen)
        k = min(self.n_components, self.shared.size, n_rows)
        self.pca = StreamingPCA(k)
        for path, row_group, _ in tqdm(chosen, desc="pca_corpus: fit", unit="row group", disable=not progress,
                                       leave=False):
            matrix = _row_group_matrix(path, row_group, column_of, self.shared.size)
            keep = np.asarray(matrix.sum(axis=1)).ravel() > 0  # no counts on the shared genes: nothing to learn
            self.pca.add(log_normalise(matrix[keep], TARGET_SUM).toarray())
            self.n_corpus_samples += int(keep.sum())
        self.pca.finish()
        self.dim = k
        return self

    def transform(self, counts: sp.csr_matrix, start: int, stop: int) -> np.ndarray:
        shared_counts = sp.csr_matrix(counts @ self.summing)
        return self.pca.transform(log_normalise(shared_counts, TARGET_SUM).toarray())

    def info(self) -> dict[str, Any]:
        return {"dim": int(self.dim), "n_shared_genes": int(self.shared.size),
                "n_corpus_samples": self.n_corpus_samples,
                "explained_variance_ratio": self.pca.explained_variance_ratio}


def _row_groups(corpus: str | os.PathLike, split: str) -> list[tuple[str, int, int]]:
    """(shard path, row group, rows) of every row group of a split, from the Parquet footers."""
    units = []
    for path in schema.list_shards(corpus, split):
        meta = pq.ParquetFile(path).metadata
        units += [(str(path), rg, meta.row_group(rg).num_rows) for rg in range(meta.num_row_groups)]
    return units


def _evenly_spread(units: list[tuple[str, int, int]], max_rows: int) -> list[tuple[str, int, int]]:
    """Row groups evenly spaced over ``units`` whose rows add up to about ``max_rows`` (at least one)."""
    total = sum(rows for _, _, rows in units)
    if total <= max_rows:
        return units
    n_pick = max(1, round(len(units) * max_rows / total))
    picks = np.unique(np.linspace(0, len(units) - 1, n_pick).round().astype(np.int64))
    return [units[i] for i in picks]


def _row_group_matrix(path: str, row_group: int, column_of: np.ndarray, n_columns: int) -> sp.csr_matrix:
    """Counts of one shard row group on the selected vocabulary genes: csr (rows × n_columns) float64."""
    table = pq.ParquetFile(path).read_row_group(row_group, columns=["gene_idx", "counts"])
    lengths = pc.list_value_length(table.column("gene_idx")).to_numpy(zero_copy_only=False)
    genes = pc.list_flatten(table.column("gene_idx")).to_numpy(zero_copy_only=False).astype(np.int64)
    counts = pc.list_flatten(table.column("counts")).to_numpy(zero_copy_only=False).astype(np.float64)
    rows = np.repeat(np.arange(lengths.size), lengths)
    columns = column_of[genes]
    keep = columns >= 0
    return sp.csr_matrix((counts[keep], (rows[keep], columns[keep])), shape=(lengths.size, n_columns))


class TxFMEmbedder(Embedder):
    """CLS embeddings of a TxFM checkpoint, chunk by chunk, identical to :func:`txfm.embed.embed_anndata`."""

    name = "txfm"
    row_independent = False  # the input-gene choice is seeded by the cell's row number

    def __init__(self, checkpoint: str | os.PathLike, batch_size: int = 256, n_input_genes: int | None = None,
                 seed: int = 0, device: str | None = None):
        self.checkpoint, self.batch_size, self.seed = checkpoint, int(batch_size), int(seed)
        self.n_input_genes = n_input_genes
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.report: dict[str, Any] = {}

    def fit(self, screen: Screen, progress: bool = True) -> "TxFMEmbedder":
        from txfm.checkpoint import load_model, read_model_config, resolve_checkpoint
        from txfm.embed import checkpoint_transform, feature_summing_matrix, map_to_vocabulary

        model_dir = resolve_checkpoint(self.checkpoint)
        self.model, self.cfg, vocabulary = load_model(model_dir, map_location=self.device)
        _, extra = read_model_config(model_dir)
        # The checkpoint's own K, L and input sampling (uniform / frequency with its temperature), as txfm embed.
        self.input_transform = checkpoint_transform(self.cfg, extra, vocabulary, self.n_input_genes, str(model_dir))
        self.k = self.input_transform.k
        vocab_idx, how, mapper = map_to_vocabulary(screen.features, vocabulary)
        self.summing, self.input_genes = feature_summing_matrix(vocab_idx)
        if self.input_genes.size == 0:
            raise ValueError(f"{screen.label_for_errors}: none of the {screen.n_features} features maps to the "
                             f"vocabulary of {model_dir}; wrong --gene-column?")
        self.dim = self.cfg.dim
        self.report = {"checkpoint": str(model_dir), "mapper": mapper, "n_genes_used": int(self.input_genes.size),
                       "n_unmapped_features": int((vocab_idx < 0).sum()), "n_input_genes": int(self.k)}
        return self

    def transform(self, counts: sp.csr_matrix, start: int, stop: int) -> np.ndarray:
        from txfm.embed import model_inputs

        mapped = sp.csr_matrix(counts @ self.summing)
        out = np.empty((stop - start, self.dim), dtype=np.float32)
        with torch.inference_mode():
            for lo in range(0, stop - start, self.batch_size):
                hi = min(lo + self.batch_size, stop - start)
                batch = model_inputs(mapped[lo:hi], self.input_genes, np.arange(start + lo, start + hi), self.k,
                                     self.cfg.library_size, self.seed, transform=self.input_transform)
                batch = {name: tensor.to(self.device) for name, tensor in batch.items()}
                out[lo:hi] = self.model.embed(**batch).float().cpu().numpy()
        return out

    def info(self) -> dict[str, Any]:
        return {"dim": int(self.dim), **self.report}


class RandomEmbedder(Embedder):
    """Standard-normal vectors independent of the counts, seeded per cell (so independent of chunking):
    the null baseline."""

    name = "random"
    row_independent = False

    def __init__(self, dim: int = 32, seed: int = 0):
        self.dim, self.seed = int(dim), int(seed)

    def transform(self, counts: sp.csr_matrix, start: int, stop: int) -> np.ndarray:
        return np.stack([np.random.default_rng([self.seed, cell]).standard_normal(self.dim)
                         for cell in range(start, stop)])
