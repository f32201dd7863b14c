"""Validation split by whole held-out batches.

A batch (gem group, plate, donor, project, …) is never split between train and val, so that validation
measures generalisation to an unseen experimental batch rather than to unseen cells of a seen batch.
Which batches are held out is a pure function of ``(seed, dataset, batch)`` through a keyed BLAKE2b hash,
so it is the same on every machine, Python version and run (unlike the salted built-in ``hash()``), and
adding a batch to a dataset does not reshuffle the others.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Iterable

log = logging.getLogger(__name__)

#: Fixed key for the batch-order hash: it separates this use of BLAKE2b from any other in the project.
_SPLIT_KEY = b"diverserna/splits/v1"


def batch_order_key(seed: int, dataset: str, batch: str) -> int:
    """Deterministic 64-bit rank of ``batch`` within ``dataset`` for ``seed`` (lower = held out first)."""
    # A unit separator between the fields, so ("a", "bc") and ("ab", "c") hash differently.
    message = "\x1f".join((str(int(seed)), dataset, batch)).encode("utf-8")
    return int.from_bytes(hashlib.blake2b(message, digest_size=8, key=_SPLIT_KEY).digest(), "big")


def assign_splits(batches: Iterable[str], dataset: str, val_fraction: float, seed: int = 0,
                  batch_sizes: dict[str, int] | None = None) -> dict[str, str]:
    """Map every batch of ``dataset`` to ``"train"`` or ``"val"``.

    Batches are visited in :func:`batch_order_key` order and moved to val while that brings the val share
    closer to ``val_fraction`` (ties move it), until the share reaches ``val_fraction``. The share is
    counted in samples when ``batch_sizes`` (batch -> number of samples) is given, in batches otherwise.
    A batch that would overshoot the target by more than it currently falls short is skipped, so one huge
    batch is not held out for a 10 % target. At least one batch always stays in train; a dataset with a
    single batch is all train (logged).

    Args:
        batches: batch labels; duplicates are ignored (pass each sample's batch or each batch once).
        dataset: dataset name, part of the hash key so datasets with the same batch names split independently.
        val_fraction: target share of samples (or batches) in val, in [0, 1).
        seed: split seed (the config's top-level ``seed``).
        batch_sizes: optional samples per batch; must cover every batch.

    Returns:
        ``{batch: "train" | "val"}`` for every distinct batch.
    """
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"{dataset}: val_fraction must be in [0, 1), got {val_fraction!r}")
    unique = list(dict.fromkeys(str(b) for b in batches))
    splits = {b: "train" for b in unique}
    if len(unique) < 2:
        if unique and val_fraction > 0:
            log.info("%s: a single batch (%r); all samples stay in train, no validation split", dataset, unique[0])
        return splits
    if val_fraction == 0:
        return splits

    weights = _batch_weights(unique, dataset, batch_sizes)
    total = sum(weights.values())
    if total <= 0:
        log.info("%s: all batches are empty; all stay in train", dataset)
        return splits

    target = float(val_fraction)
    held_out = 0.0
    n_val = 0
    for batch in sorted(unique, key=lambda b: (batch_order_key(seed, dataset, b), b)):
        if held_out / total >= target or n_val == len(unique) - 1:
            break
        after = (held_out + weights[batch]) / total
        if abs(after - target) <= abs(held_out / total - target):
            splits[batch] = "val"
            held_out += weights[batch]
            n_val += 1
    if n_val == 0:
        log.info("%s: no batch fits a validation share of %.3f (batches too large or too few); all train",
                 dataset, target)
    else:
        log.debug("%s: %d of %d batches (%.1f %% of %s) held out as val", dataset, n_val, len(unique),
                  100 * held_out / total, "samples" if batch_sizes is not None else "batches")
    return splits


def _batch_weights(batches: list[str], dataset: str, batch_sizes: dict[str, int] | None) -> dict[str, float]:
    """Per-batch weight: its sample count if given, else 1 (the share is then a share of batches)."""
    if batch_sizes is None:
        return {b: 1.0 for b in batches}
    missing = [b for b in batches if b not in batch_sizes]
    if missing:
        raise ValueError(f"{dataset}: batch_sizes lacks batch(es) {', '.join(map(repr, missing[:5]))}")
    negative = [b for b in batches if batch_sizes[b] < 0]
    if negative:
        raise ValueError(f"{dataset}: negative size for batch(es) {', '.join(map(repr, negative[:5]))}")
    return {b: float(batch_sizes[b]) for b in batches}
