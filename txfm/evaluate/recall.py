"""Known-relationship recall: do vectors of related genes (perturbation aggregates, gene weights) stand out?

For vectors ``v_1..v_n`` named by gene symbols:

* the null is the cosine similarity of ``n_null`` random pairs ``(i, j)``, ``i ≠ j``, drawn uniformly with
  replacement from all ordered pairs (seeded);
* a pair is *called* when its cosine similarity is below the null's lower percentile or above its upper
  percentile (5/95 and 10/90 by default — so a random pair is called with probability 10 % / 20 %);
* recall of a database = share of its pairs (both genes among the named vectors, self pairs dropped,
  undirected and de-duplicated) that are called.

Only the needed similarities are computed (database pairs and null pairs), never the n × n matrix.
Databases are CSV files ``entity1,entity2`` of gene symbols (``resources/gene_relationships``); symbols are
matched case-insensitively.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from curation.io import CurationError

DATABASES = ("CORUM", "HuMAP", "Reactome", "SIGNOR", "StringDB")
RELATIONSHIP_DIR = Path(__file__).resolve().parents[2] / "resources" / "gene_relationships"
#: (lower, upper) percentiles of the null that call a pair.
THRESHOLDS: tuple[tuple[float, float], ...] = ((5.0, 95.0), (10.0, 90.0))
N_NULL_PAIRS = 5000


def threshold_tag(lower: float, upper: float) -> str:
    """'5_95' for (5, 95): the suffix of recall column names."""
    def fmt(value: float) -> str:
        return str(int(value)) if float(value).is_integer() else str(value).replace(".", "p")

    return f"{fmt(lower)}_{fmt(upper)}"


@functools.lru_cache(maxsize=16)
def _read_relationships(path: str, mtime: float) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise CurationError(path, f"cannot read as CSV ({exc})") from None
    if not {"entity1", "entity2"} <= set(frame.columns):
        raise CurationError(path, f"needs columns entity1,entity2; has {', '.join(frame.columns)}")
    a = frame["entity1"].str.strip().str.upper().to_numpy(dtype=object)
    b = frame["entity2"].str.strip().str.upper().to_numpy(dtype=object)
    keep = (a != "") & (b != "") & (a != b)
    first, second = np.where(a < b, a, b)[keep], np.where(a < b, b, a)[keep]  # undirected: order each pair
    return pd.DataFrame({"gene_a": first, "gene_b": second}).drop_duplicates(ignore_index=True)


def load_relationships(path: str | os.PathLike) -> pd.DataFrame:
    """Undirected, de-duplicated, self-pair-free relationships of one CSV: columns gene_a < gene_b (upper case)."""
    path = Path(path)
    if not path.is_file():
        raise CurationError(path, "relationship database not found")
    return _read_relationships(str(path), path.stat().st_mtime).copy()


def load_databases(directory: str | os.PathLike | None = None, names: Sequence[str] | None = None
                   ) -> dict[str, pd.DataFrame]:
    """``{name: relationships}`` of ``<directory>/<name>.txt``. Defaults: the shipped directory and its five
    databases; with another directory and no names, every ``*.txt`` in it."""
    directory = Path(directory) if directory is not None else RELATIONSHIP_DIR
    if names is None:
        names = DATABASES if directory == RELATIONSHIP_DIR else sorted(p.stem for p in directory.glob("*.txt"))
    if not names:
        raise CurationError(directory, "no relationship databases (*.txt) found")
    return {name: load_relationships(directory / f"{name}.txt") for name in names}


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float64); all-zero rows stay zero (similarity 0 to everything)."""
    vectors = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)


def null_pairs(n: int, n_null: int = N_NULL_PAIRS, seed: int = 0) -> np.ndarray:
    """(n_null, 2) int64 random index pairs (i, j), i ≠ j, uniform over ordered pairs of range(n)."""
    if n < 2:
        raise ValueError(f"a null of random pairs needs at least 2 vectors, got {n}")
    rng = np.random.default_rng([int(seed), 0x9A125])
    first = rng.integers(0, n, size=n_null)
    second = rng.integers(0, n - 1, size=n_null)
    second += second >= first  # skip i itself: uniform over the other n − 1
    return np.stack([first, second], axis=1)


@dataclass
class RecallResult:
    """``table``: one row per (database, threshold): database, lower, upper, n_pairs, n_called, recall.
    ``null_similarity`` (n_null,) and ``cutoffs`` {(lower, upper): (low value, high value)}."""

    table: pd.DataFrame
    null_similarity: np.ndarray
    cutoffs: dict[tuple[float, float], tuple[float, float]]

    def summary(self, prefix: str = "recall") -> dict[str, float]:
        """Flat metrics: ``{prefix}_{db}_{tag}`` and ``{prefix}_avg_{tag}`` (mean over databases with pairs)."""
        out: dict[str, float] = {}
        for (lower, upper), rows in self.table.groupby(["lower", "upper"], sort=False):
            tag = threshold_tag(lower, upper)
            for database, recall in zip(rows["database"], rows["recall"]):
                out[f"{prefix}_{database}_{tag}"] = float(recall)
            finite = rows["recall"].dropna()
            out[f"{prefix}_avg_{tag}"] = float(finite.mean()) if len(finite) else float("nan")
        return out


def relationship_recall(vectors: np.ndarray, names: Sequence[str], databases: dict[str, pd.DataFrame],
                        n_null: int = N_NULL_PAIRS, seed: int = 0,
                        thresholds: Sequence[tuple[float, float]] = THRESHOLDS) -> RecallResult:
    """Recall of each database's pairs among the vectors (module docstring). vectors (n, d), names (n,)."""
    vectors = np.asarray(vectors, dtype=np.float64)
    if vectors.ndim != 2 or vectors.shape[0] != len(names):
        raise ValueError(f"vectors {vectors.shape} and {len(names)} names do not match")
    units = unit_rows(vectors)
    pairs = null_pairs(len(units), n_null, seed)
    null = np.einsum("ij,ij->i", units[pairs[:, 0]], units[pairs[:, 1]])
    cutoffs = {(float(lo), float(hi)): tuple(float(v) for v in np.percentile(null, [lo, hi])) for lo, hi in thresholds}
    index = pd.Index(pd.Series(list(names), dtype=object).astype(str).str.upper())
    first_of = pd.Series(np.arange(len(index)), index=index)
    first_of = first_of[~first_of.index.duplicated(keep="first")]  # a symbol named twice: its first vector
    rows = []
    for database, relations in databases.items():
        a = first_of.reindex(relations["gene_a"]).to_numpy()
        b = first_of.reindex(relations["gene_b"]).to_numpy()
        present = ~(np.isnan(a) | np.isnan(b))
        a, b = a[present].astype(np.int64), b[present].astype(np.int64)
        similarity = np.einsum("ij,ij->i", units[a], units[b])
        for (lower, upper), (low, high) in cutoffs.items():
            called = int(((similarity < low) | (similarity > high)).sum())
            rows.append({"database": database, "lower": lower, "upper": upper, "n_pairs": int(a.size),
                         "n_called": called, "recall": called / a.size if a.size else float("nan")})
    return RecallResult(table=pd.DataFrame(rows), null_similarity=null, cutoffs=cutoffs)
