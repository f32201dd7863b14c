"""Streaming readers for the RNA-seq file formats that feed DiverseRNA.

Every reader turns one dataset's raw files into a stream of :class:`Chunk` objects — a CSR matrix of raw
counts (samples × features, float32) plus a per-sample metadata table — in memory bounded by the chunk
size, never by the size of the input. Use :func:`open_reader`::

    reader = open_reader("10x_mtx", {"matrix": "matrix.mtx.gz", "features": "features.tsv.gz",
                                     "barcodes": "barcodes.tsv.gz"})
    reader.features            # DataFrame: feature_id (+ symbol)
    for chunk in reader.chunks(10_000):
        chunk.counts           # csr_matrix (n_samples_in_chunk, n_features) float32
        chunk.obs              # DataFrame: source_id + the format's metadata columns

``chunks()`` may be called any number of times (curation makes two passes).

Formats whose sample axis is not the file's storage order (MatrixMarket and triplet files sorted
arbitrarily, GCT / GEO tables with genes as rows, CSC-stored h5ad matrices) are transposed through a
temporary on-disk store (:class:`_BucketStore`): one streaming pass appends every non-zero entry to the
bucket file of its sample range, then each bucket is loaded alone and turned into CSR rows. The store is
built once per reader and reused by later passes; it is deleted by :meth:`Reader.close` (or when the
reader is garbage-collected).

Options shared by every format: ``progress`` (tqdm bar while bucketing, default True), ``tmp_dir``
(where bucket files go; default the system temp dir), ``block_values`` (text values parsed per block,
default 4,000,000 — bounds parsing memory), ``allow_non_integer`` (default False for h5ad, where the
check is the contract; True elsewhere — pass False to check those formats too).

Decisions worth knowing:

* Counts are returned as float32 with duplicate coordinates summed and explicit zeros removed. NaN,
  inf and negative values are passed through untouched (QC drops such samples later).
* ``star_counts``: Ensembl versions are stripped (ENSG00000000003.15 → ENSG00000000003) and the
  ``_PAR_Y`` copies of pseudo-autosomal genes are DROPPED (GDC assigns their reads to the X copy, and
  keeping them would duplicate the X gene's ID once the version is stripped).
* ``mixseq_zip`` members are streamed out of the archives without extracting them to disk; an archive
  with any absolute or ``..`` member name is refused outright all the same.
* ``geo_table`` lines starting with ``!`` or ``#`` are skipped (GEO series-matrix framing); a header one
  field shorter than the data rows (R ``write.table`` style) is read as missing the label column's name.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import itertools
import math
import os
import re
import shutil
import tempfile
import weakref
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any, Callable, ClassVar, Iterable, Iterator, Sequence

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm import tqdm

from curation.io import CurationError, SeenIds, one_line

FORMATS: tuple[str, ...] = ("h5ad", "10x_mtx", "10x_h5", "gct", "star_counts", "geo_table",
                            "sciplex_triplets", "mixseq_zip")

#: Upper bound on the number of bucket files of one on-disk store (so tiny chunk sizes cannot create
#: millions of files); buckets grow instead.
MAX_BUCKETS = 4096
#: Samples per bucket: the chunk size of the pass that builds the store, clipped to [MIN_BUCKET_ROWS,
#: BUCKET_ROWS] (and raised when MAX_BUCKETS would be exceeded). One bucket is the largest thing loaded at
#: once; the floor keeps a chunk size of 1 from scattering every parse block over thousands of files.
BUCKET_ROWS = 1024
MIN_BUCKET_ROWS = 128
#: Default number of text values (matrix cells or coordinate entries) parsed per block.
BLOCK_VALUES = 4_000_000

_GZIP_MAGIC = b"\x1f\x8b"
_MTX_HEADER = re.compile(r"^%%matrixmarket\s+matrix\s+coordinate\s+(integer|real)\s+general\s*$", re.I)
_ENSEMBL_VERSION = re.compile(r"\.\d+(?=(_PAR_Y)?$)")
_STAR_SPECIAL_PREFIX = "N_"
_STAR_COLUMNS = ("gene_id", "gene_name", "gene_type", "unstranded", "stranded_first", "stranded_second",
                 "tpm_unstranded", "fpkm_unstranded", "fpkm_uq_unstranded")


# ----------------------------------------------------------------------------------------------------
# Public data types
# ----------------------------------------------------------------------------------------------------
@dataclass
class Chunk:
    """A block of consecutive samples.

    counts: (n_samples, n_features) float32 CSR of raw counts as in the file (canonical: sorted
        indices, no duplicates, no explicit zeros).
    obs: n_samples rows with a RangeIndex; column ``source_id`` (str) first, then every metadata column
        the format carries.
    """

    counts: sp.csr_matrix
    obs: pd.DataFrame


class Reader:
    """Base class of all format readers; obtain one from :func:`open_reader`.

    Attributes:
        files: every input file or directory by role (a list role such as ``archives`` is stored as
            ``archives:<stem>`` entries).
        features: one row per column of ``Chunk.counts``: ``feature_id`` (str, as in the file) and, when
            the format carries one, ``symbol``.
        n_samples: number of samples, when it is cheaply known (else None).
    """

    fmt: ClassVar[str] = ""
    #: Option names this format accepts besides the common ones.
    options: ClassVar[tuple[str, ...]] = ()
    #: Default of ``allow_non_integer`` for the format.
    default_allow_non_integer: ClassVar[bool] = True

    def __init__(self, files: dict[str, Path], *, progress: bool = True, tmp_dir: str | Path | None = None,
                 block_values: int = BLOCK_VALUES, allow_non_integer: bool | None = None) -> None:
        if not isinstance(block_values, int) or block_values < 1:
            raise ValueError(f"block_values must be a positive integer, got {block_values!r}")
        self.files = files
        self.n_samples: int | None = None
        self.progress = bool(progress)
        self.tmp_dir = None if tmp_dir is None else Path(tmp_dir)
        self.block_values = block_values
        self.allow_non_integer = (self.default_allow_non_integer if allow_non_integer is None
                                  else bool(allow_non_integer))
        self._features: pd.DataFrame | None = None
        self._store: _BucketStore | None = None
        #: False when source ids are only seen while streaming; chunks() then checks them as it goes.
        self._ids_checked_upfront = True
        self._integer_where: Path | None = next(iter(files.values()), None)
        self._integer_problem = ("counts hold non-integer values (normalised data?); "
                                 "set allow_normalised: true to accept")

    # -- public -------------------------------------------------------------------------------------
    @property
    def features(self) -> pd.DataFrame:
        """Feature table (feature_id, optional symbol); may trigger the bucketing pass for gene-row text."""
        if self._features is None:
            self._prepare()
        assert self._features is not None
        return self._features

    @features.setter
    def features(self, value: pd.DataFrame) -> None:
        self._features = value

    @property
    def n_features(self) -> int:
        return len(self.features)

    def chunks(self, chunk_size: int = 10_000) -> Iterator[Chunk]:
        """Yield the samples in file order, ``chunk_size`` at a time (the last chunk may be smaller).

        Memory is bounded by the non-zero entries of max(chunk_size, bucket size) samples (bucketed
        formats; see BUCKET_ROWS) plus one parse block of ``block_values`` text values.
        """
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        chunk_size = int(chunk_size)
        n_features = self.n_features
        seen_ids = None if self._ids_checked_upfront else SeenIds(self._integer_where)
        produced = 0
        for counts, obs in _rechunk(self._pieces(chunk_size), chunk_size):
            counts = _canonical_csr(counts, n_features)
            if not self.allow_non_integer and _has_non_integer(counts.data):
                raise CurationError(self._integer_where, self._integer_problem)
            obs = _with_source_id_first(obs)
            if seen_ids is not None:
                seen_ids.add(obs["source_id"])
            produced += counts.shape[0]
            yield Chunk(counts=counts, obs=obs)
        if self.n_samples is not None and produced != self.n_samples:
            raise CurationError(self._integer_where, f"yielded {produced} samples but {self.n_samples} were "
                                                     "expected")

    def close(self) -> None:
        """Delete temporary bucket files (idempotent)."""
        if self._store is not None:
            self._store.cleanup()
            self._store = None

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.fmt} n_samples={self.n_samples} files={list(self.files)}>"

    # -- for subclasses -----------------------------------------------------------------------------
    def _prepare(self) -> None:
        """Fill ``self._features`` when it is not known at open time (readers that need a pass over the
        data to learn their features override this)."""
        raise NotImplementedError

    def _pieces(self, chunk_size: int) -> Iterator[tuple[sp.csr_matrix, pd.DataFrame]]:
        """Yield (counts, obs) blocks of consecutive samples in order, of any size."""
        raise NotImplementedError

    def _bucket_store(self, n_samples: int, fill: Callable[["_BucketStore", tqdm], None], total: int | None,
                      unit: str, chunk_size: int | None = None) -> "_BucketStore":
        """Build (once) and return the on-disk bucket store, filled by ``fill(store, progress_bar)``.

        ``chunk_size`` (of the pass that triggers the build, when known) sizes the buckets.
        """
        if self._store is None:
            target = BUCKET_ROWS if chunk_size is None else min(max(chunk_size, MIN_BUCKET_ROWS), BUCKET_ROWS)
            rows = max(math.ceil(n_samples / MAX_BUCKETS), min(max(n_samples, 1), target))
            store = _BucketStore(n_samples, rows, self.tmp_dir)
            try:
                with tqdm(total=total, unit=unit, unit_scale=True, desc=f"{self.fmt}: transposing",
                          disable=not self.progress, leave=False) as bar:
                    fill(store, bar)
            except BaseException:
                store.cleanup()
                raise
            self._store = store
        return self._store

    def _store_pieces(self, obs_table: pd.DataFrame) -> Iterator[tuple[sp.csr_matrix, pd.DataFrame]]:
        """Pieces from the built bucket store, with obs rows taken from ``obs_table`` by position."""
        assert self._store is not None
        for start, counts in self._store.pieces(self.n_features):
            yield counts, obs_table.iloc[start:start + counts.shape[0]]


# ----------------------------------------------------------------------------------------------------
# Shared helpers: errors, streams, checks
# ----------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _reading(where: str | os.PathLike) -> Iterator[None]:
    """Translate low-level read failures into one-line CurationErrors naming ``where``."""
    try:
        yield
    except CurationError:
        raise
    except (EOFError, zlib.error, gzip.BadGzipFile):
        raise CurationError(where, "truncated or corrupt gzip") from None
    except zipfile.BadZipFile as exc:
        raise CurationError(where, f"not a readable zip archive ({one_line(exc)})") from None
    except UnicodeDecodeError:
        raise CurationError(where, "not UTF-8 text (binary or wrongly compressed file?)") from None
    except pd.errors.EmptyDataError:
        raise CurationError(where, "file is empty") from None
    except pd.errors.ParserError as exc:
        raise CurationError(where, f"malformed table ({one_line(exc)})") from None
    except FileNotFoundError as exc:
        raise CurationError(exc.filename or where, "file not found") from None
    except OSError as exc:  # h5py raises OSError for truncated / non-HDF5 files
        raise CurationError(where, f"I/O error while reading ({one_line(exc)})") from None


def _gunzip_if_needed(raw: IO[bytes]) -> IO[bytes]:
    """Wrap a peekable binary stream in gzip decompression when it starts with the gzip magic bytes."""
    if not hasattr(raw, "peek"):
        raw = io.BufferedReader(raw)  # type: ignore[arg-type]
    head = raw.peek(2)[:2]  # type: ignore[attr-defined]
    return gzip.GzipFile(fileobj=raw, mode="rb") if head == _GZIP_MAGIC else raw


def _open_binary(path: Path) -> IO[bytes]:
    """Open a possibly gzip-compressed file (detected by content, not by name) for binary reading."""
    with open(path, "rb") as fh:
        is_gzip = fh.read(2) == _GZIP_MAGIC
    # gzip.open owns the underlying file, so closing the stream closes both.
    return gzip.open(path, "rb") if is_gzip else open(path, "rb")


def _text(stream: IO[bytes]) -> io.TextIOWrapper:
    return io.TextIOWrapper(stream, encoding="utf-8", newline=None)


def _sniff_sep(first_line: str) -> str:
    """Tab if the line holds one, else comma."""
    return "\t" if "\t" in first_line else ","


def _field_count(line: str, sep: str, quoted: bool) -> int:
    """Number of fields of one text line (quote-aware only when quoting is on and the line has quotes)."""
    line = line.rstrip("\r\n")
    if quoted and '"' in line:
        return len(next(csv.reader([line], delimiter=sep)))
    return line.count(sep) + 1


def _split_fields(line: str, sep: str, quoted: bool, max_fields: int | None = None) -> list[str]:
    """Fields of one text line; with ``max_fields`` only the leading ones are guaranteed split."""
    line = line.rstrip("\r\n")
    if quoted and '"' in line:
        return next(csv.reader([line], delimiter=sep))
    return line.split(sep) if max_fields is None else line.split(sep, max_fields)


def _check_unique(ids: Sequence[str] | pd.Index | np.ndarray, where: str | os.PathLike, what: str) -> None:
    """Raise a CurationError naming the first repeated id."""
    index = pd.Index(ids)
    if not index.is_unique:
        dup = index[index.duplicated()][0]
        raise CurationError(where, f"duplicate {what} {dup!r} ({int((index == dup).sum())} occurrences)")


def _has_non_integer(values: np.ndarray) -> bool:
    """True when some finite value has a fractional part (NaN/inf are QC's business, not this check's)."""
    finite = values[np.isfinite(values)]
    return bool(np.any(finite != np.rint(finite)))


def _canonical_csr(counts: sp.spmatrix, n_features: int) -> sp.csr_matrix:
    """float32 CSR with sorted, summed indices and no stored zeros; shape checked."""
    counts = sp.csr_matrix(counts)
    if counts.shape[1] != n_features:
        raise AssertionError(f"piece has {counts.shape[1]} columns, reader has {n_features} features")
    if counts.dtype != np.float32:
        counts = counts.astype(np.float32)
    counts.sum_duplicates()
    counts.eliminate_zeros()
    return counts


def _with_source_id_first(obs: pd.DataFrame) -> pd.DataFrame:
    obs = obs.reset_index(drop=True)
    cols = ["source_id"] + [c for c in obs.columns if c != "source_id"]
    obs = obs[cols]
    if obs["source_id"].dtype != object:
        obs = obs.assign(source_id=obs["source_id"].astype(str).astype(object))
    return obs


def _rechunk(pieces: Iterable[tuple[sp.csr_matrix, pd.DataFrame]],
             chunk_size: int) -> Iterator[tuple[sp.csr_matrix, pd.DataFrame]]:
    """Regroup consecutive (counts, obs) pieces of any sizes into blocks of exactly ``chunk_size`` rows."""
    buf_counts: list[sp.csr_matrix] = []
    buf_obs: list[pd.DataFrame] = []
    buffered = 0
    for counts, obs in pieces:
        if counts.shape[0] != len(obs):
            raise AssertionError(f"piece has {counts.shape[0]} count rows but {len(obs)} obs rows")
        if counts.shape[0] == 0:
            continue
        buf_counts.append(sp.csr_matrix(counts))
        buf_obs.append(obs)
        buffered += counts.shape[0]
        if buffered < chunk_size:
            continue
        merged = buf_counts[0] if len(buf_counts) == 1 else sp.vstack(buf_counts, format="csr")
        merged_obs = buf_obs[0] if len(buf_obs) == 1 else pd.concat(buf_obs, ignore_index=True)
        n_full = buffered - buffered % chunk_size
        for start in range(0, n_full, chunk_size):
            yield merged[start:start + chunk_size], merged_obs.iloc[start:start + chunk_size]
        buf_counts = [merged[n_full:]] if n_full < buffered else []
        buf_obs = [merged_obs.iloc[n_full:]] if n_full < buffered else []
        buffered -= n_full
    if buffered:
        merged = buf_counts[0] if len(buf_counts) == 1 else sp.vstack(buf_counts, format="csr")
        merged_obs = buf_obs[0] if len(buf_obs) == 1 else pd.concat(buf_obs, ignore_index=True)
        yield merged, merged_obs


def _read_id_table(path: Path, what: str, min_columns: int = 1) -> pd.DataFrame:
    """Read a header-less tab-separated table of strings (10x features/barcodes, sciplex annotations)."""
    with _reading(path), _open_binary(path) as fh:
        table = pd.read_csv(fh, sep="\t", header=None, dtype=str, keep_default_na=False,
                            quoting=csv.QUOTE_NONE)
    if table.shape[1] < min_columns:
        raise CurationError(path, f"{what} file needs at least {min_columns} tab-separated columns, "
                                  f"found {table.shape[1]}")
    return table


def _features_frame(ids: Sequence[str] | np.ndarray, symbols: Sequence[str] | np.ndarray | None = None,
                    **extra: Sequence[str] | np.ndarray) -> pd.DataFrame:
    frame = {"feature_id": np.asarray(ids, dtype=object).astype(str).astype(object)}
    if symbols is not None:
        frame["symbol"] = np.asarray(symbols, dtype=object)
    for name, values in extra.items():
        frame[name] = np.asarray(values, dtype=object)
    return pd.DataFrame(frame)


# ----------------------------------------------------------------------------------------------------
# The shared transposition machinery: an on-disk store of entries bucketed by sample range
# ----------------------------------------------------------------------------------------------------
class _BucketStore:
    """Temporary on-disk store that regroups (sample, feature, value) entries by sample range.

    ``add`` takes entries in any order and appends each to the binary file of bucket
    ``sample // rows_per_bucket`` (12-byte records: uint32 row-in-bucket, uint32 feature, float32 value).
    ``pieces`` then loads one bucket at a time and yields it as CSR rows. Disk use: 12 bytes per entry;
    memory: one parse block while adding, one bucket while reading.
    """

    RECORD = np.dtype([("row", "<u4"), ("col", "<u4"), ("val", "<f4")])

    def __init__(self, n_samples: int, rows_per_bucket: int, tmp_dir: Path | None) -> None:
        self.n_samples = n_samples
        self.rows_per_bucket = rows_per_bucket
        self.n_buckets = max(1, math.ceil(n_samples / rows_per_bucket))
        if tmp_dir is not None:
            tmp_dir.mkdir(parents=True, exist_ok=True)
        self.directory = Path(tempfile.mkdtemp(prefix="curation-buckets-", dir=tmp_dir))
        self.entries = np.zeros(self.n_buckets, dtype=np.int64)
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.directory, True)

    def _path(self, bucket: int) -> Path:
        return self.directory / f"{bucket:06d}.bin"

    def add(self, samples: np.ndarray, features: np.ndarray, values: np.ndarray) -> None:
        """Append entries; ``samples`` (0-based, < n_samples), ``features`` (0-based), same length."""
        if len(samples) == 0:
            return
        samples = np.asarray(samples, dtype=np.int64)
        bucket = samples // self.rows_per_bucket
        if np.any(bucket[1:] < bucket[:-1]):  # already grouped input (sorted 10x files) skips the sort
            order = np.argsort(bucket, kind="stable")
            samples, bucket = samples[order], bucket[order]
            features, values = np.asarray(features)[order], np.asarray(values)[order]
        records = np.empty(len(samples), dtype=self.RECORD)
        records["row"] = samples - bucket * self.rows_per_bucket
        records["col"] = features
        records["val"] = values
        starts = np.concatenate([[0], np.flatnonzero(bucket[1:] != bucket[:-1]) + 1])
        stops = np.append(starts[1:], len(bucket))
        for b, lo, hi in zip(bucket[starts].tolist(), starts.tolist(), stops.tolist()):
            with open(self._path(b), "ab") as fh:
                records[lo:hi].tofile(fh)
            self.entries[b] += hi - lo

    def pieces(self, n_features: int) -> Iterator[tuple[int, sp.csr_matrix]]:
        """Yield (first sample, CSR rows of that bucket) for every bucket in sample order."""
        for b in range(self.n_buckets):
            start = b * self.rows_per_bucket
            n_rows = min(self.rows_per_bucket, self.n_samples - start)
            if n_rows <= 0:
                break
            if self.entries[b]:
                records = np.fromfile(self._path(b), dtype=self.RECORD)
                counts = sp.csr_matrix((records["val"], (records["row"], records["col"])),
                                       shape=(n_rows, n_features), dtype=np.float32)
                del records
            else:
                counts = sp.csr_matrix((n_rows, n_features), dtype=np.float32)
            yield start, counts

    def cleanup(self) -> None:
        self._finalizer()


def _first_bad(mask: np.ndarray) -> int:
    return int(np.argmax(mask))


def _bucket_coordinates(stream: IO[bytes], where: str, store: _BucketStore, *, n_rows: int, n_cols: int,
                        samples_are_columns: bool, sample_offset: int, expected_entries: int | None,
                        block_values: int, bar: tqdm, first_entry: int = 1) -> int:
    """Stream whitespace-separated 1-based ``row col value`` entries into ``store``; return the count.

    Validates that indices are integers within ``n_rows`` × ``n_cols`` and, when given, that exactly
    ``expected_entries`` entries follow. ``samples_are_columns`` says which index is the sample.
    """
    try:
        blocks = pd.read_csv(stream, sep=r"\s+", header=None, chunksize=block_values, engine="c")
    except pd.errors.EmptyDataError:
        blocks = iter(())
    seen = 0
    for block in blocks:
        entry0 = first_entry + seen
        if block.shape[1] != 3:
            raise CurationError(where, f"entry {entry0}: expected 3 fields (row column value), "
                                       f"found {block.shape[1]}")
        index_arrays = []
        for col, axis, limit in ((0, "row", n_rows), (1, "column", n_cols)):
            raw = block[col].to_numpy()
            if not np.issubdtype(raw.dtype, np.integer):
                numeric = pd.to_numeric(block[col], errors="coerce").to_numpy(dtype=np.float64)
                bad = ~np.isfinite(numeric) | (numeric != np.rint(numeric))
                k = _first_bad(bad)
                raise CurationError(where, f"entry {entry0 + k} has {axis} index {block[col].iloc[k]!r}, "
                                           "not an integer")
            too_big, too_small = raw > limit, raw < 1
            if too_big.any():
                k = _first_bad(too_big)
                raise CurationError(where, f"entry {entry0 + k} has {axis} index {raw[k]} > {limit} {axis}s")
            if too_small.any():
                k = _first_bad(too_small)
                raise CurationError(where, f"entry {entry0 + k} has {axis} index {raw[k]} < 1 "
                                           "(indices are 1-based)")
            index_arrays.append(raw - 1)
        values = block[2]
        if not pd.api.types.is_numeric_dtype(values):
            numeric = pd.to_numeric(values, errors="coerce")
            k = _first_bad((numeric.isna() & values.notna()).to_numpy())
            raise CurationError(where, f"entry {entry0 + k} has value {values.iloc[k]!r}, not a number")
        rows, cols = index_arrays
        samples, features = (cols, rows) if samples_are_columns else (rows, cols)
        store.add(samples + sample_offset, features, values.to_numpy(dtype=np.float32))
        seen += len(block)
        bar.update(len(block))
    if expected_entries is not None and seen != expected_entries:
        raise CurationError(where, f"size line declares {expected_entries} entries but the file holds {seen}")
    return seen


# ----------------------------------------------------------------------------------------------------
# MatrixMarket
# ----------------------------------------------------------------------------------------------------
@dataclass
class _MtxHeader:
    n_rows: int
    n_cols: int
    n_entries: int


def _read_mtx_header(stream: IO[bytes], where: str) -> _MtxHeader:
    """Consume and validate the banner, comments and size line of a coordinate MatrixMarket stream."""
    banner = stream.readline().decode("utf-8", errors="replace").strip()
    if not _MTX_HEADER.match(banner):
        raise CurationError(where, f"header is {banner[:80]!r}, expected "
                                   "'%%MatrixMarket matrix coordinate integer|real general'")
    line = b"%"
    while line.startswith(b"%"):
        line = stream.readline()
        if not line:
            raise CurationError(where, "no size line after the header")
    parts = line.decode("utf-8", errors="replace").split()
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise CurationError(where, f"size line is {line.strip()[:80]!r}, expected 'rows columns entries'")
    n_rows, n_cols, n_entries = (int(p) for p in parts)
    return _MtxHeader(n_rows, n_cols, n_entries)


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


# ----------------------------------------------------------------------------------------------------
# h5ad and 10x HDF5
# ----------------------------------------------------------------------------------------------------
def _h5_strings(ds: h5py.Dataset, start: int | None = None, stop: int | None = None) -> np.ndarray:
    """Slice of a string (or bytes) dataset as an object array of str."""
    sl = slice(start, stop)
    if h5py.check_string_dtype(ds.dtype) is not None or ds.dtype.kind in "SO":
        return np.asarray(ds.asstr()[sl], dtype=object)
    return np.asarray(ds[sl]).astype(str).astype(object)


def _read_elem(node: h5py.Group | h5py.Dataset) -> Any:
    """anndata's element decoder (``anndata.io`` from 0.11, ``anndata.experimental`` before)."""
    try:
        from anndata.io import read_elem
    except ImportError:  # anndata 0.10
        from anndata.experimental import read_elem
    return read_elem(node)


def _compressed_rows(group: h5py.Group, start: int, stop: int, n_features: int) -> sp.csr_matrix:
    """Rows [start, stop) of a compressed matrix whose major axis is the sample axis (CSR, or 10x CSC)."""
    indptr = group["indptr"][start:stop + 1].astype(np.int64)
    lo, hi = int(indptr[0]), int(indptr[-1])
    data = group["data"][lo:hi]
    indices = group["indices"][lo:hi]
    return sp.csr_matrix((data, indices, indptr - lo), shape=(stop - start, n_features))


class _H5adObs:
    """Reads slices of an AnnData obs dataframe column by column straight from HDF5."""

    def __init__(self, path: Path, f: h5py.File) -> None:
        self.path = path
        node = f["obs"]
        self.legacy_frame: pd.DataFrame | None = None
        if isinstance(node, h5py.Group) and node.attrs.get("encoding-type") == "dataframe":
            self.index_key = str(node.attrs["_index"])
            self.columns = [str(c) for c in node.attrs.get("column-order", [])]
        else:  # pre-0.7 anndata layouts: let anndata decode them (loads obs once; such files are small)
            import anndata

            backed = anndata.read_h5ad(path, backed="r")
            self.legacy_frame = backed.obs.copy()
            backed.file.close()
            self.index_key, self.columns = "", list(self.legacy_frame.columns)
        self._full_columns: dict[str, Any] = {}
        self._categories: dict[str, pd.Index] = {}

    def index(self, f: h5py.File, start: int | None = None, stop: int | None = None) -> np.ndarray:
        if self.legacy_frame is not None:
            return np.asarray(self.legacy_frame.index[start:stop], dtype=object).astype(str).astype(object)
        return _h5_strings(f["obs"][self.index_key], start, stop)

    def frame(self, f: h5py.File, start: int, stop: int) -> pd.DataFrame:
        ids = self.index(f, start, stop)
        if self.legacy_frame is not None:
            table = self.legacy_frame.iloc[start:stop].reset_index(drop=True)
        else:
            table = pd.DataFrame({c: self._column(f["obs"], c, start, stop) for c in self.columns},
                                 index=pd.RangeIndex(stop - start))
        if "source_id" in table.columns:  # keep a file column of that name under another one
            table = table.rename(columns={"source_id": "source_id_file"})
        table.insert(0, "source_id", ids)
        return table

    def _column(self, obs: h5py.Group, name: str, start: int, stop: int) -> Any:
        node = obs[name]
        enc = node.attrs.get("encoding-type", "")
        if isinstance(node, h5py.Dataset):
            ref = node.attrs.get("categories")
            if isinstance(ref, h5py.Reference):  # anndata 0.7 categorical: codes + referenced categories
                if name not in self._categories:
                    self._categories[name] = pd.Index(_h5_strings(obs.file[ref]))
                return pd.Categorical.from_codes(node[start:stop], categories=self._categories[name])
            if h5py.check_string_dtype(node.dtype) is not None or node.dtype.kind in "SO":
                return _h5_strings(node, start, stop)
            return node[start:stop]
        if enc == "categorical":
            if name not in self._categories:
                cats = node["categories"]
                self._categories[name] = pd.Index(_h5_strings(cats) if cats.dtype.kind in "SO"
                                                  or h5py.check_string_dtype(cats.dtype) is not None else cats[()])
            return pd.Categorical.from_codes(node["codes"][start:stop], categories=self._categories[name],
                                             ordered=bool(node.attrs.get("ordered", False)))
        if enc == "nullable-integer":
            return pd.arrays.IntegerArray(node["values"][start:stop], node["mask"][start:stop].astype(bool))
        if enc == "nullable-boolean":
            return pd.arrays.BooleanArray(node["values"][start:stop].astype(bool),
                                          node["mask"][start:stop].astype(bool))
        if enc == "nullable-string-array":
            values = pd.array(_h5_strings(node["values"], start, stop), dtype="string")
            values[node["mask"][start:stop].astype(bool)] = pd.NA
            return values
        # Unknown encodings: decode the whole column once with anndata, then slice.
        if name not in self._full_columns:
            self._full_columns[name] = _read_elem(node)
        return self._full_columns[name][start:stop]


class H5adReader(Reader):
    """AnnData .h5ad (files: matrix). Options: matrix "X" | "raw" | "layers/<name>", gene_id_column
    (var column for feature_id; None = var_names), symbol_column, allow_non_integer (default False).

    CSR and dense matrices are read row-slice by row-slice; a CSC matrix is transposed through the
    on-disk bucket store (one pass over its columns).
    """

    fmt = "h5ad"
    options = ("matrix", "gene_id_column", "symbol_column")
    default_allow_non_integer = False

    def __init__(self, files: dict[str, Path], matrix: str = "X", gene_id_column: str | None = None,
                 symbol_column: str | None = None, **common: Any) -> None:
        super().__init__(files, **common)
        self.path = files["matrix"]
        self.matrix = matrix
        if matrix == "X":
            self._matrix_key, var_key = "X", "var"
        elif matrix == "raw":
            self._matrix_key, var_key = "raw/X", "raw/var"
        elif isinstance(matrix, str) and matrix.startswith("layers/") and len(matrix) > len("layers/"):
            self._matrix_key, var_key = matrix, "var"
        else:
            raise CurationError(self.path, f"reader option matrix={matrix!r}: expected 'X', 'raw' or 'layers/<name>'")
        self._integer_problem = (f"matrix {matrix} holds non-integer values (normalised data?); "
                                 "set allow_normalised: true to accept")
        with _reading(self.path), h5py.File(self.path, "r") as f:
            if self._matrix_key not in f:
                layers = sorted(f["layers"].keys()) if "layers" in f else []
                raise CurationError(self.path, f"has no matrix {matrix!r} (layers: {', '.join(layers) or 'none'})")
            node = f[self._matrix_key]
            self._layout, shape = self._layout_of(node)
            self.n_samples = int(shape[0])
            self._obs = _H5adObs(self.path, f)
            _check_unique(self._obs.index(f), self.path, "obs name (sample id)")
            var = self._read_var(f, var_key)
        if len(var) != shape[1]:
            raise CurationError(self.path, f"matrix {matrix} has {shape[1]} columns but {var_key} has {len(var)} rows")
        self.features = self._features_from_var(var, gene_id_column, symbol_column, var_key)

    def _layout_of(self, node: h5py.Group | h5py.Dataset) -> tuple[str, tuple[int, int]]:
        if isinstance(node, h5py.Dataset):
            if node.ndim != 2:
                raise CurationError(self.path, f"matrix {self.matrix} is a {node.ndim}-d array, expected 2-d")
            return "dense", (int(node.shape[0]), int(node.shape[1]))
        enc = str(node.attrs.get("encoding-type", node.attrs.get("h5sparse_format", "")))
        shape = node.attrs.get("shape", node.attrs.get("h5sparse_shape"))
        layout = {"csr_matrix": "csr", "csr": "csr", "csc_matrix": "csc", "csc": "csc"}.get(enc)
        if layout is None or shape is None:
            raise CurationError(self.path, f"matrix {self.matrix} has unsupported encoding {enc!r}")
        return layout, (int(shape[0]), int(shape[1]))

    def _read_var(self, f: h5py.File, var_key: str) -> pd.DataFrame:
        import anndata

        node = f[var_key]
        if isinstance(node, h5py.Group) and node.attrs.get("encoding-type") == "dataframe":
            return _read_elem(node)
        backed = anndata.read_h5ad(self.path, backed="r")  # legacy layout
        var = (backed.raw.var if var_key == "raw/var" else backed.var).copy()
        backed.file.close()
        return var

    def _features_from_var(self, var: pd.DataFrame, gene_id_column: str | None, symbol_column: str | None,
                           var_key: str) -> pd.DataFrame:
        for option, column in (("gene_id_column", gene_id_column), ("symbol_column", symbol_column)):
            if column is not None and column not in var.columns:
                raise CurationError(self.path, f"reader option {option}={column!r}: no such column in {var_key} "
                                               f"(columns: {', '.join(map(str, var.columns)) or 'none'})")
        ids = var.index.to_numpy() if gene_id_column is None else var[gene_id_column].to_numpy()
        symbols = None if symbol_column is None else var[symbol_column].astype(object).to_numpy()
        return _features_frame(ids, symbols)

    def _pieces(self, chunk_size: int) -> Iterator[tuple[sp.csr_matrix, pd.DataFrame]]:
        n, n_features = self.n_samples or 0, self.n_features
        with _reading(self.path), h5py.File(self.path, "r") as f:
            node = f[self._matrix_key]
            if self._layout == "csc":
                self._bucket_store(n, lambda store, bar: self._fill_from_csc(node, store, bar),
                                   total=n_features, unit="genes", chunk_size=chunk_size)
                for start, counts in self._store.pieces(n_features):  # type: ignore[union-attr]
                    yield counts, self._obs.frame(f, start, start + counts.shape[0])
                return
            for start in range(0, n, chunk_size):
                stop = min(start + chunk_size, n)
                if self._layout == "csr":
                    counts = _compressed_rows(node, start, stop, n_features)
                else:
                    counts = sp.csr_matrix(node[start:stop])
                yield counts, self._obs.frame(f, start, stop)

    def _fill_from_csc(self, node: h5py.Group, store: _BucketStore, bar: tqdm) -> None:
        """Walk a CSC matrix in column blocks of about ``block_values`` entries into the bucket store."""
        indptr = node["indptr"][()].astype(np.int64)
        n_cols = len(indptr) - 1
        col = 0
        while col < n_cols:
            # Largest column block holding at most block_values entries (at least one column).
            stop = int(np.searchsorted(indptr, indptr[col] + self.block_values, side="right")) - 1
            stop = min(max(stop, col + 1), n_cols)
            lo, hi = int(indptr[col]), int(indptr[stop])
            cells = node["indices"][lo:hi]
            genes = np.repeat(np.arange(col, stop, dtype=np.int64), np.diff(indptr[col:stop + 1]))
            store.add(cells, genes, node["data"][lo:hi])
            bar.update(stop - col)
            col = stop


class TenXH5Reader(Reader):
    """CellRanger HDF5 (files: matrix): v3 ``/matrix/{data,indices,indptr,shape,barcodes,features/...}`` or
    v2 ``/<genome>/{...,genes,gene_names}``. Stored CSC genes × cells, i.e. one compressed row per cell."""

    fmt = "10x_h5"

    def __init__(self, files: dict[str, Path], **common: Any) -> None:
        super().__init__(files, **common)
        self.path = files["matrix"]
        with _reading(self.path), h5py.File(self.path, "r") as f:
            self._group = self._matrix_group(f)
            g = f[self._group]
            missing = [k for k in ("data", "indices", "indptr", "shape", "barcodes") if k not in g]
            if missing:
                raise CurationError(self.path, f"group /{self._group} lacks {', '.join(missing)}")
            n_genes, n_cells = (int(x) for x in g["shape"][()])
            if "features" in g:
                feats = g["features"]
                ids = _h5_strings(feats["id"])
                symbols = _h5_strings(feats["name"]) if "name" in feats else None
                extra = {"feature_type": _h5_strings(feats["feature_type"])} if "feature_type" in feats else {}
            else:
                ids = _h5_strings(g["genes"])
                symbols = _h5_strings(g["gene_names"]) if "gene_names" in g else None
                extra = {}
            self._barcodes = _h5_strings(g["barcodes"])
            if len(g["indptr"]) != n_cells + 1:
                raise CurationError(self.path, f"indptr has {len(g['indptr'])} entries for {n_cells} cells")
        if len(ids) != n_genes:
            raise CurationError(self.path, f"shape says {n_genes} features but {len(ids)} feature ids are stored")
        if len(self._barcodes) != n_cells:
            raise CurationError(self.path, f"shape says {n_cells} cells but {len(self._barcodes)} barcodes are stored")
        _check_unique(self._barcodes, self.path, "barcode")
        self.n_samples = n_cells
        self.features = _features_frame(ids, symbols, **extra)

    def _matrix_group(self, f: h5py.File) -> str:
        if "matrix" in f:
            return "matrix"
        candidates = [k for k in f.keys() if isinstance(f[k], h5py.Group) and "indptr" in f[k]]
        if len(candidates) != 1:
            raise CurationError(self.path, "not a CellRanger matrix HDF5 (no /matrix group and no single "
                                           "genome group)")
        return candidates[0]

    def _pieces(self, chunk_size: int) -> Iterator[tuple[sp.csr_matrix, pd.DataFrame]]:
        n = self.n_samples or 0
        with _reading(self.path), h5py.File(self.path, "r") as f:
            g = f[self._group]
            for start in range(0, n, chunk_size):
                stop = min(start + chunk_size, n)
                yield (_compressed_rows(g, start, stop, self.n_features),
                       pd.DataFrame({"source_id": self._barcodes[start:stop]}))


# ----------------------------------------------------------------------------------------------------
# MatrixMarket-based formats
# ----------------------------------------------------------------------------------------------------
class TenXMtxReader(Reader):
    """10x MatrixMarket triple (files: matrix, features — features.tsv or genes.tsv —, barcodes).
    Option orientation "genes_x_cells" (10x default) or "cells_x_genes"."""

    fmt = "10x_mtx"
    options = ("orientation",)

    def __init__(self, files: dict[str, Path], orientation: str = "genes_x_cells", **common: Any) -> None:
        super().__init__(files, **common)
        self.path = files["matrix"]
        if orientation not in ("genes_x_cells", "cells_x_genes"):
            raise CurationError(self.path, f"reader option orientation={orientation!r}: expected "
                                           "'genes_x_cells' or 'cells_x_genes'")
        self._cells_are_columns = orientation == "genes_x_cells"
        with _reading(self.path), _open_binary(self.path) as fh:
            header = _read_mtx_header(fh, str(self.path))
        n_genes, n_cells = ((header.n_rows, header.n_cols) if self._cells_are_columns
                            else (header.n_cols, header.n_rows))
        self._header = header
        feats = _read_id_table(files["features"], "features")
        barcodes = _read_id_table(files["barcodes"], "barcodes")
        if len(feats) != n_genes:
            raise CurationError(files["features"], f"lists {len(feats)} features but {self.path.name} has "
                                                   f"{n_genes} ({orientation})")
        if len(barcodes) != n_cells:
            raise CurationError(files["barcodes"], f"lists {len(barcodes)} barcodes but {self.path.name} has "
                                                   f"{n_cells} ({orientation})")
        _check_unique(barcodes[0].to_numpy(), files["barcodes"], "barcode")
        extra = {"feature_type": feats[2].to_numpy()} if feats.shape[1] > 2 else {}
        self.features = _features_frame(feats[0].to_numpy(), feats[1].to_numpy() if feats.shape[1] > 1 else None,
                                        **extra)
        self._obs_table = pd.DataFrame({"source_id": barcodes[0].to_numpy(dtype=object)})
        self.n_samples = n_cells

    def _fill(self, store: _BucketStore, bar: tqdm) -> None:
        where = str(self.path)
        with _reading(self.path), _open_binary(self.path) as fh:
            header = _read_mtx_header(fh, where)
            _bucket_coordinates(fh, where, store, n_rows=header.n_rows, n_cols=header.n_cols,
                                samples_are_columns=self._cells_are_columns, sample_offset=0,
                                expected_entries=header.n_entries, block_values=self.block_values, bar=bar)

    def _pieces(self, chunk_size: int) -> Iterator[tuple[sp.csr_matrix, pd.DataFrame]]:
        self._bucket_store(self.n_samples or 0, self._fill, total=self._header.n_entries, unit="entries",
                           chunk_size=chunk_size)
        yield from self._store_pieces(self._obs_table)


class SciplexTripletsReader(Reader):
    """sci-Plex triplets (files: matrix ``gene_row cell_col count`` 1-based, no header; genes: gene_id,
    gene_short_name; cells: cell name, sample — all header-less)."""

    fmt = "sciplex_triplets"

    def __init__(self, files: dict[str, Path], **common: Any) -> None:
        super().__init__(files, **common)
        self.path = files["matrix"]
        genes = _read_id_table(files["genes"], "gene annotation")
        cells = _read_id_table(files["cells"], "cell annotation")
        _check_unique(cells[0].to_numpy(), files["cells"], "cell name")
        self.features = _features_frame(genes[0].to_numpy(), genes[1].to_numpy() if genes.shape[1] > 1 else None)
        obs = {"source_id": cells[0].to_numpy(dtype=object)}
        for col in range(1, cells.shape[1]):
            obs["sample" if col == 1 else f"column_{col + 1}"] = cells[col].to_numpy(dtype=object)
        self._obs_table = pd.DataFrame(obs)
        self.n_samples = len(cells)

    def _fill(self, store: _BucketStore, bar: tqdm) -> None:
        with _reading(self.path), _open_binary(self.path) as fh:
            _bucket_coordinates(fh, str(self.path), store, n_rows=self.n_features, n_cols=self.n_samples or 0,
                                samples_are_columns=True, sample_offset=0, expected_entries=None,
                                block_values=self.block_values, bar=bar)

    def _pieces(self, chunk_size: int) -> Iterator[tuple[sp.csr_matrix, pd.DataFrame]]:
        self._bucket_store(self.n_samples or 0, self._fill, total=None, unit="entries", chunk_size=chunk_size)
        yield from self._store_pieces(self._obs_table)


@dataclass
class _MixseqArchive:
    path: Path
    stem: str
    matrix: str
    genes: str
    barcodes: str
    classifications: str
    header: _MtxHeader | None = None


class MixseqZipReader(Reader):
    """MIX-Seq archives (files: archives = list of zip paths or a directory of zips). Each zip holds,
    possibly under a folder, matrix.mtx, genes.tsv (or features.tsv), barcodes.tsv (each optionally .gz)
    and classifications.csv (with a ``barcode`` column). source_id = "<zip stem>:<barcode>"; obs carries
    ``experiment`` (the zip stem) and the classification columns. Members are streamed, not extracted."""

    fmt = "mixseq_zip"
    _ROLES = {"matrix": ("matrix.mtx", "matrix.mtx.gz"),
              "genes": ("genes.tsv", "genes.tsv.gz", "features.tsv", "features.tsv.gz"),
              "barcodes": ("barcodes.tsv", "barcodes.tsv.gz"),
              "classifications": ("classifications.csv", "classifications.csv.gz")}

    def __init__(self, files: dict[str, Path], archives: list[Path], **common: Any) -> None:
        super().__init__(files, **common)
        if not archives:
            raise CurationError(next(iter(files.values()), None), "no zip archives found")
        _check_unique([a.stem for a in archives], archives[0].parent, "archive stem (experiment)")
        self._archives: list[_MixseqArchive] = []
        obs_parts: list[pd.DataFrame] = []
        first_genes: pd.DataFrame | None = None
        for path in archives:
            archive = self._inspect(path)
            with _reading(path), zipfile.ZipFile(path) as zf:
                where = f"{path}:{archive.matrix}"
                with _reading(where), self._member(zf, archive.matrix) as fh:
                    archive.header = _read_mtx_header(fh, where)
                genes = self._member_table(zf, path, archive.genes, header=None, sep="\t")
                barcodes = self._member_table(zf, path, archive.barcodes, header=None, sep="\t")
                classes = self._member_table(zf, path, archive.classifications, header=0, sep=",")
            if archive.header.n_rows != len(genes) or archive.header.n_cols != len(barcodes):
                shape = f"{archive.header.n_rows} × {archive.header.n_cols}"
                raise CurationError(f"{path}:{archive.matrix}", f"is {shape} but the archive lists {len(genes)} "
                                                                f"genes × {len(barcodes)} barcodes")
            if first_genes is None:
                first_genes = genes
            elif not genes[0].equals(first_genes[0]):
                raise CurationError(f"{path}:{archive.genes}", f"gene list differs from {archives[0].name}")
            obs_parts.append(self._obs_for(path, archive, barcodes[0], classes))
            self._archives.append(archive)
        assert first_genes is not None
        self.features = _features_frame(first_genes[0].to_numpy(),
                                        first_genes[1].to_numpy() if first_genes.shape[1] > 1 else None)
        self._obs_table = pd.concat(obs_parts, ignore_index=True)
        self.n_samples = len(self._obs_table)

    @classmethod
    def _inspect(cls, path: Path) -> _MixseqArchive:
        """Refuse unsafe member names and find the one member of each role."""
        with _reading(path), zipfile.ZipFile(path) as zf:
            names = zf.namelist()
        for name in names:
            posix = PurePosixPath(name.replace("\\", "/"))
            if posix.is_absolute() or ".." in posix.parts or re.match(r"^[A-Za-z]:", name):
                raise CurationError(path, f"member {name!r} has an absolute or '..' path; refusing the archive")
        found: dict[str, str] = {}
        for role, basenames in cls._ROLES.items():
            matches = [n for n in names if PurePosixPath(n).name in basenames and not n.startswith("__MACOSX/")]
            if len(matches) != 1:
                raise CurationError(path, f"expected exactly one {' / '.join(basenames[:2])} member, found "
                                          f"{len(matches)}")
            found[role] = matches[0]
        return _MixseqArchive(path=path, stem=path.stem, **found)

    @staticmethod
    def _member(zf: zipfile.ZipFile, name: str) -> IO[bytes]:
        return _gunzip_if_needed(zf.open(name))  # type: ignore[arg-type]

    def _member_table(self, zf: zipfile.ZipFile, path: Path, name: str, header: int | None, sep: str) -> pd.DataFrame:
        where = f"{path}:{name}"
        with _reading(where), self._member(zf, name) as fh:
            if header is None:  # genes / barcodes: plain strings, a gene called "NA" stays "NA"
                return pd.read_csv(fh, sep=sep, header=None, dtype=str, keep_default_na=False,
                                   quoting=csv.QUOTE_NONE)
            return pd.read_csv(fh, sep=sep, header=header, dtype={"barcode": str})

    @staticmethod
    def _obs_for(path: Path, archive: _MixseqArchive, barcodes: pd.Series, classes: pd.DataFrame) -> pd.DataFrame:
        where = f"{path}:{archive.classifications}"
        if "barcode" not in classes.columns:
            raise CurationError(where, f"no 'barcode' column (columns: {', '.join(classes.columns)})")
        _check_unique(barcodes.to_numpy(), f"{path}:{archive.barcodes}", "barcode")
        _check_unique(classes["barcode"].to_numpy(), where, "barcode")
        obs = pd.DataFrame({"source_id": (archive.stem + ":" + barcodes).to_numpy(dtype=object),
                            "experiment": archive.stem, "barcode": barcodes.to_numpy(dtype=object)})
        extra = classes.set_index("barcode")
        extra = extra.drop(columns=[c for c in ("source_id", "experiment") if c in extra.columns])
        return obs.join(extra, on="barcode")

    def _fill(self, store: _BucketStore, bar: tqdm) -> None:
        offset = 0
        for archive in self._archives:
            where = f"{archive.path}:{archive.matrix}"
            with _reading(where), zipfile.ZipFile(archive.path) as zf, self._member(zf, archive.matrix) as fh:
                header = _read_mtx_header(fh, where)
                _bucket_coordinates(fh, where, store, n_rows=header.n_rows, n_cols=header.n_cols,
                                    samples_are_columns=True, sample_offset=offset,
                                    expected_entries=header.n_entries, block_values=self.block_values, bar=bar)
            offset += header.n_cols

    def _pieces(self, chunk_size: int) -> Iterator[tuple[sp.csr_matrix, pd.DataFrame]]:
        total = sum(a.header.n_entries for a in self._archives if a.header is not None)
        self._bucket_store(self.n_samples or 0, self._fill, total=total, unit="entries", chunk_size=chunk_size)
        yield from self._store_pieces(self._obs_table)


# ----------------------------------------------------------------------------------------------------
# Text tables
# ----------------------------------------------------------------------------------------------------
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


class StarCountsReader(Reader):
    """GDC STAR-Counts (files: dir — a directory searched recursively for *.tsv / *.tsv.gz, one sample per
    file; optional role sample_sheet). Options: column (default "unstranded"), sample_sheet (TSV with
    file_name, sample_id and metadata to pass through; GDC headers such as "File Name"/"Sample ID" are
    accepted; a relative path is tried as given, then against the directory's parent)."""

    fmt = "star_counts"
    options = ("column", "sample_sheet")

    def __init__(self, files: dict[str, Path], column: str = "unstranded", sample_sheet: str | Path | None = None,
                 **common: Any) -> None:
        super().__init__(files, **common)
        self.directory = files["dir"]
        if not self.directory.is_dir():
            raise CurationError(self.directory, "is not a directory")
        self.column = column
        sheet_path = files.get("sample_sheet") or self._resolve_sheet(sample_sheet)
        if sheet_path is not None:
            self.files["sample_sheet"] = sheet_path
        available = sorted(p for pattern in ("*.tsv", "*.tsv.gz") for p in self.directory.rglob(pattern)
                           if p.is_file() and p != sheet_path)
        if sheet_path is None:
            self._paths = available
            self._obs_table = pd.DataFrame({"source_id": [self._stem(p) for p in available]})
            _check_unique(self._obs_table["source_id"], self.directory, "sample id (file stem)")
        else:
            self._paths, self._obs_table = self._from_sheet(sheet_path, available)
        if not self._paths:
            raise CurationError(self.directory, "holds no *.tsv or *.tsv.gz STAR-Counts files")
        gene_ids, symbols, _ = self._read_sample(self._paths[0])
        _check_unique(gene_ids, self._paths[0], "gene id (after stripping versions)")
        self._gene_ids = gene_ids
        self.features = _features_frame(gene_ids, symbols)
        self.n_samples = len(self._paths)

    def _resolve_sheet(self, sample_sheet: str | Path | None) -> Path | None:
        if sample_sheet is None:
            return None
        path = Path(sample_sheet)
        if not path.is_absolute() and not path.exists() and (self.directory.parent / path).exists():
            path = self.directory.parent / path
        if not path.exists():
            raise CurationError(path, "file not found (reader option sample_sheet)")
        return path

    @staticmethod
    def _stem(path: Path) -> str:
        name = path.name
        for suffix in (".gz", ".tsv"):
            name = name[: -len(suffix)] if name.endswith(suffix) else name
        return name

    def _from_sheet(self, sheet: Path, available: list[Path]) -> tuple[list[Path], pd.DataFrame]:
        table = load_metadata_table(sheet, key="file_name", sep="\t", normalise_headers=True).reset_index()
        if "sample_id" not in table.columns:
            raise CurationError(sheet, f"no sample_id column (columns: {', '.join(table.columns)})")
        _check_unique(table["sample_id"].to_numpy(), sheet, "sample_id")
        by_name: dict[str, Path] = {}
        for p in available:
            if p.name in by_name:
                raise CurationError(p, f"file name also found at {by_name[p.name]}; the sample sheet is ambiguous")
            by_name[p.name] = p
        missing = [n for n in table["file_name"] if n not in by_name]
        if missing:
            raise CurationError(sheet, f"lists {len(missing)} file(s) not found under {self.directory}, "
                                       f"e.g. {missing[0]!r}")
        obs = table.rename(columns={"sample_id": "source_id"})
        obs["source_id"] = obs["source_id"].astype(str)
        return [by_name[n] for n in table["file_name"]], obs

    def _read_sample(self, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(gene ids without version, gene names, values of the chosen column) of one STAR-Counts file."""
        with _reading(path), _open_binary(path) as fh:
            table = pd.read_csv(fh, sep="\t", comment="#", dtype={"gene_id": str, "gene_name": str,
                                                                   "gene_type": str}, keep_default_na=False,
                                na_values={self.column: ["", "NA", "NaN", "nan"]})
        missing = [c for c in ("gene_id", "gene_name", self.column) if c not in table.columns]
        if missing:
            raise CurationError(path, f"missing STAR-Counts column(s) {', '.join(missing)} (found: "
                                      f"{', '.join(map(str, table.columns[:6]))}); expected {' '.join(_STAR_COLUMNS)}")
        table = table[~table["gene_id"].str.startswith(_STAR_SPECIAL_PREFIX)]
        table = table[~table["gene_id"].str.endswith("_PAR_Y")]  # see module docstring
        values = pd.to_numeric(table[self.column], errors="coerce")
        bad = values.isna() & table[self.column].notna()
        if bad.any():
            example = table[self.column][bad].iloc[0]
            raise CurationError(path, f"column {self.column} holds non-numeric value {example!r}")
        ids = table["gene_id"].str.replace(_ENSEMBL_VERSION, "", regex=True).to_numpy(dtype=object)
        return ids, table["gene_name"].to_numpy(dtype=object), values.to_numpy(dtype=np.float32)

    def _pieces(self, chunk_size: int) -> Iterator[tuple[sp.csr_matrix, pd.DataFrame]]:
        first = self._paths[0]
        for start in range(0, len(self._paths), chunk_size):
            stop = min(start + chunk_size, len(self._paths))
            indptr, indices, data = [0], [], []
            for path in self._paths[start:stop]:
                ids, _, values = self._read_sample(path)
                if len(ids) != len(self._gene_ids) or not np.array_equal(ids, self._gene_ids):
                    raise CurationError(path, f"gene list differs from {first.name} "
                                              f"({len(ids)} vs {len(self._gene_ids)} genes)")
                nz = np.flatnonzero(values != 0)
                indices.append(nz)
                data.append(values[nz])
                indptr.append(indptr[-1] + len(nz))
            counts = sp.csr_matrix((np.concatenate(data), np.concatenate(indices), np.asarray(indptr)),
                                   shape=(stop - start, len(self._gene_ids)))
            yield counts, self._obs_table.iloc[start:stop]


# ----------------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------------
_READERS: dict[str, type[Reader]] = {
    "h5ad": H5adReader, "10x_mtx": TenXMtxReader, "10x_h5": TenXH5Reader, "gct": GctReader,
    "star_counts": StarCountsReader, "geo_table": GeoTableReader, "sciplex_triplets": SciplexTripletsReader,
    "mixseq_zip": MixseqZipReader,
}
_ROLES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {  # (required, optional) file roles
    "h5ad": (("matrix",), ()), "10x_mtx": (("matrix", "features", "barcodes"), ()), "10x_h5": (("matrix",), ()),
    "gct": (("matrix",), ()), "star_counts": (("dir",), ("sample_sheet",)), "geo_table": (("matrix",), ()),
    "sciplex_triplets": (("matrix", "genes", "cells"), ()), "mixseq_zip": (("archives",), ()),
}
_COMMON_OPTIONS = ("progress", "tmp_dir", "block_values", "allow_non_integer")
assert tuple(_READERS) == FORMATS


def open_reader(fmt: str, files: dict[str, str | Path | Sequence[str | Path]], **options: Any) -> Reader:
    """Open the raw files of one dataset.

    Args:
        fmt: one of :data:`FORMATS`.
        files: role → path (see each reader's docstring for the roles; ``mixseq_zip`` takes
            ``archives``: a list of zips or a directory of them).
        **options: the format's reader options plus the common ones (progress, tmp_dir,
            block_values, allow_non_integer).
    Raises:
        CurationError: unknown format / role / option, a missing file, or a file that is not what it
            claims to be (one line naming the file).
    """
    if fmt not in _READERS:
        raise CurationError(None, f"unknown reader format {fmt!r}; expected one of {', '.join(FORMATS)}")
    required, optional = _ROLES[fmt]
    given = dict(files or {})
    unknown_roles = sorted(set(given) - set(required) - set(optional))
    if unknown_roles:
        raise CurationError(None, f"format {fmt}: unknown file role(s) {', '.join(unknown_roles)} "
                                  f"(expected {', '.join(required + optional)})")
    missing_roles = [r for r in required if r not in given]
    if missing_roles:
        raise CurationError(None, f"format {fmt}: missing file role(s) {', '.join(missing_roles)}")
    reader_cls = _READERS[fmt]
    unknown = sorted(set(options) - set(reader_cls.options) - set(_COMMON_OPTIONS))
    if unknown:
        raise CurationError(None, f"format {fmt}: unknown reader option(s) {', '.join(unknown)} (known: "
                                  f"{', '.join(reader_cls.options + _COMMON_OPTIONS)})")
    resolved: dict[str, Path] = {}
    extra: dict[str, Any] = {}
    for role, value in given.items():
        if role == "archives":
            archives = _archive_list(value)
            extra["archives"] = archives
            if isinstance(value, (str, os.PathLike)):
                resolved[role] = Path(value)
            else:
                resolved.update({f"archives:{p.stem}": p for p in archives})
            continue
        if not isinstance(value, (str, os.PathLike)):
            raise CurationError(None, f"format {fmt}: file role {role} must be a single path, got {value!r}")
        path = Path(value)
        if not path.exists():
            raise CurationError(path, f"file not found (role {role})")
        resolved[role] = path
    return reader_cls(resolved, **extra, **options)


def _archive_list(value: str | Path | Sequence[str | Path]) -> list[Path]:
    if isinstance(value, (str, os.PathLike)):
        path = Path(value)
        if path.is_dir():
            return sorted(path.glob("*.zip"))
        values: Sequence[str | Path] = [path]
    else:
        values = value
    paths = [Path(v) for v in values]
    for p in paths:
        if not p.is_file():
            raise CurationError(p, "file not found (role archives)")
    return paths


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
