"""Phenoprint: the consistency statistic against explicit loops, and pruning of a simulated Perturb-seq screen."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.io import CurationError
from curation.phenoprint import _Reservoir, null_draw_indices, perturbation_consistency, run_phenoprint
from curation.schema import SAMPLE_SCHEMA, content_hash


def _cosine_mean_pairs(x: np.ndarray) -> float:
    """Mean cosine similarity over all unordered pairs, by an explicit double loop."""
    total, pairs = 0.0, 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            total += float(x[i] @ x[j]) / (np.linalg.norm(x[i]) * np.linalg.norm(x[j]))
            pairs += 1
    return total / pairs


def _chunked(emb: np.ndarray, labels: np.ndarray, size: int):
    for start in range(0, len(emb), size):
        yield emb[start:start + size], labels[start:start + size]


def test_consistency_and_p_value_equal_explicit_loops():
    rng = np.random.default_rng(1)
    labels = np.array(["A"] * 6 + ["B"] * 4 + ["C"] * 6 + ["D"] + [None] * 5, dtype=object)
    rng.shuffle(labels)
    emb = rng.normal(size=(len(labels), 5))
    emb[labels == "A"] += 2.0  # A is consistent, the others are not
    n_null, seed = 200, 3
    table = perturbation_consistency(_chunked(emb, labels, 7), n_null=n_null, seed=seed, reservoir=1000)
    table = table.set_index("perturbation")
    assert list(table.index) == ["A", "B", "C", "D"]
    assert table.loc["D", "n_cells"] == 1 and np.isnan(table.loc["D", "consistency"])
    for label in ["A", "B", "C"]:
        cells = emb[labels == label]
        observed = _cosine_mean_pairs(cells)
        assert table.loc[label, "n_cells"] == len(cells)
        assert table.loc[label, "consistency"] == pytest.approx(observed, abs=1e-12)
        # The pool holds every cell in arrival order (reservoir > n); null sets are the documented draws.
        draws = null_draw_indices(len(emb), len(cells), n_null, seed)
        assert draws.shape == (n_null, len(cells))
        null = np.array([_cosine_mean_pairs(emb[d]) for d in draws])
        assert table.loc[label, "null_mean"] == pytest.approx(null.mean(), abs=1e-12)
        assert table.loc[label, "p_value"] == (1 + np.sum(null >= observed)) / (1 + n_null)
    assert table.loc["A", "p_value"] == pytest.approx(1 / (1 + n_null))


def test_result_does_not_depend_on_chunking():
    rng = np.random.default_rng(2)
    labels = rng.choice(["p1", "p2", "p3"], size=60).astype(object)
    emb = rng.normal(size=(60, 4))
    one = perturbation_consistency([(emb, labels)], n_null=50, reservoir=100)
    many = perturbation_consistency(_chunked(emb, labels, 9), n_null=50, reservoir=100)
    pd.testing.assert_frame_equal(one, many)


def test_reservoir_is_a_uniform_sample_of_distinct_rows():
    rows = np.arange(5000, dtype=np.float64)[:, None]
    hits = np.zeros(5000)
    for seed in range(40):
        pool = _Reservoir(500, np.random.default_rng(seed))
        for start in range(0, 5000, 333):
            pool.add(rows[start:start + 333])
        sample = pool.sample()[:, 0]
        assert sample.shape == (500,) and np.unique(sample).size == 500
        hits[sample.astype(int)] += 1
    # Each row is kept with probability 0.1: the first and last fifths of the stream are kept alike.
    assert hits[:1000].mean() == pytest.approx(4.0, rel=0.15)
    assert hits[-1000:].mean() == pytest.approx(4.0, rel=0.15)


def test_bad_embeddings_are_rejected():
    with pytest.raises(ValueError, match="zero-norm"):
        perturbation_consistency([(np.zeros((3, 2)), np.array(["a", "a", "a"]))])
    with pytest.raises(ValueError, match="dimension changed"):
        perturbation_consistency([(np.ones((2, 2)), np.array(["a", "a"])), (np.ones((2, 3)), np.array(["a", "a"]))])


# ------------------------------------------------------------------------------- simulated screen

N_GENES, N_MODULES, MODULE_SIZE = 300, 6, 30
PANEL = np.arange(1000, 1000 + N_GENES)  # reference indices of the measured genes


def simulate_screen(tmp_path: Path, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """Write a small Perturb-seq screen (NB counts, co-varying gene modules, two batches) as a curated dataset.

    Returns the real (module-shifting) and null (no-effect) perturbation names.
    """
    base = rng.lognormal(mean=1.5, sigma=0.8, size=N_GENES)  # mean counts per gene
    real = [f"REAL{i}" for i in range(10)]
    null = [f"NULL{i}" for i in range(40)]
    effect = {p: (i % N_MODULES, 1.5 if i % 2 == 0 else -1.5) for i, p in enumerate(real)}
    cells = [("non-targeting", None)] * 400
    for p in real + null:
        cells += [(p, effect.get(p))] * int(rng.integers(12, 21))
    batch_shift = rng.normal(0, 0.3, size=(2, N_GENES))  # multiplicative batch effect (log scale)
    rows = []
    for i in rng.permutation(len(cells)):
        perturbation, eff = cells[i]
        batch = int(rng.integers(0, 2))
        log_mu = np.log(base) + batch_shift[batch]
        activity = rng.normal(0, 0.4, size=N_MODULES)  # modules co-vary in every cell, controls included
        if eff is not None:
            activity[eff[0]] += eff[1]
        log_mu[:N_MODULES * MODULE_SIZE] += np.repeat(activity, MODULE_SIZE)
        mu = np.exp(log_mu) * rng.lognormal(0, 0.2)  # cell library size factor
        dispersion = 5.0
        counts = rng.negative_binomial(dispersion, dispersion / (dispersion + mu)).astype(np.float32)
        nz = np.flatnonzero(counts)
        idx, vals = PANEL[nz].astype(np.int32), counts[nz]
        rows.append({
            "sample_id": f"screen:cell{i:05d}", "dataset": "screen", "batch": f"gem{batch}", "split": "",
            "modality": "single_cell", "perturbation": perturbation, "cell_type": "K562", "tissue": None,
            "source_accession": f"screen:cell{i:05d}", "gene_idx": idx.tolist(), "counts": vals.tolist(),
            "library_size": float(vals.sum()), "n_genes_detected": len(idx), "content_hash": content_hash(idx, vals),
        })
    out = tmp_path / "curated" / "screen"
    out.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA), out / "samples.parquet", row_group_size=256)
    (out / "report.json").write_text(json.dumps({"panel": PANEL.tolist()}))
    return real, null


SPEC = {"control_label": "non-targeting",
        "phenoprint": {"enabled": True, "p_threshold": 0.1, "n_null": 1000, "n_components": 10}}


def test_simulated_screen_keeps_real_and_prunes_null_perturbations(tmp_path):
    real, null = simulate_screen(tmp_path, np.random.default_rng(0))
    # The test is calibrated: a no-effect perturbation passes p < t with probability ~t, so at the config
    # default t = 0.1 about 10 % of null perturbations are kept by design. t = 0.02 makes "prune >= 90 %"
    # a robust check, while real effects reach the smallest possible p, 1 / (1 + n_null).
    spec = {**SPEC, "phenoprint": {**SPEC["phenoprint"], "p_threshold": 0.02}}
    summary = run_phenoprint("screen", spec, tmp_path, seed=0, progress=False)
    out = tmp_path / "curated" / "screen"
    scores = pd.DataFrame(summary["perturbations"]).set_index("perturbation")
    kept = set(scores.index[scores["kept"]])
    assert set(real) <= kept
    assert len(set(null) - kept) >= 0.9 * len(null)
    assert (scores.loc[real, "p_value"] == 1 / 1001).all()
    null_p = scores.loc[null, "p_value"]
    assert 0.35 <= null_p.mean() <= 0.65  # roughly uniform under the null: neither blind nor trigger-happy

    pruned = pq.read_table(out / "phenoprint.parquet").to_pandas()
    samples = pq.read_table(out / "samples.parquet", columns=["sample_id", "perturbation"]).to_pandas()
    expected = samples[~samples["perturbation"].isin(kept | {"non-targeting"})]
    assert sorted(pruned["sample_id"]) == sorted(expected["sample_id"])
    assert set(pruned["reason"]) == {"phenoprint"}
    assert not pruned["perturbation"].isin(real + ["non-targeting"]).any()
    assert json.loads((out / "phenoprint.json").read_text()) == summary
    assert summary["n_cells"] == len(samples) and summary["n_cells_pruned"] == len(pruned)
    assert summary["n_control_cells"] == 400


def test_custom_embedding_hook_and_disabled_mode(tmp_path):
    simulate_screen(tmp_path, np.random.default_rng(1))
    seen_shapes = []

    def embed_fn(counts, panel, obs):
        seen_shapes.append((counts.shape, len(panel), list(obs.columns)))
        return np.log1p(counts.toarray()) + 1e-3  # any embedding works; +1e-3 avoids zero-norm rows

    summary = run_phenoprint("screen", SPEC, tmp_path, embed_fn=embed_fn, progress=False)
    assert summary["embedding"] == "custom"
    assert all(shape[1] == N_GENES and n == N_GENES for shape, n, _ in seen_shapes)
    assert seen_shapes[0][2] == ["sample_id", "batch", "perturbation"]

    off = run_phenoprint("screen", {"control_label": "non-targeting"}, tmp_path, progress=False)
    assert off == {"dataset": "screen", "enabled": False}
    assert pq.read_table(tmp_path / "curated" / "screen" / "phenoprint.parquet").num_rows == 0


def test_missing_controls_is_a_one_line_error(tmp_path):
    simulate_screen(tmp_path, np.random.default_rng(2))
    spec = {**SPEC, "control_label": "no-such-control"}
    with pytest.raises(CurationError, match=r"samples\.parquet: phenoprint needs control cells; found 0"):
        run_phenoprint("screen", spec, tmp_path, progress=False)
