"""build_corpus / validate_corpus on small hand-made curated intermediates (no other curation step needed)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from curation import corpus as corpus_mod
from curation import schema
from curation.config import load_config
from curation.corpus import build_corpus, remap_gene_idx, validate_corpus
from curation.io import CurationError

N_REFERENCE = 60

#: name -> (modality, panel as reference indices, batches, samples per batch, phenoprint enabled)
DATASETS = {
    "alpha": ("single_cell", np.arange(0, 40, 2), ["g1", "g2", "g3", "g4"], 5, False),
    "beta": ("bulk", np.arange(10, 50), ["p1", "p2", "p3"], 4, False),
    "gamma": ("single_cell", np.array([1, 3, 5, 7, 20, 21, 22, 55]), ["d1", "d2"], 3, True),
}
DEDUP_REMOVED = ["beta:p2-s1"]  # planted duplicate of alpha:g1-s0
PHENOPRINT_PRUNED = ["gamma:d1-s2"]  # planted cell without a perturbation phenotype


def reference_genes() -> SimpleNamespace:
    """A stand-in for curation.genes.GeneTable: only ``.genes`` is used by build_corpus."""
    ids = [f"ENSG{i:011d}" for i in range(N_REFERENCE)]
    return SimpleNamespace(genes=pd.DataFrame({"gene_id": ids, "symbol": [f"GENE{i}" for i in range(N_REFERENCE)],
                                               "biotype": ["protein_coding"] * N_REFERENCE}))


def write_intermediates(root: Path, seed: int = 0) -> tuple[dict, dict[str, np.ndarray]]:
    """Write raw_dir-less config + curated samples/report, dedup and phenoprint outputs under ``root``.

    Returns (loaded config, {sample_id: dense counts over the reference index, shape (N_REFERENCE,)}).
    """
    rng = np.random.default_rng(seed)
    work = root / "work"
    dense: dict[str, np.ndarray] = {}
    entries = {}
    for name, (modality, panel, batches, per_batch, phenoprint) in DATASETS.items():
        rows = []
        for batch in batches:
            for i in range(per_batch):
                sample_id = f"{name}:{batch}-s{i}"
                detected = np.sort(rng.choice(panel, size=rng.integers(1, len(panel)), replace=False))
                counts = rng.integers(1, 50, size=detected.size).astype(np.float32)
                profile = np.zeros(N_REFERENCE, np.float32)
                profile[detected] = counts
                dense[sample_id] = profile
                rows.append({"sample_id": sample_id, "dataset": name, "batch": batch, "split": "",
                             "modality": modality, "perturbation": f"KD{i}", "cell_type": None, "tissue": None,
                             "source_accession": f"{batch}-s{i}", "gene_idx": detected.tolist(),
                             "counts": counts.tolist(), "library_size": float(counts.sum()),
                             "n_genes_detected": int(detected.size),
                             "content_hash": schema.content_hash(detected, counts)})
        curated = work / "curated" / name
        curated.mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=schema.SAMPLE_SCHEMA), curated / "samples.parquet",
                       row_group_size=7)
        report = {"panel": panel.tolist(), "n_input": len(rows) + 2, "n_samples": len(rows),
                  "dropped": {"low_genes": 2, "negative": 0}, "n_genes_mapped": len(panel) + 1,
                  "mapping": {"n_unmapped": 1, "unmapped_examples": ["ENSG99999999999"]},
                  "source_files": [{"role": "matrix", "path": str(root / "raw" / f"{name}.h5ad"), "bytes": 1,
                                    "sha256": "0" * 64}]}
        (curated / "report.json").write_text(json.dumps(report))
        if phenoprint:
            pq.write_table(pa.table({"sample_id": PHENOPRINT_PRUNED, "perturbation": ["KD2"],
                                     "reason": ["no_phenotype"]}), curated / "phenoprint.parquet")
        entries[name] = {"modality": modality, "format": "h5ad", "files": {"matrix": f"{name}.h5ad"},
                         "val_fraction": 0.3, "phenoprint": {"enabled": phenoprint},
                         "source": f"{name} et al.", "licence": "CC BY 4.0"}
    (work / "dedup").mkdir()
    pq.write_table(pa.table({"sample_id": DEDUP_REMOVED, "dataset": ["beta"], "reason": ["exact"],
                             "duplicate_of": ["alpha:g1-s0"], "duplicate_of_dataset": ["alpha"]}),
                   work / "dedup" / "removed.parquet")
    config = {"raw_dir": str(root / "raw"), "work_dir": str(work), "corpus_dir": str(root / "corpus"),
              "seed": 1, "datasets": entries}
    (root / "config.yaml").write_text(json.dumps(config))  # JSON is YAML
    return load_config(root / "config.yaml"), dense


@pytest.fixture
def small_layout(monkeypatch):
    """Tiny shard and row-group sizes so that partitions span several part files and row groups."""
    monkeypatch.setattr(schema, "SHARD_ROWS", 4)
    monkeypatch.setattr(schema, "ROW_GROUP_ROWS", 2)
    monkeypatch.setattr(corpus_mod, "READ_BATCH_ROWS", 3)


@pytest.fixture
def built(tmp_path, small_layout):
    config, dense = write_intermediates(tmp_path)
    manifest = build_corpus(config, progress=False, gene_table=reference_genes())
    return Path(config["corpus_dir"]), manifest, dense, config


def read_corpus(corpus: Path) -> pd.DataFrame:
    return pl.scan_parquet(f"{corpus}/shards/**/*.parquet", hive_partitioning=True).collect().to_pandas()


def test_corpus_is_valid_and_counts_are_remapped(built):
    corpus, manifest, dense, _ = built
    assert validate_corpus(corpus) == []
    genes = pq.read_table(corpus / schema.GENES_FILE).to_pandas()
    union = np.unique(np.concatenate([d[1] for d in DATASETS.values()]))
    assert genes["gene_idx"].tolist() == list(range(len(union)))
    assert genes["gene_id"].tolist() == [f"ENSG{i:011d}" for i in union]

    samples = read_corpus(corpus)
    expected_ids = sorted(set(dense) - set(DEDUP_REMOVED) - set(PHENOPRINT_PRUNED))
    assert sorted(samples["sample_id"]) == expected_ids
    for row in samples.itertuples():
        profile = np.zeros(N_REFERENCE, np.float32)
        profile[union[np.asarray(row.gene_idx)]] = row.counts
        np.testing.assert_array_equal(profile, dense[row.sample_id])

    datasets = pq.read_table(corpus / schema.DATASETS_FILE).to_pandas().set_index("dataset")
    for name, (modality, panel, *_rest) in DATASETS.items():
        assert datasets.loc[name, "modality"] == modality
        assert list(union[datasets.loc[name, "measured_gene_idx"]]) == panel.tolist()
        assert datasets.loc[name, "n_samples"] == (samples["dataset"] == name).sum()
        assert manifest["datasets"][name]["n_samples"] == datasets.loc[name, "n_samples"]
    assert manifest["datasets"]["beta"]["dedup_removed"] == 1
    assert manifest["datasets"]["beta"]["dedup_removed_by_dataset"] == {"alpha": 1}
    assert manifest["datasets"]["gamma"]["phenoprint_removed"] == 1
    assert manifest["datasets"]["alpha"]["source_files"][0]["path"] == "alpha.h5ad"
    assert manifest["datasets"]["alpha"]["qc_removed"] == {"low_genes": 2, "negative": 0}


def test_splits_are_by_batch_and_shards_follow_the_layout(built):
    corpus, manifest, _, _ = built
    samples = read_corpus(corpus)
    splits_per_batch = samples.groupby(["dataset", "batch"])["split"].nunique()
    assert (splits_per_batch == 1).all()
    assert set(samples["split"]) == {"train", "val"}
    for shard in schema.list_shards(corpus):
        metadata = pq.read_metadata(shard)
        assert metadata.num_rows <= 4
        assert all(metadata.row_group(i).num_rows <= 2 for i in range(metadata.num_row_groups))
    # alpha's 19-20 training rows need several part files.
    assert len(list(schema.shard_dir(corpus, "train", "alpha").glob("part-*.parquet"))) >= 3
    assert [s["path"] for s in manifest["shards"]] == sorted(s["path"] for s in manifest["shards"])


def test_pyarrow_dataset_reads_the_shards_without_this_package(built):
    corpus, manifest, _, _ = built
    table = pads.dataset(corpus / "shards", partitioning="hive").to_table()
    assert table.num_rows == sum(s["rows"] for s in manifest["shards"])
    assert set(table.column_names) >= set(schema.SAMPLE_SCHEMA.names)


def test_rebuild_is_byte_identical_whatever_the_read_batch_size(built, monkeypatch):
    corpus, manifest, _, config = built
    monkeypatch.setattr(corpus_mod, "READ_BATCH_ROWS", 1000)
    again = build_corpus(config, progress=False, gene_table=reference_genes())
    assert again == manifest
    assert json.loads((corpus / schema.MANIFEST_FILE).read_text()) == manifest
    assert (corpus / "DATACARD.md").is_file() and (corpus / "detected_genes.png").is_file()


def test_crash_mid_write_leaves_no_visible_shard_and_rerun_matches(tmp_path, small_layout, monkeypatch):
    config, _ = write_intermediates(tmp_path)
    corpus = Path(config["corpus_dir"])
    reference = build_corpus(config, out_dir=tmp_path / "reference", progress=False, gene_table=reference_genes())

    calls = {"n": 0}
    original = corpus_mod.PartitionWriter._write_row_group

    def failing(self, table):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk full (simulated)")
        return original(self, table)

    monkeypatch.setattr(corpus_mod.PartitionWriter, "_write_row_group", failing)
    with pytest.raises(OSError, match="simulated"):
        build_corpus(config, progress=False, gene_table=reference_genes())
    assert not corpus.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    # A build killed outright (SIGKILL) leaves its hidden temp directory behind: the next run removes it.
    stale = tmp_path / ".corpus.tmp-999999999"
    schema.shard_dir(stale, "train", "alpha").mkdir(parents=True)
    schema.shard_path(stale, "train", "alpha", 0).write_bytes(b"partial")
    monkeypatch.setattr(corpus_mod.PartitionWriter, "_write_row_group", original)
    rebuilt = build_corpus(config, progress=False, gene_table=reference_genes())
    assert not stale.exists()
    assert [s["sha256"] for s in rebuilt["shards"]] == [s["sha256"] for s in reference["shards"]]
    assert rebuilt == reference


def test_failed_rebuild_keeps_the_previous_corpus(built, monkeypatch):
    corpus, manifest, _, config = built

    def failing(self, table):
        raise OSError("killed (simulated)")

    monkeypatch.setattr(corpus_mod.PartitionWriter, "_write_row_group", failing)
    with pytest.raises(OSError):
        build_corpus(config, progress=False, gene_table=reference_genes())
    assert json.loads((corpus / schema.MANIFEST_FILE).read_text()) == manifest
    assert validate_corpus(corpus) == []


def test_validate_catches_corrupted_and_missing_shards(built):
    corpus, manifest, _, _ = built
    first, second = (corpus / s["path"] for s in manifest["shards"][:2])
    data = bytearray(first.read_bytes())
    data[len(data) // 2] ^= 0xFF
    first.write_bytes(bytes(data))
    second.unlink()
    problems = validate_corpus(corpus)
    assert any(str(first) in p and "sha256" in p for p in problems)
    assert any(str(second) in p and "missing" in p for p in problems)
    assert any("n_samples" in p for p in problems)


def test_validate_catches_bad_content_even_with_a_matching_manifest(built):
    corpus, manifest, _, _ = built
    entry = next(s for s in manifest["shards"] if "split=train/dataset=alpha" in s["path"])
    shard = corpus / entry["path"]
    table = pq.read_table(shard, schema=schema.SAMPLE_SCHEMA)
    rows = table.to_pylist()
    rows[0]["gene_idx"] = rows[0]["gene_idx"][::-1] if len(rows[0]["gene_idx"]) > 1 else [0, 0]
    rows[0]["counts"] = rows[0]["counts"][::-1] if len(rows[0]["counts"]) > 1 else [1.0, 1.0]
    rows[1]["sample_id"] = rows[0]["sample_id"]
    rows[1]["split"] = "val"
    pq.write_table(pa.Table.from_pylist(rows, schema=schema.SAMPLE_SCHEMA), shard)
    # Re-sign the manifest so that only the content checks can notice.
    entry.update(bytes=shard.stat().st_size, sha256=corpus_mod.file_digest(shard))
    (corpus / schema.MANIFEST_FILE).write_text(json.dumps(manifest))
    problems = validate_corpus(corpus)
    assert any("not sorted and unique" in p for p in problems)
    assert any("split column differs" in p for p in problems)
    assert any("sample_id(s) occur more than once" in p for p in problems)


def test_validate_reports_missing_corpus_files(tmp_path):
    assert validate_corpus(tmp_path / "nope") == [f"{tmp_path / 'nope'}: not a corpus directory"]
    (tmp_path / "empty").mkdir()
    problems = validate_corpus(tmp_path / "empty")
    assert any(schema.GENES_FILE in p for p in problems) and any(schema.MANIFEST_FILE in p for p in problems)


def test_missing_or_inconsistent_intermediates_give_one_line_errors(tmp_path, small_layout):
    config, _ = write_intermediates(tmp_path)
    work = Path(config["work_dir"])
    (work / "dedup" / "removed.parquet").rename(work / "dedup" / "moved.parquet")
    with pytest.raises(CurationError, match=r"removed.parquet: missing; run `python -m curation dedup`"):
        build_corpus(config, progress=False, gene_table=reference_genes())
    (work / "dedup" / "moved.parquet").rename(work / "dedup" / "removed.parquet")

    report_path = work / "curated" / "alpha" / "report.json"
    report = json.loads(report_path.read_text())
    report["panel"] = report["panel"][:-3]  # samples now hold genes outside the declared panel
    report_path.write_text(json.dumps(report))
    with pytest.raises(CurationError, match="outside the dataset's panel") as err:
        build_corpus(config, progress=False, gene_table=reference_genes())
    assert "\n" not in str(err.value)
    assert not Path(config["corpus_dir"]).exists()


def test_remap_gene_idx_handles_sliced_lists():
    column = pa.array([[1, 4], [2], [], [4, 9]], pa.list_(pa.int32())).slice(1, 3)
    lookup = np.full(10, -1)
    lookup[[2, 4, 9]] = [0, 1, 2]
    remapped, ok = remap_gene_idx(column, lookup)
    assert ok and remapped.to_pylist() == [[0], [], [1, 2]]
    _, ok = remap_gene_idx(pa.array([[3]], pa.list_(pa.int32())), lookup)
    assert not ok


def test_validate_requires_exact_library_sizes(built):
    """library_size must equal the float64 sum of counts exactly (it used to pass within rtol 1e-4)."""
    corpus, manifest, _, _ = built
    entry = next(s for s in manifest["shards"] if "split=train/dataset=alpha" in s["path"])
    shard = corpus / entry["path"]
    rows = pq.read_table(shard, schema=schema.SAMPLE_SCHEMA).to_pylist()
    for row, error in ((rows[0], 0.0), (rows[1], 1.0)):  # row 0 exact, row 1 off by one read in ~17M
        row["counts"] = [16_777_216.0] + [1.0] * (len(row["counts"]) - 1)
        row["library_size"] = 16_777_216.0 + len(row["counts"]) - 1 + error
    pq.write_table(pa.Table.from_pylist(rows, schema=schema.SAMPLE_SCHEMA), shard)
    entry.update(bytes=shard.stat().st_size, sha256=corpus_mod.file_digest(shard))
    (corpus / schema.MANIFEST_FILE).write_text(json.dumps(manifest))
    problems = [p for p in validate_corpus(corpus) if "library_size" in p]
    assert len(problems) == 1 and "library_size != sum(counts)" in problems[0], problems
