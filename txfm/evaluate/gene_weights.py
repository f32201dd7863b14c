"""Gene-weight recall: known relationships among the per-gene vectors of a checkpoint.

The vectors come from :func:`txfm.export.export_gene_weights` (input codebook, decoder output rows). Each
matrix is standardised per dimension over genes, then reduced by PCA to 32 (codebook) / 256 (decoder)
components — capped by the available dimensions — and scored with :func:`txfm.evaluate.recall.relationship_recall`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
from sklearn.decomposition import PCA

from txfm.evaluate.recall import N_NULL_PAIRS, RecallResult, relationship_recall

#: PCA components per exported weight column.
GENE_WEIGHT_COMPONENTS = {"codebook": 32, "decoder": 256}


def read_gene_weights(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(names (G,) symbol or gene_id where no symbol, {column: (G, w) float32}) of an exported Parquet."""
    table = pq.read_table(path)
    missing = {"gene_id", "symbol", *GENE_WEIGHT_COMPONENTS} - set(table.column_names)
    if missing:
        raise ValueError(f"{path}: not a gene-weights table (missing {', '.join(sorted(missing))})")
    symbols = table.column("symbol").to_pandas()
    names = symbols.where(symbols.notna(), table.column("gene_id").to_pandas()).astype(str).to_numpy(dtype=object)
    matrices = {}
    for column in GENE_WEIGHT_COMPONENTS:
        values = pc.list_flatten(table.column(column)).to_numpy(zero_copy_only=False)
        matrices[column] = values.reshape(table.num_rows, -1).astype(np.float32)
    return names, matrices


def reduce_gene_vectors(matrix: np.ndarray, n_components: int, seed: int = 0) -> np.ndarray:
    """Standardise each dimension over genes (constant dimensions dropped), then PCA. (G, w) → (G, ≤ n_components)"""
    matrix = np.asarray(matrix, dtype=np.float64)
    std = matrix.std(axis=0)
    varying = std > 1e-12 * max(float(std.max(initial=0.0)), np.finfo(np.float64).tiny)
    if not varying.any():
        raise ValueError("gene vectors are constant across genes; nothing to compare")
    z = (matrix[:, varying] - matrix[:, varying].mean(axis=0)) / std[varying]
    k = min(int(n_components), z.shape[1], z.shape[0] - 1)
    return PCA(n_components=k, random_state=seed).fit_transform(z)


def gene_weight_recall(checkpoint: str | os.PathLike, out_path: str | os.PathLike, databases: dict,
                       n_null: int = N_NULL_PAIRS, seed: int = 0) -> dict[str, RecallResult]:
    """Export the checkpoint's gene weights to ``out_path`` and score recall of each weight kind.

    Returns ``{"codebook": RecallResult, "decoder": RecallResult}``.
    """
    from txfm.export import export_gene_weights

    path = export_gene_weights(checkpoint, Path(out_path))
    names, matrices = read_gene_weights(path)
    return {kind: relationship_recall(reduce_gene_vectors(matrices[kind], GENE_WEIGHT_COMPONENTS[kind], seed), names,
                                      databases, n_null=n_null, seed=seed)
            for kind in GENE_WEIGHT_COMPONENTS}
