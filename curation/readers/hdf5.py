"""HDF5 formats: AnnData .h5ad and CellRanger .h5."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm import tqdm

from curation.io import CurationError
from curation.readers.base import Reader, _BucketStore, _check_unique, _features_frame, _reading


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


def _check_indptr(indptr: np.ndarray, n_data: int, where: Path, offset: int = 0, major: str = "row",
                  first: bool = False) -> None:
    """Raise a one-line CurationError unless ``indptr`` (a slice starting at major position ``offset``) is
    non-decreasing and within the ``n_data`` stored values (and starts at 0 when ``first``)."""
    if first and indptr.size and indptr[0] != 0:
        raise CurationError(where, f"indptr[0] = {int(indptr[0])}, expected 0 (corrupt compressed matrix)")
    steps = np.diff(indptr)
    if np.any(steps < 0):
        k = int(np.argmax(steps < 0))
        raise CurationError(where, f"indptr decreases at {major} {offset + k} (corrupt compressed matrix)")
    if indptr.size and (indptr[0] < 0 or indptr[-1] > n_data):
        bad = int(np.argmax((indptr < 0) | (indptr > n_data)))
        raise CurationError(where, f"indptr[{offset + bad}] = {int(indptr[bad])} beyond the {n_data} stored "
                                   "values (truncated or corrupt compressed matrix)")


def _check_indices(indices: np.ndarray, n_minor: int, where: Path, minor: str) -> None:
    """Raise a one-line CurationError unless every index lies in [0, n_minor)."""
    bad = (indices < 0) | (indices >= n_minor)
    if np.any(bad):
        value = int(indices[int(np.argmax(bad))])
        raise CurationError(where, f"{minor} index {value} outside [0, {n_minor}) (corrupt compressed matrix)")


def _compressed_rows(group: h5py.Group, start: int, stop: int, n_features: int, where: Path,
                     minor: str) -> sp.csr_matrix:
    """Rows [start, stop) of a compressed matrix whose major axis is the sample axis (CSR, or 10x CSC).

    ``indptr`` and ``indices`` are bounds-checked per chunk (scipy does not check them, and an index past
    ``n_features`` can crash the process or silently lose a count); ``minor`` names the index axis in errors.
    """
    indptr = group["indptr"][start:stop + 1].astype(np.int64)
    _check_indptr(indptr, int(group["data"].shape[0]), where, offset=start, first=start == 0)
    lo, hi = int(indptr[0]), int(indptr[-1])
    data = group["data"][lo:hi]
    indices = group["indices"][lo:hi]
    _check_indices(indices, n_features, where, minor)
    return sp.csr_matrix((data, indices, indptr - lo), shape=(stop - start, n_features))


def _compound_frame(ds: h5py.Dataset) -> pd.DataFrame:
    """A pre-0.7 anndata dataframe: a compound (structured) dataset whose ``index`` field is the index."""
    table = ds[()]
    columns = {}
    for name in table.dtype.names:
        values = table[name]
        columns[name] = values.astype(str).astype(object) if values.dtype.kind in "SUO" else values
    index = columns.pop("index", None)
    if index is None:
        index = np.arange(len(table)).astype(str).astype(object)
    return pd.DataFrame(columns, index=pd.Index(index))


class _H5adObs:
    """Reads slices of an AnnData obs dataframe column by column straight from HDF5."""

    def __init__(self, path: Path, f: h5py.File) -> None:
        self.path = path
        node = f["obs"]
        self.legacy_frame: pd.DataFrame | None = None
        if isinstance(node, h5py.Group) and node.attrs.get("encoding-type") == "dataframe":
            self.index_key = str(node.attrs["_index"])
            self.columns = [str(c) for c in node.attrs.get("column-order", [])]
        elif isinstance(node, h5py.Dataset) and node.dtype.names:  # pre-0.7 compound obs (small: loaded once)
            self.legacy_frame = _compound_frame(node)
            self.index_key, self.columns = "", list(self.legacy_frame.columns)
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
    """AnnData .h5ad (files: matrix). Options: matrix "X" | "raw" | "auto" (raw when present, else X: the CELLxGENE
    rule) | "layers/<name>", gene_id_column
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
        if matrix in ("X", "auto"):
            self._matrix_key, var_key = "X", "var"
        elif matrix == "raw":
            self._matrix_key, var_key = "raw/X", "raw/var"
        elif isinstance(matrix, str) and matrix.startswith("layers/") and len(matrix) > len("layers/"):
            self._matrix_key, var_key = matrix, "var"
        else:
            raise CurationError(self.path, f"reader option matrix={matrix!r}: expected 'X', 'raw', 'auto' or "
                                           "'layers/<name>'")
        self._integer_problem = (f"matrix {matrix} holds non-integer values (normalised data?); "
                                 "set allow_normalised: true to accept")
        with _reading(self.path), h5py.File(self.path, "r") as f:
            if matrix == "auto":
                # CELLxGENE schema 5.0.0: raw counts are in raw.X unless no normalised matrix is given, then in X.
                self.matrix = matrix = "raw" if ("raw/X" in f or "raw.X" in f) else "X"
                self._matrix_key, var_key = ("raw/X", "raw/var") if matrix == "raw" else ("X", "var")
                self._integer_problem = (f"matrix {matrix} (chosen by matrix: auto) holds non-integer values "
                                         "(normalised data?); set allow_normalised: true to accept")
            if matrix == "raw" and self._matrix_key not in f and "raw.X" in f:
                # anndata < 0.7 kept .raw as top-level "raw.X" / "raw.var" (read by anndata's _read_legacy_raw)
                self._matrix_key, var_key = "raw.X", "raw.var"
            if self._matrix_key not in f:
                layers = sorted(f["layers"].keys()) if "layers" in f else []
                raise CurationError(self.path, f"has no matrix {matrix!r} (layers: {', '.join(layers) or 'none'})")
            node = f[self._matrix_key]
            self._layout, shape = self._layout_of(node)
            self.n_samples = int(shape[0])
            if self._layout != "dense":
                n_major = shape[0] if self._layout == "csr" else shape[1]
                if len(node["indptr"]) != n_major + 1:
                    raise CurationError(self.path, f"matrix {matrix}: indptr has {len(node['indptr'])} entries for "
                                                   f"{n_major} {'rows' if self._layout == 'csr' else 'columns'} "
                                                   "(corrupt compressed matrix)")
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
        if isinstance(node, h5py.Dataset) and node.dtype.names:
            return _compound_frame(node)
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
                    counts = _compressed_rows(node, start, stop, n_features, self.path, "column")
                else:
                    counts = sp.csr_matrix(node[start:stop])
                yield counts, self._obs.frame(f, start, stop)

    def _fill_from_csc(self, node: h5py.Group, store: _BucketStore, bar: tqdm) -> None:
        """Walk a CSC matrix in column blocks of about ``block_values`` entries into the bucket store."""
        indptr = node["indptr"][()].astype(np.int64)
        _check_indptr(indptr, int(node["data"].shape[0]), self.path, major="column", first=True)
        n_cols = len(indptr) - 1
        col = 0
        while col < n_cols:
            # Largest column block holding at most block_values entries (at least one column).
            stop = int(np.searchsorted(indptr, indptr[col] + self.block_values, side="right")) - 1
            stop = min(max(stop, col + 1), n_cols)
            lo, hi = int(indptr[col]), int(indptr[stop])
            cells = node["indices"][lo:hi]
            _check_indices(cells, store.n_samples, self.path, "row")
            genes = np.repeat(np.arange(col, stop, dtype=np.int64), np.diff(indptr[col:stop + 1]))
            store.add(cells, genes, node["data"][lo:hi])
            bar.update(stop - col)
            col = stop


class TenXH5Reader(Reader):
    """CellRanger HDF5 (files: matrix): v3 ``/matrix/{data,indices,indptr,shape,barcodes,features/...}`` or
    v2 ``/<genome>/{...,genes,gene_names}``. Stored CSC genes × cells, i.e. one compressed row per cell.

    Option genome: v2 multi-genome files (one group per genome, e.g. hg19 + mm10 barnyard runs) need it to
    pick the group; in v3 files it keeps only the features whose ``features/genome`` equals it."""

    fmt = "10x_h5"
    options = ("genome",)

    def __init__(self, files: dict[str, Path], genome: str | None = None, **common: Any) -> None:
        super().__init__(files, **common)
        self.path = files["matrix"]
        self.genome = genome
        self._keep: np.ndarray | None = None  # v3 with a genome option: the feature columns of that genome
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
                extra = {k: _h5_strings(feats[k]) for k in ("feature_type", "genome") if k in feats}
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
        self._n_stored_features = n_genes
        features = _features_frame(ids, symbols, **extra)
        if genome is not None and self._group == "matrix":
            if "genome" not in features.columns:
                raise CurationError(self.path, f"reader option genome={genome!r}: /matrix/features has no genome "
                                               "column (single-genome file; drop the option)")
            genomes = sorted(set(features["genome"]))
            if genome not in genomes:
                raise CurationError(self.path, f"reader option genome={genome!r}: not among the features' "
                                               f"genomes {', '.join(genomes)}")
            self._keep = np.flatnonzero(features["genome"].to_numpy() == genome)
            features = features.iloc[self._keep].reset_index(drop=True)
        self.features = features

    def _matrix_group(self, f: h5py.File) -> str:
        """The group holding the matrix: /matrix (CellRanger >= 3) or one /<genome> group (CellRanger 2)."""
        if "matrix" in f:
            return "matrix"
        candidates = sorted(k for k in f.keys() if isinstance(f[k], h5py.Group) and "indptr" in f[k])
        if self.genome is not None:
            if self.genome not in candidates:
                raise CurationError(self.path, f"reader option genome={self.genome!r}: no such genome group "
                                               f"(genome groups: {', '.join(candidates) or 'none'})")
            return self.genome
        if not candidates:
            raise CurationError(self.path, "not a CellRanger matrix HDF5 (no /matrix group and no genome group "
                                           "holding indptr)")
        if len(candidates) > 1:
            raise CurationError(self.path, f"multi-genome CellRanger file with genome groups "
                                           f"{', '.join(candidates)}; choose one with the reader option genome: <name>")
        return candidates[0]

    def _pieces(self, chunk_size: int) -> Iterator[tuple[sp.csr_matrix, pd.DataFrame]]:
        n = self.n_samples or 0
        with _reading(self.path), h5py.File(self.path, "r") as f:
            g = f[self._group]
            for start in range(0, n, chunk_size):
                stop = min(start + chunk_size, n)
                counts = _compressed_rows(g, start, stop, self._n_stored_features, self.path, "feature")
                if self._keep is not None:
                    counts = counts[:, self._keep]
                yield counts, pd.DataFrame({"source_id": self._barcodes[start:stop]})
