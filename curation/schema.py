"""The DiverseRNA corpus format. This module is its single owner: every reader and writer imports it.

On disk a corpus is a directory::

    <corpus>/
      genes.parquet        one row per vocabulary gene (GENES_SCHEMA)
      datasets.parquet     one row per dataset, with its measured-gene panel (DATASETS_SCHEMA)
      shards/split=<split>/dataset=<name>/part-00000.parquet   samples (SAMPLE_SCHEMA), hive-partitioned, zstd
      manifest.json        every shard's path, rows, bytes, sha256; config and source checksums; version
      DATACARD.md          Table-1-style summary and what QC / dedup / pruning removed

Shards are plain Parquet: ``polars.scan_parquet(f"{corpus}/shards/**/*.parquet", hive_partitioning=True)``
or ``pyarrow.dataset.dataset(f"{corpus}/shards", partitioning="hive")`` read them without this package.
The ``split`` and ``dataset`` columns are stored inside the files too, so a single shard is self-describing.

Expression is stored sparse per sample: ``gene_idx`` (sorted, unique, non-zero entries only, indices into
genes.parquet) and ``counts`` (raw counts as float32, aligned with ``gene_idx``). A gene in the dataset's
panel but absent from ``gene_idx`` was *measured as zero*; a gene outside the panel was *not measured*.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

FORMAT_VERSION = "1.0"

MODALITIES = ("single_cell", "bulk")
SPLITS = ("train", "val")

GENES_FILE = "genes.parquet"
DATASETS_FILE = "datasets.parquet"
MANIFEST_FILE = "manifest.json"
DATACARD_FILE = "DATACARD.md"
SHARDS_DIR = "shards"

#: Parquet write options shared by every shard writer, so that a rebuild is byte-identical.
PARQUET_WRITE_OPTIONS = dict(compression="zstd", compression_level=3, use_dictionary=["dataset", "split",
                             "modality", "batch", "perturbation", "cell_type", "tissue"],
                             write_statistics=True, store_schema=False)
#: Rows per Parquet row group in shards; the loader shuffles at row-group granularity.
ROW_GROUP_ROWS = 2048
#: Rows per shard file (``part-NNNNN.parquet``).
SHARD_ROWS = 65536

GENES_SCHEMA = pa.schema([
    pa.field("gene_idx", pa.int32(), nullable=False),
    pa.field("gene_id", pa.string(), nullable=False),  # Ensembl gene ID without version, e.g. ENSG00000141510
    pa.field("symbol", pa.string()),
    pa.field("biotype", pa.string()),
])

DATASETS_SCHEMA = pa.schema([
    pa.field("dataset", pa.string(), nullable=False),
    pa.field("modality", pa.string(), nullable=False),
    pa.field("n_samples", pa.int64(), nullable=False),  # after QC, dedup and pruning, both splits
    pa.field("n_genes", pa.int32(), nullable=False),  # size of the measured panel
    pa.field("measured_gene_idx", pa.list_(pa.int32()), nullable=False),  # the panel, sorted gene_idx
    pa.field("source", pa.string()),  # citation / accession of the study
    pa.field("licence", pa.string()),
])

SAMPLE_SCHEMA = pa.schema([
    pa.field("sample_id", pa.string(), nullable=False),  # "<dataset>:<source id>", globally unique
    pa.field("dataset", pa.string(), nullable=False),
    pa.field("batch", pa.string(), nullable=False),  # experimental batch: gem group, plate, donor, project…
    pa.field("split", pa.string(), nullable=False),  # "train" | "val"
    pa.field("modality", pa.string(), nullable=False),  # "single_cell" | "bulk"
    pa.field("perturbation", pa.string()),  # perturbed gene / compound; control label for controls
    pa.field("cell_type", pa.string()),
    pa.field("tissue", pa.string()),
    pa.field("source_accession", pa.string()),  # GSM / SRR / barcode / TCGA aliquot / GTEx sample
    pa.field("gene_idx", pa.list_(pa.int32()), nullable=False),  # sorted, non-zero entries only
    pa.field("counts", pa.list_(pa.float32()), nullable=False),  # raw counts aligned with gene_idx
    pa.field("library_size", pa.float64(), nullable=False),  # sum of counts over the panel
    pa.field("n_genes_detected", pa.int32(), nullable=False),  # len(gene_idx)
    pa.field("content_hash", pa.string(), nullable=False),  # hex digest of (gene_id, count) pairs, see hashing
])

#: Metadata columns (everything except the expression lists and derived numbers).
METADATA_COLUMNS = ("sample_id", "dataset", "batch", "split", "modality", "perturbation", "cell_type",
                    "tissue", "source_accession")


def shard_dir(corpus: str | Path, split: str, dataset: str) -> Path:
    """Directory that holds the shards of one (split, dataset) partition."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return Path(corpus) / SHARDS_DIR / f"split={split}" / f"dataset={dataset}"


def shard_path(corpus: str | Path, split: str, dataset: str, part: int) -> Path:
    """Path of shard number ``part`` of one (split, dataset) partition."""
    return shard_dir(corpus, split, dataset) / f"part-{part:05d}.parquet"


def list_shards(corpus: str | Path, split: str | None = None) -> list[Path]:
    """All shard files of a corpus (optionally of one split), in a stable sorted order."""
    root = Path(corpus) / SHARDS_DIR
    pattern = f"split={split}/dataset=*/part-*.parquet" if split else "split=*/dataset=*/part-*.parquet"
    return sorted(root.glob(pattern))


def check_table(table: pa.Table, schema: pa.Schema, where: str) -> pa.Table:
    """Return ``table`` cast to ``schema`` (same column order), or raise a one-line ValueError naming ``where``."""
    missing = [n for n in schema.names if n not in table.column_names]
    if missing:
        raise ValueError(f"{where}: missing column(s) {', '.join(missing)}")
    table = table.select(schema.names)
    try:
        return table.cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise ValueError(f"{where}: columns do not match the corpus schema ({exc})") from None


def content_hash(gene_idx, counts) -> str:
    """Digest of one harmonised expression profile, used for exact deduplication.

    ``gene_idx`` are indices into the *reference gene table* (curation.genes), ``counts`` the raw counts
    aligned with them (zeros already removed). Two samples get the same hash iff they have identical
    non-zero entries on identical genes, whatever dataset or gene panel they came from.
    """
    import hashlib

    import numpy as np

    h = hashlib.blake2b(digest_size=16)
    h.update(np.ascontiguousarray(gene_idx, dtype="<i4").tobytes())
    h.update(np.ascontiguousarray(counts, dtype="<f4").tobytes())
    return h.hexdigest()
