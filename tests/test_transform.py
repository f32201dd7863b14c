"""The one input transform (txfm.transform): training and embedding share it; O(K) sampling; decode cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
import scipy.sparse as sp
import torch

from curation import schema
from curation.corpus import validate_corpus
from simulation.corpus import write_synthetic_corpus
from txfm import data
from txfm.data import CorpusInfo, LoaderConfig, build_decode_cache, make_loader
from txfm.embed import input_sampling, model_inputs
from txfm import transform as txfm_transform
from txfm.transform import InputTransform, frequency_log_weight, sample_keys

K, L, B = 24, 1e4, 8


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """One dataset measuring all 60 genes (so an embedding's mapped genes equal the training panel)."""
    return write_synthetic_corpus(tmp_path_factory.mktemp("one") / "c", n_samples=160, n_genes=60, n_datasets=1,
                                  seed=5, panel_fraction=(1.0, 1.0), row_group_rows=16, shard_rows=48)


def _raw_counts(corpus: Path) -> dict[tuple, np.ndarray]:
    """Dense raw counts [G] of every train sample, keyed by (library size, detected genes)."""
    rows = pads.dataset(corpus / schema.SHARDS_DIR, partitioning="hive").to_table(
        filter=pads.field("split") == "train").to_pylist()
    out = {}
    for rec in rows:
        dense = np.zeros(60)
        dense[rec["gene_idx"]] = rec["counts"]
        out[(round(rec["library_size"]), tuple(rec["gene_idx"]))] = dense
    return out


@pytest.mark.parametrize("sampling", ["uniform", "frequency"])
def test_embed_and_training_build_the_same_model_input(corpus, sampling):
    info = CorpusInfo.open(corpus)
    cfg = LoaderConfig(micro_batch=B, n_input_genes=K, library_size=L, sampling=sampling, temperature=0.5,
                       target_format="sparse", seed=7)
    batch = next(iter(make_loader(info, cfg, [0], 1, epoch=2)))
    offsets = batch["target_offsets"].numpy()
    raw = _raw_counts(corpus)
    counts = np.stack([raw[(round(float(batch["library_size"][b])),
                            tuple(batch["target_gene"][offsets[b]:offsets[b + 1]].tolist()))] for b in range(B)])
    # What txfm embed does for these cells: the vocabulary as mapped genes, the checkpoint's sampling settings
    # (frequency: the detection frequencies training saves with the model), the training batch's sample keys.
    vocabulary = info.genes.assign(detection_frequency=info.gene_frequency)
    kind, log_weight = input_sampling({"train_config": {"sampling": sampling, "temperature": 0.5}}, vocabulary, "ckpt")
    assert kind == sampling
    keys = sample_keys((cfg.seed, 2, 0, 0, data._SALT_GENES), np.arange(B))
    embedded = model_inputs(sp.csr_matrix(counts), np.arange(60), np.arange(B), K, L, seed=0, sampling=kind,
                            log_weight=log_weight, keys=keys)
    for name in ("gene_idx", "values", "pad_mask"):
        assert torch.equal(embedded[name], batch[name]), name
    transform = InputTransform(60, K, L, kind, log_weight)
    csr = sp.csr_matrix(counts)
    built = transform(csr.indptr, csr.indices, csr.data, counts.sum(axis=1), np.zeros(B, dtype=np.int64),
                      [np.arange(60)], keys)
    for name in ("target_offsets", "target_gene", "target_value"):
        np.testing.assert_array_equal(built[name], batch[name].numpy(), err_msg=name)


def test_embed_refuses_frequency_sampling_without_saved_frequencies(corpus):
    info = CorpusInfo.open(corpus)
    with pytest.raises(ValueError, match="ckpt: .*no detection_frequency column"):
        input_sampling({"train_config": {"sampling": "frequency"}}, info.genes, "ckpt")
    assert input_sampling({}, info.genes, "ckpt") == ("uniform", None)


def test_sampling_is_without_replacement_uniform_and_keyed_per_sample():
    transform = InputTransform(500, k=300)
    panel = np.arange(100, 500)  # P = 400 candidates, K = 300: many repeated draws to reject
    seen = np.zeros(500)
    for batch in range(40):
        genes, pad = transform.sample_genes(sample_keys((batch,), np.arange(16)), np.zeros(16, dtype=np.int64),
                                            [panel])
        assert not pad.any() and all(len(set(row)) == 300 and min(row) >= 100 for row in genes.tolist())
        seen += np.bincount(genes.ravel(), minlength=500)
    expected = 40 * 16 * 300 / 400
    assert seen[:100].sum() == 0 and np.abs(seen[100:] - expected).max() < 6 * np.sqrt(expected * 0.25)
    # A sample's genes depend on its key only, not on the other samples of the batch.
    keys = sample_keys((1,), np.arange(16))
    whole, _ = transform.sample_genes(keys, np.zeros(16, dtype=np.int64), [panel])
    part, _ = transform.sample_genes(keys[5:9], np.zeros(4, dtype=np.int64), [panel])
    np.testing.assert_array_equal(part, whole[5:9])


def test_frequency_sampling_matches_successive_sampling_probabilities():
    weight = np.array([6.0, 1.0, 1.0, 2.0, 0.0])  # a never-detected gene: chosen only when nothing else is left
    transform = InputTransform(5, k=2, sampling="frequency", log_weight=frequency_log_weight(weight, 1.0))
    genes, _ = transform.sample_genes(sample_keys((3,), np.arange(20000)), np.zeros(20000, dtype=np.int64),
                                      [np.arange(5)])
    p = weight / weight.sum()
    first = np.bincount(genes[:, 0], minlength=5) / 20000
    np.testing.assert_allclose(first, p, atol=0.015)
    inclusion = np.array([p[i] + sum(p[j] * p[i] / (1 - p[j]) for j in range(5) if j != i) for i in range(5)])
    np.testing.assert_allclose(np.bincount(genes.ravel(), minlength=5) / 20000, inclusion, atol=0.02)
    all_three, _ = InputTransform(5, k=4, sampling="frequency", log_weight=frequency_log_weight(weight, 1.0)).sample_genes(
        sample_keys((4,), np.arange(50)), np.zeros(50, dtype=np.int64), [np.arange(5)])
    assert all(sorted(row) == [0, 1, 2, 3] for row in all_three.tolist()), "zero weight comes last"


def _first_distinct_reference(transform: InputTransform, key: np.ndarray, panel: np.ndarray) -> list[int] | None:
    """The spec of the compiled sampler, one sample at a time in plain Python: its draws in order, the first K
    distinct panel positions within the draw budget; None when the budget runs out (the completion's case)."""
    n_cand = panel.size
    budget = transform._per_round(n_cand) * ((1 << txfm_transform._MAX_ROUNDS) - 1)
    draws = txfm_transform._draws(key[None], 0, budget)[0]
    if transform.log_weight is None:
        positions = (draws * np.uint64(n_cand)) >> np.uint64(32)
    else:
        cdf = transform._panel_cdf(panel)
        u = (draws.astype(np.float64) + 0.5) * (1.0 / (1 << 32)) * cdf[-1]
        positions = np.minimum(np.searchsorted(cdf, u, side="right"), n_cand - 1)
    chosen: list[int] = []
    for pos in positions.tolist():
        if pos not in chosen:
            chosen.append(pos)
            if len(chosen) == transform.k:
                return [int(panel[p]) for p in chosen]
    return None


@pytest.mark.parametrize("sampling", ["uniform", "frequency"])
def test_compiled_sampler_and_gather_equal_plain_references(sampling):
    rng = np.random.default_rng(11)
    n_genes, k = 400, 150
    frequency = rng.random(n_genes) ** 4
    frequency[rng.random(n_genes) < 0.3] = 0.0  # never detected: a 200-gene panel may run out of weight
    log_weight = frequency_log_weight(frequency, 0.7) if sampling == "frequency" else None
    transform = InputTransform(n_genes, k, 1e4, sampling, log_weight)
    panels = [np.sort(rng.choice(n_genes, size, replace=False)) for size in (90, 160, 200, 400)]
    completed = 0
    for call in range(6):
        group = rng.integers(0, len(panels), 24)
        keys = sample_keys((call, 9), np.arange(24))
        counts = sp.random(24, n_genes, density=0.2, format="csr", random_state=call, dtype=np.float64)
        counts.data = np.ceil(counts.data * 20).astype(np.float32)
        built = transform(counts.indptr, counts.indices, counts.data.astype(np.float32), np.full(24, 500.0), group,
                          panels, keys)
        dense = counts.toarray()
        for b in range(24):
            panel = panels[group[b]]
            if panel.size <= k:
                expected = np.concatenate([panel, np.zeros(k - panel.size, dtype=np.int64)])
                np.testing.assert_array_equal(built["pad_mask"][b], np.arange(k) >= panel.size)
            else:
                expected = _first_distinct_reference(transform, keys[b], panel)
                if expected is None:  # finished by the numpy completion: K distinct panel genes
                    completed += 1
                    expected = built["gene_idx"][b]
                    assert len(set(expected.tolist())) == k and np.isin(expected, panel).all()
                assert not built["pad_mask"][b].any()
            np.testing.assert_array_equal(built["gene_idx"][b], expected)
            scaled = (dense[b, built["gene_idx"][b]].astype(np.float32) * np.float32(1e4 / 500.0)).astype(np.float32)
            np.testing.assert_array_equal(built["values"][b], np.where(built["pad_mask"][b], 0, np.log1p(scaled)))
    assert sampling == "uniform" or completed > 0, "the completion path was exercised"


@pytest.mark.parametrize("change, message", [
    (lambda a: a.update(gene=np.array([1, 2, 900], dtype=np.int32)), "gene outside the vocabulary"),
    (lambda a: a.update(gene=np.array([1, -2, 3], dtype=np.int32)), "gene outside the vocabulary"),
    (lambda a: a.update(offsets=np.array([0, 2, 5])), "offsets"),
    (lambda a: a.update(offsets=np.array([0, 3, 2, 3])), "offsets"),
    (lambda a: a.update(group=np.array([0, 3])), "group outside the candidate sets"),
    (lambda a: a.update(group=np.array([0, -1])), "group outside the candidate sets"),
    (lambda a: a.update(candidates=[np.array([0, 1, 60])]), "candidate genes"),
])
def test_malformed_batches_are_one_line_errors_not_crashes(change, message):
    args = dict(offsets=np.array([0, 2, 3]), gene=np.array([1, 5, 2], dtype=np.int32),
                count=np.ones(3, dtype=np.float32), library=np.full(2, 3.0), group=np.zeros(2, dtype=np.int64),
                candidates=[np.arange(60)], keys=sample_keys((0,), np.arange(2)))
    InputTransform(60, 4, 10.0)(**args)
    change(args)
    if args["offsets"].size != 3:
        args["library"] = np.full(args["offsets"].size - 1, 3.0)
        args["group"] = np.zeros(args["offsets"].size - 1, dtype=np.int64)
        args["keys"] = sample_keys((0,), np.arange(args["offsets"].size - 1))
    with pytest.raises(ValueError, match=message):
        InputTransform(60, 4, 10.0)(**args)


def test_decode_cache_serves_the_same_batches_and_keeps_the_corpus_valid(corpus, tmp_path):
    cache = tmp_path / "cache"
    from_parquet = list(make_loader(corpus, LoaderConfig(micro_batch=B, n_input_genes=K, decode_cache="none"),
                                    [0, 1], 2, epoch=1))
    assert build_decode_cache(corpus, "train", decode_cache=str(cache)) == cache
    files = sorted(cache.glob("*.arrow"))
    assert len(files) == len(schema.list_shards(corpus, "train"))
    from_cache = list(make_loader(corpus, LoaderConfig(micro_batch=B, n_input_genes=K, decode_cache=str(cache)),
                                  [0, 1], 2, epoch=1))
    assert len(from_cache) == len(from_parquet)
    for a, b in zip(from_parquet, from_cache):
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert sorted(cache.glob("*.arrow")) == files, "nothing rebuilt on the second use"
    # A damaged cache file is named in a one-line error.
    files[0].write_bytes(b"not arrow")
    with pytest.raises(ValueError, match=r"decode-cache file .*delete it to rebuild"):
        list(make_loader(corpus, LoaderConfig(micro_batch=B, n_input_genes=K, decode_cache=str(cache)), [0], 1, 0))
    list(make_loader(corpus, LoaderConfig(micro_batch=B, n_input_genes=K), [0], 1, 0))  # default: <corpus>/.decoded
    assert any((corpus / data.DECODE_CACHE_DIR).glob("*.arrow"))
    assert validate_corpus(corpus) == [], "the cache directory does not disturb the corpus validator"


def test_unwritable_decode_cache_falls_back_to_parquet_with_one_warning(corpus, tmp_path):
    (tmp_path / "a_file").write_text("not a directory")
    cfg = LoaderConfig(micro_batch=B, n_input_genes=K, decode_cache=str(tmp_path / "a_file" / "cache"))
    with pytest.warns(RuntimeWarning, match=r"a_file/cache: decode cache not writable .*decoding Parquet instead"):
        batches = list(make_loader(corpus, cfg, [0], 1, epoch=0))
    reference = list(make_loader(corpus, LoaderConfig(micro_batch=B, n_input_genes=K, decode_cache="none"), [0], 1, 0))
    assert len(batches) == len(reference) and all(torch.equal(a["values"], b["values"])
                                                  for a, b in zip(batches, reference))
