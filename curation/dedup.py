"""Cross-dataset deduplication of curated samples.

Three kinds of duplicate are found (the ``reason`` column of ``<work>/dedup/removed.parquet``):

``exact``
    identical ``content_hash`` (same non-zero counts on the same reference genes), within or across datasets.
``redistributed``
    the same cell or sample re-published by another dataset with a different gene panel, e.g. an atlas that
    integrates earlier studies. For every pair of datasets of one modality, the profiles are compared on
    ``S`` = the intersection of the two panels: equal non-zero counts on ``S`` and at least
    ``min_shared_nonzero`` of them (so sparse, near-empty profiles never match by accident).
``accession``
    the same non-empty ``source_accession`` (GSM, SRR, aliquot…) twice, within or across datasets.

Duplicate relations form a graph over samples; each connected component keeps exactly one sample — lowest
``priority`` number, then dataset name, then sample_id — and every other member is removed with
``duplicate_of`` = that kept sample, so chains (A = B = C) resolve to one survivor and never lose both copies.
A removed sample's ``reason`` is the relation that links it on its shortest path towards the kept sample
(``exact`` preferred over ``redistributed`` over ``accession`` on ties).

Memory: a 64-bit hash (plus dataset code and row number) per sample, never the expression. Expression is
only read in bounded Parquet batches; profiles are held only for verifying hash collisions, in blocks whose
size is capped by :data:`VERIFY_BUDGET_BYTES`.
"""

from __future__ import annotations

import itertools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components, dijkstra
from tqdm.auto import tqdm

from curation import intermediates
from curation.io import CurationError, atomic_path

log = logging.getLogger(__name__)

REASONS = ("exact", "redistributed", "accession")
#: Path length of one duplicate relation; the small increments make shortest paths prefer ``exact`` edges.
_REASON_WEIGHT = np.array([1.0, 1.001, 1.002])

REMOVED_SCHEMA = pa.schema([
    pa.field("sample_id", pa.string(), nullable=False),
    pa.field("dataset", pa.string(), nullable=False),
    pa.field("reason", pa.string(), nullable=False),
    pa.field("duplicate_of", pa.string(), nullable=False),
    pa.field("duplicate_of_dataset", pa.string(), nullable=False),
])

#: Priority of a dataset missing from the ``priority`` mapping: after every configured one.
DEFAULT_PRIORITY = 1_000_000
#: Rows per Parquet batch when reading metadata columns only.
METADATA_BATCH_ROWS = 65536
#: Rows per Parquet batch when reading expression lists.
EXPRESSION_BATCH_ROWS = 1024
#: Upper bound on the restricted profiles held at once while verifying ``redistributed`` candidates.
VERIFY_BUDGET_BYTES = 256 << 20

_REQUIRED_COLUMNS = ("sample_id", "modality", "gene_idx", "counts", "content_hash", "source_accession")


@dataclass(frozen=True)
class CuratedDataset:
    """One curated dataset as dedup sees it.

    ``panel``: sorted unique reference gene indices (int32, shape (n_genes,)); ``n_rows``: samples in the file.
    """

    name: str
    samples: Path
    panel: np.ndarray
    modality: str
    n_rows: int


def load_curated(name: str, path: Path) -> CuratedDataset:
    """Open ``<work>/curated/<name>`` (or its ``samples.parquet``) and its ``report.json`` panel."""
    path = Path(path)
    samples = path if path.suffix == ".parquet" else path / intermediates.SAMPLES_FILE
    report = samples.parent / intermediates.REPORT_FILE
    if not samples.is_file():
        raise CurationError(samples, f"curated samples of dataset {name!r} not found")
    pf = intermediates.check_samples_columns(samples, _REQUIRED_COLUMNS)
    if not report.is_file():
        raise CurationError(report, f"report of dataset {name!r} not found")
    panel = intermediates.load_panel(report)
    modality = _first_modality(pf, samples)
    return CuratedDataset(name, samples, panel.astype(np.int32), modality, pf.metadata.num_rows)


def _first_modality(pf: pq.ParquetFile, samples: Path) -> str:
    for batch in pf.iter_batches(batch_size=1, columns=["modality"]):
        if batch.num_rows:
            return str(batch.column(0)[0].as_py())
    return ""  # an empty dataset has no modality and takes part in no pair


# --------------------------------------------------------------------------------------------- hashing

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: a bijective, well-avalanching map uint64 -> uint64 (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def _flat_expression(batch: pa.RecordBatch, where: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flattened ``(gene_idx int64 (nnz,), counts float32 (nnz,), offsets int64 (n_rows + 1,))`` of a batch."""
    idx_col, cnt_col = batch.column("gene_idx"), batch.column("counts")
    lengths = pc.list_value_length(idx_col).fill_null(0).to_numpy(zero_copy_only=False)
    cnt_lengths = pc.list_value_length(cnt_col).fill_null(0).to_numpy(zero_copy_only=False)
    if not np.array_equal(lengths, cnt_lengths):
        raise CurationError(where, "gene_idx and counts lists differ in length")
    idx = pc.list_flatten(idx_col).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    counts = pc.list_flatten(cnt_col).to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return idx, counts, offsets


def restricted_profile_hashes(batch: pa.RecordBatch, shared: np.ndarray,
                              where: Path = Path("?")) -> tuple[np.ndarray, np.ndarray]:
    """Hash each row's profile restricted to the genes ``shared`` (sorted reference indices).

    Returns ``(hash uint64 (n_rows,), nnz int64 (n_rows,))``: a 64-bit digest of the non-zero (gene, count)
    pairs on ``shared`` and how many there are. Equal restricted profiles give equal hashes; unequal ones
    collide with probability ~2^-64 (callers verify). The per-entry hashes are combined by a wrapping sum,
    which needs no per-row Python loop and is exact for sets (gene indices are unique within a row).
    """
    idx, counts, offsets = _flat_expression(batch, where)
    keep = np.isin(idx, shared, kind="table") if idx.size and shared.size else np.zeros(idx.size, bool)
    key = (idx.astype(np.uint64) << np.uint64(32)) | counts.view(np.uint32).astype(np.uint64)
    entry = np.where(keep, _mix64(key), np.uint64(0))
    csum = np.zeros(idx.size + 1, dtype=np.uint64)
    np.cumsum(entry, out=csum[1:])
    ckeep = np.zeros(idx.size + 1, dtype=np.int64)
    np.cumsum(keep, out=ckeep[1:])
    nnz = ckeep[offsets[1:]] - ckeep[offsets[:-1]]
    total = csum[offsets[1:]] - csum[offsets[:-1]]
    return _mix64(total ^ _mix64(nnz.astype(np.uint64))), nnz


def _string_hashes(values: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """``(uint64 hash (n,), present bool (n,))`` of a string column; null and "" are absent."""
    present = pc.fill_null(pc.not_equal(values, ""), False).to_numpy(zero_copy_only=False)
    filled = pc.fill_null(values, "").to_numpy(zero_copy_only=False).astype(object, copy=False)
    return pd.util.hash_array(filled, categorize=False), present


# ----------------------------------------------------------------------------------------- row access

def _iter_rows(samples: Path, rows: np.ndarray, columns: list[str],
               batch_rows: int) -> Iterator[tuple[np.ndarray, pa.RecordBatch]]:
    """Yield ``(row numbers, batch of exactly those rows)`` for sorted unique ``rows`` of a Parquet file.

    Only row groups that contain a requested row are read, each in batches of ``batch_rows``.
    """
    if rows.size == 0:
        return
    pf = intermediates.open_samples(samples)
    sizes = np.array([pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    groups = np.unique(np.searchsorted(starts, rows, side="right") - 1)
    for group in groups:
        offset = int(starts[group])
        for batch in pf.iter_batches(batch_size=batch_rows, row_groups=[int(group)], columns=columns):
            lo, hi = np.searchsorted(rows, [offset, offset + batch.num_rows])
            if hi > lo:
                wanted = rows[lo:hi]
                yield wanted, batch.take(pa.array(wanted - offset))
            offset += batch.num_rows


def _iter_all(ds: CuratedDataset, columns: list[str], batch_rows: int,
              progress: bool, desc: str) -> Iterator[tuple[int, pa.RecordBatch]]:
    """Yield ``(first row number, batch)`` over the whole file with a progress bar."""
    pf = intermediates.open_samples(ds.samples)
    offset = 0
    with tqdm(total=ds.n_rows, desc=desc, unit="sample", disable=not progress, leave=False) as bar:
        for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
            yield offset, batch
            offset += batch.num_rows
            bar.update(batch.num_rows)


# ----------------------------------------------------------------------------------- per-sample hashes

@dataclass
class _SampleHashes:
    """One entry per sample of every dataset (concatenated): 27 bytes per sample."""

    dataset: np.ndarray  # int16 dataset code (position in the sorted dataset list)
    row: np.ndarray  # int64 row number within that dataset's samples.parquet
    content: np.ndarray  # uint64 hash of the content_hash string
    accession: np.ndarray  # uint64 hash of source_accession
    has_accession: np.ndarray  # bool


def _hash_metadata(datasets: list[CuratedDataset], progress: bool) -> _SampleHashes:
    parts: list[tuple[np.ndarray, ...]] = []
    for code, ds in enumerate(datasets):
        for offset, batch in _iter_all(ds, ["content_hash", "source_accession", "modality"],
                                       METADATA_BATCH_ROWS, progress, f"dedup hash {ds.name}"):
            modalities = pc.unique(batch.column("modality")).to_pylist()
            if modalities != [ds.modality]:
                raise CurationError(ds.samples, f"mixed modalities {sorted(map(str, modalities))}")
            content, has_content = _string_hashes(batch.column("content_hash"))
            if not has_content.all():
                raise CurationError(ds.samples, "empty content_hash")
            accession, has_accession = _string_hashes(batch.column("source_accession"))
            n = batch.num_rows
            parts.append((np.full(n, code, np.int16), np.arange(offset, offset + n, dtype=np.int64),
                          content, accession, has_accession))
    if not parts:
        empty = np.zeros(0, np.int64)
        return _SampleHashes(empty.astype(np.int16), empty, empty.astype(np.uint64), empty.astype(np.uint64),
                             empty.astype(bool))
    return _SampleHashes(*(np.concatenate(col) for col in zip(*parts)))


def _colliding(keys: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Positions of entries whose key occurs at least twice (among ``valid`` entries)."""
    positions = np.arange(keys.size) if valid is None else np.flatnonzero(valid)
    order = positions[np.argsort(keys[positions], kind="stable")]
    sorted_keys = keys[order]
    same_as_next = sorted_keys[1:] == sorted_keys[:-1]
    in_run = np.zeros(order.size, dtype=bool)
    in_run[1:] |= same_as_next
    in_run[:-1] |= same_as_next
    return np.sort(order[in_run])


# ------------------------------------------------------------------------------ redistributed samples

def _redistributed_pairs(a: CuratedDataset, b: CuratedDataset, min_shared_nonzero: int,
                         progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """Verified ``(rows of a, rows of b)`` whose profiles are equal on the shared panel (see module doc)."""
    shared = np.intersect1d(a.panel, b.panel)
    if shared.size < max(min_shared_nonzero, 1):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if shared.size == a.panel.size == b.panel.size:
        # Same panel: restricted profile == full profile, so these pairs are exactly the content_hash matches.
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    small, large = (a, b) if a.n_rows <= b.n_rows else (b, a)

    # Index: one 8-byte hash + row number per eligible sample of the smaller dataset, sorted by hash.
    hashes, rows = [], []
    for offset, batch in _iter_all(small, ["gene_idx", "counts"], EXPRESSION_BATCH_ROWS, progress,
                                   f"dedup index {small.name}"):
        h, nnz = restricted_profile_hashes(batch, shared, small.samples)
        eligible = np.flatnonzero(nnz >= min_shared_nonzero)
        hashes.append(h[eligible])
        rows.append(eligible + offset)
    index_hash = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
    index_row = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    order = np.argsort(index_hash, kind="stable")
    index_hash, index_row = index_hash[order], index_row[order]
    if index_hash.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)

    # Stream the larger dataset and look each eligible hash up in the index.
    cand_small, cand_large = [], []
    for offset, batch in _iter_all(large, ["gene_idx", "counts"], EXPRESSION_BATCH_ROWS, progress,
                                   f"dedup match {large.name} vs {small.name}"):
        h, nnz = restricted_profile_hashes(batch, shared, large.samples)
        eligible = np.flatnonzero(nnz >= min_shared_nonzero)
        lo = np.searchsorted(index_hash, h[eligible], side="left")
        hi = np.searchsorted(index_hash, h[eligible], side="right")
        n_hits = hi - lo
        if n_hits.any():
            hit_rows = np.repeat(eligible + offset, n_hits)
            # Expand each [lo, hi) range of index positions (several small-side rows may share a hash).
            starts = np.repeat(lo, n_hits)
            within = np.arange(n_hits.sum()) - np.repeat(np.cumsum(n_hits) - n_hits, n_hits)
            cand_small.append(index_row[starts + within])
            cand_large.append(hit_rows)
    del index_hash, index_row
    if not cand_small:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    cs, cl = np.concatenate(cand_small), np.concatenate(cand_large)
    ok = _verify_pairs(small, cs, large, cl, shared, min_shared_nonzero)
    cs, cl = cs[ok], cl[ok]
    if small is a:
        return cs, cl
    return cl, cs


def _restricted(idx: np.ndarray, counts: np.ndarray, shared: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keep = np.isin(idx, shared, kind="table") if idx.size else np.zeros(0, bool)
    return idx[keep], counts[keep]


def _verify_pairs(small: CuratedDataset, rows_small: np.ndarray, large: CuratedDataset, rows_large: np.ndarray,
                  shared: np.ndarray, min_shared_nonzero: int) -> np.ndarray:
    """Exact check of hash-matched pairs: equal restricted profiles with >= min_shared_nonzero entries.

    Returns a bool mask over the pairs. The small side's candidate rows are streamed once; their restricted
    profiles are held until VERIFY_BUDGET_BYTES, then checked against the large side, which is streamed
    reading only the row groups that hold a paired row. So memory is bounded, and the large side is read
    once per budget-full of candidate profiles (once, unless a dataset is largely re-published).
    """
    ok = np.zeros(rows_small.size, dtype=bool)
    order = np.argsort(rows_small, kind="stable")
    sorted_small = rows_small[order]
    held: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    held_bytes = 0
    done = 0  # pairs order[:done] are verified

    def check_held() -> None:
        nonlocal done
        last = max(held)
        upto = int(np.searchsorted(sorted_small, last, side="right"))
        block = order[done:upto]
        by_large = pd.Series(block).groupby(rows_large[block]).agg(list)
        for got, batch in _iter_rows(large.samples, by_large.index.to_numpy(dtype=np.int64),
                                     ["gene_idx", "counts"], EXPRESSION_BATCH_ROWS):
            idx, counts, offsets = _flat_expression(batch, large.samples)
            for i, row in enumerate(got):
                r_idx, r_counts = _restricted(idx[offsets[i]:offsets[i + 1]], counts[offsets[i]:offsets[i + 1]],
                                              shared)
                if r_idx.size < min_shared_nonzero:
                    continue
                for pair in by_large[int(row)]:
                    s_idx, s_counts = held[int(rows_small[pair])]
                    ok[pair] = np.array_equal(s_idx, r_idx) and np.array_equal(s_counts, r_counts)
        done = upto

    for got, batch in _iter_rows(small.samples, np.unique(rows_small), ["gene_idx", "counts"],
                                 EXPRESSION_BATCH_ROWS):
        idx, counts, offsets = _flat_expression(batch, small.samples)
        for i, row in enumerate(got):
            profile = _restricted(idx[offsets[i]:offsets[i + 1]], counts[offsets[i]:offsets[i + 1]], shared)
            held[int(row)] = profile
            held_bytes += profile[0].nbytes + profile[1].nbytes + 256  # + array and dict overhead
            if held_bytes >= VERIFY_BUDGET_BYTES:
                check_held()
                held.clear()
                held_bytes = 0
    if held:
        check_held()
    return ok


# -------------------------------------------------------------------------------------- resolution

def _gather_metadata(ds: CuratedDataset, rows: np.ndarray) -> pd.DataFrame:
    """sample_id, content_hash, source_accession of the given sorted rows of one dataset."""
    frames = [pd.DataFrame({"row": got, **{c: batch.column(c).to_pylist() for c in batch.schema.names}})
              for got, batch in _iter_rows(ds.samples, rows, ["sample_id", "content_hash", "source_accession"],
                                           METADATA_BATCH_ROWS)]
    if not frames:
        return pd.DataFrame(columns=["row", "sample_id", "content_hash", "source_accession"])
    return pd.concat(frames, ignore_index=True)


def _equal_value_edges(nodes: pd.DataFrame, column: str, candidate: np.ndarray) -> np.ndarray:
    """Edges (k, 2) joining each ``candidate`` node to the first node with the same non-empty ``column`` value.

    ``candidate``: bool (n_nodes,) — nodes whose 64-bit hash of ``column`` collided; comparing the full
    strings here removes hash collisions.
    """
    values = nodes[column]
    sub = pd.DataFrame({"node": np.flatnonzero(candidate & values.notna().to_numpy() & (values != "").to_numpy())})
    sub["value"] = values.to_numpy()[sub["node"].to_numpy()]
    sub["first"] = sub.groupby("value", sort=False)["node"].transform("first")
    edges = sub[["node", "first"]].to_numpy(dtype=np.int64)
    return edges[edges[:, 0] != edges[:, 1]]


def _node_key(dataset_code: np.ndarray, row: np.ndarray) -> np.ndarray:
    """One int64 per (dataset, row): dataset code in the high bits (row numbers stay below 2^40)."""
    return (np.asarray(dataset_code, dtype=np.int64) << 40) | np.asarray(row, dtype=np.int64)


def find_duplicates(curated: dict[str, Path], priority: dict[str, int], min_shared_nonzero: int = 50,
                    progress: bool = True) -> pd.DataFrame:
    """Find the samples to remove so that every duplicate group keeps exactly one member.

    Args:
        curated: dataset name -> its curated directory ``<work>/curated/<name>`` (or its samples.parquet);
            ``report.json`` next to samples.parquet supplies the panel.
        priority: dataset name -> priority; the lowest number keeps its copy (missing: DEFAULT_PRIORITY).
        min_shared_nonzero: fewest non-zero shared genes for a ``redistributed`` match.
        progress: show tqdm progress bars.

    Returns:
        One row per removed sample, columns ``sample_id, dataset, reason, duplicate_of,
        duplicate_of_dataset`` (see REMOVED_SCHEMA), sorted by dataset then sample_id.
    """
    if min_shared_nonzero < 1:
        raise ValueError(f"min_shared_nonzero must be >= 1, got {min_shared_nonzero}")
    datasets = [load_curated(name, Path(curated[name])) for name in sorted(curated)]
    hashes = _hash_metadata(datasets, progress)

    # Candidate samples: a 64-bit hash shared with another sample; the full strings are compared below.
    exact_pos = _colliding(hashes.content)
    accession_pos = _colliding(hashes.accession, hashes.has_accession)

    redistributed: list[tuple[int, np.ndarray, int, np.ndarray]] = []
    pairs = [(i, j) for i, j in itertools.combinations(range(len(datasets)), 2)
             if datasets[i].modality and datasets[i].modality == datasets[j].modality]
    for i, j in tqdm(pairs, desc="dedup dataset pairs", disable=not progress or not pairs, leave=False):
        rows_i, rows_j = _redistributed_pairs(datasets[i], datasets[j], min_shared_nonzero, progress)
        if rows_i.size:
            log.info("%s / %s: %d redistributed sample pairs", datasets[i].name, datasets[j].name, rows_i.size)
            redistributed.append((i, rows_i, j, rows_j))

    # Every sample that takes part in any relation becomes a graph node, keyed by (dataset code, row).
    exact_keys = _node_key(hashes.dataset[exact_pos], hashes.row[exact_pos])
    accession_keys = _node_key(hashes.dataset[accession_pos], hashes.row[accession_pos])
    del hashes
    pair_keys = [(_node_key(np.full(ri.size, i), ri), _node_key(np.full(rj.size, j), rj))
                 for i, ri, j, rj in redistributed]
    node_keys = np.unique(np.concatenate([exact_keys, accession_keys, *itertools.chain(*pair_keys)]))
    if node_keys.size == 0:
        return _empty_removed()

    node_ds, node_row = node_keys >> 40, node_keys & ((1 << 40) - 1)
    meta = [_gather_metadata(datasets[code], node_row[node_ds == code]).assign(ds=code)
            for code in np.unique(node_ds)]
    nodes = (pd.concat(meta, ignore_index=True).assign(key=lambda f: _node_key(f["ds"], f["row"]))
             .sort_values("key", ignore_index=True))
    if not np.array_equal(nodes["key"].to_numpy(), node_keys):
        raise CurationError(None, "dedup: could not re-read every candidate sample (files changed during dedup?)")
    nodes["dataset"] = [datasets[c].name for c in nodes["ds"]]
    nodes["priority"] = [int(priority.get(name, DEFAULT_PRIORITY)) for name in nodes["dataset"]]

    edge_parts = [
        (_equal_value_edges(nodes, "content_hash", np.isin(node_keys, exact_keys)), 0),
        (_equal_value_edges(nodes, "source_accession", np.isin(node_keys, accession_keys)), 2),
    ]
    for keys_i, keys_j in pair_keys:
        edge_parts.append((np.stack([np.searchsorted(node_keys, keys_i), np.searchsorted(node_keys, keys_j)],
                                    axis=1), 1))
    edges = pd.DataFrame(np.concatenate([e for e, _ in edge_parts]), columns=["u", "v"])
    edges["reason"] = np.concatenate([np.full(len(e), r, np.int64) for e, r in edge_parts])
    return _resolve(nodes, edges)


def _empty_removed() -> pd.DataFrame:
    return pd.DataFrame({name: pd.Series(dtype=object) for name in REMOVED_SCHEMA.names})


def _resolve(nodes: pd.DataFrame, edges: pd.DataFrame) -> pd.DataFrame:
    """Keep one node per connected component; removed rows point at it with the reason of their path."""
    n = len(nodes)
    # Undirected, one edge per pair with its most direct reason.
    lo, hi = np.minimum(edges["u"], edges["v"]), np.maximum(edges["u"], edges["v"])
    edges = (pd.DataFrame({"u": lo, "v": hi, "reason": edges["reason"]})
             .sort_values(["u", "v", "reason"]).drop_duplicates(["u", "v"], ignore_index=True))
    graph = sp.csr_matrix((_REASON_WEIGHT[edges["reason"].to_numpy()], (edges["u"], edges["v"])), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    nodes = nodes.assign(component=component)
    ranked = nodes.sort_values(["component", "priority", "dataset", "sample_id"])
    keeper = ranked.groupby("component", sort=False).head(1)
    keeper_of = pd.Series(keeper.index.to_numpy(), index=keeper["component"].to_numpy())
    _, predecessor, _ = dijkstra(graph, directed=False, indices=keeper.index.to_numpy(), min_only=True,
                                 return_predecessors=True)
    removed = np.flatnonzero(~nodes.index.isin(keeper.index))
    if removed.size == 0:
        return _empty_removed()
    pred = predecessor[removed]
    # Reason of the edge (removed, predecessor): look its pair key up among the sorted unique edges.
    edge_key = edges["u"].to_numpy(dtype=np.int64) * n + edges["v"].to_numpy(dtype=np.int64)
    wanted = np.minimum(removed, pred).astype(np.int64) * n + np.maximum(removed, pred)
    reason_code = edges["reason"].to_numpy()[np.searchsorted(edge_key, wanted)]
    kept = keeper_of.loc[component[removed]].to_numpy()
    out = pd.DataFrame({
        "sample_id": nodes.loc[removed, "sample_id"].to_numpy(),
        "dataset": nodes.loc[removed, "dataset"].to_numpy(),
        "reason": np.asarray(REASONS, dtype=object)[reason_code],
        "duplicate_of": nodes.loc[kept, "sample_id"].to_numpy(),
        "duplicate_of_dataset": nodes.loc[kept, "dataset"].to_numpy(),
    })
    return out.sort_values(["dataset", "sample_id"], ignore_index=True)


# ------------------------------------------------------------------------------------------ driver

def summarise(removed: pd.DataFrame) -> list[dict]:
    """Removal counts per (dataset, duplicate_of_dataset, reason), sorted."""
    if removed.empty:
        return []
    counts = removed.groupby(["dataset", "duplicate_of_dataset", "reason"]).size().reset_index(name="n_removed")
    return [{k: (int(v) if k == "n_removed" else str(v)) for k, v in rec.items()}
            for rec in counts.to_dict(orient="records")]


def run_dedup(work_dir: Path, config: dict) -> dict:
    """Deduplicate every configured dataset's curated samples; write ``<work>/dedup/`` atomically.

    Reads ``config["datasets"]`` (each entry's ``priority``), optional ``config["dedup"]["min_shared_nonzero"]``
    (default 50) and ``config["progress"]`` (default True). Writes ``removed.parquet`` (REMOVED_SCHEMA) and
    ``report.json``; returns the report dict.
    """
    work_dir = Path(work_dir)
    specs = config.get("datasets") or {}
    if not specs:
        raise CurationError(None, "config has no datasets to deduplicate")
    curated = {name: intermediates.curated_dir(work_dir, name) for name in specs}
    priority = {name: int((spec or {}).get("priority", DEFAULT_PRIORITY)) for name, spec in specs.items()}
    min_shared = int((config.get("dedup") or {}).get("min_shared_nonzero", 50))
    removed = find_duplicates(curated, priority, min_shared, progress=bool(config.get("progress", True)))

    n_samples = {name: pq.ParquetFile(path / intermediates.SAMPLES_FILE).metadata.num_rows for name, path in curated.items()}
    report = {
        "n_samples": n_samples,
        "n_removed": int(len(removed)),
        "n_removed_by_reason": {r: int((removed["reason"] == r).sum()) for r in REASONS},
        "n_removed_by_dataset": {name: int((removed["dataset"] == name).sum()) for name in sorted(specs)},
        "removals": summarise(removed),
        "min_shared_nonzero": min_shared,
        "priority": priority,
    }
    out_dir = intermediates.dedup_dir(work_dir)
    table = pa.Table.from_pandas(removed, schema=REMOVED_SCHEMA, preserve_index=False)
    with atomic_path(out_dir / intermediates.DEDUP_REMOVED_FILE) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    with atomic_path(out_dir / intermediates.DEDUP_REPORT_FILE) as tmp:
        tmp.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    log.info("dedup: %d of %d samples removed (%s)", report["n_removed"], sum(n_samples.values()),
             report["n_removed_by_reason"])
    return report
