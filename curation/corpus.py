"""Build the DiverseRNA corpus from curated intermediates, and validate a built corpus.

``build_corpus`` reads every configured dataset's ``<work>/curated/<name>/samples.parquet`` (reference gene
index, ``split=""``) and ``report.json`` (with the measured ``panel``), drops the samples that dedup
(``<work>/dedup/removed.parquet``) and phenoprint (``<work>/curated/<name>/phenoprint.parquet``) removed,
assigns each dataset's batches to train / val, remaps ``gene_idx`` to the corpus index (the sorted union of
all panels) and writes the layout described in ``curation/schema.py``.

Guarantees:

* Streaming — samples are read and written in bounded record batches; memory does not grow with the number
  of samples (only with the number of removed samples and of batches).
* Deterministic — datasets in name order, samples in curated-file order, fixed Parquet options and no
  timestamps, so rebuilding from the same intermediates gives byte-identical files and manifest.
* Atomic — everything is written into a hidden sibling directory (``.<name>.tmp-<pid>``, each shard itself via
  ``atomic_path``) that replaces ``out_dir`` only once complete; a crash leaves no visible partial shard, and
  the next run removes the leftovers. An existing corpus is first renamed aside (``.<name>.old-<pid>``) and
  deleted after the new one is in place; if a build dies between those two renames, the next build restores it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from curation import intermediates, schema
from curation.config import config_digest
from curation.io import CurationError, atomic_path, file_digest, one_line

#: Rows per record batch read from a curated file (bounded memory: ~ this × genes detected per sample).
READ_BATCH_ROWS = schema.ROW_GROUP_ROWS
#: How many of a dataset's unmapped gene identifiers the manifest and data card quote.
UNMAPPED_EXAMPLES = 10


@dataclass
class DatasetInput:
    """One dataset's curated intermediates and what build_corpus derived from them."""

    name: str
    spec: dict
    samples_path: Path
    report: dict
    panel: np.ndarray  # (n_panel,) int64 sorted reference indices of the measured genes
    dedup_ids: pa.Array  # string sample ids that dedup removed from this dataset
    phenoprint_ids: pa.Array  # string sample ids that phenoprint pruned
    dedup_removed: pa.Table  # the dedup rows of this dataset (reason, duplicate_of_dataset, …)
    batch_sizes: dict[str, int] = field(default_factory=dict)  # samples kept per batch
    n_input: int = 0  # rows in samples.parquet (after QC)
    n_dedup: int = 0  # rows actually removed as duplicates
    n_phenoprint: int = 0  # rows actually removed by phenoprint (and not already by dedup)


# --------------------------------------------------------------------------------------------- build


def build_corpus(config: Mapping[str, Any], out_dir: Path | None = None, progress: bool = True,
                 gene_table: Any | None = None) -> dict:
    """Build the corpus described by a loaded config into ``out_dir`` (default ``config["corpus_dir"]``).

    ``gene_table`` is a ``curation.genes.GeneTable`` (loaded from the shipped tables when None); only its
    ``.genes`` DataFrame (columns gene_id, symbol, biotype; row = reference index) is used.
    Returns the manifest (also written to ``<out_dir>/manifest.json``).
    Raises ``CurationError`` when an intermediate is missing or malformed.
    """
    out_dir = Path(out_dir if out_dir is not None else config["corpus_dir"])
    work_dir = Path(config["work_dir"])
    genes = _reference_genes(gene_table)
    inputs = _load_inputs(config, work_dir, n_reference=len(genes))
    for dataset in inputs:
        _count_batches(dataset)
    splits = {d.name: _assign_splits(d) for d in inputs}

    _remove_stale_builds(out_dir)
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    try:
        with atomic_path(out_dir) as tmp:
            manifest = _build_into(tmp, config, inputs, splits, genes, progress)
            # A directory cannot be renamed over a non-empty one: move the previous corpus aside first.
            if out_dir.exists():
                os.replace(out_dir, old)
    except BaseException:
        if old.exists() and not out_dir.exists():
            os.replace(old, out_dir)  # the new corpus failed to land: keep the previous one
        raise
    shutil.rmtree(old, ignore_errors=True)
    return manifest


def _build_into(corpus_dir: Path, config: Mapping[str, Any], inputs: list[DatasetInput],
                splits: dict[str, dict[str, str]], genes, progress: bool) -> dict:
    """Write every corpus file into the (empty, hidden) directory ``corpus_dir``; returns the manifest."""
    from curation.datacard import write_datacard

    union = np.unique(np.concatenate([d.panel for d in inputs])) if inputs else np.zeros(0, np.int64)
    corpus_dir.mkdir(parents=True)
    _write_genes(corpus_dir / schema.GENES_FILE, union, genes)
    shard_rows: dict[tuple[str, str], int] = {}
    with tqdm(total=sum(d.n_input for d in inputs), unit="samples", desc="build corpus",
              disable=not progress) as bar:
        for dataset in inputs:
            shard_rows.update(_write_dataset_shards(corpus_dir, dataset, splits[dataset.name], union, bar))
    n_samples = {d.name: sum(n for (_, name), n in shard_rows.items() if name == d.name) for d in inputs}
    _write_datasets_table(corpus_dir / schema.DATASETS_FILE, inputs, union, n_samples)
    manifest = _manifest(corpus_dir, config, inputs, splits, shard_rows)
    with atomic_path(corpus_dir / schema.MANIFEST_FILE) as path:
        path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    write_datacard(corpus_dir, manifest["datasets"])
    return manifest


def _reference_genes(gene_table: Any | None):
    """The reference gene table's DataFrame (gene_id, symbol, biotype), row = reference index."""
    if gene_table is None:
        from curation.genes import GeneTable

        gene_table = GeneTable.load()
    genes = gene_table.genes
    missing = [c for c in ("gene_id", "symbol", "biotype") if c not in genes.columns]
    if missing:
        raise CurationError(None, f"reference gene table: missing column(s) {', '.join(missing)}")
    return genes


def _load_inputs(config: Mapping[str, Any], work_dir: Path, n_reference: int) -> list[DatasetInput]:
    """Locate and check every dataset's curated files; read the (small) removal lists."""
    removed = intermediates.read_dedup_removals(work_dir)
    inputs = []
    for name in sorted(config["datasets"]):
        spec = config["datasets"][name]
        paths = intermediates.curated_paths(work_dir, name)
        intermediates.require_curated(paths)
        report = intermediates.read_report(paths.report)
        panel = intermediates.report_panel(report, paths.report, n_reference)
        intermediates.check_samples_columns(paths.samples, schema.SAMPLE_SCHEMA.names)
        if spec.get("phenoprint", {}).get("enabled"):
            phenoprint_ids = intermediates.read_phenoprint_pruned(paths)
        else:
            phenoprint_ids = pa.array([], pa.string())
        mine = removed.filter(pc.equal(removed["dataset"], name))
        inputs.append(DatasetInput(name=name, spec=spec, samples_path=paths.samples, report=report, panel=panel,
                                   dedup_ids=mine["sample_id"].combine_chunks(), phenoprint_ids=phenoprint_ids,
                                   dedup_removed=mine))
    return inputs


def _iter_samples(path: Path, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    """Record batches of a curated samples file, in file order (bounded memory)."""
    parquet = pq.ParquetFile(path, pre_buffer=False)
    yield from parquet.iter_batches(batch_size=READ_BATCH_ROWS, columns=columns)


def _kept_mask(batch: pa.RecordBatch, dataset: DatasetInput) -> tuple[pa.Array, int, int]:
    """(keep mask, rows dropped by dedup, rows dropped by phenoprint only) for one record batch."""
    ids = batch.column("sample_id")
    is_dup = pc.is_in(ids, value_set=dataset.dedup_ids)
    is_pruned = pc.and_(pc.is_in(ids, value_set=dataset.phenoprint_ids), pc.invert(is_dup))
    keep = pc.invert(pc.or_(is_dup, is_pruned))
    return keep, pc.sum(is_dup).as_py() or 0, pc.sum(is_pruned).as_py() or 0


def _count_batches(dataset: DatasetInput) -> None:
    """First, metadata-only pass: kept samples per batch and removal counts (reads sample_id and batch)."""
    sizes: Counter[str] = Counter()
    for batch in _iter_samples(dataset.samples_path, columns=["sample_id", "batch"]):
        keep, n_dup, n_pruned = _kept_mask(batch, dataset)
        dataset.n_input += batch.num_rows
        dataset.n_dedup += n_dup
        dataset.n_phenoprint += n_pruned
        kept = batch.column("batch").filter(keep)
        if kept.null_count:
            raise CurationError(dataset.samples_path, "column batch has nulls")
        for entry in pc.value_counts(kept).to_pylist():
            sizes[entry["values"]] += entry["counts"]
    dataset.batch_sizes = dict(sorted(sizes.items()))


def _assign_splits(dataset: DatasetInput) -> dict[str, str]:
    """{batch: "train" | "val"} for the dataset's kept batches (curation.splits decides)."""
    from curation.splits import assign_splits

    batches = list(dataset.batch_sizes)
    if not batches:
        return {}
    assignment = assign_splits(batches, dataset.name, dataset.spec["val_fraction"], dataset.spec["seed"],
                               dataset.batch_sizes)
    wrong = {split for split in assignment.values() if split not in schema.SPLITS}
    if set(assignment) != set(batches) or wrong:
        raise CurationError(None, f"{dataset.name}: splits.assign_splits returned an incomplete or invalid "
                                  "batch assignment")
    return {batch: assignment[batch] for batch in batches}


def _write_genes(path: Path, union: np.ndarray, genes) -> None:
    """genes.parquet: corpus gene_idx 0..n-1 over the sorted union of panels (reference indices ``union``)."""
    rows = genes.iloc[union]
    table = pa.table({
        "gene_idx": pa.array(np.arange(len(union), dtype=np.int32)),
        "gene_id": pa.array(rows["gene_id"].astype(str).to_numpy(), pa.string()),
        "symbol": pa.array(rows["symbol"].to_numpy(), pa.string(), from_pandas=True),
        "biotype": pa.array(rows["biotype"].to_numpy(), pa.string(), from_pandas=True),
    }, schema=schema.GENES_SCHEMA)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", store_schema=False)


def _write_datasets_table(path: Path, inputs: list[DatasetInput], union: np.ndarray,
                          n_samples: dict[str, int]) -> None:
    rows = [{"dataset": d.name, "modality": d.spec["modality"], "n_samples": n_samples[d.name],
             "n_genes": int(d.panel.size),
             "measured_gene_idx": np.searchsorted(union, d.panel).astype(np.int32).tolist(),
             "source": d.spec.get("source"), "licence": d.spec.get("licence")} for d in inputs]
    table = pa.Table.from_pylist(rows, schema=schema.DATASETS_SCHEMA)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", store_schema=False)


class PartitionWriter:
    """Writes one (split, dataset) partition: ``part-NNNNN.parquet`` files of ``SHARD_ROWS`` rows in row
    groups of exactly ``ROW_GROUP_ROWS`` rows (the last ones shorter), each file via ``atomic_path``.

    Incoming record batches of any size are buffered up to one row group, so the file layout depends only
    on the row sequence, not on how the input was chunked.
    """

    def __init__(self, corpus_dir: Path, split: str, dataset: str):
        self.corpus_dir, self.split, self.dataset = corpus_dir, split, dataset
        self.rows_written = 0
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self._part = 0
        self._rows_in_part = 0
        self._writer: pq.ParquetWriter | None = None
        self._file: contextlib.ExitStack | None = None

    def write(self, batch: pa.RecordBatch) -> None:
        """Append rows (SAMPLE_SCHEMA, this partition's split and dataset)."""
        if batch.num_rows == 0:
            return
        self._pending.append(batch)
        self._pending_rows += batch.num_rows
        while self._pending_rows >= schema.ROW_GROUP_ROWS:
            self._write_row_group(self._take(schema.ROW_GROUP_ROWS))

    def close(self) -> None:
        """Flush the last partial row group and commit the open part file."""
        if self._pending_rows:
            self._write_row_group(self._take(self._pending_rows))
        self._close_part()

    def abort(self) -> None:
        """Drop the open part file (its temporary file is removed; nothing becomes visible)."""
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()
        if self._file is not None:
            error = RuntimeError("partition write aborted")
            self._file.__exit__(type(error), error, None)
        self._writer, self._file = None, None

    def _take(self, n_rows: int) -> pa.Table:
        table = pa.Table.from_batches(self._pending, schema=schema.SAMPLE_SCHEMA)
        head, rest = table.slice(0, n_rows), table.slice(n_rows)
        self._pending, self._pending_rows = rest.to_batches(), rest.num_rows
        return head

    def _write_row_group(self, table: pa.Table) -> None:
        if self._writer is None:
            self._file = contextlib.ExitStack()
            final = schema.shard_path(self.corpus_dir, self.split, self.dataset, self._part)
            tmp = self._file.enter_context(atomic_path(final))
            self._writer = pq.ParquetWriter(tmp, schema.SAMPLE_SCHEMA, **schema.PARQUET_WRITE_OPTIONS)
        self._writer.write_table(table, row_group_size=schema.ROW_GROUP_ROWS)
        self._rows_in_part += table.num_rows
        self.rows_written += table.num_rows
        if self._rows_in_part >= schema.SHARD_ROWS:
            self._close_part()

    def _close_part(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._file.close()  # renames the finished part onto its final name
        self._writer, self._file = None, None
        self._part += 1
        self._rows_in_part = 0


def remap_gene_idx(column: pa.ListArray, lookup: np.ndarray) -> tuple[pa.ListArray, bool]:
    """Map a list<int32> column of reference indices through ``lookup`` (reference → corpus, -1 = not allowed).

    Vectorised over the flattened values. Returns the remapped column (same list offsets) and whether every
    value mapped to a valid (≥ 0) index.
    """
    offsets = column.offsets.to_numpy()
    start, end = int(offsets[0]), int(offsets[-1])
    values = column.values.slice(start, end - start).to_numpy(zero_copy_only=False)
    if values.size and (values.min() < 0 or values.max() >= lookup.size):
        return column, False
    mapped = lookup[values]
    ok = bool(np.all(mapped >= 0))
    new_offsets = pa.array((offsets - start).astype(np.int32))
    return pa.ListArray.from_arrays(new_offsets, pa.array(mapped.astype(np.int32))), ok


def _write_dataset_shards(corpus_dir: Path, dataset: DatasetInput, split_of_batch: dict[str, str],
                          union: np.ndarray, bar: tqdm) -> dict[tuple[str, str], int]:
    """Stream one dataset's kept samples into its train / val partitions; returns rows per (split, name)."""
    lookup = np.full(int(union.max()) + 1 if union.size else 0, -1, dtype=np.int64)
    lookup[dataset.panel] = np.searchsorted(union, dataset.panel)  # genes outside the panel stay -1
    val_batches = pa.array(sorted(b for b, s in split_of_batch.items() if s == "val"), pa.string())
    writers = {split: PartitionWriter(corpus_dir, split, dataset.name) for split in schema.SPLITS}
    where = dataset.samples_path
    try:
        for batch in _iter_samples(where, columns=list(schema.SAMPLE_SCHEMA.names)):
            bar.update(batch.num_rows)
            keep, _, _ = _kept_mask(batch, dataset)
            batch = _checked_batch(batch.filter(keep), dataset)
            gene_idx, ok = remap_gene_idx(batch.column("gene_idx"), lookup)
            if not ok:
                raise CurationError(where, "gene_idx has genes outside the dataset's panel in report.json")
            is_val = pc.is_in(batch.column("batch"), value_set=val_batches)
            for split, mask in (("train", pc.invert(is_val)), ("val", is_val)):
                part = batch.filter(mask)
                if part.num_rows:
                    writers[split].write(_with_corpus_columns(part, split, gene_idx.filter(mask)))
        for writer in writers.values():
            writer.close()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    return {(split, dataset.name): w.rows_written for split, w in writers.items() if w.rows_written}


def _checked_batch(batch: pa.RecordBatch, dataset: DatasetInput) -> pa.RecordBatch:
    """Cast to SAMPLE_SCHEMA and reject rows the schema forbids (nulls, a foreign dataset name)."""
    where = dataset.samples_path
    try:
        table = schema.check_table(pa.Table.from_batches([batch]), schema.SAMPLE_SCHEMA, str(where))
    except ValueError as exc:
        raise CurationError(None, str(exc)) from None
    for name in schema.SAMPLE_SCHEMA.names:
        if not schema.SAMPLE_SCHEMA.field(name).nullable and table[name].null_count:
            raise CurationError(where, f"column {name} has nulls")
    if table.num_rows and not pc.all(pc.equal(table["dataset"], dataset.name)).as_py():
        raise CurationError(where, f"column dataset has values other than {dataset.name!r}")
    return table.combine_chunks().to_batches()[0] if table.num_rows else pa.RecordBatch.from_pylist(
        [], schema=schema.SAMPLE_SCHEMA)


def _with_corpus_columns(batch: pa.RecordBatch, split: str, gene_idx: pa.Array) -> pa.RecordBatch:
    """The batch with its split set and gene_idx replaced by corpus indices."""
    columns = {name: batch.column(name) for name in schema.SAMPLE_SCHEMA.names}
    columns["split"] = pa.array([split] * batch.num_rows, pa.string())
    columns["gene_idx"] = gene_idx
    return pa.RecordBatch.from_arrays(list(columns.values()), schema=schema.SAMPLE_SCHEMA)


def _manifest(corpus_dir: Path, config: Mapping[str, Any], inputs: list[DatasetInput],
              splits: dict[str, dict[str, str]], shard_rows: dict[tuple[str, str], int]) -> dict:
    """Everything needed to verify and describe the corpus; no timestamps (rebuilds are identical)."""
    shards = []
    for path in schema.list_shards(corpus_dir):
        metadata = pq.read_metadata(path)
        shards.append({"path": path.relative_to(corpus_dir).as_posix(), "rows": metadata.num_rows,
                       "bytes": path.stat().st_size, "sha256": file_digest(path)})
    shards.sort(key=lambda s: s["path"])
    raw_dir = Path(config["raw_dir"])
    datasets = {d.name: _dataset_summary(d, splits[d.name], shard_rows, raw_dir) for d in inputs}
    return {
        "format_version": schema.FORMAT_VERSION,
        "config_sha256": config_digest(config),
        "n_genes": int(pq.read_metadata(corpus_dir / schema.GENES_FILE).num_rows),
        "n_samples": sum(d["n_samples"] for d in datasets.values()),
        "files": {name: file_digest(corpus_dir / name) for name in (schema.GENES_FILE, schema.DATASETS_FILE)},
        "datasets": datasets,
        "shards": shards,
    }


def _dataset_summary(dataset: DatasetInput, split_of_batch: dict[str, str],
                     shard_rows: dict[tuple[str, str], int], raw_dir: Path) -> dict:
    """Per-dataset counts for the manifest and the data card (JSON-serialisable, location-independent).

    Reads the curated report's ``n_input``, ``dropped`` ({QC reason: n}), ``mapping`` (``n_unmapped``,
    ``unmapped_examples``), ``n_genes_mapped`` and ``source_files`` when present.
    """
    report = dataset.report
    mapping = report.get("mapping") or {}
    removed = dataset.dedup_removed
    by_reason = Counter(removed["reason"].to_pylist())
    by_other = Counter(d if d is not None else "unknown" for d in removed["duplicate_of_dataset"].to_pylist())
    n_train = shard_rows.get(("train", dataset.name), 0)
    n_val = shard_rows.get(("val", dataset.name), 0)
    n_mapped = report.get("n_genes_mapped")
    return {
        "modality": dataset.spec["modality"],
        "source": dataset.spec.get("source"),
        "licence": dataset.spec.get("licence"),
        "n_genes": int(dataset.panel.size),
        "n_genes_below_qc": None if n_mapped is None else int(n_mapped) - int(dataset.panel.size),
        "n_raw_samples": report.get("n_input"),
        "n_curated": dataset.n_input,
        "qc_removed": {k: int(v) for k, v in sorted((report.get("dropped") or {}).items())},
        "dedup_removed": dataset.n_dedup,
        "dedup_removed_by_reason": dict(sorted(by_reason.items())),
        "dedup_removed_by_dataset": dict(sorted(by_other.items())),
        "phenoprint_removed": dataset.n_phenoprint,
        "n_unmapped_genes": mapping.get("n_unmapped"),
        "unmapped_gene_examples": list(mapping.get("unmapped_examples") or [])[:UNMAPPED_EXAMPLES],
        "n_samples": n_train + n_val,
        "n_train": n_train,
        "n_val": n_val,
        "train_batches": sum(1 for s in split_of_batch.values() if s == "train"),
        "val_batches": sorted(b for b, s in split_of_batch.items() if s == "val"),
        "source_files": [_relative_source(entry, raw_dir) for entry in report.get("source_files") or []],
    }


def _relative_source(entry: Mapping[str, Any], raw_dir: Path) -> dict:
    """A curated report's source-file record with its path relative to raw_dir (manifest stays portable)."""
    entry = dict(entry)
    if "path" in entry:
        with contextlib.suppress(ValueError):
            entry["path"] = Path(entry["path"]).relative_to(raw_dir).as_posix()
    return entry


def _remove_stale_builds(out_dir: Path) -> None:
    """Clean up after a killed build: its hidden temp directory, and a previous corpus it had moved aside."""
    for stale in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
        if not _pid_alive(stale.name.rsplit("-", 1)[-1]):
            shutil.rmtree(stale, ignore_errors=True)
    for old in sorted(out_dir.parent.glob(f".{out_dir.name}.old-*")):
        if _pid_alive(old.name.rsplit("-", 1)[-1]):
            continue
        if out_dir.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, out_dir)  # killed between the two renames: the old corpus is the latest complete one


def _pid_alive(pid_text: str) -> bool:
    """Whether the process whose id is in a temp-directory name still runs (and is not this process)."""
    import psutil

    return pid_text.isdigit() and int(pid_text) != os.getpid() and psutil.pid_exists(int(pid_text))


# ------------------------------------------------------------------------------------------ validate


def validate_corpus(path: Path) -> list[str]:
    """Check a built corpus; return one-line problems (empty list = valid).

    Checks: genes / datasets tables and manifest present and well-formed; every shard has the sample schema,
    the split and dataset of its partition, and matches the manifest's rows, bytes and sha256; gene_idx
    sorted, unique, in range and inside the dataset's panel; counts finite, ≥ 0 and aligned with gene_idx;
    n_genes_detected and library_size consistent; sample_id globally unique; no batch in both splits;
    per-dataset sample counts agree between shards, datasets.parquet and the manifest.
    Reads shards in record batches (memory: 8 bytes per sample for the uniqueness check).
    """
    corpus = Path(path)
    if not corpus.is_dir():
        return [f"{corpus}: not a corpus directory"]
    problems: list[str] = []
    n_genes = _validate_genes(corpus, problems)
    datasets = _validate_datasets_table(corpus, n_genes, problems)
    manifest = _validate_manifest(corpus, problems)
    if n_genes is None or datasets is None:
        return problems
    state = _ShardChecks(n_genes=n_genes, panels=datasets["panels"])
    for shard in schema.list_shards(corpus):
        _validate_shard(corpus, shard, state, problems)
    problems.extend(state.sample_id_problems(corpus))
    for (dataset, batch), splits in sorted(state.batch_splits.items()):
        if len(splits) > 1:
            problems.append(f"{corpus}: dataset {dataset} batch {batch!r} is in both splits")
    for name, expected in sorted(datasets["n_samples"].items()):
        if state.rows.get(name, 0) != expected:
            problems.append(f"{corpus / schema.DATASETS_FILE}: {name} n_samples {expected} but its shards hold "
                            f"{state.rows.get(name, 0)}")
        if manifest and manifest.get("datasets", {}).get(name, {}).get("n_samples") != expected:
            problems.append(f"{corpus / schema.MANIFEST_FILE}: {name} n_samples disagrees with "
                            f"{schema.DATASETS_FILE} ({expected})")
    for name in sorted(set(state.rows) - set(datasets["n_samples"])):
        problems.append(f"{corpus}: shards of dataset {name} which is not in {schema.DATASETS_FILE}")
    return problems


def _read_checked(path: Path, table_schema: pa.Schema, problems: list[str]) -> pa.Table | None:
    """``path`` read and checked against ``table_schema``, or None with a one-line problem recorded."""
    try:
        return schema.check_table(pq.read_table(path), table_schema, str(path))
    except (OSError, ValueError) as exc:
        problems.append(one_line(exc) if str(path) in str(exc) else f"{path}: {one_line(exc)}")
        return None


def _validate_genes(corpus: Path, problems: list[str]) -> int | None:
    """Vocabulary size, or None (with a problem recorded) when genes.parquet is unusable."""
    path = corpus / schema.GENES_FILE
    table = _read_checked(path, schema.GENES_SCHEMA, problems)
    if table is None:
        return None
    gene_idx = table["gene_idx"].to_numpy()
    if not np.array_equal(gene_idx, np.arange(table.num_rows)):
        problems.append(f"{path}: gene_idx is not 0..{table.num_rows - 1} in order")
    if table["gene_id"].null_count or len(pc.unique(table["gene_id"])) != table.num_rows:
        problems.append(f"{path}: gene_id has nulls or duplicates")
    return table.num_rows


def _validate_datasets_table(corpus: Path, n_genes: int | None, problems: list[str]) -> dict | None:
    """{"panels": {name: bool mask over genes}, "n_samples": {name: n}} or None when unusable."""
    path = corpus / schema.DATASETS_FILE
    table = _read_checked(path, schema.DATASETS_SCHEMA, problems)
    if table is None:
        return None
    panels, n_samples = {}, {}
    for row in table.to_pylist():
        name, panel = row["dataset"], np.asarray(row["measured_gene_idx"], dtype=np.int64)
        if row["modality"] not in schema.MODALITIES:
            problems.append(f"{path}: {name} has unknown modality {row['modality']!r}")
        if panel.size != row["n_genes"]:
            problems.append(f"{path}: {name} n_genes {row['n_genes']} != panel size {panel.size}")
        if np.any(np.diff(panel) <= 0):
            problems.append(f"{path}: {name} measured_gene_idx is not sorted and unique")
        mask = np.zeros(n_genes or 0, dtype=bool)
        if panel.size and (panel.min() < 0 or n_genes is None or panel.max() >= n_genes):
            problems.append(f"{path}: {name} measured_gene_idx outside genes.parquet")
        else:
            mask[panel] = True
        panels[name], n_samples[name] = mask, row["n_samples"]
    return {"panels": panels, "n_samples": n_samples}


def _validate_manifest(corpus: Path, problems: list[str]) -> dict | None:
    """Check manifest.json against the files on disk; returns it (None when unreadable)."""
    path = corpus / schema.MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        problems.append(f"{path}: unreadable ({exc})")
        return None
    if manifest.get("format_version") != schema.FORMAT_VERSION:
        problems.append(f"{path}: format_version {manifest.get('format_version')!r} != {schema.FORMAT_VERSION}")
    for name, digest in sorted(manifest.get("files", {}).items()):
        if not (corpus / name).is_file() or file_digest(corpus / name) != digest:
            problems.append(f"{corpus / name}: missing or sha256 differs from the manifest")
    listed = {entry["path"]: entry for entry in manifest.get("shards", [])}
    on_disk = {p.relative_to(corpus).as_posix() for p in schema.list_shards(corpus)}
    for rel in sorted(set(listed) - on_disk):
        problems.append(f"{corpus / rel}: listed in the manifest but missing")
    for rel in sorted(on_disk - set(listed)):
        problems.append(f"{corpus / rel}: not listed in the manifest")
    for rel in sorted(on_disk & set(listed)):
        entry, shard = listed[rel], corpus / rel
        if shard.stat().st_size != entry.get("bytes") or file_digest(shard) != entry.get("sha256"):
            problems.append(f"{shard}: size or sha256 differs from the manifest")
    return manifest


@dataclass
class _ShardChecks:
    """State carried across shards by validate_corpus."""

    n_genes: int
    panels: dict[str, np.ndarray]
    rows: Counter = field(default_factory=Counter)  # dataset -> rows in shards
    batch_splits: dict[tuple[str, str], set[str]] = field(default_factory=dict)
    id_hashes: list[np.ndarray] = field(default_factory=list)  # uint64 hashes of every sample_id
    shards: list[Path] = field(default_factory=list)

    def sample_id_problems(self, corpus: Path) -> list[str]:
        """Duplicate sample ids: hash collisions found in memory, confirmed on the exact strings."""
        import pandas as pd

        hashes = np.sort(np.concatenate(self.id_hashes)) if self.id_hashes else np.zeros(0, np.uint64)
        repeated = np.unique(hashes[1:][hashes[1:] == hashes[:-1]])
        if repeated.size == 0:
            return []
        seen: Counter[str] = Counter()
        for shard in self.shards:
            for batch in pq.ParquetFile(shard, pre_buffer=False).iter_batches(columns=["sample_id"]):
                ids = batch.column("sample_id").to_numpy(zero_copy_only=False)
                candidates = ids[np.isin(pd.util.hash_array(ids.astype(object)), repeated)]
                seen.update(candidates.tolist())
        duplicates = sorted(i for i, n in seen.items() if n > 1)
        if not duplicates:
            return []
        return [f"{corpus}: {len(duplicates)} sample_id(s) occur more than once, e.g. {duplicates[0]!r}"]


def _validate_shard(corpus: Path, shard: Path, state: _ShardChecks, problems: list[str]) -> None:
    """Check one shard file in record batches; at most one problem per kind is reported for it."""
    import pandas as pd

    split = shard.parent.parent.name.removeprefix("split=")
    dataset = shard.parent.name.removeprefix("dataset=")
    found: dict[str, str] = {}

    def problem(kind: str, text: str) -> None:
        found.setdefault(kind, f"{shard}: {text}")

    try:
        parquet = pq.ParquetFile(shard, pre_buffer=False)
    except Exception as exc:  # noqa: BLE001 — corrupt bytes surface as many exception types; report, don't crash
        problems.append(f"{shard}: not a readable Parquet file ({one_line(exc)})")
        return
    actual = parquet.schema_arrow
    if actual.names != schema.SAMPLE_SCHEMA.names or any(
            not actual.field(n).type.equals(schema.SAMPLE_SCHEMA.field(n).type) for n in actual.names):
        problems.append(f"{shard}: schema differs from SAMPLE_SCHEMA")
        return
    panel = state.panels.get(dataset)
    if panel is None:
        problems.append(f"{shard}: dataset {dataset} is not in {schema.DATASETS_FILE}")
        return
    state.shards.append(shard)
    try:
        for batch in parquet.iter_batches(batch_size=READ_BATCH_ROWS):
            _check_sample_batch(batch, split, dataset, panel, state.n_genes, problem)
            state.rows[dataset] += batch.num_rows
            ids = batch.column("sample_id").to_numpy(zero_copy_only=False).astype(object)
            state.id_hashes.append(pd.util.hash_array(ids))
            for batch_name in pc.unique(batch.column("batch")).to_pylist():
                state.batch_splits.setdefault((dataset, batch_name), set()).add(split)
    except Exception as exc:  # noqa: BLE001 — as above: a corrupt page is a finding, not a crash
        problem("read", f"unreadable ({one_line(exc)})")
    problems.extend(found.values())


def _check_sample_batch(batch: pa.RecordBatch, split: str, dataset: str, panel: np.ndarray, n_genes: int,
                        problem) -> None:
    """Vectorised per-record-batch checks of one shard's rows; calls ``problem(kind, text)`` on failure."""
    for name in schema.SAMPLE_SCHEMA.names:
        if not schema.SAMPLE_SCHEMA.field(name).nullable and batch.column(name).null_count:
            problem(f"null-{name}", f"column {name} has nulls")
    if not pc.all(pc.equal(batch.column("split"), split)).as_py():
        problem("split", f"split column differs from its partition split={split}")
    if not pc.all(pc.equal(batch.column("dataset"), dataset)).as_py():
        problem("dataset", f"dataset column differs from its partition dataset={dataset}")
    if not pc.all(pc.starts_with(batch.column("sample_id"), f"{dataset}:")).as_py():
        problem("sample_id", f"sample_id not of the form '{dataset}:<source id>'")
    if not pc.all(pc.is_in(batch.column("modality"), value_set=pa.array(schema.MODALITIES))).as_py():
        problem("modality", "unknown modality")

    gene_idx, counts = batch.column("gene_idx"), batch.column("counts")
    offsets = gene_idx.offsets.to_numpy().astype(np.int64)
    values = gene_idx.values.slice(offsets[0], offsets[-1] - offsets[0]).to_numpy(zero_copy_only=False)
    offsets = offsets - offsets[0]
    lengths = np.diff(offsets)
    if values.size:
        if values.min() < 0 or values.max() >= n_genes:
            problem("range", f"gene_idx outside [0, {n_genes})")
        elif not panel[values].all():
            problem("panel", "gene_idx outside the dataset's measured panel")
        within_list = np.ones(values.size - 1, dtype=bool)
        starts = offsets[1:-1]
        within_list[starts[(starts > 0) & (starts < values.size)] - 1] = False
        if np.any(np.diff(values.astype(np.int64))[within_list] <= 0):
            problem("sorted", "gene_idx not sorted and unique within a sample")
    if not np.array_equal(pc.list_value_length(counts).to_numpy(zero_copy_only=False), lengths):
        problem("aligned", "counts and gene_idx lengths differ")
        return
    count_offsets = counts.offsets.to_numpy().astype(np.int64)
    count_values = counts.values.slice(count_offsets[0], count_offsets[-1] - count_offsets[0]).to_numpy(
        zero_copy_only=False).astype(np.float64)
    if not np.all(np.isfinite(count_values)) or np.any(count_values < 0):
        problem("counts", "counts not finite and >= 0")
    if not np.array_equal(batch.column("n_genes_detected").to_numpy(zero_copy_only=False), lengths):
        problem("n_genes_detected", "n_genes_detected != len(gene_idx)")
    # Exact: curation sums the same float32 values in the same order in float64 (curation.qc.row_sums).
    sums = np.bincount(np.repeat(np.arange(lengths.size), lengths), weights=count_values, minlength=lengths.size)
    library_size = batch.column("library_size").to_numpy(zero_copy_only=False)
    if not np.array_equal(library_size, sums):
        problem("library_size", "library_size != sum(counts) (exactly)")
