"""Curate one dataset: raw files → QC-filtered, gene-harmonised samples in the reference gene index space.

Outputs ``<work_dir>/curated/<name>/samples.parquet`` (``schema.SAMPLE_SCHEMA`` rows, ``gene_idx`` = reference
indices restricted to the dataset's panel, ``split=""``) and ``report.json``; the report is written last and its
existence marks the dataset as done.

Streaming in two passes over the reader's chunks, so memory is O(chunk_size × n_features + n_genes) plus 8 bytes
per sample (hashes of the source IDs, to reject duplicates):

* pass 1 — map features, apply the cell filter (local to each cell), count per-gene detection over the passing
  cells; the genes detected in ≥ ``min_cells_per_gene`` passing cells form the dataset's *panel*;
* pass 2 — re-read, re-apply the (deterministic) cell filter, restrict to the panel and write Parquet rows in row
  groups of ``schema.ROW_GROUP_ROWS`` whatever the chunk size, so the file depends only on the inputs.

Sample labels come from the reader's per-sample table (plus the optional metadata table joined on ``source_id``)
via ``spec["columns"]``: a missing batch column gives batch "all", a missing value "unknown". A missing
``source_accession`` column (or value) gives the sample ID "<dataset>:<source_id>" rather than the bare source ID:
bare IDs such as 10x barcodes repeat across unrelated datasets and would make accession-based deduplication drop
real cells; when the source IDs are true accessions (GSM…, TCGA aliquots) set ``source_accession: source_id``.
Perturbation labels are stored verbatim, so control cells keep ``control_label`` (phenoprint needs it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp
from tqdm.auto import tqdm

from curation import readers, schema
from curation.genes import GeneMapping, GeneTable
from curation.intermediates import CURATED_DIR, REPORT_FILE, SAMPLES_FILE, check_panel, curated_dir
from curation.io import CurationError, SeenIds, atomic_path, file_digest
from curation.qc import GeneDetectionCounter, QCConfig, QCTally, cell_pass_mask, check_sample_filter, row_sums

#: Obs columns that ``spec["columns"]`` can name, in SAMPLE_SCHEMA order.
LABEL_KEYS = ("batch", "perturbation", "cell_type", "tissue", "source_accession")
SINGLE_BATCH = "all"
UNKNOWN_BATCH = "unknown"


def curate_dataset(name: str, spec: Mapping[str, Any], work_dir: Path, gene_table: GeneTable | None = None,
                   chunk_size: int = 10_000, progress: bool = True) -> dict:
    """Curate dataset ``name`` described by ``spec`` (one completed ``datasets:`` entry, absolute paths).

    Writes ``<work_dir>/curated/<name>/samples.parquet`` then ``report.json`` (atomically, report last) and
    returns the report dict. Raises ``CurationError`` (one line, naming the file) on bad input.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be ≥ 1, got {chunk_size}")
    for key in ("modality", "format", "files"):
        if key not in spec:
            raise CurationError(None, f"datasets.{name}: missing key {key!r}")
    if spec["modality"] not in schema.MODALITIES:
        raise CurationError(None, f"datasets.{name}.modality: {spec['modality']!r} is not one of {schema.MODALITIES}")
    gene_table = gene_table if gene_table is not None else GeneTable.load()
    qc = QCConfig.for_modality(spec["modality"], spec.get("qc"), where=f"datasets.{name}.qc")
    columns = {key: (spec.get("columns") or {}).get(key) for key in LABEL_KEYS}
    where = _main_file(spec["files"])
    out_dir = curated_dir(work_dir, name)
    (out_dir / REPORT_FILE).unlink(missing_ok=True)  # an old report must not vouch for samples this run replaces

    reader = readers.open_reader(spec["format"], dict(spec["files"]), **_reader_options(spec, progress))
    try:
        return _curate(name, spec, out_dir, reader, gene_table, qc, columns, where, chunk_size, progress)
    finally:
        if hasattr(reader, "close"):
            reader.close()  # removes the reader's temporary bucket files


def _curate(name: str, spec: Mapping[str, Any], out_dir: Path, reader: Any, gene_table: GeneTable,
            qc: QCConfig, columns: dict[str, str | None], where: str, chunk_size: int, progress: bool) -> dict:
    """Both passes and the outputs of :func:`curate_dataset` for an open ``reader``."""
    feature_ids, symbols = _feature_table(reader.features, where)
    mapping = gene_table.map_features(feature_ids, symbols)
    mapping_report = mapping.report(feature_ids)
    if len(mapping.genes) == 0:
        raise CurationError(where, f"none of the {len(feature_ids)} features maps to a human reference gene "
                                   f"(e.g. {', '.join(mapping_report['unmapped_examples'][:3])})")
    metadata_spec = spec.get("metadata")
    metadata = None
    if metadata_spec:
        metadata = readers.load_metadata_table(metadata_spec["file"], metadata_spec["key"], metadata_spec.get("sep"))
        metadata.index = metadata.index.astype(str)
    sample_filter = check_sample_filter(spec.get("sample_filter"), f"datasets.{name}.sample_filter")
    chunks = _ChunkSource(reader, mapping, metadata, columns, qc, chunk_size, where, sample_filter)

    # Pass 1: QC statistics.
    tally = QCTally()
    detection = GeneDetectionCounter(len(mapping.genes))
    seen_ids = SeenIds(where)
    n_metadata_matched = 0
    for chunk in chunks.iterate(desc=f"{name}: pass 1/2 (QC)", progress=progress):
        seen_ids.add(chunk.obs["source_id"])
        tally.add(chunk.reasons)
        detection.update(chunk.counts, chunk.passed)
        n_metadata_matched += chunk.n_metadata_matched
    if metadata is not None and tally.n_input and n_metadata_matched == 0:
        raise CurationError(metadata_spec["file"], f"no {metadata_spec['key']!r} value matches a sample ID of "
                                                   f"dataset {name} (e.g. {seen_ids.first!r})")
    if tally.n_passed == 0:  # fail here, not at build-corpus, and before anything is written
        dropped = ", ".join(f"{reason}: {n}" for reason, n in tally.dropped().items() if n) or "none"
        raise CurationError(where, f"QC kept 0 of {tally.n_input} samples (dropped {dropped}); check the reader "
                                   f"options and qc (min_genes_per_cell = {qc.min_genes_per_cell}, "
                                   f"min_library_size = {qc.min_library_size:g})")
    panel_columns = np.flatnonzero(detection.kept(qc.min_cells_per_gene))
    panel = mapping.genes[panel_columns]
    if panel.size == 0:
        raise CurationError(where, f"empty gene panel: no gene is detected in min_cells_per_gene = "
                                   f"{qc.min_cells_per_gene} of the {tally.n_passed} passing samples")
    panel = check_panel(panel, where)  # the check every later step applies to report.json

    # Pass 2: write the passing samples restricted to the panel.
    samples_path = out_dir / SAMPLES_FILE
    labels = _LabelStats()
    with atomic_path(samples_path) as tmp:
        with pq.ParquetWriter(tmp, schema.SAMPLE_SCHEMA, **schema.PARQUET_WRITE_OPTIONS) as writer:
            buffer = _RowGroupBuffer(writer, schema.ROW_GROUP_ROWS)
            for chunk in chunks.iterate(desc=f"{name}: pass 2/2 (write)", progress=progress):
                rows = chunk.passed
                if not rows.any():
                    continue
                table = _sample_table(name, spec, chunk.counts[rows][:, panel_columns], panel,
                                      chunk.obs.loc[rows].reset_index(drop=True), columns)
                labels.add(table, spec.get("control_label"))
                buffer.append(table)
            buffer.flush()
        if labels.n_samples != tally.n_passed:  # both passes must see the same data; keep the old file if not
            raise CurationError(where, f"the reader yielded different samples in the two passes "
                                       f"({tally.n_passed} vs {labels.n_samples} passing)")

    report = {
        "dataset": name,
        "format_version": schema.FORMAT_VERSION,
        "modality": spec["modality"],
        "format": spec["format"],
        "n_input": tally.n_input,
        "n_samples": tally.n_passed,
        "dropped": tally.dropped(),
        "qc": qc.to_dict(),
        "sample_filter": sample_filter or None,
        "n_genes_mapped": int(len(mapping.genes)),
        "n_genes_panel": int(len(panel)),
        "panel": panel.astype(int).tolist(),
        "mapping": mapping_report,
        "metadata": None if metadata is None else {
            "file": str(metadata_spec["file"]), "key": metadata_spec["key"],
            "n_samples_matched": n_metadata_matched},
        "control_label": spec.get("control_label"),
        "n_control": labels.n_control,
        "n_batches": len(labels.batches),
        "chunk_size": int(chunk_size),
        # Values within float noise of an integer that the reader rounded (pass 2; see curation.readers).
        "integer_rounding": dict(getattr(reader, "rounding", None) or {"n_values_rounded": 0, "max_abs_change": 0.0}),
        "source_files": _source_files(spec["files"]),
    }
    with atomic_path(out_dir / REPORT_FILE) as tmp:
        tmp.write_text(json.dumps(report, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return report


@dataclass
class _QCChunk:
    """One reader chunk after harmonisation and the cell filter."""

    counts: sp.csr_matrix  # (n_samples × n_mapped_genes) float32, reference-gene columns
    obs: pd.DataFrame  # n_samples rows, RangeIndex: source_id + reader and metadata columns
    passed: np.ndarray  # (n_samples,) bool
    reasons: np.ndarray  # (n_samples,) str, "" = passed
    n_metadata_matched: int


@dataclass
class _ChunkSource:
    """Iterates a reader's chunks, validated, harmonised and QC-flagged (used identically by both passes)."""

    reader: Any
    mapping: GeneMapping
    metadata: pd.DataFrame | None
    columns: dict[str, str | None]
    qc: QCConfig
    chunk_size: int
    where: str
    sample_filter: dict = field(default_factory=dict)
    _checked_columns: bool = field(default=False, init=False)

    def iterate(self, desc: str, progress: bool) -> Iterator[_QCChunk]:
        total = getattr(self.reader, "n_samples", None)
        with tqdm(total=total, desc=desc, unit=" samples", disable=not progress, leave=False) as bar:
            for chunk in self.reader.chunks(self.chunk_size):
                yield self._prepare(chunk)
                bar.update(chunk.counts.shape[0])

    def _prepare(self, chunk: Any) -> _QCChunk:
        raw = chunk.counts if sp.isspmatrix_csr(chunk.counts) else sp.csr_matrix(chunk.counts)
        obs = chunk.obs
        if raw.shape[1] != self.mapping.n_features:
            raise CurationError(self.where, f"a chunk has {raw.shape[1]} feature columns but the file lists "
                                            f"{self.mapping.n_features} features")
        if len(obs) != raw.shape[0] or "source_id" not in obs.columns:
            raise CurationError(self.where, "a chunk's sample table does not match its matrix "
                                            f"({len(obs)} rows for {raw.shape[0]} samples, needs 'source_id')")
        obs = obs.reset_index(drop=True).assign(source_id=obs["source_id"].astype(str).to_numpy())
        obs, n_matched = _join_metadata(obs, self.metadata)
        if not self._checked_columns:
            _check_label_columns(obs, self.columns, self.where)
            self._checked_columns = True
        counts, _ = self.mapping.harmonise(raw)
        excluded = sample_filter_mask(obs, self.sample_filter, self.where) if self.sample_filter else None
        passed, reasons = cell_pass_mask(counts, self.qc, raw=raw, excluded=excluded)
        return _QCChunk(counts, obs, passed, reasons, n_matched)


def _main_file(files: Mapping[str, Any]) -> str:
    """The path naming a dataset in error messages: the ``matrix`` role, else the first role."""
    value = files.get("matrix", next(iter(files.values()), "")) if files else ""
    return str(value[0] if isinstance(value, (list, tuple)) and value else value)


def _reader_options(spec: Mapping[str, Any], progress: bool) -> dict:
    """The spec's reader options; unless ``allow_normalised``, every format refuses non-integer counts."""
    options = dict(spec.get("reader") or {})
    options.setdefault("allow_non_integer", bool(spec.get("allow_normalised", False)))
    options.setdefault("progress", progress)
    return options


def _feature_table(features: pd.DataFrame, where: str) -> tuple[list[str], list[str] | None]:
    """Feature IDs (n_features,) and optional symbols from a reader's ``features`` table."""
    if "feature_id" not in features.columns:
        raise CurationError(where, "the reader's feature table has no 'feature_id' column")
    if len(features) == 0:
        raise CurationError(where, "the file lists no features (genes)")
    ids = features["feature_id"].astype(str).tolist()
    symbols = features["symbol"].tolist() if "symbol" in features.columns else None
    return ids, symbols


def _join_metadata(obs: pd.DataFrame, metadata: pd.DataFrame | None) -> tuple[pd.DataFrame, int]:
    """Add the metadata table's columns (matched on ``source_id``; its values win where matched)."""
    if metadata is None:
        return obs, 0
    ids = obs["source_id"].to_numpy()
    matched = metadata.index.get_indexer(ids) >= 0
    extra = metadata.reindex(ids).reset_index(drop=True)  # index unique (load_metadata_table checks it)
    joined = obs.copy()
    for column in extra.columns:
        if column == "source_id":
            continue
        joined[column] = extra[column].where(matched, obs[column]) if column in obs.columns else extra[column]
    return joined, int(matched.sum())


def _check_label_columns(obs: pd.DataFrame, columns: Mapping[str, str | None], where: str) -> None:
    for key, column in columns.items():
        if column is not None and column not in obs.columns:
            available = ", ".join(map(str, obs.columns))
            raise CurationError(where, f"columns.{key}: no sample column {column!r} (available: {available})")


def _as_labels(values: pd.Series) -> np.ndarray:
    """Per-sample string labels (object array, None for missing); whole floats print as integers (1.0 → "1")."""
    if isinstance(values.dtype, pd.CategoricalDtype):
        values = values.astype(object)
    if pd.api.types.is_float_dtype(values.dtype):
        finite = values.dropna()
        if len(finite) and np.all(np.isfinite(finite)) and np.all(finite == np.round(finite)):
            values = values.astype("Int64")
    labels = values.astype(object).where(values.notna(), None)
    return np.array([None if v is None else str(v) for v in labels], dtype=object)


def sample_filter_mask(obs: pd.DataFrame, sample_filter: Mapping[str, Mapping[str, list[str]]], where: str
                       ) -> np.ndarray:
    """(n_samples,) bool: the samples of ``obs`` that a normalised ``sample_filter`` (qc.check_sample_filter)
    removes. Values compare as the stored labels do (:func:`_as_labels`: a float column's 1.0 is "1")."""
    excluded = np.zeros(len(obs), dtype=bool)
    for kind in ("keep", "drop"):
        for column, values in sample_filter.get(kind, {}).items():
            if column not in obs.columns:
                raise CurationError(where, f"sample_filter.{kind}: no sample column {column!r} (columns: "
                                           f"{', '.join(map(str, obs.columns))})")
            listed = np.isin(_as_labels(obs[column]), np.asarray(values, dtype=object))
            excluded |= ~listed if kind == "keep" else listed
    return excluded


def _sample_table(name: str, spec: Mapping[str, Any], counts: sp.csr_matrix, panel: np.ndarray,
                  obs: pd.DataFrame, columns: Mapping[str, str | None]) -> pa.Table:
    """SAMPLE_SCHEMA rows for passing samples. ``counts``: (n × len(panel)) CSR, columns = ``panel`` indices."""
    counts = sp.csr_matrix(counts, dtype=np.float32)
    counts.eliminate_zeros()
    counts.sort_indices()
    n = counts.shape[0]
    gene_idx = panel[counts.indices].astype(np.int32)
    values = counts.data.astype(np.float32)
    indptr = counts.indptr.astype(np.int64)
    hashes = [schema.content_hash(gene_idx[a:b], values[a:b]) for a, b in zip(indptr[:-1], indptr[1:])]
    source_ids = obs["source_id"].to_numpy(dtype=object)
    sample_ids = np.array([f"{name}:{s}" for s in source_ids], dtype=object)

    labels = {key: (_as_labels(obs[col]) if col is not None else np.full(n, None, dtype=object))
              for key, col in columns.items()}
    batch = labels["batch"]
    if columns["batch"] is None:
        batch = np.full(n, SINGLE_BATCH, dtype=object)
    else:
        batch = np.where(pd.isna(batch), UNKNOWN_BATCH, batch)
    accession = labels["source_accession"]
    accession = np.where(pd.isna(accession), sample_ids, accession)

    offsets = pa.array(indptr.astype(np.int32), type=pa.int32())
    arrays = {
        "sample_id": pa.array(sample_ids, type=pa.string()),
        "dataset": pa.array(np.full(n, name, dtype=object), type=pa.string()),
        "batch": pa.array(batch, type=pa.string()),
        "split": pa.array(np.full(n, "", dtype=object), type=pa.string()),
        "modality": pa.array(np.full(n, spec["modality"], dtype=object), type=pa.string()),
        "perturbation": pa.array(labels["perturbation"], type=pa.string()),
        "cell_type": pa.array(labels["cell_type"], type=pa.string()),
        "tissue": pa.array(labels["tissue"], type=pa.string()),
        "source_accession": pa.array(accession, type=pa.string()),
        "gene_idx": pa.ListArray.from_arrays(offsets, pa.array(gene_idx, type=pa.int32())),
        "counts": pa.ListArray.from_arrays(offsets, pa.array(values, type=pa.float32())),
        "library_size": pa.array(row_sums(counts), type=pa.float64()),
        "n_genes_detected": pa.array(np.diff(indptr).astype(np.int32), type=pa.int32()),
        "content_hash": pa.array(hashes, type=pa.string()),
    }
    table = pa.Table.from_arrays([arrays[f.name] for f in schema.SAMPLE_SCHEMA], names=schema.SAMPLE_SCHEMA.names)
    return schema.check_table(table, schema.SAMPLE_SCHEMA, f"curated dataset {name}")


class _RowGroupBuffer:
    """Collects tables and writes row groups of exactly ``rows`` rows (the last one shorter)."""

    def __init__(self, writer: pq.ParquetWriter, rows: int):
        self.writer, self.rows = writer, rows
        self.pending: list[pa.Table] = []
        self.n_pending = 0

    def append(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.n_pending += table.num_rows
        if self.n_pending >= self.rows:
            combined = pa.concat_tables(self.pending)
            n_full = (combined.num_rows // self.rows) * self.rows
            for start in range(0, n_full, self.rows):
                self._write(combined.slice(start, self.rows))
            rest = combined.slice(n_full)
            self.pending, self.n_pending = ([rest] if rest.num_rows else []), rest.num_rows

    def flush(self) -> None:
        if self.n_pending:
            self._write(pa.concat_tables(self.pending))
        self.pending, self.n_pending = [], 0

    def _write(self, table: pa.Table) -> None:
        self.writer.write_table(table.combine_chunks(), row_group_size=self.rows)


@dataclass
class _LabelStats:
    """Counts over the written samples for the report."""

    n_samples: int = 0
    n_control: int = 0
    batches: set = field(default_factory=set)

    def add(self, table: pa.Table, control_label: str | list[str] | None) -> None:
        self.n_samples += table.num_rows
        self.batches.update(table.column("batch").unique().to_pylist())
        if control_label:
            labels = [control_label] if isinstance(control_label, str) else list(control_label)
            perturbation = table.column("perturbation").to_numpy(zero_copy_only=False)
            self.n_control += int(np.isin(perturbation, np.asarray(labels, dtype=object)).sum())


def _source_files(files: Mapping[str, Any]) -> list[dict]:
    """Name, size and sha256 of every input file (directories expanded), for the corpus manifest."""
    out = []
    for role in sorted(files):
        value = files[role]
        for entry in (value if isinstance(value, (list, tuple)) else [value]):
            path = Path(entry)
            members = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
            for member in members:
                if member.is_file():
                    out.append({"role": role, "path": str(member), "bytes": member.stat().st_size,
                                "sha256": file_digest(member)})
    return out


__all__ = ["curate_dataset", "curated_dir", "CURATED_DIR", "SAMPLES_FILE", "REPORT_FILE"]
