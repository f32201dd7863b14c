"""Streaming, deterministic, resumable micro-batch loader over DiverseRNA corpus shards.

Streams and ranks
-----------------
A split's samples are dealt, once per epoch, into ``num_streams`` disjoint *streams*. The unit of dealing is
a Parquet row group (``(shard, row group)``, read from the footers only): row groups are permuted from
``(seed, epoch)`` and handed greedily to the least-loaded stream while they fit under the per-stream target
``T // num_streams`` rows (``T`` = samples in the split); the few that do not fit form a pool whose rows are
sliced to top every stream up to exactly the target. Every stream therefore has the same number of rows and
the same number of micro-batches, ``microbatches_per_stream = (T // num_streams) // micro_batch``; the
samples left out of an epoch (fewer than ``num_streams · micro_batch``) differ from epoch to epoch.

Within a stream, its row groups are mixed in windows of ``shuffle_buffer_row_groups`` consecutive pieces (a
bounded shuffle buffer: rows are permuted within a window), and micro-batch ``i`` is rows
``[i·B, (i+1)·B)`` of that order. Gene subsets of micro-batch ``i`` of stream ``s`` are drawn from a
generator seeded with ``(seed, epoch, s, i)``. So a stream's sequence depends only on the corpus, the
split, ``seed``, ``epoch``, ``num_streams`` and the batch settings — never on ``num_workers``, the world
size or which process reads it — and any micro-batch can be rebuilt on its own (skip-ahead is exact).

:func:`make_loader` yields the micro-batches of ``streams`` interleaved: yielded index ``p`` is micro-batch
``p // len(streams)`` of stream ``streams[p % len(streams)]``. A trainer on rank ``r`` of ``W`` with
gradient accumulation ``A`` passes ``num_streams = W·A`` and ``streams = [r + a·W for a in range(A)]``.

Workers: with ``num_workers = n`` worker ``w`` builds yielded indices ``w, w+n, …``; torch's DataLoader
collects them round-robin, which restores the order. Yielded index ``p`` belongs to stream
``streams[p % len(streams)]``, so when ``n`` divides ``len(streams)`` (the trainer: one stream per accumulation
step, e.g. 2 workers × 48 streams) worker ``w`` serves whole streams and every row group is decoded by
exactly one worker. Otherwise (e.g. one stream read by 2 workers) each worker decodes the row groups of all
streams it touches — repeated work, the price of worker-independent sequences. Each worker keeps a small LRU
cache of decoded row groups (about ``len(streams) · (shuffle_buffer_row_groups + 1)`` of them).

Resuming: the trainer's loader state is just :class:`LoaderState` ``(epoch, microbatches_consumed)``; call
``make_loader(..., epoch=state.epoch, start_microbatch=state.microbatches_consumed)``.

Batch (``B`` = micro_batch, ``K`` = n_input_genes, ``G`` = vocabulary size):
``gene_idx`` int64 [B, K], ``values`` float32 [B, K], ``pad_mask`` bool [B, K], ``dataset_idx`` int64 [B],
``library_size`` float32 [B] (raw total counts), and the target in one of two formats (``target_format``):

* ``dense`` (default): ``target`` float32 [B, G], ``target_mask`` bool [B, G];
* ``sparse``: ``target_gene`` int32 [B, M] and ``target_value`` float32 [B, M], each sample's non-zero
  entries padded with (gene 0, value 0) to M = the batch's largest non-zero count rounded up to a multiple
  of :data:`SPARSE_TARGET_ALIGN`. A dense target costs B·G·5 bytes through the worker queue (7 MB at
  G = 44k, B = 32) and its zero-filling dominated the batch build; the sparse one costs B·M·8 bytes.
  :func:`densify_target` turns either format into ``(target, target_mask)`` on the training device.

Values are ``log1p(count / library_size · L)`` with ``L = cfg.library_size``.
"""

from __future__ import annotations

import functools
import heapq
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from curation import schema

SAMPLING_KINDS = ("uniform", "frequency")
TARGET_FORMATS = ("dense", "sparse")
#: Width of sparse target arrays is rounded up to a multiple of this many entries.
SPARSE_TARGET_ALIGN = 256
#: Row groups read (evenly spread over the corpus) to estimate gene detection frequencies.
FREQUENCY_MAX_ROW_GROUPS = 256
# Distinct salts keep the random streams of the different decisions independent of each other.
_SALT_UNIT_ORDER = 0x0D0E
_SALT_WINDOW = 0x5B0F
_SALT_GENES = 0x6E5E
_SHARD_COLUMNS = ["dataset", "gene_idx", "counts", "library_size"]


# --------------------------------------------------------------------------------------------------------
# Corpus metadata
# --------------------------------------------------------------------------------------------------------
class CorpusInfo:
    """Vocabulary, datasets and panels of a corpus (``genes.parquet`` + ``datasets.parquet``), no samples.

    ``genes`` [G rows] and ``datasets`` [D rows] are the two tables; ``dataset_index`` maps a dataset name
    to its row in ``datasets``; ``panel_mask`` bool [D, G] is True where a dataset measures a gene;
    ``panels[d]`` int64 [P_d] the sorted panel; ``gene_frequency`` float64 [G] (computed on first use) is
    each gene's detection frequency: the share of samples *measuring* the gene in which its count is > 0,
    estimated from up to :data:`FREQUENCY_MAX_ROW_GROUPS` row groups spread over all shards (0 if never
    measured).
    """

    def __init__(self, path: Path, genes: pd.DataFrame, datasets: pd.DataFrame):
        self.path = path
        self.genes = genes
        self.datasets = datasets
        self.n_genes = len(genes)
        self.dataset_index = {name: i for i, name in enumerate(datasets["dataset"])}
        self.panels = [np.asarray(p, dtype=np.int64) for p in datasets["measured_gene_idx"]]
        mask = np.zeros((len(datasets), self.n_genes), dtype=bool)
        for d, panel in enumerate(self.panels):  # one vectorised assignment per dataset
            mask[d, panel] = True
        self.panel_mask = torch.from_numpy(mask)

    @classmethod
    def open(cls, corpus: str | Path) -> "CorpusInfo":
        """Read and check ``genes.parquet`` and ``datasets.parquet`` of ``corpus``; ValueError if malformed."""
        root = Path(corpus)
        genes = _read_table(root / schema.GENES_FILE, schema.GENES_SCHEMA).to_pandas()
        datasets = _read_table(root / schema.DATASETS_FILE, schema.DATASETS_SCHEMA).to_pandas()
        n_genes = len(genes)
        if n_genes == 0 or not np.array_equal(genes["gene_idx"].to_numpy(), np.arange(n_genes)):
            raise ValueError(f"{root / schema.GENES_FILE}: gene_idx must be 0..{n_genes - 1} in order")
        if len(datasets) == 0 or datasets["dataset"].duplicated().any():
            raise ValueError(f"{root / schema.DATASETS_FILE}: needs at least one dataset, names unique")
        for name, panel in zip(datasets["dataset"], datasets["measured_gene_idx"]):
            panel = np.asarray(panel)
            if panel.size == 0 or panel[0] < 0 or panel[-1] >= n_genes or np.any(np.diff(panel) <= 0):
                raise ValueError(f"{root / schema.DATASETS_FILE}: panel of {name!r} must be sorted, unique, "
                                 f"non-empty gene_idx in [0, {n_genes})")
        return cls(root, genes, datasets)

    @functools.cached_property
    def gene_frequency(self) -> np.ndarray:
        """Detection frequency per vocabulary gene, float64 [G] in [0, 1] (see the class docstring)."""
        units = _list_units(self.path, None)
        if not units.files:
            raise ValueError(f"{self.path}: corpus has no shards")
        pick = np.unique(np.linspace(0, len(units.rows) - 1, min(len(units.rows), FREQUENCY_MAX_ROW_GROUPS))
                         .round().astype(np.int64))
        detected = np.zeros(self.n_genes, dtype=np.int64)
        samples_per_dataset = np.zeros(len(self.panels), dtype=np.int64)
        reader = _RowGroupReader(units.files, self, capacity=1)
        for u in pick:
            block = reader.get(int(units.file[u]), int(units.row_group[u]))
            detected += np.bincount(block.gene_idx, minlength=self.n_genes)
            samples_per_dataset += np.bincount(block.dataset_idx, minlength=len(self.panels))
        measuring = samples_per_dataset @ self.panel_mask.numpy().astype(np.int64)  # samples measuring gene
        return np.divide(detected, measuring, out=np.zeros(self.n_genes), where=measuring > 0)


def _read_table(path: Path, table_schema: pa.Schema) -> pa.Table:
    """Read a small metadata Parquet file and cast it to ``table_schema``; one-line ValueError on failure."""
    if not path.is_file():
        raise ValueError(f"{path}: missing (not a corpus directory?)")
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise ValueError(f"{path}: unreadable Parquet ({exc})") from None
    return schema.check_table(table, table_schema, str(path))


# --------------------------------------------------------------------------------------------------------
# Configuration and loader state
# --------------------------------------------------------------------------------------------------------
@dataclass
class LoaderConfig:
    """Loader settings. ``sampling="frequency"`` draws input genes with p ∝ freq^(1/temperature)."""

    split: str = "train"
    micro_batch: int = 32
    n_input_genes: int = 2048
    library_size: float = 1e5
    sampling: str = "uniform"
    temperature: float = 1.0
    shuffle_buffer_row_groups: int = 4
    num_workers: int = 0
    seed: int = 0
    pin_memory: bool | None = None  # None: pin when CUDA is available
    target_format: str = "dense"  # "sparse": ship target entries, densify on the device (densify_target)

    def validate(self) -> None:
        """Raise a one-line ValueError for an impossible setting."""
        if self.split not in schema.SPLITS:
            raise ValueError(f"LoaderConfig.split must be one of {schema.SPLITS}, got {self.split!r}")
        if self.target_format not in TARGET_FORMATS:
            raise ValueError(f"LoaderConfig.target_format must be one of {TARGET_FORMATS}, got {self.target_format!r}")
        if self.sampling not in SAMPLING_KINDS:
            raise ValueError(f"LoaderConfig.sampling must be one of {SAMPLING_KINDS}, got {self.sampling!r}")
        for name in ("micro_batch", "n_input_genes", "shuffle_buffer_row_groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"LoaderConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.library_size <= 0 or self.temperature <= 0 or self.num_workers < 0:
            raise ValueError("LoaderConfig: library_size and temperature must be > 0, num_workers >= 0")


@dataclass
class LoaderState:
    """Where a trainer is in the data: everything needed to resume exactly.

    ``microbatches_consumed`` counts micro-batches *yielded by this process's loader* in ``epoch`` (all of
    its streams together); resume with ``make_loader(..., epoch=epoch, start_microbatch=microbatches_consumed)``.
    """

    epoch: int = 0
    microbatches_consumed: int = 0

    def state_dict(self) -> dict[str, int]:
        """Plain ints, safe for ``torch.save`` / ``torch.load(weights_only=True)``."""
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict[str, int]) -> "LoaderState":
        """Inverse of :meth:`state_dict`."""
        return cls(epoch=int(state["epoch"]), microbatches_consumed=int(state["microbatches_consumed"]))


# --------------------------------------------------------------------------------------------------------
# Units (row groups) and the per-epoch plan
# --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Units:
    """All row groups of a split, in ``list_shards`` order: ``file``/``row_group``/``rows`` int64 [n_units]."""

    files: list[str]
    file: np.ndarray
    row_group: np.ndarray
    rows: np.ndarray


def _list_units(corpus: Path, split: str | None) -> _Units:
    """Row groups of the shards of ``split`` (all splits if None), from the Parquet footers only."""
    files, file_of, row_group, rows = [], [], [], []
    for path in schema.list_shards(corpus, split):
        try:
            meta = pq.ParquetFile(path).metadata
        except (OSError, pa.ArrowException) as exc:
            raise ValueError(f"{path}: unreadable Parquet footer ({exc})") from None
        for rg in range(meta.num_row_groups):
            if meta.row_group(rg).num_rows == 0:  # nothing to deal; keeps every piece non-empty
                continue
            file_of.append(len(files))
            row_group.append(rg)
            rows.append(meta.row_group(rg).num_rows)
        files.append(str(path))
    as_array = functools.partial(np.asarray, dtype=np.int64)
    return _Units(files, as_array(file_of), as_array(row_group), as_array(rows))


def _deal_units(unit_rows: np.ndarray, num_streams: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Deal row groups to streams so that each gets exactly ``T // num_streams`` rows.

    Returns per stream an int64 [n_pieces, 3] array of pieces ``(unit, row_start, row_stop)`` in stream
    order. Whole units go, in a permuted order, to the least-loaded stream while they fit; units that do
    not fit are pooled and their rows sliced to fill every stream up to the target.
    """
    target = int(unit_rows.sum()) // num_streams
    order = np.random.default_rng([seed, epoch, _SALT_UNIT_ORDER]).permutation(unit_rows.size)
    pieces: list[list[tuple[int, int, int]]] = [[] for _ in range(num_streams)]
    heap = [(0, s) for s in range(num_streams)]  # (rows so far, stream): least loaded first
    pool = []
    for u in order.tolist():
        load, s = heap[0]
        if load + unit_rows[u] <= target:
            heapq.heapreplace(heap, (load + int(unit_rows[u]), s))
            pieces[s].append((u, 0, int(unit_rows[u])))
        else:
            pool.append(u)
    loads = dict((s, load) for load, s in heap)
    cursor_unit, cursor_row = 0, 0  # position in the pool
    for s in range(num_streams):
        need = target - loads[s]
        while need > 0:
            u = pool[cursor_unit]
            take = min(need, int(unit_rows[u]) - cursor_row)
            pieces[s].append((u, cursor_row, cursor_row + take))
            need -= take
            cursor_row += take
            if cursor_row == unit_rows[u]:
                cursor_unit, cursor_row = cursor_unit + 1, 0
    return [np.asarray(p, dtype=np.int64).reshape(-1, 3) for p in pieces]


class _StreamOrder:
    """Sample order of one stream: pieces mixed in windows of ``window`` pieces, materialised lazily.

    ``rows(start, stop)`` → (unit int64 [n], row int64 [n]) of positions ``[start, stop)`` of the stream.
    Only the windows touched are built (and the last two kept), so memory is bounded by the window size.
    """

    def __init__(self, pieces: np.ndarray, window: int, seed: int, epoch: int, stream: int):
        self.pieces, self.window, self.key = pieces, window, (seed, epoch, stream)
        piece_start = np.concatenate([[0], np.cumsum(pieces[:, 2] - pieces[:, 1])])
        # Window j holds pieces [j·window, (j+1)·window) = stream positions [window_start[j], window_start[j+1]).
        self.window_start = piece_start[np.append(np.arange(0, len(pieces), window), len(pieces))]
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def _window(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        if j not in self._cache:
            part = self.pieces[j * self.window:(j + 1) * self.window]
            lengths = part[:, 2] - part[:, 1]
            unit = np.repeat(part[:, 0], lengths)
            row = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths - part[:, 1], lengths)
            perm = np.random.default_rng([*self.key, j, _SALT_WINDOW]).permutation(unit.size)
            self._cache[j] = (unit[perm], row[perm])
            if len(self._cache) > 2:
                self._cache.popitem(last=False)
        return self._cache[j]

    def rows(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        first = int(np.searchsorted(self.window_start, start, side="right")) - 1
        last = int(np.searchsorted(self.window_start, stop - 1, side="right")) - 1
        units, rows = [], []
        for j in range(first, last + 1):
            unit, row = self._window(j)
            lo = max(start, self.window_start[j]) - self.window_start[j]
            hi = min(stop, self.window_start[j + 1]) - self.window_start[j]
            units.append(unit[lo:hi])
            rows.append(row[lo:hi])
        return np.concatenate(units), np.concatenate(rows)


# --------------------------------------------------------------------------------------------------------
# Reading row groups
# --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Block:
    """One decoded row group: CSR-like expression plus per-row dataset and library size.

    ``offsets`` int64 [n+1] into ``gene_idx`` int32 / ``counts`` float32 [nnz]; ``dataset_idx`` int64 [n];
    ``library_size`` float64 [n] (raw counts).
    """

    offsets: np.ndarray
    gene_idx: np.ndarray
    counts: np.ndarray
    dataset_idx: np.ndarray
    library_size: np.ndarray


class _RowGroupReader:
    """Reads and checks row groups, keeping the ``capacity`` most recently used ones decoded."""

    def __init__(self, files: list[str], info: CorpusInfo, capacity: int):
        self.files, self.info, self.capacity = files, info, capacity
        self._handles: dict[int, pq.ParquetFile] = {}
        self._cache: OrderedDict[tuple[int, int], _Block] = OrderedDict()

    def get(self, file: int, row_group: int) -> _Block:
        key = (file, row_group)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        block = self._decode(file, row_group)
        self._cache[key] = block
        if len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return block

    def _decode(self, file: int, row_group: int) -> _Block:
        path = self.files[file]
        where = f"{path}: row group {row_group}"
        try:
            if file not in self._handles:
                self._handles[file] = pq.ParquetFile(path)
            table = self._handles[file].read_row_group(row_group, columns=_SHARD_COLUMNS, use_threads=False)
        except (OSError, pa.ArrowException, KeyError) as exc:
            raise ValueError(f"{where}: unreadable ({exc})") from None
        genes = table.column("gene_idx").combine_chunks()
        counts = table.column("counts").combine_chunks()
        if genes.null_count or counts.null_count or table.column("library_size").null_count:
            raise ValueError(f"{where}: null expression entries")
        offsets = genes.offsets.to_numpy().astype(np.int64)
        if not np.array_equal(offsets, counts.offsets.to_numpy()):
            raise ValueError(f"{where}: gene_idx and counts lists differ in length")
        gene_idx = genes.values.to_numpy()
        encoded = pc.dictionary_encode(table.column("dataset").combine_chunks())
        try:
            codes = np.asarray([self.info.dataset_index[name] for name in encoded.dictionary.to_pylist()],
                               dtype=np.int64)
        except KeyError as exc:
            raise ValueError(f"{where}: dataset {exc.args[0]!r} is not in datasets.parquet") from None
        dataset_idx = codes[encoded.indices.to_numpy()]
        # Vocabulary bounds are checked here (one min/max per row group); panel membership per micro-batch,
        # where the entries' flat [B, G] positions are computed anyway.
        if gene_idx.size and (gene_idx.min() < 0 or gene_idx.max() >= self.info.n_genes):
            raise ValueError(f"{where}: gene_idx outside the vocabulary [0, {self.info.n_genes})")
        return _Block(offsets, gene_idx, counts.values.to_numpy(), dataset_idx,
                      table.column("library_size").to_numpy().astype(np.float64))


# --------------------------------------------------------------------------------------------------------
# Building a micro-batch
# --------------------------------------------------------------------------------------------------------
def _gather_entries(reader: _RowGroupReader, units: _Units, unit: np.ndarray, row: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Non-zero entries of the samples ``(unit[b], row[b])``, b < B.

    → (sample int64 [nnz], gene int32 [nnz], count float32 [nnz], dataset_idx int64 [B], library f64 [B]).
    Loops only over the distinct row groups of the batch.
    """
    n = unit.size
    dataset_idx, library = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.float64)
    samples, genes, counts = [], [], []
    for u in np.unique(unit):
        sel = np.flatnonzero(unit == u)
        block = reader.get(int(units.file[u]), int(units.row_group[u]))
        r = row[sel]
        starts, lengths = block.offsets[r], block.offsets[r + 1] - block.offsets[r]
        # Flat positions of all entries of the selected rows: run b covers starts[b] .. starts[b]+lengths[b].
        flat = np.arange(lengths.sum()) + np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
        samples.append(np.repeat(sel, lengths))
        genes.append(block.gene_idx[flat])
        counts.append(block.counts[flat])
        dataset_idx[sel], library[sel] = block.dataset_idx[r], block.library_size[r]
    return np.concatenate(samples), np.concatenate(genes), np.concatenate(counts), dataset_idx, library


def _sample_input_genes(rng: np.random.Generator, dataset_idx: np.ndarray, panels: list[np.ndarray],
                        log_weight: np.ndarray | None, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``k`` panel genes per sample without replacement. → (gene_idx int64 [B, k], pad_mask bool [B, k])

    Uniform: the k smallest of i.i.d. uniform 32-bit integer keys (two per raw 64-bit draw: the cheapest
    keys to draw and to partition; a tie at the cut, probability ~P²/2³³ per sample, is broken by position:
    a negligible bias). Frequency: Gumbel-top-k on ``log_weight`` [G]
    (p ∝ exp(log_weight)), i.e. the k smallest of ``log(-log u) - log_weight``. Panels with ≤ k genes
    give all their genes followed by padding (gene 0, pad_mask True).
    """
    gene_idx = np.zeros((dataset_idx.size, k), dtype=np.int64)
    pad_mask = np.zeros((dataset_idx.size, k), dtype=bool)
    for d in np.unique(dataset_idx):  # loop over datasets in the batch, not genes
        sel = np.flatnonzero(dataset_idx == d)
        panel = panels[d]
        if panel.size <= k:
            gene_idx[sel, :panel.size] = panel
            pad_mask[sel, panel.size:] = True
            continue
        if log_weight is None:
            keys = rng.bit_generator.random_raw((sel.size * panel.size + 1) // 2).view(np.uint32)
            keys = keys[:sel.size * panel.size].reshape(sel.size, panel.size)
        else:
            with np.errstate(divide="ignore"):
                keys = np.log(-np.log(rng.random((sel.size, panel.size)))) - log_weight[panel]
        chosen = np.argpartition(keys, k - 1, axis=1)[:, :k]
        gene_idx[sel] = panel[chosen]
    return gene_idx, pad_mask


class _MicroBatchDataset(IterableDataset):
    """Yields the interleaved micro-batches of ``streams`` (see the module docstring), worker-split."""

    def __init__(self, info: CorpusInfo, cfg: LoaderConfig, units: _Units, streams: list[int],
                 num_streams: int, epoch: int, start_microbatch: int, log_weight: np.ndarray | None):
        super().__init__()
        self.info, self.cfg, self.units = info, cfg, units
        self.streams, self.num_streams, self.epoch = list(streams), num_streams, epoch
        self.start = start_microbatch
        self.log_weight = log_weight
        self.panel_mask = info.panel_mask.numpy()
        self.per_stream = (int(units.rows.sum()) // num_streams) // cfg.micro_batch
        self.total = self.per_stream * len(self.streams)

    def __len__(self) -> int:
        return self.total - self.start

    def _scratch(self, size: int) -> np.ndarray:
        """A zeroed float32 [size] buffer reused across batches (callers restore the zeros they overwrite)."""
        if getattr(self, "_scratch_buffer", None) is None or self._scratch_buffer.size < size:
            self._scratch_buffer = np.zeros(size, dtype=np.float32)
        return self._scratch_buffer[:size]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker = get_worker_info()
        worker_id, n_workers = (0, 1) if worker is None else (worker.id, worker.num_workers)
        pieces = _deal_units(self.units.rows, self.num_streams, self.cfg.seed, self.epoch)
        orders = {s: _StreamOrder(pieces[s], self.cfg.shuffle_buffer_row_groups, self.cfg.seed, self.epoch, s)
                  for s in self.streams}
        capacity = len(self.streams) * (self.cfg.shuffle_buffer_row_groups + 1) + 1
        reader = _RowGroupReader(self.units.files, self.info, capacity)
        for position in range(self.start + worker_id, self.total, n_workers):
            stream = self.streams[position % len(self.streams)]
            yield self.build(reader, orders[stream], stream, position // len(self.streams))

    def build(self, reader: _RowGroupReader, order: _StreamOrder, stream: int, index: int
              ) -> dict[str, torch.Tensor]:
        """Micro-batch ``index`` of ``stream`` as a dict of tensors (shapes in the module docstring)."""
        cfg, n_genes = self.cfg, self.info.n_genes
        unit, row = order.rows(index * cfg.micro_batch, (index + 1) * cfg.micro_batch)
        sample, gene, count, dataset_idx, library = _gather_entries(reader, self.units, unit, row)
        in_panel = self.panel_mask[dataset_idx[sample], gene]
        if not in_panel.all():
            bad = unit[sample[np.argmin(in_panel)]]
            raise ValueError(f"{self.units.files[self.units.file[bad]]}: row group {self.units.row_group[bad]}: "
                             "gene_idx outside the sample's dataset panel")
        # L / library per sample (an all-zero sample has no entries, so its guard value is never used).
        scale = (cfg.library_size / np.where(library > 0, library, 1.0)).astype(np.float32)
        expression = np.log1p(count * scale[sample])  # float32 [nnz], log1p-normalised
        rng = np.random.default_rng([cfg.seed, self.epoch, stream, index, _SALT_GENES])
        gene_idx, pad_mask = _sample_input_genes(rng, dataset_idx, self.info.panels, self.log_weight,
                                                 cfg.n_input_genes)
        # Input values: scatter the entries into a reused flat [B·G] scratch row, gather the K inputs, and
        # zero just those entries again — O(nnz + B·K) per batch, no [B, G] allocation or zero-fill.
        flat = sample * n_genes + gene
        scratch = self._scratch(unit.size * n_genes)
        scratch[flat] = expression
        values = scratch[np.arange(unit.size)[:, None] * n_genes + gene_idx]
        scratch[flat] = 0.0
        values[pad_mask] = 0.0
        batch = {
            "gene_idx": torch.from_numpy(gene_idx),
            "values": torch.from_numpy(values),
            "pad_mask": torch.from_numpy(pad_mask),
        }
        if cfg.target_format == "dense":
            target = np.zeros((unit.size, n_genes), dtype=np.float32)
            np.put(target, flat, expression)
            batch["target"] = torch.from_numpy(target)
            batch["target_mask"] = torch.from_numpy(self.panel_mask[dataset_idx])
        else:
            by_sample = np.argsort(sample, kind="stable")  # entries grouped per sample (_gather_entries: per unit)
            batch.update(_sparse_target(sample[by_sample], gene[by_sample], expression[by_sample], unit.size))
        batch["dataset_idx"] = torch.from_numpy(dataset_idx)
        batch["library_size"] = torch.from_numpy(library.astype(np.float32))
        return batch


def _sparse_target(sample: np.ndarray, gene: np.ndarray, expression: np.ndarray, n_samples: int
                   ) -> dict[str, torch.Tensor]:
    """Padded per-sample target entries: ``target_gene`` int32 [B, M], ``target_value`` float32 [B, M].

    ``sample`` must be non-decreasing. M = the batch's largest non-zero count, rounded up to a multiple of
    :data:`SPARSE_TARGET_ALIGN` (fewer distinct shapes for the caching allocators). Padding is gene 0 with
    value 0: :func:`densify_target` *adds* entries into zeros, so padding changes nothing.
    """
    nnz = np.bincount(sample, minlength=n_samples)
    width = max(SPARSE_TARGET_ALIGN, -(-int(nnz.max(initial=0)) // SPARSE_TARGET_ALIGN) * SPARSE_TARGET_ALIGN)
    slot = np.arange(sample.size) - np.repeat(np.cumsum(nnz) - nnz, nnz)  # rank of the entry within its sample
    target_gene = np.zeros((n_samples, width), dtype=np.int32)
    target_value = np.zeros((n_samples, width), dtype=np.float32)
    target_gene[sample, slot] = gene
    target_value[sample, slot] = expression
    return {"target_gene": torch.from_numpy(target_gene), "target_value": torch.from_numpy(target_value)}


def densify_target(batch: dict[str, torch.Tensor], panel_mask: torch.Tensor,
                   device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense ``(target float32 [B, G], target_mask bool [B, G])`` of a batch, built on ``device``.

    Works for both target formats: a dense batch's tensors are moved as they are; a sparse one's padded
    entries (``target_gene`` / ``target_value`` [B, M]) are scattered into zeros on the device, and the mask
    is ``panel_mask[dataset_idx]`` (``panel_mask`` bool [D, G], e.g. ``CorpusInfo.panel_mask``; pass it
    already on ``device`` to avoid a copy per call). No host–device synchronisation.
    """
    device = torch.device(device) if device is not None else batch["gene_idx"].device
    if "target" in batch:
        return (batch["target"].to(device, non_blocking=True),
                batch["target_mask"].to(device, non_blocking=True))
    genes = batch["target_gene"].to(device, non_blocking=True).long()
    entries = batch["target_value"].to(device, non_blocking=True)
    target = torch.zeros(genes.shape[0], panel_mask.shape[1], dtype=entries.dtype, device=device)
    # scatter_add (not scatter_): padding repeats gene 0, and adding an exact 0.0 is order-independent, so
    # the result is exact and deterministic even with CUDA atomics.
    target.scatter_add_(1, genes, entries)
    dataset_idx = batch["dataset_idx"].to(device, non_blocking=True)
    return target, panel_mask.to(device, non_blocking=True)[dataset_idx]


def _worker_init(worker_id: int) -> None:
    """One thread per loader worker: parallelism comes from the workers, not from BLAS/torch threads."""
    torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------------
def as_corpus_info(corpus: str | Path | CorpusInfo) -> CorpusInfo:
    """``corpus`` itself when already opened, else ``CorpusInfo.open(corpus)`` (so callers open it once)."""
    return corpus if isinstance(corpus, CorpusInfo) else CorpusInfo.open(corpus)


def microbatches_per_stream(corpus: str | Path | CorpusInfo, cfg: LoaderConfig, num_streams: int) -> int:
    """Micro-batches per stream per epoch, the same for every stream and epoch: ``(T // S) // B``."""
    cfg.validate()
    root = corpus.path if isinstance(corpus, CorpusInfo) else Path(corpus)
    if num_streams < 1:
        raise ValueError(f"num_streams must be >= 1, got {num_streams}")
    return (int(_list_units(root, cfg.split).rows.sum()) // num_streams) // cfg.micro_batch


def make_loader(corpus: str | Path | CorpusInfo, cfg: LoaderConfig, streams: list[int], num_streams: int,
                epoch: int, start_microbatch: int = 0) -> DataLoader:
    """Loader over micro-batches of ``streams`` (of ``num_streams``) for one epoch; ``len()`` = batches left.

    Yields dicts of tensors (see the module docstring); skips the first ``start_microbatch`` of them.
    Raises ValueError when the split is empty or has fewer than ``num_streams · micro_batch`` samples.
    """
    cfg.validate()
    info = as_corpus_info(corpus)
    if num_streams < 1 or not streams or any(not 0 <= s < num_streams for s in streams):
        raise ValueError(f"streams must be a non-empty list of ints in [0, {num_streams}), got {streams}")
    if len(set(streams)) != len(streams):
        raise ValueError(f"streams must be distinct, got {streams}")
    units = _list_units(info.path, cfg.split)
    if (int(units.rows.sum()) // num_streams) // cfg.micro_batch == 0:
        raise ValueError(f"{info.path}: split {cfg.split!r} has {int(units.rows.sum())} samples, fewer than "
                         f"num_streams × micro_batch = {num_streams * cfg.micro_batch}")
    log_weight = None
    if cfg.sampling == "frequency":
        with np.errstate(divide="ignore"):  # genes never detected get weight 0 (log −inf)
            log_weight = np.log(info.gene_frequency) / cfg.temperature
    dataset = _MicroBatchDataset(info, cfg, units, streams, num_streams, epoch, start_microbatch, log_weight)
    if not 0 <= start_microbatch <= dataset.total:
        raise ValueError(f"start_microbatch must be in [0, {dataset.total}], got {start_microbatch}")
    pin = torch.cuda.is_available() if cfg.pin_memory is None else cfg.pin_memory
    return DataLoader(dataset, batch_size=None, num_workers=cfg.num_workers, pin_memory=pin,
                      worker_init_fn=_worker_init if cfg.num_workers else None)
