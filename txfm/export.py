"""Export a trained TxFM's per-gene parameters: the input codebook and the decoder output weights.

One Parquet row per vocabulary gene, in vocabulary order::

    gene_id   string            Ensembl gene ID
    symbol    string            (null when the vocabulary has none)
    codebook  list<float32>     the gene's input embedding, length dim − 1
    decoder   list<float32>     the decoder head's weight row for the gene, length decoder width

These vectors are what the paper probes for gene–gene relationships (CORUM, StringDB, Reactome, …).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curation.io import atomic_path
from txfm.checkpoint import load_model, resolve_checkpoint

GENE_WEIGHTS_SCHEMA = pa.schema([
    pa.field("gene_id", pa.string(), nullable=False),
    pa.field("symbol", pa.string()),
    pa.field("codebook", pa.list_(pa.float32()), nullable=False),
    pa.field("decoder", pa.list_(pa.float32()), nullable=False),
])


def _list_column(matrix: np.ndarray) -> pa.ListArray:
    """[G, w] float32 matrix → list<float32> column of G rows (zero-copy offsets, no Python loop)."""
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    offsets = np.arange(0, matrix.size + 1, matrix.shape[1], dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(matrix.ravel()))


def gene_weights_table(checkpoint_dir: str | os.PathLike) -> pa.Table:
    """The gene-weights table (:data:`GENE_WEIGHTS_SCHEMA`) of a checkpoint."""
    model, cfg, genes = load_model(resolve_checkpoint(checkpoint_dir))
    codebook = model.gene_codebook().detach().float().cpu().numpy()
    decoder = model.decoder_gene_weights().detach().float().cpu().numpy()
    symbols = genes["symbol"] if "symbol" in genes.columns else [None] * len(genes)
    return pa.table({
        "gene_id": pa.array(genes["gene_id"].astype(str).tolist(), pa.string()),
        "symbol": pa.array([None if s is None or s != s else str(s) for s in symbols], pa.string()),
        "codebook": _list_column(codebook),
        "decoder": _list_column(decoder),
    }, schema=GENE_WEIGHTS_SCHEMA)


def export_gene_weights(checkpoint_dir: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Write the gene-weights Parquet of a checkpoint (model or run directory) atomically; returns its path."""
    out_path = Path(out_path)
    table = gene_weights_table(checkpoint_dir)
    with atomic_path(out_path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return out_path


def _run(args: argparse.Namespace) -> int:
    path = export_gene_weights(args.checkpoint, args.output)
    table = pq.read_metadata(path)
    print(f"wrote {path}: {table.num_rows} genes", file=sys.stderr)
    return 0


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``txfm export-gene-weights`` to a CLI's subparsers (sets ``func``)."""
    parser = subparsers.add_parser("export-gene-weights", help="write per-gene codebook and decoder weights (Parquet)",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="model/checkpoint directory or a run directory")
    parser.add_argument("--output", required=True, help="output .parquet")
    parser.set_defaults(func=_run)
    return parser
