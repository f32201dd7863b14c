"""Delimited text tables: GCT, GEO supplement tables, per-sample metadata tables."""

from __future__ import annotations

import csv
import io
import itertools
import re
from pathlib import Path
from typing import IO, Any, Iterator, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm import tqdm

from curation.io import CurationError
from curation.readers.base import (
    Reader, _BucketStore, _check_unique, _features_frame, _field_count, _first_bad, _open_binary, _reading,
    _sniff_sep, _split_fields, _text,
)


# ----------------------------------------------------------------------------------------------------
# Delimited text with genes as rows or as columns (GCT, GEO tables)
# ----------------------------------------------------------------------------------------------------
def _text_blocks(fh: IO[str], where: str, *, sep: str, n_fields: int, first_line_no: int, rows_per_block: int,
                 quoted: bool, skip_prefixes: tuple[str, ...] = ()) -> Iterator[tuple[list[int], list[str]]]:
    """Yield (line numbers, lines) blocks of data lines, each checked to hold exactly ``n_fields`` fields.

    Blank lines and lines starting with ``skip_prefixes`` are skipped. Line numbers are 1-based.
    """
    line_no = first_line_no
    while True:
        lines = list(itertools.islice(fh, rows_per_block))
        if not lines:
            return
        kept_numbers: list[int] = []
        kept: list[str] = []
        for offset, line in enumerate(lines):
            if not line.strip() or (skip_prefixes and line.startswith(skip_prefixes)):
                continue
            n = _field_count(line, sep, quoted)
            if n != n_fields:
                raise CurationError(where, f"line {line_no + offset} has {n} columns but the header has {n_fields}")
            kept_numbers.append(line_no + offset)
            kept.append(line if line.endswith("\n") else line + "\n")
        line_no += len(lines)
        if kept:
            yield kept_numbers, kept


def _parse_numeric_block(lines: list[str], line_numbers: list[int], where: str, *, sep: str, quoted: bool,
                         label_columns: Sequence[int], header: Sequence[str]) -> tuple[np.ndarray, list[list[str]]]:
    """Parse validated lines into (values float32 (n_lines, n_value_columns), labels per label column)."""
    frame = pd.read_csv(io.StringIO("".join(lines)), sep=sep, header=None, engine="c",
                        dtype={c: str for c in label_columns},
                        quoting=csv.QUOTE_MINIMAL if quoted else csv.QUOTE_NONE)
    # Labels are split by hand: pandas would turn a gene called "NA" into NaN.
    label_set = set(label_columns)
    if label_columns:
        # maxsplit: a GTEx line has ~17k fields, and only the leading label columns are wanted here.
        split = [_split_fields(line, sep, quoted, max_fields=max(label_columns) + 1) for line in lines]
        labels = [[fields[c] for fields in split] for c in label_columns]
    else:
        labels = []
    value_columns = [c for c in range(frame.shape[1]) if c not in label_set]
    values = frame.iloc[:, value_columns]
    non_numeric = [i for i, dt in enumerate(values.dtypes) if not pd.api.types.is_numeric_dtype(dt)]
    if non_numeric:
        col = values.iloc[:, non_numeric[0]]
        numeric = pd.to_numeric(col, errors="coerce")
        k = _first_bad((numeric.isna() & col.notna()).to_numpy())
        name = header[value_columns[non_numeric[0]]]
        raise CurationError(where, f"line {line_numbers[k]}: value {col.iloc[k]!r} in column {name!r} is not a number")
    return values.to_numpy(dtype=np.float32), labels


def _bucket_gene_rows(fh: IO[str], where: str, store: _BucketStore, *, sep: str, header: list[str],
                      label_columns: Sequence[int], first_line_no: int, block_values: int, quoted: bool,
                      bar: tqdm, skip_prefixes: tuple[str, ...] = ()) -> list[list[str]]:
    """Stream a genes-as-rows table into ``store`` (its value columns are the samples).

    Returns the label columns' values for every gene row, in file order.
    """
    n_fields = len(header)
    n_values = n_fields - len(label_columns)
    rows_per_block = max(1, block_values // max(n_values, 1))
    labels: list[list[str]] = [[] for _ in label_columns]
    n_genes = 0
    for numbers, lines in _text_blocks(fh, where, sep=sep, n_fields=n_fields, first_line_no=first_line_no,
                                       rows_per_block=rows_per_block, quoted=quoted, skip_prefixes=skip_prefixes):
        values, block_labels = _parse_numeric_block(lines, numbers, where, sep=sep, quoted=quoted,
                                                    label_columns=label_columns, header=header)
        gene_rows, sample_cols = np.nonzero(values != 0)  # NaN != 0, so non-finite values are kept
        store.add(sample_cols, gene_rows + n_genes, values[gene_rows, sample_cols])
        for acc, new in zip(labels, block_labels):
            acc.extend(new)
        n_genes += len(lines)
        bar.update(len(lines))
    return labels


class GctReader(Reader):
    """GCT v1.2 (files: matrix, gzip ok): ``#1.2``, ``nrows ncols``, header ``Name Description <samples>``,
    then one tab-separated line per gene. feature_id = Name, symbol = Description."""

    fmt = "gct"

    def __init__(self, files: dict[str, Path], **common: Any) -> None:
        super().__init__(files, **common)
        self.path = files["matrix"]
        with _reading(self.path), _text(_open_binary(self.path)) as fh:
            self._declared_rows, self._header = self._read_preamble(fh)
        self._samples = self._header[2:]
        _check_unique(self._samples, self.path, "sample id")
        self.n_samples = len(self._samples)

    def _read_preamble(self, fh: IO[str]) -> tuple[int, list[str]]:
        version = fh.readline().strip()
        if version != "#1.2":
            raise CurationError(self.path, f"line 1 is {version[:40]!r}; only GCT version '#1.2' is supported")
        dims = fh.readline().split()
        if len(dims) < 2 or not all(d.isdigit() for d in dims[:2]):
            raise CurationError(self.path, "line 2 must hold 'n_rows n_columns'")
        n_rows, n_cols = int(dims[0]), int(dims[1])
        header = fh.readline().rstrip("\r\n").split("\t")
        if len(header) < 2 or header[0].lower() != "name" or header[1].lower() != "description":
            raise CurationError(self.path, f"line 3 must start with 'Name<TAB>Description', found {header[:2]!r}")
        if len(header) - 2 != n_cols:
            raise CurationError(self.path, f"line 3 names {len(header) - 2} samples but line 2 declares {n_cols}")
        return n_rows, header

    def _fill(self, store: _BucketStore, bar: tqdm) -> None:
        where = str(self.path)
        with _reading(self.path), _text(_open_binary(self.path)) as fh:
            self._read_preamble(fh)
            labels = _bucket_gene_rows(fh, where, store, sep="\t", header=self._header, label_columns=(0, 1),
                                       first_line_no=4, block_values=self.block_values, quoted=False, bar=bar)
        if len(labels[0]) != self._declared_rows:
            raise CurationError(self.path, f"line 2 declares {self._declared_rows} genes but the file holds "
                                           f"{len(labels[0])}")
        self._features = _features_frame(labels[0], labels[1])

    def _prepare(self) -> None:
        self._bucket_store(self.n_samples or 0, self._fill, total=self._declared_rows, unit="genes")

    def _pieces(self, chunk_size: int) -> Iterator[tuple[sp.csr_matrix, pd.DataFrame]]:
        self._prepare()
        yield from self._store_pieces(pd.DataFrame({"source_id": np.asarray(self._samples, dtype=object)}))


class GeoTableReader(Reader):
    """A delimited count table as found in GEO supplements (files: matrix, gzip ok).

    Options: orientation "genes_x_samples" (default) | "samples_x_genes"; sep None (sniffed: tab if
    the header holds one, else comma); gene_column (int position or header name, default 0): the
    column of row labels — gene IDs for genes_x_samples, sample IDs for samples_x_genes; symbol_column
    (genes_x_samples only): an optional second label column holding symbols. Every other column holds
    counts.
    """

    fmt = "geo_table"
    options = ("orientation", "sep", "gene_column", "symbol_column")
    _SKIP = ("!", "#")

    def __init__(self, files: dict[str, Path], orientation: str = "genes_x_samples", sep: str | None = None,
                 gene_column: int | str = 0, symbol_column: int | str | None = None, **common: Any) -> None:
        super().__init__(files, **common)
        self.path = files["matrix"]
        if orientation not in ("genes_x_samples", "samples_x_genes"):
            raise CurationError(self.path, f"reader option orientation={orientation!r}: expected "
                                           "'genes_x_samples' or 'samples_x_genes'")
        self.orientation = orientation
        with _reading(self.path), _text(_open_binary(self.path)) as fh:
            self._header_line_no, header_line, first_data = self._first_lines(fh)
        self.sep = sep if sep is not None else _sniff_sep(header_line)
        header = _split_fields(header_line, self.sep, quoted=True)
        if first_data is not None and _field_count(first_data, self.sep, True) == len(header) + 1:
            header = [""] + header  # R write.table: the row-label column has no name
        self._header = header
        label_columns = [self._column_index(gene_column, "gene_column")]
        if symbol_column is not None:
            if orientation != "genes_x_samples":
                raise CurationError(self.path, "reader option symbol_column applies to genes_x_samples only")
            label_columns.append(self._column_index(symbol_column, "symbol_column"))
        self._label_columns = tuple(label_columns)
        self._value_names = [h for i, h in enumerate(header) if i not in self._label_columns]
        if not self._value_names:
            raise CurationError(self.path, "header has no count columns")
        if orientation == "genes_x_samples":
            _check_unique(self._value_names, self.path, "sample id (column name)")
            self.n_samples = len(self._value_names)
        else:
            self.features = _features_frame(self._value_names)
            self._ids_checked_upfront = False  # sample ids are row labels, checked while streaming

    def _first_lines(self, fh: IO[str]) -> tuple[int, str, str | None]:
        """(line number of the header, header line, first data line or None), skipping GEO framing."""
        header: str | None = None
        header_no = 0
        for number, line in enumerate(fh, start=1):
            if not line.strip() or line.startswith(self._SKIP):
                continue
            if header is None:
                header, header_no = line, number
            else:
                return header_no, header, line
        if header is None:
            raise CurationError(self.path, "no header line")
        return header_no, header, None

    def _column_index(self, column: int | str, option: str) -> int:
        if isinstance(column, (int, np.integer)) and not isinstance(column, bool):
            if 0 <= column < len(self._header):
                return int(column)
        elif column in self._header:
            return self._header.index(column)
        raise CurationError(self.path, f"reader option {option}={column!r}: not a column of the header "
                                       f"({len(self._header)} columns)")

    def _skip_to_data(self, fh: IO[str]) -> None:
        for _ in range(self._header_line_no):
            fh.readline()

    def _fill(self, store: _BucketStore, bar: tqdm) -> None:
        where = str(self.path)
        with _reading(self.path), _text(_open_binary(self.path)) as fh:
            self._skip_to_data(fh)
            labels = _bucket_gene_rows(fh, where, store, sep=self.sep, header=self._header,
                                       label_columns=self._label_columns, first_line_no=self._header_line_no + 1,
                                       block_values=self.block_values, quoted=True, bar=bar,
                                       skip_prefixes=self._SKIP)
        self._features = _features_frame(labels[0], labels[1] if len(labels) > 1 else None)

    def _prepare(self) -> None:
        if self.orientation == "genes_x_samples":
            self._bucket_store(self.n_samples or 0, self._fill, total=None, unit="genes")

    def _pieces(self, chunk_size: int) -> Iterator[tuple[sp.csr_matrix, pd.DataFrame]]:
        if self.orientation == "genes_x_samples":
            self._prepare()
            yield from self._store_pieces(pd.DataFrame({"source_id": np.asarray(self._value_names, dtype=object)}))
            return
        where = str(self.path)
        rows_per_block = max(1, min(chunk_size, self.block_values // len(self._value_names)))
        with _reading(self.path), _text(_open_binary(self.path)) as fh:
            self._skip_to_data(fh)
            for numbers, lines in _text_blocks(fh, where, sep=self.sep, n_fields=len(self._header),
                                               first_line_no=self._header_line_no + 1,
                                               rows_per_block=rows_per_block, quoted=True, skip_prefixes=self._SKIP):
                values, labels = _parse_numeric_block(lines, numbers, where, sep=self.sep, quoted=True,
                                                      label_columns=self._label_columns, header=self._header)
                yield sp.csr_matrix(values), pd.DataFrame({"source_id": np.asarray(labels[0], dtype=object)})


def load_metadata_table(path: str | Path, key: str, sep: str | None = None,
                        normalise_headers: bool = False) -> pd.DataFrame:
    """Read a per-sample metadata table (CSV/TSV, gzip ok) indexed by its ``key`` column (as str).

    ``sep`` None sniffs tab vs comma from the header line. ``normalise_headers`` lower-cases column names
    and turns spaces into underscores first (GDC sample sheets: "File Name" → file_name).
    Raises CurationError for a missing file, a missing key column, empty keys or duplicate keys.
    """
    path = Path(path)
    if not path.is_file():
        raise CurationError(path, "file not found")
    def clean(name: object) -> str:
        return re.sub(r"\s+", "_", str(name).strip()).lower() if normalise_headers else str(name)

    with _reading(path):
        if sep is None:
            with _text(_open_binary(path)) as fh:
                sep = _sniff_sep(fh.readline())
        with _open_binary(path) as fh:
            columns = pd.read_csv(fh, sep=sep, nrows=0).columns
        raw_keys = [c for c in columns if clean(c) == key]
        if not raw_keys:
            raise CurationError(path, f"no key column {key!r} (columns: {', '.join(map(str, columns))})")
        with _open_binary(path) as fh:  # keys as str, so "007" keeps its zeros
            table = pd.read_csv(fh, sep=sep, dtype={raw_keys[0]: str}, low_memory=False)
    table.columns = [clean(c) for c in table.columns]
    keys = table[key]
    if keys.isna().any():
        raise CurationError(path, f"key column {key!r} is empty on row {int(np.argmax(keys.isna().to_numpy())) + 1}")
    keys = keys.astype(str)
    _check_unique(keys.to_numpy(), path, f"{key}")
    table = table.drop(columns=[key])
    table.index = pd.Index(keys.to_numpy(dtype=object), name=key)
    return table
