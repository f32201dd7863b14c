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

Package layout (one module per format family, like anndata's ``_io/``): ``base`` (Chunk, Reader, stream and
error helpers, the on-disk bucket store), ``hdf5`` (h5ad, 10x_h5), ``mtx`` (10x_mtx, sciplex_triplets,
mixseq_zip), ``tables`` (gct, geo_table, metadata tables), ``star`` (star_counts); this module holds the
registry and :func:`open_reader`.

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
  inf and negative integers are passed through untouched (QC drops such samples later); negative
  NON-integers are scaled data and refused outright, whatever ``allow_non_integer`` says.
* While the integer check is in force, values within ``INTEGER_NOISE`` (relative) of an integer — dense float
  matrices written through float arithmetic, e.g. 2.9999998 — are rounded to it; ``reader.rounding`` counts
  them (curation copies it into report.json as ``integer_rounding``). Any other fraction is refused.
* Compressed HDF5 matrices (h5ad X/raw/layers, 10x .h5) have ``indptr`` and ``indices`` bounds-checked chunk
  by chunk: a corrupt file is a one-line error, never a crash or a silently lost count.
* ``star_counts``: Ensembl versions are stripped (ENSG00000000003.15 → ENSG00000000003) and the
  ``_PAR_Y`` copies of pseudo-autosomal genes are DROPPED (GDC assigns their reads to the X copy, and
  keeping them would duplicate the X gene's ID once the version is stripped).
* ``mixseq_zip`` members are streamed out of the archives without extracting them to disk; an archive
  with any absolute or ``..`` member name is refused outright all the same.
* ``geo_table`` lines starting with ``!`` or ``#`` are skipped (GEO series-matrix framing); a header one
  field shorter than the data rows (R ``write.table`` style) is read as missing the label column's name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence


from curation.io import CurationError
from curation.readers.base import BLOCK_VALUES, BUCKET_ROWS, FORMATS, Chunk, Reader
from curation.readers.hdf5 import H5adReader, TenXH5Reader
from curation.readers.mtx import MixseqZipReader, SciplexTripletsReader, TenXMtxReader
from curation.readers.star import StarCountsReader
from curation.readers.tables import GctReader, GeoTableReader, load_metadata_table

__all__ = ["FORMATS", "BLOCK_VALUES", "BUCKET_ROWS", "Chunk", "Reader", "open_reader", "load_metadata_table",
           "H5adReader", "TenXH5Reader", "TenXMtxReader", "SciplexTripletsReader", "MixseqZipReader", "GctReader",
           "GeoTableReader", "StarCountsReader"]

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
