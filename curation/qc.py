"""Sample and gene quality control, as pure functions on CSR chunks (streaming, two passes).

Paper defaults (TxFM, single-cell): keep cells with ≥ 2,000 detected genes, then genes detected in ≥ 1,000 of the
passing cells. Bulk defaults are 0 / 0 / 0: a bulk file's gene list *is* its measured panel — a gene with no reads
in every sample of a study is a measured zero, not an unmeasured gene — and bulk libraries are deep, so only an
explicit per-dataset ``min_library_size`` / ``min_genes_per_cell`` removes samples.

A sample holding any non-finite or negative value (anywhere in the raw row, mapped gene or not: it means the file is
not raw counts, or is corrupt) is dropped and counted — never repaired. Detected genes and library size are counted
over all *mapped* genes (the cell filter is local to the cell); the gene filter then uses detection counts over the
passing cells, accumulated by :class:`GeneDetectionCounter` in O(n_genes) memory during pass 1. The filters are
applied once each (cells, then genes), as in the paper; ``n_genes_detected`` stored later is over the final panel.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

import numpy as np
import scipy.sparse as sp

from curation.io import CurationError

#: Why a sample is dropped; a sample failing several checks counts under the first one. ``excluded``: removed
#: by the dataset's ``sample_filter`` (e.g. MIX-seq doublets, an assay family), before any count-based check.
DROP_REASONS = ("excluded", "non_finite", "negative", "low_genes", "low_library")

_DEFAULTS: dict[str, dict[str, float]] = {
    "single_cell": {"min_genes_per_cell": 2000, "min_cells_per_gene": 1000, "min_library_size": 0},
    "bulk": {"min_genes_per_cell": 0, "min_cells_per_gene": 0, "min_library_size": 0},
}


@dataclass(frozen=True)
class QCConfig:
    """Thresholds. Genes and cells are counts (≥ 0); ``min_library_size`` is in raw counts (UMIs or reads)."""

    min_genes_per_cell: int
    min_cells_per_gene: int
    min_library_size: float

    @classmethod
    def for_modality(cls, modality: str, overrides: Mapping[str, Any] | None = None,
                     where: str = "qc") -> "QCConfig":
        """Defaults for ``modality`` ("single_cell" | "bulk") updated with the dataset's ``qc:`` entries."""
        if modality not in _DEFAULTS:
            raise CurationError(None, f"{where}: unknown modality {modality!r}; expected one of {tuple(_DEFAULTS)}")
        values = dict(_DEFAULTS[modality])
        for key, value in (overrides or {}).items():
            if key not in values:
                raise CurationError(None, f"{where}: unknown QC setting {key!r}; expected one of {tuple(values)}")
            if value is None:
                continue  # null in YAML: keep the modality default
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
                raise CurationError(None, f"{where}.{key}: expected a number ≥ 0, got {value!r}")
            values[key] = value
        for key in ("min_genes_per_cell", "min_cells_per_gene"):
            if values[key] != int(values[key]):
                raise CurationError(None, f"{where}.{key}: expected a whole number, got {values[key]!r}")
        return cls(min_genes_per_cell=int(values["min_genes_per_cell"]),
                   min_cells_per_gene=int(values["min_cells_per_gene"]),
                   min_library_size=float(values["min_library_size"]))

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def row_sums(counts: sp.csr_matrix) -> np.ndarray:
    """Per-row sums of a CSR matrix, float64 (n_rows,), accumulated in float64 in stored order.

    Exact for integer counts (up to 2**53). ``csr.sum(axis=1, dtype=np.float64)`` is NOT: scipy multiplies by
    a ones vector of the matrix's own dtype first, so float32 counts are summed in float32 (a 17M-read bulk
    sample comes out off by a few reads). Every library size in curation and validation uses this function,
    so the same counts always give bit-identical sums.
    """
    counts = sp.csr_matrix(counts)
    rows = np.repeat(np.arange(counts.shape[0]), np.diff(counts.indptr))
    sums = np.bincount(rows, weights=counts.data.astype(np.float64), minlength=counts.shape[0])
    return sums.astype(np.float64, copy=False)  # bincount of an empty matrix is int64 zeros


def invalid_rows(counts: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``counts`` (n_samples × n_features) holding a non-finite / a negative value: two (n_samples,) bool."""
    counts = sp.csr_matrix(counts)
    row_of_entry = np.repeat(np.arange(counts.shape[0]), np.diff(counts.indptr))
    values = counts.data
    non_finite = np.zeros(counts.shape[0], dtype=bool)
    negative = np.zeros(counts.shape[0], dtype=bool)
    non_finite[row_of_entry[~np.isfinite(values)]] = True
    negative[row_of_entry[values < 0]] = True  # -inf is non-finite first; NaN < 0 is False
    return non_finite, negative


def cell_pass_mask(chunk: sp.csr_matrix, qc: QCConfig, raw: sp.csr_matrix | None = None,
                   excluded: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Which samples of ``chunk`` pass the cell filter.

    ``chunk``: (n_samples × n_mapped_genes) harmonised counts; ``raw``: the same samples' unharmonised
    (n_samples × n_features) counts, checked for non-finite / negative values (``chunk`` itself when None);
    ``excluded``: (n_samples,) bool, samples removed by the dataset's sample_filter (see :func:`sample_filter_mask`).
    Returns ``mask`` (n_samples,) bool and ``reasons`` (n_samples,) str: "" for a passing sample, else the first
    failing entry of :data:`DROP_REASONS`.
    """
    chunk = sp.csr_matrix(chunk)
    source = chunk if raw is None else sp.csr_matrix(raw)
    if source.shape[0] != chunk.shape[0]:
        raise ValueError(f"cell_pass_mask: raw has {source.shape[0]} rows, chunk has {chunk.shape[0]}")
    non_finite, negative = invalid_rows(source)
    detected = np.diff(sp.csr_matrix(chunk > 0).indptr)
    library = row_sums(chunk)
    reasons = np.full(chunk.shape[0], "", dtype=f"<U{max(map(len, DROP_REASONS))}")
    # Assign in reverse order so that the first failing reason is the one that sticks.
    reasons[library < qc.min_library_size] = "low_library"
    reasons[detected < qc.min_genes_per_cell] = "low_genes"
    reasons[negative] = "negative"
    reasons[non_finite] = "non_finite"
    if excluded is not None:
        reasons[np.asarray(excluded, dtype=bool)] = "excluded"
    return reasons == "", reasons


def check_sample_filter(spec: Mapping[str, Any] | None, where: str) -> dict[str, dict[str, list[str]]]:
    """Validate ``sample_filter: {keep: {column: [values]}, drop: {column: [values]}}``; returns it normalised.

    A sample is kept when, for every ``keep`` column, its value is listed, and for no ``drop`` column its value
    is listed. Values compare as strings (a numeric column's 1 matches "1").
    """
    spec = dict(spec or {})
    unknown = sorted(set(spec) - {"keep", "drop"})
    if unknown:
        raise CurationError(None, f"{where}: unknown key(s) {', '.join(unknown)} (expected keep, drop)")
    out: dict[str, dict[str, list[str]]] = {}
    for kind in ("keep", "drop"):
        rules = spec.get(kind) or {}
        if not isinstance(rules, Mapping):
            raise CurationError(None, f"{where}.{kind}: expected a mapping column -> list of values")
        out[kind] = {}
        for column, values in rules.items():
            values = [values] if isinstance(values, str) else list(values or [])
            if not values:
                raise CurationError(None, f"{where}.{kind}.{column}: empty list of values")
            out[kind][str(column)] = [str(v) for v in values]
    return out


class GeneDetectionCounter:
    """Per-gene number of passing samples with a count > 0, accumulated over chunks in O(n_genes) memory."""

    def __init__(self, n_genes: int):
        self.n_genes = int(n_genes)
        self.n_samples = 0
        self.detected = np.zeros(self.n_genes, dtype=np.int64)  # (n_genes,) samples with count > 0

    def update(self, chunk: sp.csr_matrix, mask: np.ndarray | None = None) -> None:
        """Add the rows of ``chunk`` (n_samples × n_genes) selected by ``mask`` (n_samples,) bool (all if None)."""
        chunk = sp.csr_matrix(chunk)
        if chunk.shape[1] != self.n_genes:
            raise ValueError(f"GeneDetectionCounter: chunk has {chunk.shape[1]} genes, counter {self.n_genes}")
        if mask is not None:
            chunk = chunk[np.asarray(mask, dtype=bool)]
        positive = chunk.indices[chunk.data > 0]
        self.detected += np.bincount(positive, minlength=self.n_genes)
        self.n_samples += chunk.shape[0]

    def kept(self, min_cells_per_gene: int) -> np.ndarray:
        """(n_genes,) bool: genes detected in at least ``min_cells_per_gene`` of the counted samples."""
        return self.detected >= min_cells_per_gene


@dataclass
class QCTally:
    """Running counts of samples seen, kept and dropped by reason."""

    n_input: int = 0
    n_passed: int = 0
    excluded: int = 0
    non_finite: int = 0
    negative: int = 0
    low_genes: int = 0
    low_library: int = 0

    def add(self, reasons: np.ndarray) -> None:
        """Count one chunk's ``reasons`` (n_samples,) as returned by :func:`cell_pass_mask`."""
        self.n_input += len(reasons)
        self.n_passed += int((reasons == "").sum())
        for reason in DROP_REASONS:
            setattr(self, reason, getattr(self, reason) + int((reasons == reason).sum()))

    def dropped(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name in DROP_REASONS}
