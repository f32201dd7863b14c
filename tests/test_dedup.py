"""Deduplication on a small planted case: every planted duplicate found, nothing else (precision = recall = 1)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import curation.dedup as dedup
from curation.dedup import find_duplicates, restricted_profile_hashes, run_dedup
from curation.io import CurationError
from curation.schema import SAMPLE_SCHEMA, content_hash

Profile = tuple[np.ndarray, np.ndarray]  # (sorted reference gene indices, counts)


def _random_profile(rng: np.random.Generator, genes: np.ndarray, n_nonzero: int) -> Profile:
    idx = np.sort(rng.choice(genes, size=n_nonzero, replace=False)).astype(np.int32)
    return idx, rng.integers(1, 30, size=n_nonzero).astype(np.float32)


def _merge(*profiles: Profile) -> Profile:
    idx = np.concatenate([p[0] for p in profiles])
    counts = np.concatenate([p[1] for p in profiles])
    order = np.argsort(idx)
    return idx[order], counts[order]


def write_curated(root: Path, name: str, modality: str, panel: np.ndarray,
                  samples: dict[str, Profile], accessions: dict[str, str] | None = None) -> Path:
    """Write ``<root>/curated/<name>/samples.parquet`` + ``report.json`` as the curation step would."""
    accessions = accessions or {}
    rows = []
    for sid, (idx, counts) in samples.items():
        rows.append({
            "sample_id": f"{name}:{sid}", "dataset": name, "batch": "b0", "split": "", "modality": modality,
            "perturbation": None, "cell_type": None, "tissue": None,
            "source_accession": accessions.get(sid, f"{name}:{sid}"),
            "gene_idx": idx.tolist(), "counts": counts.tolist(), "library_size": float(counts.sum()),
            "n_genes_detected": len(idx), "content_hash": content_hash(idx, counts),
        })
    out = root / "curated" / name
    out.mkdir(parents=True, exist_ok=True)
    # Tiny row groups, so that row-group-selective reads are exercised.
    pq.write_table(pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA), out / "samples.parquet", row_group_size=7)
    (out / "report.json").write_text(json.dumps({"panel": panel.tolist()}))
    return out


@pytest.fixture()
def planted(tmp_path: Path) -> tuple[dict[str, Path], dict[str, int], pd.DataFrame]:
    """Four datasets with planted duplicates of each kind and the exact expected removal table."""
    rng = np.random.default_rng(0)
    atlas_panel = np.arange(0, 600)       # the integrating atlas
    study1_panel = np.arange(300, 900)    # an earlier study it re-publishes (shared genes 300..599)
    study2_panel = np.arange(0, 900)
    bulk_panel = np.arange(0, 1000)
    only_atlas, shared_s1, only_s1 = np.arange(0, 300), np.arange(300, 600), np.arange(600, 900)

    study1 = {f"c{i:02d}": _random_profile(rng, study1_panel, 150) for i in range(20)}
    atlas = {f"a{i:02d}": _random_profile(rng, atlas_panel, 150) for i in range(30)}
    study2 = {f"d{i:02d}": _random_profile(rng, study2_panel, 150) for i in range(15)}
    bulk = {f"b{i:02d}": _random_profile(rng, bulk_panel, 300) for i in range(5)}

    # (a) exact: within study1 (c06 = c05), and across datasets (study2 d03 = study1 c10, genes 300..899).
    study1["c06"] = study1["c05"]
    study2["d03"] = study1["c10"]

    # (b) redistributed: atlas a07 re-publishes c05 (so also c06) on the shared genes, with its own other genes.
    def republish(src: Profile) -> Profile:
        on_shared = np.isin(src[0], shared_s1)
        return _merge((src[0][on_shared], src[1][on_shared]), _random_profile(rng, only_atlas, 60))

    atlas["a07"] = republish(study1["c05"])
    # Chain A = B = C: atlas a11 re-publishes c12 (redistributed), study2 d08 is an exact copy of a11.
    atlas["a11"] = republish(study1["c12"])
    study2["d08"] = atlas["a11"]
    # Near-empty decoy: identical on the shared genes but only 10 non-zero there -> must NOT match.
    sparse_shared = _random_profile(rng, shared_s1, 10)
    study1["c15"] = _merge(sparse_shared, _random_profile(rng, only_s1, 100))
    atlas["a20"] = _merge(sparse_shared, _random_profile(rng, only_atlas, 100))
    # Modality decoy: a bulk sample equal to c03 on study1's panel plus extra genes -> different modality.
    bulk["b02"] = _merge(study1["c03"], _random_profile(rng, np.arange(900, 1000), 20))
    # (c) accession: study2 d11 carries the accession of atlas a25 (different profiles).
    accessions2 = {"d11": "GSM000025"}
    accessions_atlas = {"a25": "GSM000025"}

    curated = {
        "atlas": write_curated(tmp_path, "atlas", "single_cell", atlas_panel, atlas, accessions_atlas),
        "study1": write_curated(tmp_path, "study1", "single_cell", study1_panel, study1),
        "study2": write_curated(tmp_path, "study2", "single_cell", study2_panel, study2, accessions2),
        "bulk": write_curated(tmp_path, "bulk", "bulk", bulk_panel, bulk),
    }
    priority = {"study1": 1, "atlas": 2, "study2": 3, "bulk": 4}
    expected = pd.DataFrame([
        ("atlas:a07", "atlas", "redistributed", "study1:c05", "study1"),
        ("atlas:a11", "atlas", "redistributed", "study1:c12", "study1"),
        ("study1:c06", "study1", "exact", "study1:c05", "study1"),
        ("study2:d03", "study2", "exact", "study1:c10", "study1"),
        ("study2:d08", "study2", "exact", "study1:c12", "study1"),  # chain: resolves to the one kept sample
        ("study2:d11", "study2", "accession", "atlas:a25", "atlas"),
    ], columns=["sample_id", "dataset", "reason", "duplicate_of", "duplicate_of_dataset"])
    return curated, priority, expected


def test_finds_exactly_the_planted_duplicates(planted):
    curated, priority, expected = planted
    found = find_duplicates(curated, priority, min_shared_nonzero=50, progress=False)
    pd.testing.assert_frame_equal(found, expected)


def test_small_verification_budget_gives_the_same_answer(planted, monkeypatch):
    curated, priority, expected = planted
    monkeypatch.setattr(dedup, "VERIFY_BUDGET_BYTES", 1)  # one held profile per block: many blocks
    monkeypatch.setattr(dedup, "EXPRESSION_BATCH_ROWS", 3)
    found = find_duplicates(curated, priority, min_shared_nonzero=50, progress=False)
    pd.testing.assert_frame_equal(found, expected)


def test_lower_threshold_lets_the_near_empty_decoy_match(planted):
    curated, priority, _ = planted
    found = find_duplicates(curated, priority, min_shared_nonzero=5, progress=False)
    assert ("atlas:a20", "redistributed", "study1:c15") in set(
        zip(found["sample_id"], found["reason"], found["duplicate_of"]))


def test_priority_decides_which_copy_is_kept(planted):
    curated, priority, _ = planted
    found = find_duplicates(curated, {**priority, "study2": 0}, progress=False)
    kept_d03 = found.loc[found["sample_id"] == "study1:c10"]
    assert kept_d03[["reason", "duplicate_of"]].values.tolist() == [["exact", "study2:d03"]]
    # Never both copies: no removed sample is anyone's kept copy.
    assert not set(found["sample_id"]) & set(found["duplicate_of"])


def test_run_dedup_writes_table_and_report(planted, tmp_path):
    curated, priority, expected = planted
    config = {"datasets": {name: {"priority": p} for name, p in priority.items()}, "progress": False}
    report = run_dedup(tmp_path, config)
    removed = pq.read_table(tmp_path / "dedup" / "removed.parquet").to_pandas()
    pd.testing.assert_frame_equal(removed, expected)
    on_disk = json.loads((tmp_path / "dedup" / "report.json").read_text())
    assert on_disk == report
    assert report["n_removed"] == 6
    assert report["n_removed_by_reason"] == {"exact": 3, "redistributed": 2, "accession": 1}
    pairs = {(r["dataset"], r["duplicate_of_dataset"], r["reason"]): r["n_removed"] for r in report["removals"]}
    assert pairs == {("atlas", "study1", "redistributed"): 2, ("study1", "study1", "exact"): 1,
                     ("study2", "study1", "exact"): 2, ("study2", "atlas", "accession"): 1}
    assert not list((tmp_path / "dedup").glob(".*"))  # no temp files left


def test_restricted_hash_ignores_genes_outside_the_shared_panel():
    shared = np.arange(10, 20)
    table = pa.Table.from_pylist([
        {"gene_idx": [1, 12, 15], "counts": [5.0, 2.0, 3.0]},
        {"gene_idx": [12, 15, 40], "counts": [2.0, 3.0, 9.0]},
        {"gene_idx": [12, 15], "counts": [2.0, 4.0]},
        {"gene_idx": [], "counts": []},
    ], schema=pa.schema([("gene_idx", pa.list_(pa.int32())), ("counts", pa.list_(pa.float32()))]))
    h, nnz = restricted_profile_hashes(table.to_batches()[0], shared)
    assert h[0] == h[1] != h[2]
    assert nnz.tolist() == [2, 2, 2, 0]


def test_missing_report_is_a_one_line_error(tmp_path):
    one = {"s": (np.array([1], np.int32), np.ones(1, np.float32))}
    out = write_curated(tmp_path, "x", "bulk", np.arange(5), one)
    (out / "report.json").unlink()
    with pytest.raises(CurationError, match=r"report\.json: report of dataset 'x' not found"):
        find_duplicates({"x": out}, {}, progress=False)
