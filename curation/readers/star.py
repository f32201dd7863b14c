"""GDC STAR-Counts: one tab-separated file per sample."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import scipy.sparse as sp

from curation.io import CurationError

from curation.readers.tables import load_metadata_table
from curation.readers.base import Reader, _check_unique, _features_frame, _open_binary, _reading

_ENSEMBL_VERSION = re.compile(r"\.\d+(?=(_PAR_Y)?$)")
_STAR_SPECIAL_PREFIX = "N_"
_STAR_COLUMNS = ("gene_id", "gene_name", "gene_type", "unstranded", "stranded_first", "stranded_second",
                 "tpm_unstranded", "fpkm_unstranded", "fpkm_uq_unstranded")


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
