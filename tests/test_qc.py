"""QC on CSR chunks equals an independent dense numpy computation."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from curation.io import CurationError
from curation.qc import DROP_REASONS, GeneDetectionCounter, QCConfig, QCTally, cell_pass_mask, invalid_rows


def random_counts(seed: int, n_samples: int = 60, n_genes: int = 40) -> np.ndarray:
    """Sparse-ish integer counts with planted bad rows: NaN, +inf, -inf, negative, and NaN + negative."""
    rng = np.random.default_rng(seed)
    dense = rng.poisson(0.8, size=(n_samples, n_genes)).astype(np.float32)
    dense[rng.random(dense.shape) < 0.4] = 0
    dense[2, 5] = np.nan
    dense[7, 0] = np.inf
    dense[11, 3] = -np.inf
    dense[13, 9] = -2
    dense[17, [1, 2]] = [np.nan, -1]
    dense[19] = 0
    return dense


def dense_qc(dense: np.ndarray, qc: QCConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reference implementation, row by row: (reasons, passed mask, gene detection over passing rows)."""
    reasons = []
    for row in dense:
        if not np.all(np.isfinite(row)):
            reasons.append("non_finite")
        elif np.any(row < 0):
            reasons.append("negative")
        elif np.count_nonzero(row) < qc.min_genes_per_cell:
            reasons.append("low_genes")
        elif row.sum() < qc.min_library_size:
            reasons.append("low_library")
        else:
            reasons.append("")
    reasons = np.array(reasons)
    passed = reasons == ""
    return reasons, passed, (dense[passed] > 0).sum(axis=0)


@pytest.mark.parametrize("seed, qc", [
    (0, QCConfig(min_genes_per_cell=15, min_cells_per_gene=20, min_library_size=0)),
    (1, QCConfig(min_genes_per_cell=10, min_cells_per_gene=5, min_library_size=25)),
    (2, QCConfig(min_genes_per_cell=0, min_cells_per_gene=0, min_library_size=0)),
])
def test_cell_and_gene_filters_equal_dense_reference(seed, qc):
    dense = random_counts(seed)
    expected_reasons, expected_pass, expected_detected = dense_qc(dense, qc)
    assert set(expected_reasons) >= {"", "non_finite", "negative"}

    counter = GeneDetectionCounter(dense.shape[1])
    tally = QCTally()
    reasons_all = []
    for start, stop in [(0, 1), (1, 8), (8, 33), (33, 60)]:  # uneven chunks
        chunk = sp.csr_matrix(dense[start:stop])
        mask, reasons = cell_pass_mask(chunk, qc)
        counter.update(chunk, mask)
        tally.add(reasons)
        reasons_all.append(reasons)
        np.testing.assert_array_equal(mask, expected_pass[start:stop])
    np.testing.assert_array_equal(np.concatenate(reasons_all), expected_reasons)
    np.testing.assert_array_equal(counter.detected, expected_detected)
    np.testing.assert_array_equal(counter.kept(qc.min_cells_per_gene), expected_detected >= qc.min_cells_per_gene)
    assert counter.n_samples == expected_pass.sum() == tally.n_passed
    assert tally.n_input == len(dense)
    assert tally.dropped() == {r: int((expected_reasons == r).sum()) for r in DROP_REASONS}


def test_invalid_values_checked_on_raw_matrix():
    raw = sp.csr_matrix(np.array([[1, np.nan, 3], [1, 2, 3], [-1, 5, 5]], dtype=np.float32))
    harmonised = sp.csr_matrix(np.array([[1, 3], [1, 3], [5, 5]], dtype=np.float32))  # bad column unmapped
    qc = QCConfig(min_genes_per_cell=1, min_cells_per_gene=0, min_library_size=0)
    mask, reasons = cell_pass_mask(harmonised, qc, raw=raw)
    assert mask.tolist() == [False, True, False]
    assert reasons.tolist() == ["non_finite", "", "negative"]
    assert [m.tolist() for m in invalid_rows(raw)] == [[True, False, False], [False, False, True]]
    with pytest.raises(ValueError, match="rows"):
        cell_pass_mask(harmonised, qc, raw=raw[:2])


def test_counter_rejects_wrong_width():
    with pytest.raises(ValueError, match="genes"):
        GeneDetectionCounter(3).update(sp.csr_matrix(np.ones((2, 4), dtype=np.float32)))


def test_config_defaults_and_overrides():
    assert QCConfig.for_modality("single_cell") == QCConfig(2000, 1000, 0.0)
    assert QCConfig.for_modality("bulk") == QCConfig(0, 0, 0.0)
    assert QCConfig.for_modality("bulk", {"min_library_size": 1e6, "min_genes_per_cell": None}) == QCConfig(0, 0, 1e6)
    with pytest.raises(CurationError, match="unknown QC setting 'min_reads'"):
        QCConfig.for_modality("bulk", {"min_reads": 3})
    with pytest.raises(CurationError, match=r"datasets.x.qc.min_cells_per_gene: expected a number ≥ 0"):
        QCConfig.for_modality("single_cell", {"min_cells_per_gene": -1}, where="datasets.x.qc")
    with pytest.raises(CurationError, match="whole number"):
        QCConfig.for_modality("single_cell", {"min_genes_per_cell": 2.5})
    with pytest.raises(CurationError, match="unknown modality"):
        QCConfig.for_modality("spatial")
