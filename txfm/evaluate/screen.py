"""A perturbation screen to evaluate on: an AnnData of raw counts, read in row chunks (backed when a path).

Only the metadata columns the evaluation needs are held in memory (perturbation, batch, optional label);
the counts matrix is streamed ``chunk_rows`` cells at a time, so memory does not grow with the number of
cells. Bad input raises a one-line :class:`curation.io.CurationError` naming the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm.auto import tqdm

from curation.io import CurationError

#: Upper bound on float64 elements of one densified chunk (cells × genes): 4 Mi = 32 MiB.
MAX_CHUNK_ELEMENTS = 1 << 22
MIN_CHUNK_ROWS, MAX_CHUNK_ROWS = 64, 8192


def _labels(column: pd.Series) -> np.ndarray:
    """(n,) object array of str labels, None where missing (NaN / None / empty)."""
    values = column.astype(object)
    missing = values.isna().to_numpy()
    out = values.astype(str).to_numpy(dtype=object)
    out[missing | (out == "")] = None
    return out


@dataclass
class Screen:
    """A screen's metadata in memory and its counts streamed.

    ``perturbation`` (n_cells,) object labels (None = unlabelled), ``batch`` (n_cells,) int codes into
    ``batches``, ``is_control`` (n_cells,) bool, ``label`` (n_cells,) object or None, ``features``
    (n_features,) str feature names (var_names or ``var[gene_column]``).
    """

    source: Any  # AnnData (possibly backed)
    label_for_errors: str
    perturbation: np.ndarray
    batch: np.ndarray
    batches: np.ndarray
    is_control: np.ndarray
    label: np.ndarray | None
    features: pd.Series
    allow_normalised: bool = False
    opened_here: bool = False
    chunk_rows: int = field(init=False)

    def __post_init__(self) -> None:
        self.chunk_rows = int(np.clip(MAX_CHUNK_ELEMENTS // max(self.n_features, 1), MIN_CHUNK_ROWS, MAX_CHUNK_ROWS))

    @property
    def n_cells(self) -> int:
        return int(self.perturbation.size)

    @property
    def n_features(self) -> int:
        return int(self.features.size)

    @property
    def perturbation_labels(self) -> np.ndarray:
        """(n_cells,) labels with controls and unlabelled cells set to None: what gets scored/aggregated."""
        labels = self.perturbation.copy()
        labels[self.is_control] = None
        return labels

    def chunks(self, desc: str = "screen", progress: bool = True) -> Iterator[tuple[int, int, sp.csr_matrix]]:
        """Yield ``(start, stop, counts)``: rows [start, stop) as float64 CSR (n_rows × n_features)."""
        with tqdm(total=self.n_cells, desc=desc, unit="cell", disable=not progress, leave=False) as bar:
            for start in range(0, self.n_cells, self.chunk_rows):
                stop = min(start + self.chunk_rows, self.n_cells)
                block = self.source.X[start:stop]
                block = sp.csr_matrix(block, dtype=np.float64) if sp.issparse(block) else \
                    sp.csr_matrix(np.asarray(block, dtype=np.float64))
                self._check(block.data, start, stop)
                bar.update(stop - start)
                yield start, stop, block

    def _check(self, values: np.ndarray, start: int, stop: int) -> None:
        """Refuse negative / non-finite values, and non-integers unless ``allow_normalised``."""
        if values.size == 0:
            return
        if not np.isfinite(values).all() or (values < 0).any():
            raise CurationError(self.label_for_errors, f"X has negative or non-finite values in rows "
                                                       f"{start}–{stop - 1}; expected raw counts")
        if not self.allow_normalised and not np.array_equal(values, np.round(values)):
            raise CurationError(self.label_for_errors, f"X has non-integer values in rows {start}–{stop - 1}; "
                                                       "expected raw counts (--allow-normalised for TPM/CPM)")

    def close(self) -> None:
        """Close the backing file if this object opened it."""
        if self.opened_here and getattr(self.source, "file", None) is not None:
            self.source.file.close()

    def __enter__(self) -> "Screen":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_screen(adata_or_path: Any, perturbation_column: str, control_labels: Sequence[str], batch_column: str,
                label_column: str | None = None, gene_column: str | None = None,
                allow_normalised: bool = False) -> Screen:
    """Open an h5ad path (backed, read-only) or wrap an AnnData; check the columns and controls exist."""
    import anndata as ad

    if isinstance(adata_or_path, ad.AnnData):
        adata, where, opened_here = adata_or_path, "<AnnData>", False
    else:
        path = Path(os.fspath(adata_or_path))
        if not path.is_file():
            raise CurationError(path, "input AnnData file does not exist")
        try:
            adata = ad.read_h5ad(path, backed="r")
        except Exception as exc:  # noqa: BLE001 (h5py/anndata raise many types for a bad file)
            raise CurationError(path, f"cannot read as h5ad ({type(exc).__name__}: {exc})") from None
        where, opened_here = str(path), True
    try:
        return _build_screen(adata, where, opened_here, perturbation_column, list(control_labels), batch_column,
                             label_column, gene_column, allow_normalised)
    except BaseException:
        if opened_here:
            adata.file.close()
        raise


def _build_screen(adata: Any, where: str, opened_here: bool, perturbation_column: str, control_labels: list[str],
                  batch_column: str, label_column: str | None, gene_column: str | None,
                  allow_normalised: bool) -> Screen:
    obs = adata.obs
    for role, column in (("perturbation", perturbation_column), ("batch", batch_column), ("label", label_column)):
        if column is not None and column not in obs.columns:
            raise CurationError(where, f"obs has no {role} column {column!r} (columns: "
                                       f"{', '.join(map(str, obs.columns))})")
    if adata.X is None:
        raise CurationError(where, "X is empty; expected a counts matrix")
    if adata.n_obs < 2 or adata.n_vars < 1:
        raise CurationError(where, f"needs at least 2 cells and 1 feature, has {adata.n_obs} × {adata.n_vars}")
    perturbation = _labels(obs[perturbation_column])
    is_control = np.isin(perturbation.astype(str), control_labels) & (perturbation != None)  # noqa: E711
    if not is_control.any():
        examples = ", ".join(map(str, pd.unique(perturbation[perturbation != None])[:5]))  # noqa: E711
        raise CurationError(where, f"no control cells: no {perturbation_column!r} value in {control_labels} "
                                   f"(values include {examples})")
    batch_labels = _labels(obs[batch_column])
    if any(b is None for b in batch_labels):
        raise CurationError(where, f"obs column {batch_column!r} has missing batch labels")
    batch, batches = pd.factorize(batch_labels)
    if gene_column is None:
        features = pd.Series(np.asarray(adata.var_names, dtype=object), dtype=object)
    elif gene_column in adata.var.columns:
        features = adata.var[gene_column].astype(object).reset_index(drop=True)
    else:
        raise CurationError(where, f"var has no column {gene_column!r} (columns: "
                                   f"{', '.join(map(str, adata.var.columns))})")
    label = _labels(obs[label_column]) if label_column is not None else None
    return Screen(source=adata, label_for_errors=where, perturbation=perturbation, batch=batch.astype(np.int64),
                  batches=np.asarray(batches, dtype=object), is_control=is_control, label=label,
                  features=features.astype(str), allow_normalised=allow_normalised, opened_here=opened_here)
