"""Validation split by whole batches: deterministic, never straddling, fraction roughly honoured."""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import pytest

from curation.splits import assign_splits, batch_order_key


def _batches(n: int) -> list[str]:
    return [f"gem{i:03d}" for i in range(n)]


def test_deterministic_and_independent_of_input_order():
    batches = _batches(40)
    first = assign_splits(batches, "ds", 0.2, seed=3)
    again = assign_splits(list(reversed(batches)), "ds", 0.2, seed=3)
    assert first == again
    assert set(first) == set(batches)
    assert set(first.values()) == {"train", "val"}


def test_seed_and_dataset_change_the_choice():
    batches = _batches(40)
    base = assign_splits(batches, "ds", 0.2, seed=0)
    assert assign_splits(batches, "ds", 0.2, seed=1) != base
    assert assign_splits(batches, "other", 0.2, seed=0) != base


def test_order_key_is_keyed_blake2b_of_all_three_fields():
    # Pinned to the documented construction: fails if the key ever depends on Python's salted hash().
    expected = hashlib.blake2b(b"0\x1fds\x1fgem000", digest_size=8, key=b"diverserna/splits/v1").digest()
    assert batch_order_key(0, "ds", "gem000") == int.from_bytes(expected, "big")
    assert batch_order_key(0, "ds", "gem000") != batch_order_key(0, "ds", "gem001")
    assert batch_order_key(0, "a", "bc") != batch_order_key(0, "ab", "c")


def test_batch_fraction_roughly_honoured():
    splits = assign_splits(_batches(100), "ds", 0.1, seed=0)
    n_val = sum(s == "val" for s in splits.values())
    assert n_val == 10


def test_sample_fraction_with_batch_sizes():
    rng = np.random.default_rng(0)
    batches = _batches(60)
    sizes = {b: int(s) for b, s in zip(batches, rng.integers(50, 500, size=len(batches)))}
    splits = assign_splits(batches, "ds", 0.15, seed=7, batch_sizes=sizes)
    # Each sample gets its batch's split, so no batch can appear in both.
    samples = [(b, splits[b]) for b in batches for _ in range(sizes[b])]
    val_share = np.mean([s == "val" for _, s in samples])
    assert 0.12 <= val_share <= 0.18
    per_batch = {}
    for b, s in samples:
        per_batch.setdefault(b, set()).add(s)
    assert all(len(v) == 1 for v in per_batch.values())


def test_huge_batch_is_not_held_out_for_a_small_target():
    batches = _batches(11)
    sizes = {b: 10 for b in batches}
    sizes[batches[0]] = 10_000
    for seed in range(20):
        splits = assign_splits(batches, "ds", 0.1, seed=seed, batch_sizes=sizes)
        assert splits[batches[0]] == "train"


def test_single_batch_stays_train_and_is_logged(caplog):
    with caplog.at_level(logging.INFO, logger="curation.splits"):
        assert assign_splits(["only"] * 5, "ds", 0.5) == {"only": "train"}
    assert "single batch" in caplog.text


def test_never_all_batches():
    splits = assign_splits(_batches(2), "ds", 0.9, seed=0)
    assert sorted(splits.values()) == ["train", "val"]
    assert assign_splits([], "ds", 0.1) == {}
    assert set(assign_splits(_batches(5), "ds", 0.0).values()) == {"train"}


def test_bad_arguments():
    with pytest.raises(ValueError, match="val_fraction"):
        assign_splits(_batches(3), "ds", 1.0)
    with pytest.raises(ValueError, match="lacks batch"):
        assign_splits(_batches(3), "ds", 0.2, batch_sizes={"gem000": 1})
