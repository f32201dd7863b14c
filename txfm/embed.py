"""Embed the cells/samples of an AnnData with a trained TxFM: ``.obsm["X_txfm"]`` = CLS embeddings.

Steps, mirroring training (``txfm.data``):

1. Map the features (``var_names`` or a ``var`` column; gene symbols or Ensembl IDs, versioned or not) to the
   checkpoint vocabulary (its ``genes.parquet``). ``curation.genes.GeneTable`` resolves symbols, previous
   symbols and aliases to Ensembl IDs; features it cannot place are matched directly against the vocabulary's
   own IDs and symbols. Several features on one gene are summed.
2. Build the model input with the training transform, :class:`txfm.transform.InputTransform` (the one
   owner of it): ``log1p(count / library_size · L)`` over the mapped genes with L from the model config;
   input genes = the mapped genes (zeros included, like a dataset panel), K of them drawn without
   replacement with the checkpoint's ``sampling`` / ``temperature`` (frequency sampling uses the detection
   frequencies saved with the model), keyed by (seed, cell index) — deterministic per cell, independent of
   the batch size; fewer than K are padded.
3. Stream the matrix in row batches (backed h5ad: memory does not grow with the number of cells).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from curation.io import CurationError, atomic_path
from txfm.checkpoint import load_model, read_model_config, resolve_checkpoint
from txfm.transform import N_INPUT_GENES, InputTransform, frequency_log_weight, sample_keys

OBSM_KEY = "X_txfm"
#: K when neither the caller nor the checkpoint's ``extra`` gives one (the training default).
DEFAULT_N_INPUT_GENES = N_INPUT_GENES
#: Column of the model's genes.parquet with each gene's detection frequency (saved for frequency sampling).
FREQUENCY_COLUMN = "detection_frequency"
_SALT_EMBED = 0xE3BD
N_UNMAPPED_EXAMPLES = 20
_ENSEMBL_VERSION_RE = r"^(ENS[A-Z]*G\d+)(?:\.\d+)?(?:_PAR_Y)?$"


# ----------------------------------------------------------------------------------------------------------------
# checkpoint and feature mapping

def default_n_input_genes(extra: dict[str, Any]) -> int:
    """K used in training: ``extra["n_input_genes"]`` (top level or one dict deep), else the loader default."""
    candidates = [extra] + [value for value in extra.values() if isinstance(value, dict)]
    for section in candidates:
        value = section.get("n_input_genes")
        if isinstance(value, int) and value > 0:
            return value
    return DEFAULT_N_INPUT_GENES


def input_sampling(extra: dict[str, Any], vocabulary: pd.DataFrame, where: str) -> tuple[str, np.ndarray | None]:
    """The checkpoint's input-gene sampling: ``(kind, log_weight float64 [G] or None)`` from its train config.

    Frequency sampling needs the vocabulary's :data:`FREQUENCY_COLUMN` (training saves it); a checkpoint
    without a train config samples uniformly, as training does by default.
    """
    train = extra.get("train_config") or {}
    sampling = train.get("sampling", "uniform")
    if sampling == "uniform":
        return sampling, None
    if sampling != "frequency":
        raise ValueError(f"{where}: unknown input sampling {sampling!r} in the checkpoint's train config")
    if FREQUENCY_COLUMN not in vocabulary.columns:
        raise ValueError(f"{where}: checkpoint was trained with frequency sampling but its genes.parquet has no "
                         f"{FREQUENCY_COLUMN} column")
    return sampling, frequency_log_weight(vocabulary[FREQUENCY_COLUMN].to_numpy(), float(train.get("temperature", 1.0)))


def checkpoint_transform(cfg: Any, extra: dict[str, Any], vocabulary: pd.DataFrame, n_input_genes: int | None,
                         where: str) -> InputTransform:
    """The input transform a checkpoint was trained with: its K (unless ``n_input_genes`` overrides it), L,
    ``sampling`` and ``temperature`` (``cfg``: its TxFMConfig; ``extra``: config.json's extra)."""
    k = n_input_genes if n_input_genes is not None else default_n_input_genes(extra)
    if k < 1:
        raise ValueError(f"n_input_genes must be >= 1, got {k}")
    sampling, log_weight = input_sampling(extra, vocabulary, where)
    return InputTransform(cfg.n_genes, k, cfg.library_size, sampling, log_weight)


def _direct_vocabulary_match(features: pd.Series, vocabulary: pd.DataFrame) -> np.ndarray:
    """Vocabulary row per feature by unversioned Ensembl ID, then exact symbol, then unique upper-cased symbol.

    features: (n_features,) str. Returns (n_features,) int64, -1 = no match.
    """
    gene_ids = pd.Index(vocabulary["gene_id"].astype(str))
    unversioned = features.str.extract(_ENSEMBL_VERSION_RE, expand=False)
    found = gene_ids.get_indexer(unversioned.fillna(features))
    if "symbol" in vocabulary.columns:
        symbols = vocabulary["symbol"].astype(object).where(vocabulary["symbol"].notna(), None)
        symbol_rows = pd.Series(np.arange(len(vocabulary)), index=symbols)
        symbol_rows = symbol_rows[symbol_rows.index.notna()]
        exact = symbol_rows[~symbol_rows.index.duplicated(keep=False)]
        upper = pd.Series(symbol_rows.to_numpy(), index=symbol_rows.index.str.upper())
        upper = upper[~upper.index.duplicated(keep=False)]
        todo = found < 0
        found[todo] = features[todo].map(exact).fillna(-1).to_numpy(np.int64)
        todo = found < 0
        found[todo] = features[todo].str.upper().map(upper).fillna(-1).to_numpy(np.int64)
    return found.astype(np.int64)


def map_to_vocabulary(features: Any, vocabulary: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, str]:
    """Vocabulary row of each feature. features: (n_features,) IDs or symbols; vocabulary: gene_id[, symbol].

    Returns ``(vocab_idx (n_features,) int64 with -1 = unmapped, how (n_features,) str, mapper name)``.
    ``how`` is GeneTable's label (ensembl / symbol / previous / alias), ``vocabulary`` for a direct match,
    ``not_in_vocabulary`` for a known gene the model never saw, or ``unmapped``.
    """
    names = pd.Series(np.asarray(features, dtype=object), dtype=object).fillna("").astype(str).str.strip()
    vocab_idx = np.full(len(names), -1, dtype=np.int64)
    how = np.full(len(names), "unmapped", dtype=object)
    mapper = "direct"
    try:
        from curation.genes import GeneTable
    except ImportError:  # the reference table module is optional for embedding
        GeneTable = None
    table = None
    if GeneTable is not None:
        try:
            table = GeneTable.load()
        except CurationError:  # reference snapshots missing: fall back to direct matching
            table = None
    if table is not None:
        mapper = "curation.genes"
        mapping = table.map_features(names.tolist())
        known = mapping.ref_idx >= 0
        ref_gene_ids = table.genes["gene_id"].to_numpy(dtype=object)[mapping.ref_idx[known]]
        rows = pd.Index(vocabulary["gene_id"].astype(str)).get_indexer(ref_gene_ids)
        vocab_idx[known] = rows
        how[known] = np.where(rows >= 0, mapping.how[known], "not_in_vocabulary")
    todo = vocab_idx < 0
    direct = _direct_vocabulary_match(names[todo].reset_index(drop=True), vocabulary)
    rows = np.flatnonzero(todo)[direct >= 0]
    vocab_idx[rows], how[rows] = direct[direct >= 0], "vocabulary"
    return vocab_idx, how.astype(str), mapper


# ----------------------------------------------------------------------------------------------------------------
# batches

def feature_summing_matrix(vocab_idx: np.ndarray) -> tuple[sp.csr_matrix, np.ndarray]:
    """(n_features × n_inputs) 0/1 matrix summing features onto their vocabulary gene, and the sorted
    vocabulary indices of its columns (n_inputs,) int64. Unmapped features (−1) get an empty row."""
    input_genes = np.unique(vocab_idx[vocab_idx >= 0])
    mapped = np.flatnonzero(vocab_idx >= 0)
    columns = np.searchsorted(input_genes, vocab_idx[mapped])
    matrix = sp.csr_matrix((np.ones(len(mapped), dtype=np.float64), (mapped, columns)),
                           shape=(len(vocab_idx), len(input_genes)))
    return matrix, input_genes


def cell_keys(cell_index: np.ndarray, seed: int) -> np.ndarray:
    """Sampling keys of cells by global index (uint64 [n]): a cell's input genes depend only on (seed, index)."""
    return sample_keys((seed, _SALT_EMBED), cell_index)


def _check_counts(values: np.ndarray, label: str, rows: tuple[int, int], allow_normalised: bool) -> None:
    """Refuse negative / non-finite values always, and non-integers unless ``allow_normalised``."""
    if values.size == 0:
        return
    if not np.isfinite(values).all() or (values < 0).any():
        raise CurationError(label, f"X has negative or non-finite values in rows {rows[0]}–{rows[1] - 1}; "
                                   "expected raw counts")
    if not allow_normalised and not np.array_equal(values, np.round(values)):
        raise CurationError(label, f"X has non-integer values in rows {rows[0]}–{rows[1] - 1}; expected raw counts "
                                   "(pass allow_normalised / --allow-normalised for linear-scale TPM/CPM values)")


def _as_csr(block: Any) -> sp.csr_matrix:
    """A row block of X (dense ndarray, scipy sparse, or anndata's backed sparse slice) as float64 CSR."""
    if sp.issparse(block):
        return sp.csr_matrix(block, dtype=np.float64)
    return sp.csr_matrix(np.asarray(block, dtype=np.float64))


def model_inputs(counts: sp.csr_matrix, input_genes: np.ndarray, cell_index: np.ndarray, k: int, library_size: float,
                 seed: int, sampling: str = "uniform", log_weight: np.ndarray | None = None,
                 keys: np.ndarray | None = None, transform: InputTransform | None = None) -> dict[str, torch.Tensor]:
    """Tokens for one batch. counts: (B × n_inputs) summed counts on ``input_genes`` (sorted vocabulary indices).

    Returns gene_idx int64 [B, K], values float32 [B, K] (log1p(count / library · L)), pad_mask bool [B, K],
    built by :class:`txfm.transform.InputTransform` exactly as in training. ``keys`` (uint64 [B]) overrides
    the per-cell keys :func:`cell_keys` ``(cell_index, seed)``; pass ``transform`` to reuse its buffers
    across batches (its settings then win over ``k`` / ``library_size`` / ``sampling`` / ``log_weight``).
    """
    counts = sp.csr_matrix(counts)
    counts.sort_indices()
    if transform is None:
        n_genes = len(log_weight) if log_weight is not None else int(input_genes[-1]) + 1
        transform = InputTransform(n_genes, k, library_size, sampling, log_weight)
    keys = cell_keys(np.asarray(cell_index), seed) if keys is None else keys
    library = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
    built = transform(counts.indptr, input_genes[counts.indices], counts.data, library,
                      np.zeros(counts.shape[0], dtype=np.int64), [np.asarray(input_genes, dtype=np.int64)], keys)
    return {name: torch.from_numpy(built[name]) for name in ("gene_idx", "values", "pad_mask")}


# ----------------------------------------------------------------------------------------------------------------
# embedding

def _open_anndata(adata_or_path: Any) -> tuple[Any, str, bool]:
    """(AnnData, label for messages, opened_here). Paths are opened backed (read-only, streamed)."""
    import anndata as ad

    if isinstance(adata_or_path, ad.AnnData):
        return adata_or_path, "<AnnData>", False
    path = Path(adata_or_path)
    if not path.is_file():
        raise CurationError(path, "input AnnData file does not exist")
    try:
        return ad.read_h5ad(path, backed="r"), str(path), True
    except Exception as exc:  # noqa: BLE001 (h5py/anndata raise many types for a bad file)
        raise CurationError(path, f"cannot read as h5ad ({type(exc).__name__}: {exc})") from None


def _feature_names(adata: Any, gene_column: str | None, label: str) -> pd.Series:
    """(n_vars,) feature names: ``var_names`` or ``var[gene_column]``, positional index."""
    if gene_column is None:
        return pd.Series(adata.var_names.astype(str), dtype=object)
    if gene_column not in adata.var.columns:
        columns = ", ".join(map(str, adata.var.columns))
        raise CurationError(label, f"var has no column {gene_column!r} (columns: {columns})")
    return adata.var[gene_column].astype(object).reset_index(drop=True)


def embed_anndata(checkpoint_dir: str | os.PathLike, adata_or_path: Any, batch_size: int = 256,
                  n_input_genes: int | None = None, gene_column: str | None = None, allow_normalised: bool = False,
                  seed: int = 0, progress: bool = True, device: str | torch.device | None = None
                  ) -> tuple[np.ndarray, dict[str, Any]]:
    """CLS embeddings of every cell of an AnnData (or h5ad path, read backed) → (float32 [n_cells, dim], report).

    ``n_input_genes`` (K) defaults to the checkpoint's training K (see :func:`default_n_input_genes`).
    ``device`` defaults to CUDA when available. The report is JSON-ready: feature mapping counts and unmapped
    examples, genes used, K, cells with zero library size.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model_dir = resolve_checkpoint(checkpoint_dir)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, cfg, vocabulary = load_model(model_dir, map_location=device)
    _, extra = read_model_config(model_dir)
    transform = checkpoint_transform(cfg, extra, vocabulary, n_input_genes, str(model_dir))
    k = transform.k

    adata, label, opened_here = _open_anndata(adata_or_path)
    try:
        features = _feature_names(adata, gene_column, label)
        vocab_idx, how, mapper = map_to_vocabulary(features, vocabulary)
        summing, input_genes = feature_summing_matrix(vocab_idx)
        if len(input_genes) == 0:
            raise CurationError(label, f"none of the {len(features)} features maps to the checkpoint vocabulary "
                                       f"(examples: {', '.join(map(str, features.iloc[:5]))}); wrong --gene-column?")
        if adata.X is None:
            raise CurationError(label, "X is empty; expected a counts matrix")
        n_cells = adata.n_obs
        embedding = np.empty((n_cells, cfg.dim), dtype=np.float32)
        n_zero_library = 0
        starts = range(0, n_cells, batch_size)
        with torch.inference_mode():
            for start in tqdm(starts, desc="txfm embed", unit="batch", disable=not progress):
                stop = min(start + batch_size, n_cells)
                block = _as_csr(adata.X[start:stop])
                _check_counts(block.data, label, (start, stop), allow_normalised)
                counts = sp.csr_matrix(block @ summing)
                n_zero_library += int((np.asarray(counts.sum(axis=1)).ravel() == 0).sum())
                batch = model_inputs(counts, input_genes, np.arange(start, stop), k, cfg.library_size, seed,
                                     transform=transform)
                batch = {name: tensor.to(device, non_blocking=True) for name, tensor in batch.items()}
                embedding[start:stop] = model.embed(**batch).float().cpu().numpy()
    finally:
        if opened_here and getattr(adata, "file", None) is not None:
            adata.file.close()

    unmapped = np.flatnonzero(vocab_idx < 0)
    report = {
        "checkpoint": str(model_dir),
        "input": label,
        "mapper": mapper,
        "n_cells": int(n_cells),
        "n_features": int(len(features)),
        "n_mapped_features": int(len(features) - len(unmapped)),
        "n_unmapped_features": int(len(unmapped)),
        "unmapped_examples": [str(features.iloc[i]) for i in unmapped[:N_UNMAPPED_EXAMPLES]],
        "by_how": {str(key): int(value) for key, value in pd.Series(how).value_counts().items()},
        "n_genes_used": int(len(input_genes)),
        "n_vocabulary": int(cfg.n_genes),
        "vocabulary_coverage": float(len(input_genes) / cfg.n_genes),
        "n_input_genes": int(k),
        "sampling": transform.sampling,
        "padded": bool(len(input_genes) < k),
        "n_zero_library_cells": int(n_zero_library),
        "embedding_dim": int(cfg.dim),
    }
    return embedding, report


def write_embedding(adata_or_path: Any, output_path: str | os.PathLike, embedding: np.ndarray,
                    keep_x: bool = False) -> None:
    """Write an h5ad with ``obsm["X_txfm"] = embedding`` atomically.

    keep_x=False: a new AnnData with the input's obs and var and no X. keep_x=True: a copy of the whole input
    (X, layers, uns…) — for a path, the file is copied and the embedding added in place, so X is never loaded.
    """
    import anndata as ad
    import h5py
    from anndata.io import write_elem

    output_path = Path(output_path)
    if isinstance(adata_or_path, ad.AnnData):
        source = adata_or_path
        if embedding.shape[0] != source.n_obs:
            raise ValueError(f"{output_path}: {embedding.shape[0]} embeddings for {source.n_obs} cells")
        out = source.copy() if keep_x else ad.AnnData(obs=source.obs.copy(), var=source.var.copy())
        out.obsm[OBSM_KEY] = embedding
        with atomic_path(output_path) as tmp:
            out.write_h5ad(tmp)
        return
    input_path = Path(adata_or_path)
    source = ad.read_h5ad(input_path, backed="r")
    try:
        if embedding.shape[0] != source.n_obs:
            raise ValueError(f"{output_path}: {embedding.shape[0]} embeddings for {source.n_obs} cells")
        if not keep_x:
            out = ad.AnnData(obs=source.obs.copy(), var=source.var.copy(), obsm={OBSM_KEY: embedding})
    finally:
        source.file.close()
    with atomic_path(output_path) as tmp:
        if not keep_x:
            out.write_h5ad(tmp)
            return
        shutil.copyfile(input_path, tmp)
        with h5py.File(tmp, "r+") as handle:
            obsm = handle.require_group("obsm")
            if OBSM_KEY in obsm:
                del obsm[OBSM_KEY]
            write_elem(obsm, OBSM_KEY, embedding)


# ----------------------------------------------------------------------------------------------------------------
# CLI

def format_report(report: dict[str, Any]) -> str:
    """Human-readable summary of :func:`embed_anndata`'s report (a few lines)."""
    lines = [f"txfm embed: {report['n_cells']} cells, {report['n_mapped_features']}/{report['n_features']} features "
             f"mapped ({report['mapper']}) onto {report['n_genes_used']} of {report['n_vocabulary']} vocabulary "
             f"genes ({100 * report['vocabulary_coverage']:.1f} %), K = {report['n_input_genes']}"
             + (" (padded)" if report["padded"] else "")]
    if report["n_unmapped_features"]:
        lines.append(f"  {report['n_unmapped_features']} unmapped features, e.g. "
                     + ", ".join(report["unmapped_examples"][:10]))
    if report["n_zero_library_cells"]:
        lines.append(f"  {report['n_zero_library_cells']} cells have no counts on the mapped genes")
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    embedding, report = embed_anndata(args.checkpoint, args.input, batch_size=args.batch_size,
                                      n_input_genes=args.n_input_genes, gene_column=args.gene_column,
                                      allow_normalised=args.allow_normalised, seed=args.seed,
                                      progress=not args.no_progress, device=args.device)
    write_embedding(args.input, args.output, embedding, keep_x=args.keep_x)
    print(format_report(report), file=sys.stderr)
    print(f"wrote {args.output} (obsm['{OBSM_KEY}']: {embedding.shape[0]} × {embedding.shape[1]})", file=sys.stderr)
    return 0


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``txfm embed`` to a CLI's subparsers (sets ``func``)."""
    parser = subparsers.add_parser("embed", help="embed an h5ad's cells with a trained TxFM (.obsm['X_txfm'])",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="model/checkpoint directory or a run directory")
    parser.add_argument("--input", required=True, help="input .h5ad with raw counts in X")
    parser.add_argument("--output", required=True, help="output .h5ad (obs/var + obsm['X_txfm'])")
    parser.add_argument("--gene-column", default=None, help="var column with gene symbols/IDs (default var_names)")
    parser.add_argument("--batch-size", type=int, default=256, help="cells per forward pass (default 256)")
    parser.add_argument("--n-input-genes", type=int, default=None, help="K input genes per cell (default: training K)")
    parser.add_argument("--allow-normalised", action="store_true",
                        help="accept non-integer linear-scale X (TPM/CPM); not log-transformed data")
    parser.add_argument("--keep-x", action="store_true", help="copy the whole input (X, layers, uns) to the output")
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-cell input-gene choice")
    parser.add_argument("--device", default=None, help="torch device (default cuda if available, else cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=_run)
    return parser
