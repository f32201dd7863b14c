"""The curation intermediates between the per-dataset steps and build-corpus: their layout, loading and checks.

One owner for what curate, phenoprint, dedup and build-corpus exchange under ``<work>``::

    <work>/curated/<name>/samples.parquet      curate: schema.SAMPLE_SCHEMA rows (gene_idx = reference indices)
    <work>/curated/<name>/report.json          curate: written last; ``panel`` = sorted reference gene indices
    <work>/curated/<name>/phenoprint.parquet   phenoprint: pruned cells (sample_id, perturbation, reason)
    <work>/curated/<name>/phenoprint.json      phenoprint: summary
    <work>/dedup/removed.parquet               dedup: one row per removed sample
    <work>/dedup/report.json                   dedup: summary

:func:`check_panel` is THE panel check: every step that reads a panel calls it, so a panel one step accepts is
a panel every later step accepts (an empty panel is refused everywhere, first of all by curate).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation.io import CurationError, one_line

CURATED_DIR = "curated"
SAMPLES_FILE = "samples.parquet"
REPORT_FILE = "report.json"
PHENOPRINT_PRUNED_FILE = "phenoprint.parquet"
PHENOPRINT_SUMMARY_FILE = "phenoprint.json"
DEDUP_DIR = "dedup"
DEDUP_REMOVED_FILE = "removed.parquet"
DEDUP_REPORT_FILE = "report.json"


@dataclass(frozen=True)
class CuratedPaths:
    """Every file of one curated dataset (they need not exist)."""

    name: str
    directory: Path
    samples: Path
    report: Path
    phenoprint: Path
    phenoprint_summary: Path


def curated_dir(work_dir: str | Path, name: str) -> Path:
    """``<work_dir>/curated/<name>``: the directory holding one dataset's curated intermediates."""
    return Path(work_dir) / CURATED_DIR / name


def curated_paths(work_dir: str | Path, name: str) -> CuratedPaths:
    directory = curated_dir(work_dir, name)
    return CuratedPaths(name=name, directory=directory, samples=directory / SAMPLES_FILE,
                        report=directory / REPORT_FILE, phenoprint=directory / PHENOPRINT_PRUNED_FILE,
                        phenoprint_summary=directory / PHENOPRINT_SUMMARY_FILE)


def dedup_dir(work_dir: str | Path) -> Path:
    return Path(work_dir) / DEDUP_DIR


def require_curated(paths: CuratedPaths) -> None:
    """Raise the one-line 'run curate first' error when samples.parquet or report.json is missing."""
    for path in (paths.samples, paths.report):
        if not path.is_file():
            raise CurationError(path, f"missing; run `python -m curation curate --dataset {paths.name}` first")


def check_panel(values: Any, where: str | Path | None, n_reference: int | None = None) -> np.ndarray:
    """A dataset panel as int64 (n_genes,): non-empty, integer, sorted, unique, in [0, n_reference).

    ``n_reference`` (the reference gene table's size) is checked when given. Raises CurationError naming
    ``where``.
    """
    try:
        panel = np.asarray(values)
    except (TypeError, ValueError) as exc:
        raise CurationError(where, f"'panel' is not a list of reference gene indices ({one_line(exc)})") from None
    if panel.ndim != 1 or (panel.size and not np.issubdtype(panel.dtype, np.integer)):
        raise CurationError(where, "'panel' must be a flat list of integer reference gene indices")
    if panel.size == 0:
        raise CurationError(where, "'panel' is empty: no gene passed the dataset's min_cells_per_gene")
    panel = panel.astype(np.int64)
    if panel.min() < 0 or (n_reference is not None and panel.max() >= n_reference):
        bound = "" if n_reference is None else f", {n_reference}"
        raise CurationError(where, f"'panel' has indices outside the reference gene table [0{bound})")
    if np.any(np.diff(panel) <= 0):
        raise CurationError(where, "'panel' must be sorted and unique")
    return panel


def read_report(path: Path) -> dict:
    """A curated report.json as a dict (one-line CurationError when missing or not a JSON object)."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise CurationError(path, "missing; run `python -m curation curate` for this dataset first") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CurationError(path, f"not valid JSON ({one_line(exc)})") from None
    if not isinstance(data, dict):
        raise CurationError(path, "expected a JSON object")
    return data


def report_panel(report: dict, path: Path, n_reference: int | None = None) -> np.ndarray:
    """The checked panel of a loaded report (see :func:`check_panel`)."""
    if "panel" not in report:
        raise CurationError(path, "no 'panel' (measured reference gene indices)")
    return check_panel(report["panel"], path, n_reference)


def load_panel(report_path: Path, n_reference: int | None = None) -> np.ndarray:
    """Read report.json and return its checked panel, int64 (n_genes,)."""
    return report_panel(read_report(report_path), report_path, n_reference)


def open_samples(path: Path) -> pq.ParquetFile:
    """Open a curated samples.parquet for bounded-memory streaming.

    ``pre_buffer=False`` matters: with pyarrow's default (True), ``iter_batches`` buffers the selected column
    chunks of the whole file up front, so memory grows with the file (measured: 250 MB vs 53 MB for a
    210 MB file of 60k cells).
    """
    return pq.ParquetFile(path, pre_buffer=False)


def check_samples_columns(path: Path, required: Sequence[str]) -> pq.ParquetFile:
    """Open a curated samples.parquet for streaming (:func:`open_samples`) and check its ``required`` columns."""
    if not path.is_file():
        raise CurationError(path, "missing; run `python -m curation curate` for this dataset first")
    try:
        pf = open_samples(path)
    except (OSError, pa.ArrowException) as exc:
        raise CurationError(path, f"not a readable Parquet file ({one_line(exc)})") from None
    missing = [c for c in required if c not in pf.schema_arrow.names]
    if missing:
        raise CurationError(path, f"missing column(s) {', '.join(missing)}")
    return pf


def _read_small_parquet(path: Path) -> pa.Table:
    try:
        return pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise CurationError(path, f"not a readable Parquet file ({one_line(exc)})") from None


def read_dedup_removals(work_dir: str | Path) -> pa.Table:
    """dedup's removed.parquet: string columns sample_id, dataset, reason, duplicate_of_dataset."""
    path = dedup_dir(work_dir) / DEDUP_REMOVED_FILE
    if not path.is_file():
        raise CurationError(path, "missing; run `python -m curation dedup` first")
    table = _read_small_parquet(path)
    missing = [c for c in ("sample_id", "dataset", "reason") if c not in table.column_names]
    if missing:
        raise CurationError(path, f"missing column(s) {', '.join(missing)}")
    if "duplicate_of_dataset" not in table.column_names:
        table = table.append_column("duplicate_of_dataset", pa.nulls(table.num_rows, pa.string()))
    names = ("sample_id", "dataset", "reason", "duplicate_of_dataset")
    return table.select(list(names)).cast(pa.schema([(c, pa.string()) for c in names]))


def read_phenoprint_pruned(paths: CuratedPaths) -> pa.Array:
    """Sample ids that phenoprint pruned from one dataset (rows with a non-empty reason), as a string array."""
    path = paths.phenoprint
    if not path.is_file():
        raise CurationError(path, f"missing; run `python -m curation phenoprint --dataset {paths.name}` first "
                                  "(or disable phenoprint for this dataset)")
    table = _read_small_parquet(path)
    if "sample_id" not in table.column_names:
        raise CurationError(path, "missing column sample_id")
    if "reason" in table.column_names:
        reason = table["reason"].cast(pa.string())
        table = table.filter(pc.and_(pc.is_valid(reason), pc.not_equal(reason, "")))
    return table["sample_id"].cast(pa.string()).combine_chunks()
