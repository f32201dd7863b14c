"""End to end: ``python -m simulation demo`` on the simulated sources recovers what the simulation planted."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import polars as pl
import pytest

from curation import schema
from simulation.__main__ import main
from curation.corpus import validate_corpus


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, dict, pd.DataFrame]:
    out = tmp_path_factory.mktemp("demo")
    assert main(["--quiet", "demo", "--out", str(out), "--seed", "0", "--scale", "1"]) == 0
    truth = json.loads((out / "raw" / "truth.json").read_text())
    samples = (pl.scan_parquet(f"{out}/corpus/shards/**/*.parquet", hive_partitioning=True)
               .select("sample_id", "dataset", "batch", "split", "perturbation").collect().to_pandas())
    return out, truth, samples


@pytest.mark.slow
def test_demo_builds_a_valid_corpus_with_every_dataset(demo):
    out, truth, samples = demo
    corpus = out / "corpus"
    assert validate_corpus(corpus) == []
    manifest = json.loads((corpus / schema.MANIFEST_FILE).read_text())
    assert set(manifest["datasets"]) == set(truth["datasets"])
    assert len(samples) == manifest["n_samples"] == samples["sample_id"].nunique()
    assert (samples.groupby(["dataset", "batch"])["split"].nunique() == 1).all()
    card = (corpus / schema.DATACARD_FILE).read_text()
    assert all(f"| {name} |" in card for name in truth["datasets"])


@pytest.mark.slow
def test_demo_removes_planted_duplicates_and_low_quality_samples(demo):
    out, truth, samples = demo
    in_corpus = set(samples["sample_id"])
    removed = pd.read_parquet(out / "work" / "dedup" / "removed.parquet")
    assert ({(r.sample_id, r.reason, r.duplicate_of) for r in removed.itertuples()}
            == {(e["sample_id"], e["reason"], e["duplicate_of"]) for e in truth["expected_removed_by_dedup"]})
    pruned = set()
    for name in truth["datasets"]:
        path = out / "work" / "curated" / name / "phenoprint.parquet"
        if path.is_file():
            pruned |= set(pd.read_parquet(path)["sample_id"])
    for entry in truth["expected_removed_by_dedup"]:
        assert entry["sample_id"] not in in_corpus
        # The kept copy stays unless phenoprint pruned it for its own (unrelated) reason.
        assert entry["duplicate_of"] in in_corpus or entry["duplicate_of"] in pruned

    low_quality = {s for ids in truth["low_quality"].values() for s in ids}
    invalid = {s for ids in truth["invalid_values"].values() for s in ids}
    qc_dropped = {s for report in truth["expected_removed_by_qc"].values()
                  for ids in report["dropped"].values() for s in ids}
    assert low_quality and invalid and qc_dropped
    assert not (low_quality | invalid | qc_dropped) & in_corpus


@pytest.mark.slow
def test_demo_keeps_controls_and_real_perturbations_over_null_ones(demo):
    out, truth, samples = demo
    screen = samples[samples["dataset"] == "sim_screen"]
    scores = json.loads((out / "work" / "curated" / "sim_screen" / "phenoprint.json").read_text())
    kept = {p["perturbation"] for p in scores["perturbations"] if p["kept"]}
    # The corpus holds exactly the controls and the perturbations phenoprint kept.
    assert set(screen["perturbation"].dropna()) == kept | {truth["control_label"]}
    real = {p["perturbation"] for p in truth["real_perturbations"]}
    null = set(truth["null_perturbations"])
    # Every planted real perturbation survives; at p < 0.1 about 10 % of null ones pass by chance.
    assert kept & real == real
    assert len(kept & null) <= 0.3 * len(null)
