"""simulation.corpus corpora and the txfm.data streaming loader: coverage, determinism, resume, correctness."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch

from curation import schema
from curation.corpus import validate_corpus
from curation.io import file_digest
from txfm.data import CorpusInfo, LoaderConfig, LoaderState, make_loader, microbatches_per_stream
from simulation.corpus import write_synthetic_corpus

K = 64  # input genes; the smallest panel (36 genes) is below it, the largest (120) above
L = 1e4  # target library size


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """~700 samples, 120 genes, 3 datasets with panels of 120/78/36 genes, row groups of 32 rows."""
    return write_synthetic_corpus(tmp_path_factory.mktemp("corpus") / "c", n_samples=700, n_genes=120,
                                  n_datasets=3, seed=3, panel_fraction=(0.3, 1.0), row_group_rows=32,
                                  shard_rows=96)


@pytest.fixture(scope="module")
def reference(corpus) -> dict:
    """Independent dense computation per train sample, keyed by (dataset, library size, detected genes)."""
    info = CorpusInfo.open(corpus)
    table = pads.dataset(corpus / schema.SHARDS_DIR, partitioning="hive").to_table(
        filter=pads.field("split") == "train").to_pylist()
    samples = {}
    for rec in table:
        dense = np.zeros(info.n_genes)
        dense[rec["gene_idx"]] = rec["counts"]
        d = info.dataset_index[rec["dataset"]]
        key = (d, round(rec["library_size"]), (dense > 0).tobytes())
        assert key not in samples, "synthetic samples should be distinguishable"
        samples[key] = dict(sample_id=rec["sample_id"], expression=np.log1p(dense * L / dense.sum()),
                            library_size=rec["library_size"])
    return samples


def _config(**overrides) -> LoaderConfig:
    return LoaderConfig(**{**dict(micro_batch=8, n_input_genes=K, library_size=L), **overrides})


def _batches(corpus, cfg=None, streams=(0,), num_streams=1, epoch=0, start=0) -> list[dict]:
    return list(make_loader(corpus, cfg or _config(), list(streams), num_streams, epoch, start))


def _sample_keys(batch: dict) -> list[tuple]:
    detected = (batch["target"] > 0).numpy()
    return [(int(d), round(float(lib)), row.tobytes())
            for d, lib, row in zip(batch["dataset_idx"], batch["library_size"], detected)]


def _assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for name in x:
            assert torch.equal(x[name], y[name]), name


# ----------------------------------------------------------------------------------------- synthetic corpus
def test_synthetic_corpus_is_a_valid_deterministic_corpus(corpus, tmp_path):
    info = CorpusInfo.open(corpus)
    assert info.panel_mask.any(dim=0).all(), "vocabulary = union of the panels"
    assert sorted(info.panel_mask.sum(dim=1).tolist()) == [36, 78, 120]
    shards = schema.list_shards(corpus)
    manifest = json.loads((corpus / schema.MANIFEST_FILE).read_text())
    assert {s["path"] for s in manifest["shards"]} == {p.relative_to(corpus).as_posix() for p in shards}
    for entry in manifest["shards"]:
        assert entry["sha256"] == file_digest(corpus / entry["path"])
        meta = pq.ParquetFile(corpus / entry["path"]).metadata
        assert meta.num_rows == entry["rows"] <= 96 and meta.row_group(0).num_rows <= 32
    assert validate_corpus(corpus) == [], "the corpus builder's own checker accepts it"
    table = pq.read_table(shards[0])
    schema.check_table(table, schema.SAMPLE_SCHEMA, "shard")
    rows = pads.dataset(corpus / schema.SHARDS_DIR, partitioning="hive").to_table().to_pandas()
    assert len(rows) == 700 and rows["sample_id"].is_unique
    assert (rows.groupby(["dataset", "batch"])["split"].nunique() == 1).all(), "splits are whole batches"
    assert set(rows["split"]) == {"train", "val"}
    for rec in rows.itertuples():
        d = info.dataset_index[rec.dataset]
        assert np.all(np.diff(rec.gene_idx) > 0) and info.panel_mask[d, rec.gene_idx].all()
        assert np.all(rec.counts > 0) and rec.library_size == pytest.approx(rec.counts.sum())
    again = write_synthetic_corpus(tmp_path / "again", n_samples=700, n_genes=120, n_datasets=3, seed=3,
                                   panel_fraction=(0.3, 1.0), row_group_rows=32, shard_rows=96)
    other = write_synthetic_corpus(tmp_path / "other", n_samples=700, n_genes=120, n_datasets=3, seed=4,
                                   panel_fraction=(0.3, 1.0), row_group_rows=32, shard_rows=96)
    digests = {p.name: [file_digest(s) for s in schema.list_shards(p)] for p in (corpus, again, other)}
    assert digests[corpus.name] == digests["again"] != digests["other"]


def test_synthetic_corpus_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "file").write_text("occupied")
    with pytest.raises(ValueError, match="not an empty directory"):
        write_synthetic_corpus(tmp_path / "x")


# ------------------------------------------------------------------------------------------ stream contract
@pytest.mark.parametrize("num_streams", [1, 3])
def test_every_sample_exactly_once_per_epoch_up_to_truncation(corpus, reference, num_streams):
    cfg = _config()
    per_stream = microbatches_per_stream(corpus, cfg, num_streams)
    seen = {}
    for s in range(num_streams):
        batches = _batches(corpus, cfg, [s], num_streams)
        assert len(batches) == per_stream
        for key in (k for b in batches for k in _sample_keys(b)):
            assert key in reference and key not in seen, "unknown or repeated sample"
            seen[key] = s
    n_train = len(reference)
    assert per_stream == (n_train // num_streams) // cfg.micro_batch
    assert len(seen) == num_streams * per_stream * cfg.micro_batch
    assert n_train - len(seen) < num_streams * cfg.micro_batch  # the only samples dropped: truncation


def test_stream_sequence_independent_of_workers_and_stream_subset(corpus):
    everything = _batches(corpus, streams=[0, 1, 2], num_streams=3)
    with_workers = _batches(corpus, _config(num_workers=2), streams=[0, 1, 2], num_streams=3)
    _assert_same(everything, with_workers)
    _assert_same(everything[1::3], _batches(corpus, streams=[1], num_streams=3))
    reordered = _batches(corpus, _config(num_workers=2), streams=[2, 0], num_streams=3)
    _assert_same(everything[2::3], reordered[0::2])
    _assert_same(everything[0::3], reordered[1::2])


def test_start_microbatch_reproduces_the_tail(corpus):
    full = _batches(corpus, streams=[0, 1], num_streams=2, epoch=5)
    for start in (1, 7, len(full)):
        loader = make_loader(corpus, _config(num_workers=2 if start == 7 else 0), [0, 1], 2, 5, start)
        assert len(loader) == len(full) - start
        _assert_same(full[start:], list(loader))


def test_epochs_shuffle_differently_and_seeds_reproduce(corpus):
    def order(epoch, seed=0):
        return [k for b in _batches(corpus, _config(seed=seed), epoch=epoch) for k in _sample_keys(b)]

    assert order(0) == order(0)
    assert order(0) != order(1)
    assert order(0, seed=1) != order(0)
    # The shuffle buffer mixes row groups (each holds one dataset) inside a micro-batch.
    assert any(b["dataset_idx"].unique().numel() > 1 for b in _batches(corpus, epoch=0))
    first_batches = [set(_sample_keys(b)) for b in _batches(corpus, epoch=0)[:3]]
    assert first_batches != [set(_sample_keys(b)) for b in _batches(corpus, epoch=1)[:3]]


# --------------------------------------------------------------------------------------------- batch values
def test_input_genes_come_from_the_panel_with_padding(corpus):
    info = CorpusInfo.open(corpus)
    panel_sizes = info.panel_mask.sum(dim=1)
    seen_padding = seen_full = False
    for batch in _batches(corpus, streams=[0, 1, 2], num_streams=3):
        assert batch["gene_idx"].shape == batch["values"].shape == batch["pad_mask"].shape == (8, K)
        for b in range(8):
            genes, pad = batch["gene_idx"][b], batch["pad_mask"][b]
            real = genes[~pad]
            expected = min(int(panel_sizes[batch["dataset_idx"][b]]), K)
            assert real.numel() == expected and real.unique().numel() == expected
            assert batch["target_mask"][b, real].all(), "input gene outside the dataset panel"
            assert (genes[pad] == 0).all() and (batch["values"][b, pad] == 0).all()
            seen_padding |= bool(pad.any())
            seen_full |= bool(not pad.any())
    assert seen_padding and seen_full


def test_values_and_targets_match_an_independent_dense_computation(corpus, reference):
    info = CorpusInfo.open(corpus)
    for batch in _batches(corpus, _config(num_workers=2), streams=[0, 1], num_streams=2):
        assert batch["values"].dtype == batch["target"].dtype == torch.float32
        assert batch["target_mask"].dtype == torch.bool and batch["gene_idx"].dtype == torch.int64
        for b, key in enumerate(_sample_keys(batch)):
            ref = reference[key]
            np.testing.assert_allclose(batch["target"][b].numpy(), ref["expression"], rtol=1e-6, atol=1e-6)
            assert batch["library_size"][b].item() == pytest.approx(ref["library_size"])
            genes = batch["gene_idx"][b][~batch["pad_mask"][b]].numpy()
            np.testing.assert_allclose(batch["values"][b][~batch["pad_mask"][b]].numpy(),
                                       ref["expression"][genes], rtol=1e-6, atol=1e-6)
        assert torch.equal(batch["target_mask"], info.panel_mask[batch["dataset_idx"]])


def test_frequency_sampling_prefers_frequent_genes_at_low_temperature(corpus):
    info = CorpusInfo.open(corpus)
    freq = info.gene_frequency
    assert freq.shape == (120,) and np.all((freq >= 0) & (freq <= 1)) and freq.min() < 0.9 < freq.max()
    full_panel = int(np.flatnonzero(info.panel_mask.sum(dim=1) == 120)[0])
    top_k = set(np.argsort(-freq, kind="stable")[:K].tolist())

    def chosen_genes(cfg: LoaderConfig) -> torch.Tensor:
        """Input genes of the full-panel samples of one epoch. → int64 [n_samples, K]"""
        batches = _batches(corpus, cfg)
        return torch.cat([b["gene_idx"][b["dataset_idx"] == full_panel] for b in batches])

    def share_in_top_k(cfg: LoaderConfig) -> float:
        chosen = chosen_genes(cfg).flatten().tolist()
        return sum(g in top_k for g in chosen) / len(chosen)

    inclusion = torch.bincount(chosen_genes(_config()).flatten(), minlength=120) / len(chosen_genes(_config()))
    assert (inclusion - K / 120).abs().max() < 0.2, "uniform sampling includes every panel gene at rate K/P"
    uniform = share_in_top_k(_config())
    cold = share_in_top_k(_config(sampling="frequency", temperature=0.02))
    warm = share_in_top_k(_config(sampling="frequency", temperature=1.0))
    assert uniform == pytest.approx(K / 120, abs=0.03)
    assert uniform < warm < cold and cold > 0.95


# ------------------------------------------------------------------------------------------- errors & state
def test_bad_inputs_give_one_line_errors(corpus, tmp_path):
    with pytest.raises(ValueError, match="genes.parquet: missing"):
        CorpusInfo.open(tmp_path)
    with pytest.raises(ValueError, match="sampling"):
        _batches(corpus, _config(sampling="nope"))
    with pytest.raises(ValueError, match="streams"):
        make_loader(corpus, _config(), [3], 3, 0)
    with pytest.raises(ValueError, match="fewer than"):
        make_loader(corpus, _config(micro_batch=10_000), [0], 1, 0)
    # A shard naming a gene outside its dataset's panel is rejected, naming the file.
    bad = write_synthetic_corpus(tmp_path / "bad", n_samples=40, n_genes=50, n_datasets=2, seed=0,
                                 panel_fraction=(0.5, 1.0))
    info = CorpusInfo.open(bad)
    small = int(np.argmin(info.panel_mask.sum(dim=1).numpy()))
    outside = int(np.flatnonzero(~info.panel_mask[small].numpy())[0])
    shard = schema.list_shards(bad, "train")[small]
    table = pq.read_table(shard)
    genes = table.column("gene_idx").to_pylist()
    genes[0] = sorted(set(genes[0][1:]) | {outside})
    counts = [c[:len(g)] for c, g in zip(table.column("counts").to_pylist(), genes)]
    table = table.set_column(table.schema.get_field_index("gene_idx"), "gene_idx",
                             pa.array(genes, pa.list_(pa.int32())))
    table = table.set_column(table.schema.get_field_index("counts"), "counts",
                             pa.array(counts, pa.list_(pa.float32())))
    pq.write_table(table, shard)
    with pytest.raises(ValueError, match=rf"{shard.name}: row group 0: gene_idx outside"):
        _batches(bad, _config(micro_batch=4))


def test_loader_state_round_trips_through_plain_ints():
    state = LoaderState(epoch=3, microbatches_consumed=17)
    saved = state.state_dict()
    assert saved == {"epoch": 3, "microbatches_consumed": 17}
    assert LoaderState.from_state_dict(saved) == state
