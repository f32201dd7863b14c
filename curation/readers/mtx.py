"""MatrixMarket and coordinate-triplet formats: 10x_mtx, sciplex_triplets, mixseq_zip."""

from __future__ import annotations

import csv
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any, Iterator

import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm import tqdm

from curation.io import CurationError
from curation.readers.base import (
    Reader, _BucketStore, _check_unique, _features_frame, _first_bad, _gunzip_if_needed, _open_binary,
    _read_id_table, _reading,
)

_MTX_HEADER = re.compile(r"^%%matrixmarket\s+matrix\s+coordinate\s+(integer|real)\s+general\s*$", re.I)


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
    """sci-Plex GEO files (files: matrix, genes, cells).

    matrix: ``gene_row<TAB>cell_col<TAB>count`` 1-based triplets, no header, in any order; genes: the
    ``*_gene.annotations.txt.gz`` table — as published on GEO it is SPACE-separated with a header line
    ``id gene_short_name`` (options ``genes_sep`` default " ", ``genes_header`` default True); cells: cell name,
    sample, tab-separated, no header. Reading the gene table without its header shifts every gene by one
    (scPerturb issue #7), so a header that looks like a gene ID is refused.
    """

    fmt = "sciplex_triplets"
    options = ("genes_sep", "genes_header")

    def __init__(self, files: dict[str, Path], genes_sep: str = " ", genes_header: bool = True,
                 **common: Any) -> None:
        super().__init__(files, **common)
        self.path = files["matrix"]
        genes = self._read_genes(files["genes"], genes_sep, bool(genes_header))
        cells = _read_id_table(files["cells"], "cell annotation")
        _check_unique(cells[0].to_numpy(), files["cells"], "cell name")
        self.features = _features_frame(genes[0].to_numpy(), genes[1].to_numpy() if genes.shape[1] > 1 else None)
        obs = {"source_id": cells[0].to_numpy(dtype=object)}
        for col in range(1, cells.shape[1]):
            obs["sample" if col == 1 else f"column_{col + 1}"] = cells[col].to_numpy(dtype=object)
        self._obs_table = pd.DataFrame(obs)
        self.n_samples = len(cells)

    @staticmethod
    def _read_genes(path: Path, sep: str, header: bool) -> pd.DataFrame:
        """(gene id, symbol) table of the gene annotation file, header line consumed when ``header``."""
        with _reading(path), _open_binary(path) as fh:
            table = pd.read_csv(fh, sep=sep, header=None, dtype=str, keep_default_na=False,
                                quoting=csv.QUOTE_NONE)
        if table.shape[1] < 2:
            raise CurationError(path, f"gene annotation needs 2 columns separated by {sep!r} (gene id, "
                                      f"gene_short_name), found {table.shape[1]}; check reader option genes_sep")
        if header:
            first = [str(v) for v in table.iloc[0, :2]] if len(table) else []
            if first and re.match(r"^ENS[A-Z]*G\d", first[0]):
                raise CurationError(path, f"line 1 is a gene ({first[0]!r}), not a header such as "
                                          "'id gene_short_name'; set reader option genes_header: false")
            table = table.iloc[1:].reset_index(drop=True)
        return table

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


#: MIX-seq experiment names (zip stems) as the authors use them (broadinstitute/mix_seq_ms src/expt_meta_data.R):
#: ``<treatment>[_<hours>hr]_expt<batch>``, e.g. Idasanutlin_24hr_expt1, sgLACZ_expt2, DMSO_expt10.
_MIXSEQ_STEM = re.compile(r"^(?P<treatment>.+?)(?:_(?P<time>\d+hr))?_(?P<batch>expt\d+)$")


def _parse_mixseq_stem(stem: str) -> tuple[str, str | None, str | None]:
    """(treatment, time point or None, experiment batch or None) of a MIX-seq zip stem; an unparsable stem is
    its own treatment."""
    match = _MIXSEQ_STEM.match(stem)
    if match is None:
        return stem, None, None
    return match["treatment"], match["time"], match["batch"]


class MixseqZipReader(Reader):
    """MIX-Seq archives (files: archives = list of zip paths or a directory of zips). Each zip holds,
    possibly under a folder, matrix.mtx, genes.tsv (or features.tsv), barcodes.tsv (each optionally .gz)
    and classifications.csv (with a ``barcode`` column). source_id = "<zip stem>:<barcode>"; obs carries
    ``experiment`` (the zip stem), ``treatment`` / ``time_point`` / ``expt_batch`` parsed from it (see
    _MIXSEQ_STEM) and the classification columns (singlet_ID, cell_quality, …). Members are streamed, not
    extracted."""

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
        treatment, time_point, expt_batch = _parse_mixseq_stem(archive.stem)
        obs = pd.DataFrame({"source_id": (archive.stem + ":" + barcodes).to_numpy(dtype=object),
                            "experiment": archive.stem, "treatment": treatment, "time_point": time_point,
                            "expt_batch": expt_batch, "barcode": barcodes.to_numpy(dtype=object)})
        extra = classes.set_index("barcode")
        extra = extra.drop(columns=[c for c in ("source_id", "experiment", "treatment", "time_point", "expt_batch")
                                    if c in extra.columns])
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
