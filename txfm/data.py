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
``[i·B, (i+1)·B)`` of that order. Gene subsets of micro-batch ``i`` of stream ``s`` are keyed by
``(seed, epoch, s, i)``. So a stream's sequence depends only on the corpus, the
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

Resuming: a trainer's position is ``(epoch, micro-batches consumed)``; call
``make_loader(..., epoch=epoch, start_microbatch=consumed)``.

Decoding: the first time a shard is read its four loader columns (gene_idx, counts, library_size and the
dataset as an index) are decoded and checked once and written, one record batch per row group, as an
uncompressed Arrow IPC file in the decode cache (``decode_cache``: ``auto`` = ``<corpus>/.decoded``, a
directory, or ``none``); afterwards row groups are memory-mapped from it, zero-copy, so an epoch pays no
Parquet list decoding (zstd, repetition levels, fresh buffers). The Parquet shards stay the corpus format;
the cache is derived, keyed by the shard's manifest sha256, size and mtime, and safe to delete.
:func:`build_decode_cache` fills it ahead of time. Without a cache (``none``, or a read-only location)
row groups are decoded from Parquet as they are needed.

Batch (``B`` = micro_batch, ``K`` = n_input_genes, ``G`` = vocabulary size, ``nnz`` = the batch's
non-zero entries), built by :class:`txfm.transform.InputTransform` (the one input transform, shared with
``txfm embed``): ``gene_idx`` int64 [B, K], ``values`` float32 [B, K], ``pad_mask`` bool [B, K],
``dataset_idx`` int64 [B], ``library_size`` float32 [B] (raw total counts), and the target in one of two
formats (``target_format``):

* ``dense`` (default): ``target`` float32 [B, G], ``target_mask`` bool [B, G];
* ``sparse``: the normalised non-zero entries, flat: ``target_offsets`` int64 [B+1], ``target_gene`` int32
  [nnz], ``target_value`` float32 [nnz] (sample b's entries are ``target_offsets[b]:target_offsets[b+1]``).
  A dense target costs B·G·5 bytes through the worker queue (7 MB at G = 44k, B = 32) and its zero-fill;
  the sparse one costs nnz·8 bytes and no host work. :func:`densify_target` scatters either format into
  ``(target, target_mask)`` on the training device.

Gene subsets of micro-batch ``i`` of stream ``s`` are keyed by ``(seed, epoch, s, i)`` and the sample's
position in the batch (:func:`txfm.transform.sample_keys`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import heapq
import json
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from curation import schema
from curation.io import atomic_path
from txfm.transform import LIBRARY_SIZE, N_INPUT_GENES, SAMPLING_KINDS, InputTransform, frequency_log_weight, \
    sample_keys

TARGET_FORMATS = ("dense", "sparse")
#: ``decode_cache`` value for ``<corpus>/.decoded``, and the one that turns the cache off.
DECODE_CACHE_AUTO, DECODE_CACHE_OFF = "auto", "none"
DECODE_CACHE_DIR = ".decoded"
#: Bump when the cached columns or their encoding change (part of every cache key).
DECODE_CACHE_VERSION = 1
#: Row groups read (evenly spread over the corpus) to estimate gene detection frequencies.
FREQUENCY_MAX_ROW_GROUPS = 256
# Distinct salts keep the random streams of the different decisions independent of each other.
_SALT_UNIT_ORDER = 0x0D0E
_SALT_WINDOW = 0x5B0F
_SALT_GENES = 0x6E5E
_SHARD_COLUMNS = ["dataset", "gene_idx", "counts", "library_size"]
_CACHE_SCHEMA = pa.schema([pa.field("gene_idx", pa.list_(pa.int32()), nullable=False),
                           pa.field("counts", pa.list_(pa.float32()), nullable=False),
                           pa.field("dataset_idx", pa.int32(), nullable=False),
                           pa.field("library_size", pa.float64(), nullable=False)])


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
        self.shard_digest = _manifest_digests(path)

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
        reader = _RowGroupReader(units.files, self, capacity=1, cache_dir=None)
        for u in pick:
            block = reader.get(int(units.file[u]), int(units.row_group[u]))
            detected += np.bincount(block.gene_idx, minlength=self.n_genes)
            samples_per_dataset += np.bincount(block.dataset_idx, minlength=len(self.panels))
        measuring = samples_per_dataset @ self.panel_mask.numpy().astype(np.int64)  # samples measuring gene
        return np.divide(detected, measuring, out=np.zeros(self.n_genes), where=measuring > 0)


def _manifest_digests(root: Path) -> dict[str, str]:
    """``{shard path relative to root: sha256}`` from ``manifest.json`` (empty if absent or unreadable)."""
    try:
        manifest = json.loads((root / schema.MANIFEST_FILE).read_text())
        return {str(e["path"]): str(e["sha256"]) for e in manifest.get("shards", [])}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}  # the loader does not need a manifest; the cache key falls back to size and mtime


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
    """Loader settings. ``sampling="frequency"`` draws input genes with p ∝ freq^(1/temperature).

    Fields that share a name with :class:`txfm.config.TrainConfig` are the same setting: build a trainer's
    loader config with :meth:`from_settings`, never by copying fields by hand.
    """

    split: str = "train"
    micro_batch: int = 32
    n_input_genes: int = N_INPUT_GENES
    library_size: float = LIBRARY_SIZE
    sampling: str = "uniform"
    temperature: float = 1.0
    shuffle_buffer_row_groups: int = 4
    num_workers: int = 0
    seed: int = 0
    pin_memory: bool | None = None  # None: pin when CUDA is available
    target_format: str = "dense"  # "sparse": ship target entries, densify on the device (densify_target)
    decode_cache: str = DECODE_CACHE_AUTO  # "auto" = <corpus>/.decoded, "none", or a directory

    @classmethod
    def from_settings(cls, settings: Any, **overrides: Any) -> "LoaderConfig":
        """The loader config of any object with same-named attributes (e.g. a TrainConfig) plus ``overrides``."""
        shared = {f.name: getattr(settings, f.name) for f in dataclasses.fields(cls) if hasattr(settings, f.name)}
        return cls(**{**shared, **overrides})

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
        if not self.decode_cache:
            raise ValueError(f"LoaderConfig.decode_cache must be {DECODE_CACHE_AUTO!r}, {DECODE_CACHE_OFF!r} "
                             "or a directory")

    def cache_dir(self, corpus: Path) -> Path | None:
        """Directory of the decode cache for ``corpus``, or None when the cache is off."""
        if self.decode_cache == DECODE_CACHE_OFF:
            return None
        return corpus / DECODE_CACHE_DIR if self.decode_cache == DECODE_CACHE_AUTO else Path(self.decode_cache)


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

    ``offsets`` int [n+1] into ``gene_idx`` int32 / ``counts`` float32 [nnz]; ``dataset_idx`` int [n];
    ``library_size`` float64 [n] (raw counts). Arrays may be read-only views of a memory-mapped cache file.
    """

    offsets: np.ndarray
    gene_idx: np.ndarray
    counts: np.ndarray
    dataset_idx: np.ndarray
    library_size: np.ndarray


def _single_chunk(column: pa.ChunkedArray) -> pa.Array:
    """The column as one array: zero-copy when it arrives as one chunk (the usual case for a row group)."""
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


def _block_of(batch: pa.RecordBatch) -> _Block:
    """Zero-copy numpy views of a cache record batch (columns of :data:`_CACHE_SCHEMA`)."""
    genes, counts = batch.column(0), batch.column(1)
    return _Block(genes.offsets.to_numpy(), genes.values.to_numpy(), counts.values.to_numpy(),
                  batch.column(2).to_numpy(), batch.column(3).to_numpy())


class _RowGroupReader:
    """Serves checked row groups: memory-mapped from the decode cache, or decoded from Parquet.

    ``cache_dir`` None: decode from Parquet on demand and keep the ``capacity`` most recently used row
    groups. With a cache directory, a shard's cache file is written (all row groups, one at a time) on its
    first use and memory-mapped from then on; if the directory cannot be written, one warning and the
    Parquet path.
    """

    def __init__(self, files: list[str], info: CorpusInfo, capacity: int, cache_dir: Path | None):
        self.files, self.info, self.capacity, self.cache_dir = files, info, capacity, cache_dir
        self._handles: dict[int, pq.ParquetFile] = {}
        self._mapped: dict[int, pa.ipc.RecordBatchFileReader] = {}
        self._cache: OrderedDict[tuple[int, int], _Block] = OrderedDict()

    def get(self, file: int, row_group: int) -> _Block:
        key = (file, row_group)
        if key in self._cache:  # also for mapped blocks: get_batch parses IPC metadata on every call
            self._cache.move_to_end(key)
            return self._cache[key]
        mapped = None
        if self.cache_dir is not None:
            mapped = self._mapped.get(file) or self._open_cached(file)
        block = _block_of(mapped.get_batch(row_group) if mapped is not None else self._decode(file, row_group))
        self._cache[key] = block
        if len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return block

    def cache_path(self, file: int) -> Path:
        """Cache file of shard ``file``: named by a digest of what identifies its content and the dataset order."""
        path = Path(self.files[file])
        try:
            relative = path.relative_to(self.info.path).as_posix()
        except ValueError:
            relative = path.as_posix()
        stat = path.stat()  # size and mtime too: a shard rewritten without a new manifest gets a new key
        key = json.dumps([DECODE_CACHE_VERSION, relative, self.info.shard_digest.get(relative), stat.st_size,
                          stat.st_mtime_ns, list(self.info.datasets["dataset"])])
        return self.cache_dir / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.arrow"

    def _open_cached(self, file: int) -> pa.ipc.RecordBatchFileReader | None:
        path = self.cache_path(file)
        if not path.exists():
            try:
                self.cache_dir.mkdir(parents=True, exist_ok=True)
                self._write_cache(file, path)
            except OSError as exc:  # read-only location, disk full…: the loader works without the cache
                warnings.warn(f"{self.cache_dir}: decode cache not writable ({exc.strerror or exc}); decoding "
                              "Parquet instead", RuntimeWarning)
                self.cache_dir = None
                return None
        try:
            reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
        except (OSError, pa.ArrowException) as exc:
            raise ValueError(f"{path}: unreadable decode-cache file ({exc}); delete it to rebuild") from None
        if reader.num_record_batches != self._parquet(file).metadata.num_row_groups:
            raise ValueError(f"{path}: decode-cache file does not match {self.files[file]}; delete it to rebuild")
        self._mapped[file] = reader
        return reader

    def _write_cache(self, file: int, path: Path) -> None:
        """Decode and check every row group of shard ``file`` into ``path`` (temporary name, then rename)."""
        with atomic_path(path) as tmp:
            with pa.ipc.new_file(str(tmp), _CACHE_SCHEMA) as writer:
                for row_group in range(self._parquet(file).metadata.num_row_groups):
                    writer.write_batch(self._decode(file, row_group))

    def _parquet(self, file: int) -> pq.ParquetFile:
        if file not in self._handles:
            try:
                self._handles[file] = pq.ParquetFile(self.files[file])
            except (OSError, pa.ArrowException) as exc:
                raise ValueError(f"{self.files[file]}: unreadable Parquet ({exc})") from None
        return self._handles[file]

    def _decode(self, file: int, row_group: int) -> pa.RecordBatch:
        """Row group ``row_group`` of shard ``file`` as a checked record batch of :data:`_CACHE_SCHEMA`."""
        where = f"{self.files[file]}: row group {row_group}"
        try:
            table = self._parquet(file).read_row_group(row_group, columns=_SHARD_COLUMNS, use_threads=False)
        except (OSError, pa.ArrowException, KeyError) as exc:
            raise ValueError(f"{where}: unreadable ({exc})") from None
        genes, counts = _single_chunk(table.column("gene_idx")), _single_chunk(table.column("counts"))
        library = _single_chunk(table.column("library_size"))
        if genes.null_count or counts.null_count or library.null_count:
            raise ValueError(f"{where}: null expression entries")
        if genes.type != pa.list_(pa.int32()) or counts.type != pa.list_(pa.float32()):
            genes, counts = genes.cast(pa.list_(pa.int32())), counts.cast(pa.list_(pa.float32()))
        offsets = genes.offsets.to_numpy()
        if not np.array_equal(offsets, counts.offsets.to_numpy()):
            raise ValueError(f"{where}: gene_idx and counts lists differ in length")
        if offsets[0] != 0:  # a sliced array: rebase so the cached lists start at entry 0
            genes, counts = pa.concat_arrays([genes]), pa.concat_arrays([counts])
            offsets = genes.offsets.to_numpy()
        gene_idx = genes.values.to_numpy()
        encoded = pc.dictionary_encode(_single_chunk(table.column("dataset")))
        try:
            codes = np.asarray([self.info.dataset_index[name] for name in encoded.dictionary.to_pylist()],
                               dtype=np.int32)
        except KeyError as exc:
            raise ValueError(f"{where}: dataset {exc.args[0]!r} is not in datasets.parquet") from None
        dataset_idx = codes[encoded.indices.to_numpy()]
        # Checked once per decode (then never again per batch): vocabulary bounds and panel membership.
        if gene_idx.size and (gene_idx.min() < 0 or gene_idx.max() >= self.info.n_genes):
            raise ValueError(f"{where}: gene_idx outside the vocabulary [0, {self.info.n_genes})")
        entry_dataset = np.repeat(dataset_idx, np.diff(offsets))
        if not self.info.panel_mask.numpy()[entry_dataset, gene_idx].all():
            raise ValueError(f"{where}: gene_idx outside the sample's dataset panel")
        return pa.RecordBatch.from_arrays([genes, counts, pa.array(dataset_idx), library.cast(pa.float64())],
                                          schema=_CACHE_SCHEMA)


def build_decode_cache(corpus: str | Path | CorpusInfo, split: str | None = None,
                       decode_cache: str = DECODE_CACHE_AUTO) -> Path | None:
    """Write the decode-cache files of every shard of ``split`` (all if None) that lacks one; → cache dir."""
    info = as_corpus_info(corpus)
    cache_dir = LoaderConfig(decode_cache=decode_cache).cache_dir(info.path)
    files = [str(p) for p in schema.list_shards(info.path, split)]
    reader = _RowGroupReader(files, info, capacity=1, cache_dir=cache_dir)
    for file in range(len(files)):
        if reader.cache_dir is not None:
            reader._open_cached(file)
    return reader.cache_dir


# --------------------------------------------------------------------------------------------------------
# Building a micro-batch
# --------------------------------------------------------------------------------------------------------
def _gather_entries(reader: _RowGroupReader, units: _Units, unit: np.ndarray, row: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Non-zero entries of the samples ``(unit[b], row[b])``, b < B, in batch order (CSR rows).

    → (offsets int64 [B+1], gene int32 [nnz], count float32 [nnz], dataset_idx int64 [B], library f64 [B]).
    One slice copy per sample out of its (memory-mapped) row group.
    """
    n = unit.size
    blocks = {int(u): reader.get(int(units.file[u]), int(units.row_group[u])) for u in np.unique(unit)}
    starts, stops = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)
    dataset_idx, library = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.float64)
    for u, block in blocks.items():
        sel = np.flatnonzero(unit == u)
        r = row[sel]
        starts[sel], stops[sel] = block.offsets[r], block.offsets[r + 1]
        dataset_idx[sel], library[sel] = block.dataset_idx[r], block.library_size[r]
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(stops - starts, out=offsets[1:])
    spans = list(zip(unit.tolist(), starts.tolist(), stops.tolist()))
    genes = np.concatenate([blocks[u].gene_idx[lo:hi] for u, lo, hi in spans])  # views → one copy each
    counts = np.concatenate([blocks[u].counts[lo:hi] for u, lo, hi in spans])
    return offsets, genes, counts, dataset_idx, library


class _MicroBatchDataset(IterableDataset):
    """Yields the interleaved micro-batches of ``streams`` (see the module docstring), worker-split."""

    def __init__(self, info: CorpusInfo, cfg: LoaderConfig, units: _Units, streams: list[int],
                 num_streams: int, epoch: int, start_microbatch: int, log_weight: np.ndarray | None):
        super().__init__()
        self.info, self.cfg, self.units = info, cfg, units
        self.streams, self.num_streams, self.epoch = list(streams), num_streams, epoch
        self.start = start_microbatch
        self.transform = InputTransform(info.n_genes, cfg.n_input_genes, cfg.library_size, cfg.sampling,
                                        log_weight)
        self.panel_mask = info.panel_mask.numpy()
        self.per_stream = (int(units.rows.sum()) // num_streams) // cfg.micro_batch
        self.total = self.per_stream * len(self.streams)

    def __len__(self) -> int:
        return self.total - self.start

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker = get_worker_info()
        worker_id, n_workers = (0, 1) if worker is None else (worker.id, worker.num_workers)
        pieces = _deal_units(self.units.rows, self.num_streams, self.cfg.seed, self.epoch)
        orders = {s: _StreamOrder(pieces[s], self.cfg.shuffle_buffer_row_groups, self.cfg.seed, self.epoch, s)
                  for s in self.streams}
        capacity = len(self.streams) * (self.cfg.shuffle_buffer_row_groups + 1) + 1
        reader = _RowGroupReader(self.units.files, self.info, capacity, self.cfg.cache_dir(self.info.path))
        for position in range(self.start + worker_id, self.total, n_workers):
            stream = self.streams[position % len(self.streams)]
            yield self.build(reader, orders[stream], stream, position // len(self.streams))

    def build(self, reader: _RowGroupReader, order: _StreamOrder, stream: int, index: int
              ) -> dict[str, torch.Tensor]:
        """Micro-batch ``index`` of ``stream`` as a dict of tensors (shapes in the module docstring)."""
        cfg, n_genes = self.cfg, self.info.n_genes
        unit, row = order.rows(index * cfg.micro_batch, (index + 1) * cfg.micro_batch)
        offsets, gene, count, dataset_idx, library = _gather_entries(reader, self.units, unit, row)
        keys = sample_keys((cfg.seed, self.epoch, stream, index, _SALT_GENES), np.arange(unit.size))
        built = self.transform(offsets, gene, count, library, dataset_idx, self.info.panels, keys)
        batch = {name: torch.from_numpy(built[name]) for name in ("gene_idx", "values", "pad_mask")}
        if cfg.target_format == "dense":
            target = np.zeros((unit.size, n_genes), dtype=np.float32)
            flat = np.repeat(np.arange(unit.size, dtype=np.int64) * n_genes, np.diff(offsets)) + gene
            target.ravel()[flat] = built["target_value"]
            batch["target"] = torch.from_numpy(target)
            batch["target_mask"] = torch.from_numpy(self.panel_mask[dataset_idx])
        else:
            batch.update({name: torch.from_numpy(built[name])
                          for name in ("target_offsets", "target_gene", "target_value")})
        batch["dataset_idx"] = torch.from_numpy(dataset_idx)
        batch["library_size"] = torch.from_numpy(library.astype(np.float32))
        return batch


#: Batch keys of the two target formats (what :func:`densify_target` consumes).
TARGET_KEYS = ("target", "target_mask", "target_offsets", "target_gene", "target_value")


def densify_target(batch: dict[str, torch.Tensor], panel_mask: torch.Tensor,
                   device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense ``(target float32 [B, G], target_mask bool [B, G])`` of a batch, built on ``device``.

    Works for both target formats: a dense batch's tensors are moved as they are; a sparse one's flat
    entries (``target_offsets`` [B+1], ``target_gene`` / ``target_value`` [nnz]) are scattered into zeros
    on the device, and the mask is ``panel_mask[dataset_idx]`` (``panel_mask`` bool [D, G], e.g.
    ``CorpusInfo.panel_mask``; pass it already on ``device`` to avoid a copy per call). No host–device
    synchronisation: the entries' rows come from ``repeat_interleave`` with a known output size.
    """
    device = torch.device(device) if device is not None else batch["gene_idx"].device
    if "target" in batch:
        return (batch["target"].to(device, non_blocking=True),
                batch["target_mask"].to(device, non_blocking=True))
    n_genes = panel_mask.shape[1]
    offsets = batch["target_offsets"].to(device, non_blocking=True)
    genes = batch["target_gene"].to(device, non_blocking=True)
    entries = batch["target_value"].to(device, non_blocking=True)
    n_samples = offsets.numel() - 1
    rows = torch.repeat_interleave(torch.arange(n_samples, device=device), offsets.diff(),
                                   output_size=genes.numel())
    target = torch.zeros(n_samples * n_genes, dtype=entries.dtype, device=device)
    # (row, gene) pairs are unique (gene_idx is unique per sample), so the scatter is exact and deterministic.
    target.index_copy_(0, rows * n_genes + genes.long(), entries)
    dataset_idx = batch["dataset_idx"].to(device, non_blocking=True)
    return target.view(n_samples, n_genes), panel_mask.to(device, non_blocking=True)[dataset_idx]


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
    log_weight = frequency_log_weight(info.gene_frequency, cfg.temperature) if cfg.sampling == "frequency" else None
    dataset = _MicroBatchDataset(info, cfg, units, streams, num_streams, epoch, start_microbatch, log_weight)
    if not 0 <= start_microbatch <= dataset.total:
        raise ValueError(f"start_microbatch must be in [0, {dataset.total}], got {start_microbatch}")
    pin = torch.cuda.is_available() if cfg.pin_memory is None else cfg.pin_memory
    return DataLoader(dataset, batch_size=None, num_workers=cfg.num_workers, pin_memory=pin,
                      worker_init_fn=_worker_init if cfg.num_workers else None)
