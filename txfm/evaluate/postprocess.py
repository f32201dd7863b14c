"""EFAAR-style post-processing of cell embeddings, streamed: the benchmark's Embed → Filter → Align → Aggregate.

For one embedder over one screen, in three passes over the cells (memory independent of the cell count):

1. **Control statistics** — per batch, mean and standard deviation of every embedding feature over that
   batch's control cells (shifted sums in float64). A batch without controls uses the pooled controls.
2. **Align** — every cell is centred and scaled on its batch's controls (z-scores, clipped to ±``Z_CLIP``);
   a PCA is fitted on the standardised *control* cells (incremental) and applied with whitening, so control
   variation has identity covariance.
3. **Aggregate** — the processed cell embeddings (n_cells × n_components float32) are appended to a scratch
   file on disk and one running sum per perturbation is kept; the aggregate of a perturbation is its mean.

Std floor: a feature's batch std is at least half its pooled-control std, which is at least 1 % of the mean
pooled-control std over features, so a feature (nearly) constant in one batch's controls cannot explode.

The raw embedding is recomputed from the counts at each pass when it is wide (Lib+Log has one feature per
gene) and cached once in a scratch file otherwise (model embeddings, PCs), so an expensive embedder runs once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import scipy.sparse as sp

from txfm.evaluate.embedders import Embedder
from txfm.evaluate.pca import StreamingPCA
from txfm.evaluate.screen import MAX_CHUNK_ELEMENTS, MAX_CHUNK_ROWS, MIN_CHUNK_ROWS, Screen

Z_CLIP = 10.0
BATCH_STD_FLOOR = 0.5  # × the feature's pooled-control std
GLOBAL_STD_FLOOR = 0.01  # × the mean pooled-control std over features
#: Raw embeddings up to this width (model and PCA embeddings) are cached on disk after their first computation.
MAX_CACHED_DIM = 1024


class ChunkFile:
    """A (n_rows, dim) float32 matrix appended in row blocks to a scratch file and read back in blocks.

    Plain file I/O (not a memory map), so rows on disk never count towards the process's resident memory.
    """

    def __init__(self, path: str | os.PathLike, dim: int):
        self.path, self.dim, self.n_rows = Path(path), int(dim), 0
        self._handle = open(self.path, "wb")  # noqa: SIM115 (closed by finish())

    def append(self, rows: np.ndarray) -> None:
        """Append a (n, dim) block."""
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise ValueError(f"{self.path}: block of shape {rows.shape}, expected (n, {self.dim})")
        self._handle.write(rows.tobytes())
        self.n_rows += len(rows)

    def finish(self) -> "ChunkFile":
        """Stop writing (flush and close)."""
        if not self._handle.closed:
            self._handle.close()
        return self

    def chunks(self, rows_per_chunk: int | None = None) -> Iterator[tuple[int, int, np.ndarray]]:
        """Yield ``(start, stop, rows (stop−start, dim) float32)`` in order; by default blocks of about
        MAX_CHUNK_ELEMENTS values, like the screen's count chunks."""
        self.finish()
        if rows_per_chunk is None:
            rows_per_chunk = int(np.clip(MAX_CHUNK_ELEMENTS // self.dim, MIN_CHUNK_ROWS, MAX_CHUNK_ROWS))
        with open(self.path, "rb") as handle:
            for start in range(0, self.n_rows, rows_per_chunk):
                stop = min(start + rows_per_chunk, self.n_rows)
                block = np.fromfile(handle, dtype=np.float32, count=(stop - start) * self.dim)
                yield start, stop, block.reshape(stop - start, self.dim)

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """Rows at sorted unique indices ``rows`` (m,) → (m, dim), streaming over the file."""
        out = np.empty((rows.size, self.dim), dtype=np.float32)
        for start, stop, block in self.chunks():
            lo, hi = np.searchsorted(rows, [start, stop])
            out[lo:hi] = block[rows[lo:hi] - start]
        return out

    def remove(self) -> None:
        self.finish()
        self.path.unlink(missing_ok=True)


class EmbeddingSource:
    """The raw embedding of a screen by a fitted embedder, as a re-iterable stream of row blocks."""

    def __init__(self, screen: Screen, embedder: Embedder, scratch_dir: str | os.PathLike, progress: bool = True):
        self.screen, self.embedder, self.progress = screen, embedder, progress
        self.cache_path = Path(scratch_dir) / f"raw-{embedder.name}.f32"
        self.cache: ChunkFile | None = None
        self._cached = False

    def chunks(self, desc: str) -> Iterator[tuple[int, int, np.ndarray]]:
        """Yield ``(start, stop, embedding (n, dim) float64)`` over all cells."""
        if self._cached:
            for start, stop, block in self.cache.chunks():
                yield start, stop, block.astype(np.float64)
            return
        if self.embedder.dim <= MAX_CACHED_DIM:  # (re)start the cache: a pass abandoned half-way left it partial
            self.cache = ChunkFile(self.cache_path, self.embedder.dim)
        for start, stop, counts in self.screen.chunks(f"{self.embedder.name}: {desc}", self.progress):
            emb = np.asarray(self.embedder.transform(counts, start, stop), dtype=np.float64)
            if emb.shape != (stop - start, self.embedder.dim):
                raise ValueError(f"embedder {self.embedder.name}: returned {emb.shape} for {stop - start} cells, "
                                 f"expected dim {self.embedder.dim}")
            if not np.isfinite(emb).all():
                raise ValueError(f"embedder {self.embedder.name}: non-finite embeddings in rows {start}–{stop - 1}")
            if self.cache is not None:
                self.cache.append(emb)
            yield start, stop, emb
        if self.cache is not None:
            self._cached = self.cache.finish().n_rows == self.screen.n_cells

    def control_chunks(self, desc: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(batch codes (m,), embedding (m, dim) float64)`` of the control cells only.

        A wide, row-independent embedder (Lib+Log) embeds just the control rows; otherwise the full pass runs
        (filling the cache on the way) and the control rows are picked out.
        """
        screen = self.screen
        if self._cached or self.embedder.dim <= MAX_CACHED_DIM or not self.embedder.row_independent:
            for start, stop, emb in self.chunks(desc):
                control = screen.is_control[start:stop]
                if control.any():
                    yield screen.batch[start:stop][control], emb[control]
            return
        for start, stop, counts in screen.chunks(f"{self.embedder.name}: {desc}", self.progress):
            control = np.flatnonzero(screen.is_control[start:stop])
            if control.size:
                emb = np.asarray(self.embedder.transform(counts[control], start, stop), dtype=np.float64)
                if emb.shape != (control.size, self.embedder.dim) or not np.isfinite(emb).all():
                    raise ValueError(f"embedder {self.embedder.name}: bad embedding of the controls in rows "
                                     f"{start}–{stop - 1} (shape {emb.shape}, or non-finite values)")
                yield screen.batch[start:stop][control], emb

    def remove(self) -> None:
        if self.cache is not None:
            self.cache.remove()


@dataclass
class ControlStatistics:
    """Per-batch control mean/std of each feature: ``mean``/``std`` (n_batches, dim); ``has_controls`` (n_batches,)."""

    mean: np.ndarray
    std: np.ndarray
    has_controls: np.ndarray
    n_controls: int

    def standardise(self, emb: np.ndarray, batch: np.ndarray) -> np.ndarray:
        """Z-scores of (n, dim) rows against their batch's controls (int codes (n,)), clipped to ±Z_CLIP."""
        z = (emb - self.mean[batch]) / self.std[batch]
        return np.clip(z, -Z_CLIP, Z_CLIP, out=z)


def control_statistics(source: EmbeddingSource) -> ControlStatistics:
    """Pass 1: per-batch mean and std of the control cells (shifted sums for numerical accuracy)."""
    screen = source.screen
    n_batches, dim = len(screen.batches), source.embedder.dim
    shift: np.ndarray | None = None
    sums, sq_sums = np.zeros((n_batches, dim)), np.zeros((n_batches, dim))
    n = np.zeros(n_batches, dtype=np.int64)
    for codes, x in source.control_chunks("control statistics"):
        if shift is None:
            shift = x.mean(axis=0)
        x = x - shift
        indicator = sp.csr_matrix((np.ones(codes.size), (codes, np.arange(codes.size))), shape=(n_batches, codes.size))
        sums += indicator @ x
        sq_sums += indicator @ (x * x)
        n += np.bincount(codes, minlength=n_batches)
    return _finish_statistics(sums, sq_sums, n, shift, screen.label_for_errors)


def control_statistics_dense(emb: np.ndarray, batch: np.ndarray, is_control: np.ndarray,
                             n_batches: int) -> ControlStatistics:
    """:func:`control_statistics` of an in-memory embedding (n, dim) with batch codes (n,) and control mask (n,)."""
    x = np.asarray(emb, dtype=np.float64)[is_control]
    codes = np.asarray(batch)[is_control]
    shift = x.mean(axis=0) if len(x) else np.zeros(emb.shape[1])
    x = x - shift
    n = np.bincount(codes, minlength=n_batches)
    sums, sq_sums = np.zeros((n_batches, emb.shape[1])), np.zeros((n_batches, emb.shape[1]))
    np.add.at(sums, codes, x)
    np.add.at(sq_sums, codes, x * x)
    return _finish_statistics(sums, sq_sums, n, shift, "embedding")


def _finish_statistics(sums: np.ndarray, sq_sums: np.ndarray, n: np.ndarray, shift: np.ndarray | None,
                       where: str) -> ControlStatistics:
    """Per-batch means/stds (with the documented floors) from shifted per-batch sums (n_batches, dim)."""
    n_controls = int(n.sum())
    if n_controls < 2:
        raise ValueError(f"{where}: post-processing needs at least 2 control cells, found {n_controls}")
    pooled_mean = sums.sum(axis=0) / n_controls
    pooled_var = np.maximum(sq_sums.sum(axis=0) / n_controls - pooled_mean ** 2, 0.0)
    pooled_std = np.sqrt(pooled_var)
    pooled_std = np.maximum(pooled_std, max(GLOBAL_STD_FLOOR * float(pooled_std.mean()), np.finfo(np.float64).tiny))
    has = n > 0
    safe_n = np.maximum(n, 1)[:, None]
    mean = np.where(has[:, None], sums / safe_n, pooled_mean)
    var = np.where(has[:, None], np.maximum(sq_sums / safe_n - mean ** 2, 0.0), pooled_var)
    std = np.maximum(np.sqrt(var), BATCH_STD_FLOOR * pooled_std)
    std[~has] = pooled_std
    return ControlStatistics(mean=mean + shift, std=std, has_controls=has, n_controls=n_controls)


@dataclass
class Postprocessed:
    """Result of :func:`efaar`.

    ``cells``: processed cell embeddings on disk (n_cells, n_components); ``perturbations`` (P,) sorted labels
    (controls excluded); ``aggregates`` (P, n_components) float64 means; ``n_cells_per`` (P,) int.
    """

    cells: ChunkFile
    perturbations: np.ndarray
    aggregates: np.ndarray
    n_cells_per: np.ndarray
    n_components: int
    explained_variance_ratio: float
    batches_without_controls: list[str] = field(default_factory=list)

    def info(self) -> dict[str, Any]:
        return {"n_components": int(self.n_components), "explained_variance_ratio": self.explained_variance_ratio,
                "n_perturbations": int(self.perturbations.size),
                "batches_without_controls": list(self.batches_without_controls)}


def efaar(source: EmbeddingSource, scratch_dir: str | os.PathLike, n_components: int = 128) -> Postprocessed:
    """Passes 1–3 (module docstring) for one embedder. The caller removes ``result.cells`` when done."""
    screen = source.screen
    stats = control_statistics(source)
    k = min(int(n_components), source.embedder.dim, stats.n_controls - 1)
    pca = StreamingPCA(k)
    for codes, emb in source.control_chunks("PCA on controls"):
        pca.add(stats.standardise(emb, codes))
    pca.finish()

    labels = screen.perturbation_labels
    codes, names = pd.factorize(labels, use_na_sentinel=True)
    sums = np.zeros((len(names), k))
    cells = ChunkFile(Path(scratch_dir) / f"processed-{source.embedder.name}.f32", k)
    for start, stop, emb in source.chunks("align and aggregate"):
        processed = pca.transform(stats.standardise(emb, screen.batch[start:stop]), whiten=True)
        cells.append(processed)
        chunk_codes = codes[start:stop]
        labelled = chunk_codes >= 0
        indicator = sp.csr_matrix((np.ones(int(labelled.sum())), (chunk_codes[labelled], np.flatnonzero(labelled))),
                                  shape=(len(names), stop - start))
        sums += indicator @ processed
    cells.finish()
    counts = np.bincount(codes[codes >= 0], minlength=len(names))
    order = np.argsort(np.asarray(names, dtype=str), kind="stable")
    return Postprocessed(cells=cells, perturbations=np.asarray(names, dtype=object)[order],
                         aggregates=sums[order] / counts[order, None], n_cells_per=counts[order], n_components=k,
                         explained_variance_ratio=pca.explained_variance_ratio,
                         batches_without_controls=[str(b) for b in screen.batches[~stats.has_controls]])
