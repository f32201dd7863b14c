"""Common machinery of every reader: the Chunk and Reader types, stream and error helpers, and the
on-disk bucket store that transposes formats whose sample axis is not the storage order."""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import math
import os
import shutil
import tempfile
import weakref
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, ClassVar, Iterable, Iterator, Sequence

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
        #: Float-noise rounding of the last chunks() pass (only while the integer check is in force):
        #: n_values_rounded, max_abs_change. See INTEGER_NOISE.
        self.rounding: dict[str, float] = {"n_values_rounded": 0, "max_abs_change": 0.0}

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
        rounding = {"n_values_rounded": 0, "max_abs_change": 0.0}
        self.rounding = rounding
        for counts, obs in _rechunk(self._pieces(chunk_size), chunk_size):
            counts = _canonical_csr(counts, n_features)
            if _negative_fraction(counts.data):
                raise CurationError(self._integer_where, "holds negative non-integer values: scaled (z-scored) "
                                                         "data, not counts or normalised counts; it cannot be used "
                                                         "(point the reader at the raw counts matrix)")
            if not self.allow_non_integer and _has_non_integer(counts.data):
                counts.data, n_rounded, change, fraction_left = _round_float_noise(counts.data)
                if fraction_left:
                    raise CurationError(self._integer_where, self._integer_problem)
                if n_rounded:
                    counts.eliminate_zeros()  # values like 1e-8 round to 0
                rounding["n_values_rounded"] += n_rounded
                rounding["max_abs_change"] = max(rounding["max_abs_change"], change)
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


#: Relative distance to the nearest integer below which a float value counts as that integer stored with
#: float noise (float32 carries ~7 significant digits: 2.9999998 is 3 written through a float computation).
INTEGER_NOISE = 1e-6


def _negative_fraction(values: np.ndarray) -> bool:
    """True when some value is negative AND non-integer: scaled (z-scored) data, never counts."""
    neg = values[values < 0]
    return bool(neg.size and np.any(neg != np.rint(neg)))


def _round_float_noise(values: np.ndarray) -> tuple[np.ndarray, int, float, bool]:
    """Round values within INTEGER_NOISE (relative, at least absolute for |x| < 1) of an integer.

    Returns (values, n rounded, largest absolute change, whether a real fraction remains).
    """
    finite = np.isfinite(values)
    nearest = np.rint(values)
    change = np.where(finite, np.abs(values - nearest), 0.0)
    fractional = change > 0
    if not fractional.any():
        return values, 0, 0.0, False
    noise = fractional & (change <= INTEGER_NOISE * np.maximum(1.0, np.abs(nearest)))
    if (fractional & ~noise).any():
        return values, 0, 0.0, True
    return np.where(noise, nearest, values).astype(values.dtype), int(noise.sum()), float(change.max()), False


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
