"""PCA fitted on a stream of row blocks (sklearn ``IncrementalPCA`` with a bounded row buffer)."""

from __future__ import annotations

import numpy as np
from sklearn.decomposition import IncrementalPCA


class StreamingPCA:
    """Feed row blocks of any size with :meth:`add`; call :meth:`finish`; then :meth:`transform`.

    ``IncrementalPCA.partial_fit`` needs at least ``n_components`` rows per call, and its cost per call is
    O((n_components + rows)² · n_features); blocks of about ``2 · n_components`` rows minimise the total.
    The buffer fits ``batch_rows`` rows only while it holds ≥ 2·batch_rows, so whatever is left at
    :meth:`finish` has ≥ batch_rows rows (or is the whole, small, stream). Memory: 2·batch_rows × n_features.
    """

    def __init__(self, n_components: int, batch_rows: int | None = None):
        if n_components < 1:
            raise ValueError(f"n_components must be >= 1, got {n_components}")
        self.n_components = int(n_components)
        self.batch_rows = max(int(batch_rows or 2 * n_components), self.n_components)
        self.pca = IncrementalPCA(n_components=self.n_components)
        self._pending: list[np.ndarray] = []
        self._n_pending = 0
        self.n_seen = 0
        self.fitted = False

    def add(self, rows: np.ndarray) -> None:
        """Offer a (n, n_features) block."""
        if len(rows) == 0:
            return
        self._pending.append(np.asarray(rows, dtype=np.float64))
        self._n_pending += len(rows)
        self.n_seen += len(rows)
        if self._n_pending >= 2 * self.batch_rows:
            buffered = np.concatenate(self._pending)
            stop = len(buffered) - len(buffered) % self.batch_rows - self.batch_rows  # leave ≥ batch_rows
            for start in range(0, stop, self.batch_rows):
                self.pca.partial_fit(buffered[start:start + self.batch_rows])
            self._pending, self._n_pending = [buffered[stop:]], len(buffered) - stop

    def finish(self) -> "StreamingPCA":
        """Fit the rows still buffered. ValueError when fewer than n_components rows were seen in total."""
        if self.n_seen < self.n_components:
            raise ValueError(f"PCA with {self.n_components} components needs at least that many rows, "
                             f"got {self.n_seen}")
        if self._n_pending:
            self.pca.partial_fit(np.concatenate(self._pending))
        self._pending, self._n_pending, self.fitted = [], 0, True
        return self

    def transform(self, rows: np.ndarray, whiten: bool = False) -> np.ndarray:
        """(n, n_features) → (n, n_components) scores; ``whiten`` divides each by its component's std.

        Components with (numerically) zero variance — a rank-deficient fit — are set to 0 when whitening
        rather than divided by zero.
        """
        scores = self.pca.transform(np.asarray(rows, dtype=np.float64))
        if whiten:
            variance = self.pca.explained_variance_
            usable = variance > 1e-12 * max(float(variance.max()), np.finfo(np.float64).tiny)
            scale = np.divide(1.0, np.sqrt(variance), out=np.zeros_like(variance), where=usable)
            scores *= scale
        return scores

    @property
    def explained_variance_ratio(self) -> float:
        """Share of the variance the components explain (sum over components)."""
        return float(np.sum(self.pca.explained_variance_ratio_))
