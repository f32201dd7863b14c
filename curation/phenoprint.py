"""Phenoprint pruning of perturbation screens: drop perturbations whose cells show no consistent phenotype.

In a genome-wide Perturb-seq screen most perturbations leave no detectable transcriptional signature (the
TxFM paper prunes about 75 % of K562 GWPS cells). A perturbation is *consistent* when its cells point the
same way in an embedding: the mean pairwise cosine similarity of its cells, compared with random sets of the
same size drawn from all cells. Perturbations with a permutation p-value below ``p_threshold`` are kept,
together with the control cells; the cells of every other perturbation are listed as pruned.

:func:`perturbation_consistency` is embedding-agnostic and shared with ``txfm.evaluate``.
:func:`run_phenoprint` embeds a curated dataset (default: control-standardised log-normalised expression
projected on a PCA fitted to control cells; or any ``embed_fn``) in streaming passes whose memory does not
depend on the number of cells: per-batch per-gene statistics, an incremental PCA, a reservoir of embedded
cells, and one d-dimensional sum per perturbation.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import scipy.sparse as sp
from sklearn.decomposition import IncrementalPCA
from tqdm.auto import tqdm

from curation.intermediates import PHENOPRINT_PRUNED_FILE, PHENOPRINT_SUMMARY_FILE, curated_paths, load_panel
from curation.io import CurationError, atomic_path
from curation.qc import row_sums

log = logging.getLogger(__name__)

#: Called on each chunk of cells: (raw counts over the panel, csr (n_cells, n_panel_genes) float32; the panel
#: as sorted reference gene indices (n_panel_genes,); obs with columns sample_id, batch, perturbation)
#: -> embeddings (n_cells, d). A txfm checkpoint embedding plugs in here.
EmbedFn = Callable[[sp.csr_matrix, np.ndarray, pd.DataFrame], np.ndarray]

PHENOPRINT_SCHEMA = pa.schema([
    pa.field("sample_id", pa.string(), nullable=False),
    pa.field("perturbation", pa.string()),
    pa.field("reason", pa.string(), nullable=False),
])

TARGET_SUM = 1e4  # library-size normalisation target (counts per 10k)
#: Floor on a gene's control standard deviation (log1p CP10k units), so near-constant genes do not explode.
STD_FLOOR = 1e-2
#: Standardised values are clipped to ±Z_CLIP, as scanpy's scale(max_value=10) does, so that a gene never
#: expressed in a batch's controls cannot dominate a cell's embedding.
Z_CLIP = 10.0
#: Upper bound on float elements materialised at once (dense chunks, gathered null sets): 8 Mi = 64 MiB of float64.
MAX_ELEMENTS = 1 << 23


# ------------------------------------------------------------------------------ consistency statistic

def _set_consistency(sums: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Mean pairwise cosine similarity from sums of unit vectors: (‖Σu‖² − n) / (n (n − 1)).

    ``sums`` (k, d), ``sizes`` (k,) with sizes ≥ 2 -> (k,).
    """
    sizes = np.asarray(sizes, dtype=np.float64)
    return (np.einsum("ij,ij->i", sums, sums) - sizes) / (sizes * (sizes - 1.0))


def _unit_rows(emb: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float64). Zero or non-finite rows are a ValueError."""
    emb = np.asarray(emb, dtype=np.float64)
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (n, d), got shape {emb.shape}")
    norms = np.linalg.norm(emb, axis=1)
    if not np.all(np.isfinite(norms)) or np.any(norms == 0):
        raise ValueError("embeddings contain zero-norm or non-finite rows; cosine similarity is undefined")
    return emb / norms[:, None]


class _Reservoir:
    """Uniform sample without replacement of at most ``capacity`` rows of a stream (Vitter's algorithm R).

    While the stream is no longer than ``capacity``, the reservoir holds every row in arrival order.
    """

    def __init__(self, capacity: int, rng: np.random.Generator):
        if capacity < 2:
            raise ValueError(f"reservoir must hold at least 2 cells, got {capacity}")
        self.capacity = int(capacity)
        self.rng = rng
        self.rows: np.ndarray | None = None  # (capacity, d)
        self.filled = 0
        self.seen = 0

    def add(self, chunk: np.ndarray) -> None:
        """Offer the rows of ``chunk`` (n, d) to the reservoir."""
        if self.rows is None:
            self.rows = np.empty((self.capacity, chunk.shape[1]), dtype=chunk.dtype)
        n_direct = min(self.capacity - self.filled, len(chunk))
        self.rows[self.filled:self.filled + n_direct] = chunk[:n_direct]
        self.filled += n_direct
        rest = chunk[n_direct:]
        if len(rest):
            # Row number t (0-based, over the whole stream) replaces a uniform slot j in [0, t] if j < capacity.
            t = self.seen + n_direct + np.arange(len(rest))
            slot = self.rng.integers(0, t + 1)
            hit = np.flatnonzero(slot < self.capacity)
            # When a slot is hit twice in one chunk the later row wins, as in the sequential algorithm.
            _, last = np.unique(slot[hit][::-1], return_index=True)
            winners = hit[::-1][last]
            self.rows[slot[winners]] = rest[winners]
        self.seen += len(chunk)

    def sample(self) -> np.ndarray:
        """The retained rows, (filled, d)."""
        return np.zeros((0, 0)) if self.rows is None else self.rows[:self.filled]


def null_draw_indices(pool_size: int, set_size: int, n_null: int, seed: int = 0) -> np.ndarray:
    """The ``n_null`` random sets used as the null for sets of ``set_size``: (n_null, set_size) pool indices.

    Each row is drawn without replacement from ``range(pool_size)`` by
    ``np.random.default_rng([seed, set_size]).choice(pool_size, set_size, replace=False)``, in row order.
    Seeding per set size makes a perturbation's p-value independent of the other perturbations.
    """
    return np.concatenate(list(_null_draw_blocks(pool_size, set_size, n_null, seed, block=max(n_null, 1))))


def _null_draw_blocks(pool_size: int, set_size: int, n_null: int, seed: int, block: int) -> Iterator[np.ndarray]:
    """:func:`null_draw_indices` in blocks of at most ``block`` rows."""
    rng = np.random.default_rng([int(seed), int(set_size)])
    for start in range(0, n_null, block):
        count = min(block, n_null - start)
        yield np.stack([rng.choice(pool_size, size=set_size, replace=False) for _ in range(count)])


def _null_consistency(pool: np.ndarray, set_size: int, n_null: int, seed: int) -> np.ndarray:
    """Consistency of the ``n_null`` random sets of ``set_size`` rows of ``pool`` (unit rows) -> (n_null,)."""
    block = max(1, MAX_ELEMENTS // (set_size * max(pool.shape[1], 1)))
    parts = [_set_consistency(pool[idx].sum(axis=1), np.full(len(idx), set_size))
             for idx in _null_draw_blocks(len(pool), set_size, n_null, seed, block)]
    return np.concatenate(parts)


def perturbation_consistency(emb_iter: Iterable[tuple[np.ndarray, np.ndarray]], n_null: int = 1000, seed: int = 0,
                             reservoir: int = 20000) -> pd.DataFrame:
    """Score how consistently each perturbation moves its cells in an embedding, with a permutation p-value.

    Args:
        emb_iter: yields ``(embeddings (n, d) float, perturbation labels (n,))`` chunks; labels may be any
            hashable; None/NaN labels are not scored but join the null pool.
        n_null: random sets per set size in the null.
        seed: seeds the reservoir and the null draws (see :func:`null_draw_indices`).
        reservoir: cells kept (uniformly at random) as the pool the null sets are drawn from.

    Returns:
        One row per labelled perturbation (sorted by label): ``perturbation``, ``n_cells``, ``consistency``
        (mean pairwise cosine similarity of its cells), ``null_mean`` (mean over the random sets of the
        same size), ``p_value`` = (1 + #{null ≥ observed}) / (1 + n_null). Consistency is NaN for a single
        cell; null_mean and p_value are NaN when there are fewer pool cells than ``n_cells``.
    """
    if n_null < 1:
        raise ValueError(f"n_null must be >= 1, got {n_null}")
    pool = _Reservoir(reservoir, np.random.default_rng([int(seed), 0x5EED]))
    code_of: dict = {}
    sums = np.zeros((0, 0))
    counts = np.zeros(0, dtype=np.int64)
    dim = None
    for emb, labels in emb_iter:
        units = _unit_rows(emb)
        labels = np.asarray(labels, dtype=object)
        if len(labels) != len(units):
            raise ValueError(f"chunk has {len(units)} embeddings but {len(labels)} labels")
        if dim is None:
            dim = units.shape[1]
            sums = np.zeros((16, dim))
            counts = np.zeros(16, dtype=np.int64)
        elif units.shape[1] != dim:
            raise ValueError(f"embedding dimension changed from {dim} to {units.shape[1]} between chunks")
        pool.add(units)
        local, uniques = pd.factorize(labels, use_na_sentinel=True)
        labelled = local >= 0
        if not labelled.any():
            continue
        for label in uniques:
            code_of.setdefault(label, len(code_of))
        if len(code_of) > len(sums):  # amortised growth of the per-perturbation sums
            grown = np.zeros((max(len(code_of), 2 * len(sums)), dim))
            grown[:len(sums)] = sums
            sums = grown
            counts = np.concatenate([counts, np.zeros(len(sums) - len(counts), np.int64)])
        codes = np.array([code_of[u] for u in uniques], dtype=np.int64)[local[labelled]]
        # Per-perturbation sums of this chunk as one sparse (indicator × units) product.
        indicator = sp.csr_matrix((np.ones(len(codes)), (codes, np.arange(len(codes)))),
                                  shape=(len(sums), len(codes)))
        sums += indicator @ units[labelled]
        counts += np.bincount(codes, minlength=len(sums))

    labels_in_order = list(code_of)
    table = pd.DataFrame({"perturbation": labels_in_order,
                          "n_cells": counts[:len(labels_in_order)].astype(np.int64)})
    table["consistency"] = np.nan
    table["null_mean"] = np.nan
    table["p_value"] = np.nan
    multi = table["n_cells"].to_numpy() >= 2
    table.loc[multi, "consistency"] = _set_consistency(sums[:len(table)][multi], table.loc[multi, "n_cells"])

    pool_units = pool.sample()
    for size in sorted(set(table.loc[multi, "n_cells"])):
        if size > len(pool_units):
            log.info("perturbations with %d cells exceed the %d-cell null pool; no p-value", size, len(pool_units))
            continue
        null = np.sort(_null_consistency(pool_units, int(size), n_null, seed))
        rows = table.index[table["n_cells"] == size]
        observed = table.loc[rows, "consistency"].to_numpy()
        at_least = n_null - np.searchsorted(null, observed, side="left")
        table.loc[rows, "null_mean"] = float(null.mean())
        table.loc[rows, "p_value"] = (1.0 + at_least) / (1.0 + n_null)
    order = np.argsort(np.array([str(p) for p in table["perturbation"]]), kind="stable")
    return table.iloc[order].reset_index(drop=True)


# ------------------------------------------------------------------------------- curated-dataset reading

def _batch_to_csr(batch: pa.RecordBatch, panel: np.ndarray, where: Path) -> sp.csr_matrix:
    """Expression of a record batch as csr (n_cells, n_panel_genes) float32 raw counts, columns = panel order."""
    idx_col, cnt_col = batch.column("gene_idx"), batch.column("counts")
    lengths = pc.list_value_length(idx_col).to_numpy(zero_copy_only=False)
    if not np.array_equal(lengths, pc.list_value_length(cnt_col).to_numpy(zero_copy_only=False)):
        raise CurationError(where, "gene_idx and counts lists differ in length")
    genes = pc.list_flatten(idx_col).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    values = pc.list_flatten(cnt_col).to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    # A lookup table over the reference index space (a few hundred kB) is much faster than searchsorted.
    lookup = _panel_lookup(panel)
    if genes.size and (genes.min() < 0 or genes.max() >= lookup.size):
        raise CurationError(where, "gene_idx outside the dataset panel of report.json")
    columns = lookup[genes]
    if np.any(columns < 0):
        raise CurationError(where, "gene_idx outside the dataset panel of report.json")
    indptr = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    return sp.csr_matrix((values, columns, indptr), shape=(len(lengths), panel.size))


@functools.lru_cache(maxsize=4)
def _panel_lookup_cached(panel_bytes: bytes) -> np.ndarray:
    panel = np.frombuffer(panel_bytes, dtype=np.int64)
    lookup = np.full(int(panel[-1]) + 1, -1, dtype=np.int64)
    lookup[panel] = np.arange(panel.size)
    return lookup


def _panel_lookup(panel: np.ndarray) -> np.ndarray:
    """reference gene index -> column in the panel (-1: not in the panel); shape (max(panel) + 1,)."""
    return _panel_lookup_cached(np.ascontiguousarray(panel, dtype=np.int64).tobytes())


def log_normalise(counts: sp.csr_matrix, target_sum: float = TARGET_SUM) -> sp.csr_matrix:
    """log1p(count / library · target_sum) per cell, sparse; cells with no counts stay all-zero. (n × g) → (n × g)

    Shared with the evaluation harness (txfm.evaluate), whose Lib+Log baseline is the same transform.
    """
    library = row_sums(counts)
    scale = np.divide(target_sum, library, out=np.zeros_like(library), where=library > 0)
    out = sp.csr_matrix(counts, dtype=np.float64, copy=True)
    out.data *= np.repeat(scale, np.diff(out.indptr))
    np.log1p(out.data, out=out.data)
    return out


class _Chunks:
    """Streams a curated samples.parquet in bounded chunks: (csr counts over the panel, obs DataFrame)."""

    def __init__(self, samples: Path, panel: np.ndarray, progress: bool):
        self.samples = samples
        self.panel = panel
        self.progress = progress
        self.file = pq.ParquetFile(samples, pre_buffer=False)  # True would buffer the whole file up front
        missing = {"sample_id", "batch", "perturbation", "gene_idx", "counts"} - set(self.file.schema_arrow.names)
        if missing:
            raise CurationError(samples, f"missing column(s) {', '.join(sorted(missing))}")
        # Rows per chunk such that a dense (rows × genes) float64 block stays under MAX_ELEMENTS.
        self.rows = int(np.clip(MAX_ELEMENTS // panel.size, 64, 16384))
        self.n_cells = self.file.metadata.num_rows

    def obs(self, desc: str) -> Iterator[pd.DataFrame]:
        """Metadata only (sample_id, batch, perturbation), without reading expression."""
        with tqdm(total=self.n_cells, desc=desc, unit="cell", disable=not self.progress, leave=False) as bar:
            for batch in self.file.iter_batches(batch_size=65536, columns=["sample_id", "batch", "perturbation"]):
                bar.update(batch.num_rows)
                yield batch.to_pandas()

    def __call__(self, desc: str) -> Iterator[tuple[sp.csr_matrix, pd.DataFrame]]:
        columns = ["sample_id", "batch", "perturbation", "gene_idx", "counts"]
        with tqdm(total=self.n_cells, desc=desc, unit="cell", disable=not self.progress, leave=False) as bar:
            for batch in self.file.iter_batches(batch_size=self.rows, columns=columns):
                bar.update(batch.num_rows)
                obs = batch.select(["sample_id", "batch", "perturbation"]).to_pandas()
                yield _batch_to_csr(batch, self.panel, self.samples), obs


# ------------------------------------------------------------------------------- default embedding

class ControlPCAEmbedding:
    """log1p-CP10k -> z-score against each batch's control cells -> PCA fitted on control cells.

    ``fit`` makes two streaming passes (per-batch control statistics, then an IncrementalPCA over the
    standardised controls); ``embed`` then maps any chunk. Memory: O(n_batches × n_genes + chunk × n_genes).
    """

    def __init__(self, n_components: int = 50):
        self.n_components = int(n_components)
        self.mean: dict[str, np.ndarray] = {}
        self.std: dict[str, np.ndarray] = {}
        self.pooled: tuple[np.ndarray, np.ndarray] | None = None
        self.pca: IncrementalPCA | None = None

    def fit(self, chunks: _Chunks, is_control: Callable[[pd.Series], np.ndarray]) -> "ControlPCAEmbedding":
        n_genes = chunks.panel.size
        sums: dict[str, np.ndarray] = {}
        sq_sums: dict[str, np.ndarray] = {}
        n: dict[str, int] = {}
        for counts, obs in chunks("phenoprint: control statistics"):
            ctrl = np.flatnonzero(is_control(obs["perturbation"]))
            if ctrl.size == 0:
                continue
            x = log_normalise(counts[ctrl])
            batch_codes, batches = pd.factorize(obs["batch"].to_numpy()[ctrl])
            indicator = sp.csr_matrix((np.ones(ctrl.size), (batch_codes, np.arange(ctrl.size))),
                                      shape=(len(batches), ctrl.size))
            s = np.asarray((indicator @ x).todense())
            s2 = np.asarray((indicator @ x.multiply(x)).todense())
            per_batch = np.bincount(batch_codes, minlength=len(batches))
            for k, b in enumerate(batches):
                sums[b] = sums.get(b, np.zeros(n_genes)) + s[k]
                sq_sums[b] = sq_sums.get(b, np.zeros(n_genes)) + s2[k]
                n[b] = n.get(b, 0) + int(per_batch[k])
        n_controls = sum(n.values())
        if n_controls < 2:
            raise CurationError(chunks.samples, f"phenoprint needs control cells; found {n_controls}")
        for b in sums:
            self.mean[b], self.std[b] = _mean_std(sums[b], sq_sums[b], n[b])
        self.pooled = _mean_std(sum(sums.values()), sum(sq_sums.values()), n_controls)

        k = min(self.n_components, n_controls, n_genes)
        if k < self.n_components:
            log.warning("%s: PCA reduced to %d components (%d controls, %d genes)", chunks.samples, k,
                        n_controls, n_genes)
        self.pca = IncrementalPCA(n_components=k)
        # IncrementalPCA does a full SVD of (k + rows) × n_genes per call: cost grows with rows², so a few
        # times k rows per call is much cheaper overall than large calls (measured 30× on 5k controls).
        fit_rows = max(4 * k, 256)
        pending: list[np.ndarray] = []
        n_pending = 0
        for counts, obs in chunks("phenoprint: PCA on controls"):
            ctrl = np.flatnonzero(is_control(obs["perturbation"]))
            if ctrl.size == 0:
                continue
            pending.append(self._standardise(counts[ctrl], obs["batch"].to_numpy()[ctrl]))
            n_pending += ctrl.size
            if n_pending >= fit_rows:
                block = np.concatenate(pending)
                n_full = len(block) // fit_rows * fit_rows
                for start in range(0, n_full, fit_rows):
                    self.pca.partial_fit(block[start:start + fit_rows])
                pending = [block[n_full:]]
                n_pending = len(pending[0])
        if n_pending:
            # The first partial_fit needs >= k rows: true here, as k <= n_controls.
            self.pca.partial_fit(np.concatenate(pending))
        return self

    def _standardise(self, counts: sp.csr_matrix, batches: np.ndarray) -> np.ndarray:
        """Dense (n, n_genes) z-scores against each cell's batch controls (pooled controls if it has none)."""
        x = log_normalise(counts).toarray()
        for b in pd.unique(batches):
            rows = batches == b
            mean, std = (self.mean[b], self.std[b]) if b in self.mean else self.pooled
            x[rows] -= mean
            x[rows] /= std
        return np.clip(x, -Z_CLIP, Z_CLIP, out=x)

    def embed(self, counts: sp.csr_matrix, obs: pd.DataFrame) -> np.ndarray:
        """(n_cells, n_components) PCA coordinates of a chunk."""
        return self.pca.transform(self._standardise(counts, obs["batch"].to_numpy()))

    @property
    def explained_variance_ratio(self) -> float:
        return float(self.pca.explained_variance_ratio_.sum()) if self.pca is not None else float("nan")


def _mean_std(total: np.ndarray, sq_total: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    mean = total / n
    var = np.maximum(sq_total / n - mean * mean, 0.0)
    return mean, np.maximum(np.sqrt(var), STD_FLOOR)


# ------------------------------------------------------------------------------------------ driver

def _control_matcher(control_label: str | list[str]) -> Callable[[pd.Series], np.ndarray]:
    labels = [control_label] if isinstance(control_label, str) else list(control_label)
    return lambda perturbation: perturbation.isin(labels).to_numpy()


def run_phenoprint(name: str, spec: dict, work_dir: Path, seed: int = 0, *, embed_fn: EmbedFn | None = None,
                   progress: bool = True) -> dict:
    """Prune a curated perturbation screen; write ``phenoprint.parquet`` and ``phenoprint.json`` atomically.

    Reads ``<work>/curated/<name>/samples.parquet`` and ``report.json`` (panel). ``spec`` is the dataset's
    config entry: ``control_label`` (str or list) and ``phenoprint: {enabled, p_threshold (0.1), n_null (1000),
    n_components (50), reservoir (20000)}``. Kept: control cells, cells of perturbations with
    p < p_threshold, and cells without a perturbation label (nothing to judge). Pruned: every other cell,
    including perturbations with a single cell. With phenoprint disabled both files are written empty.

    ``embed_fn`` replaces the default control-PCA embedding (e.g. a txfm checkpoint); see :data:`EmbedFn`.
    Returns the summary written to phenoprint.json.
    """
    paths = curated_paths(work_dir, name)
    out_dir, samples = paths.directory, paths.samples
    settings = spec.get("phenoprint") or {}
    enabled = bool(settings) and bool(settings.get("enabled", True))
    summary: dict = {"dataset": name, "enabled": enabled}
    if not enabled:
        _write_outputs(out_dir, iter(()), summary)
        return summary
    if not samples.is_file():
        raise CurationError(samples, f"curated samples of dataset {name!r} not found")
    control_label = spec.get("control_label")
    if not control_label:
        raise CurationError(None, f"dataset {name!r}: phenoprint needs 'control_label' in its config")
    p_threshold = float(settings.get("p_threshold", 0.1))
    n_null = int(settings.get("n_null", 1000))
    panel = load_panel(paths.report)
    chunks = _Chunks(samples, panel, progress)
    is_control = _control_matcher(control_label)

    if embed_fn is None:
        model = ControlPCAEmbedding(int(settings.get("n_components", 50))).fit(chunks, is_control)
        embed = model.embed
        summary.update(embedding="control_pca", n_components=int(model.pca.n_components_),
                       explained_variance_ratio=model.explained_variance_ratio)
    else:
        def embed(counts: sp.csr_matrix, obs: pd.DataFrame) -> np.ndarray:
            return embed_fn(counts, panel, obs)

        summary.update(embedding="custom")

    def embedded() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for counts, obs in chunks("phenoprint: embed"):
            labels = obs["perturbation"].to_numpy(dtype=object)
            labels[is_control(obs["perturbation"])] = None  # controls join the null pool but are not scored
            yield embed(counts, obs), labels

    scores = perturbation_consistency(embedded(), n_null=n_null, seed=seed,
                                      reservoir=int(settings.get("reservoir", 20000)))
    scores["kept"] = scores["p_value"].to_numpy() < p_threshold  # NaN compares False: pruned
    kept = set(scores.loc[scores["kept"], "perturbation"])

    counts_by_kind = {"control": 0, "unlabelled": 0, "kept": 0, "pruned": 0}

    def pruned_rows() -> Iterator[pa.RecordBatch]:
        for obs in chunks.obs("phenoprint: write pruned"):
            control = is_control(obs["perturbation"])
            unlabelled = obs["perturbation"].isna().to_numpy()
            keep = control | unlabelled | obs["perturbation"].isin(kept).to_numpy()
            counts_by_kind["control"] += int(control.sum())
            counts_by_kind["unlabelled"] += int(unlabelled.sum())
            counts_by_kind["kept"] += int((keep & ~control & ~unlabelled).sum())
            counts_by_kind["pruned"] += int((~keep).sum())
            drop = obs.loc[~keep, ["sample_id", "perturbation"]].assign(reason="phenoprint")
            yield pa.RecordBatch.from_pandas(drop, schema=PHENOPRINT_SCHEMA, preserve_index=False)

    n_scored = len(scores)
    summary.update(
        control_label=control_label, p_threshold=p_threshold, n_null=n_null, seed=int(seed),
        n_perturbations=n_scored, n_perturbations_kept=int(scores["kept"].sum()),
        n_perturbations_pruned=int(n_scored - scores["kept"].sum()),
        perturbations=[{k: _json_value(v) for k, v in rec.items()} for rec in scores.to_dict(orient="records")],
    )
    _write_outputs(out_dir, pruned_rows(), summary, counts_by_kind)
    log.info("%s: phenoprint kept %d of %d perturbations; pruned %d of %d cells", name,
             summary["n_perturbations_kept"], n_scored, summary["n_cells_pruned"], summary["n_cells"])
    return summary


def _json_value(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if np.isnan(value) else float(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def _write_outputs(out_dir: Path, batches: Iterator[pa.RecordBatch], summary: dict,
                   counts_by_kind: dict[str, int] | None = None) -> None:
    """Stream pruned rows into phenoprint.parquet, then write phenoprint.json (both atomically)."""
    with atomic_path(out_dir / PHENOPRINT_PRUNED_FILE) as tmp:
        with pq.ParquetWriter(tmp, PHENOPRINT_SCHEMA, compression="zstd") as writer:
            for batch in batches:
                writer.write_batch(batch)
    if counts_by_kind is not None:
        n_cells = sum(counts_by_kind.values())
        summary.update(n_cells=n_cells, n_control_cells=counts_by_kind["control"],
                       n_unlabelled_cells=counts_by_kind["unlabelled"],
                       n_cells_kept=n_cells - counts_by_kind["pruned"], n_cells_pruned=counts_by_kind["pruned"],
                       fraction_cells_pruned=counts_by_kind["pruned"] / n_cells if n_cells else 0.0)
    with atomic_path(out_dir / PHENOPRINT_SUMMARY_FILE) as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
